"""Readers of eye-tracker exports: each hand-written sample parses to the exact fixation table; broken rows are
reported with their line numbers while the good rows still come through."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.experiments.eyetracking import formats
from gestalt_xai.experiments.eyetracking.formats import (
    FIXATION_COLUMNS,
    FIXATION_DTYPES,
    READERS,
    display_row,
    pixels_per_degree,
    read_display,
    read_fixations,
    read_stimuli,
    stimulus_to_photo_matrix,
)

DATA = Path(__file__).parent / "data" / "eyetracking"
PHOTO_SIZES = {"img_a": (800, 1000), "img_b": (1200, 900)}
# display.csv: everyone ("*") watches a 1920×1080 px, 531.36×298.89 mm screen from 600 mm with the 400×500 px
# stimulus shown at 600×750 px from (660, 165); P02 a 1280×1024 px, 376.32×301.06 mm screen from 700 mm, image at
# (340, 137), same size
PPD_ALL = 600 * math.tan(math.radians(1)) / math.sqrt(531.36 / 1920 * 298.89 / 1080)
PPD_P02 = 700 * math.tan(math.radians(1)) / math.sqrt(376.32 / 1280 * 301.06 / 1024)
# photo pixels per screen pixel of each stimulus: face_a is the whole 800×1000 photo at 400×500 (×2), shown ×1.5;
# face_b_crop is the 200×250 box at (100, 50) of img_b at 400×500 (×0.5), shown ×1.5
SCALE_A = 2 / 1.5
SCALE_B = 0.5 / 1.5


@pytest.fixture(scope="module")
def tables():
    return read_stimuli(DATA / "stimuli.csv"), read_display(DATA / "display.csv")


def read(name: str, fmt: str, tables, **options):
    stimuli, display = tables
    return read_fixations(DATA / name, fmt, stimuli=stimuli, display=display, photo_sizes=PHOTO_SIZES, **options)


def expected(rows: list[tuple], fmt: str, source: str) -> pd.DataFrame:
    """rows: (participant, trial, stimulus, image_id, fixation, start_ms, duration_ms, x, y, ppd, eye, line)."""
    cols = [c for c in FIXATION_COLUMNS if c not in ("format", "source")]
    df = pd.DataFrame(rows, columns=cols)
    df["format"], df["source"] = fmt, source
    return df.astype(FIXATION_DTYPES)[FIXATION_COLUMNS]


def problems(result) -> list[tuple[int, str]]:
    return list(zip(result.problems["line"].tolist(), result.problems["reason"].tolist(), strict=True))


# --- tables and geometry -------------------------------------------------------------------------------------------

def test_tables_and_geometry(tables):
    stimuli, display = tables
    assert stimuli["stimulus"].tolist() == ["face_a.png", "face_b_crop.jpg"]
    np.testing.assert_array_equal(stimulus_to_photo_matrix(stimuli.iloc[0], (800, 1000)), [[2, 0, 0], [0, 2, 0]])
    np.testing.assert_array_equal(stimulus_to_photo_matrix(stimuli.iloc[1], None), [[0.5, 0, 100], [0, 0.5, 50]])
    assert pixels_per_degree(display_row(display, "P02")) == pytest.approx(PPD_P02, rel=1e-12)
    assert pixels_per_degree(display_row(display, "anyone")) == pytest.approx(PPD_ALL, rel=1e-12)
    # 600 mm · tan 1° / 0.27675 mm ≈ 37.84 px per degree
    assert PPD_ALL == pytest.approx(37.843, abs=1e-3)
    assert display_row(display.iloc[1:], "P01") is None
    with pytest.raises(InputError, match="no row for participant 'P01'.*image rectangle"):
        display_row(display.iloc[1:], "P01", required="the image rectangle")


def test_table_errors(tmp_path):
    bad = tmp_path / "stimuli.csv"
    bad.write_text("stimulus,image_id,width,height,crop_left,crop_top,crop_width,crop_height\n"
                   "a.png,img_a,400,500,1,2,,\n")
    with pytest.raises(InputError, match="line 2: crop box given in part"):
        read_stimuli(bad)
    bad.write_text("stimulus,image_id,width,height\na.png,img_a,400,0\n")
    with pytest.raises(InputError, match="height = '0' is not a positive number"):
        read_stimuli(bad)
    bad.write_text("stimulus,image_id,width,height\nx/a.png,img_a,400,500\na.png,img_b,400,500\n")
    with pytest.raises(InputError, match="'a.png' listed more than once"):
        read_stimuli(bad)
    with pytest.raises(InputError, match="missing column"):
        read_display(bad)


# --- generic CSV ---------------------------------------------------------------------------------------------------

def test_generic_csv(tables):
    result = read("generic.csv", "generic_csv", tables)
    ppd_p02_photo = PPD_P02 * math.sqrt(800 / 600 * 1000 / 750)  # the photo itself shown at 600×750
    want = expected([
        ("P01", "1", "face_a.png", "img_a", 0, 0.0, 250.0, 400.5, 380.0, PPD_ALL * SCALE_A, "R", 2),
        ("P01", "1", "face_a.png", "img_a", 1, 270.0, 180.5, 350.0, 520.0, PPD_ALL * SCALE_A, "R", 3),
        ("P01", "2", "face_b_crop.jpg", "img_b", 0, 10.0, 300.0, 220.0, 190.0, PPD_ALL * SCALE_B, "R", 4),
        ("P02", "1", "img_a", "img_a", 0, 5.0, 200.0, 410.0, 300.0, ppd_p02_photo, "L", 6),
    ], "generic_csv", "generic.csv")
    assert_frame_equal(result.fixations, want, rtol=1e-12)
    assert result.problems.empty


def test_generic_csv_broken(tables):
    result = read("generic_broken.csv", "generic_csv", tables)
    assert problems(result) == [
        (3, "duration -180.5 ms is negative"),
        (4, "duration_ms = 'abc' is not a number"),
        (6, "stimulus 'unknown.png' is not in the stimulus table"),
        (7, "image_id 'img_b' differs from the stimulus table's 'img_a'"),
        (8, "y = '' is not a number"),
        (9, "image 'img_zz' is not among the run's photos"),
        (10, "fixation '1.5' is not a 0-based index"),
        (10, "eye 'X' is not L, R or B"),
    ]
    assert result.fixations["line"].tolist() == [2, 5, 11]
    assert (result.problems["file"] == "generic_broken.csv").all()


def test_generic_csv_without_display_has_nan_ppd(tables):
    stimuli, _ = tables
    result = read_fixations(DATA / "generic.csv", "generic_csv", stimuli=stimuli, photo_sizes=PHOTO_SIZES)
    assert result.fixations["photo_px_per_degree"].isna().all()
    assert len(result.fixations) == 4


# --- dispatch and unreadable files ---------------------------------------------------------------------------------

def test_unreadable_files_name_the_file(tmp_path, tables):
    for fmt in READERS:
        with pytest.raises(InputError, match="nothing_here"):
            read_fixations(tmp_path / "nothing_here.txt", fmt, stimuli=tables[0], display=tables[1],
                           photo_sizes=PHOTO_SIZES)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.csv"):
        read_fixations(empty, "generic_csv", stimuli=tables[0], photo_sizes=PHOTO_SIZES)
    with pytest.raises(ConfigError, match="unknown fixation format"):
        read_fixations(empty, "smi_idf", stimuli=tables[0], photo_sizes=PHOTO_SIZES)
    with pytest.raises(ConfigError, match="no option"):
        read_fixations(empty, "generic_csv", stimuli=tables[0], photo_sizes=PHOTO_SIZES, colour="red")


def test_module_documents_every_format():
    for fmt, reader in READERS.items():
        assert f"``{fmt}``" in formats.__doc__ and reader.__doc__
