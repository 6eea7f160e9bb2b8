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


# --- EyeLink ASC ---------------------------------------------------------------------------------------------------

def test_eyelink_asc(tables):
    result = read("P01.asc", "eyelink_asc", tables)
    # trial 1: IMGLOAD CENTER 960 540 600 750 → image from (660, 165) at ×1.5; face_a is the photo ×0.5; SYNCTIME
    # at 2100160 − 10 ms offset = 2100150
    a = 4 / 3  # photo px per screen px
    # trial 2: IMGLOAD TOP_LEFT 700 200 at the stimulus's own 400×500; face_b_crop is img_b's box (100, 50, 200, 250)
    # trial 3: IMGLOAD FILL over DISPLAY_COORDS 0 0 1919 1079 (1920×1080); no SYNCTIME: times from TRIALID
    fill = PPD_ALL * math.sqrt(800 / 1920 * 1000 / 1080)
    want = expected([
        ("P01", "1", "face_a.png", "img_a", 0, -28.0, 180.0, (958.2 - 660) * a, (538.7 - 165) * a, PPD_ALL * a, "R",
         27),
        ("P01", "1", "face_a.png", "img_a", 1, 192.0, 260.0, 600.0, (412 - 165) * a, PPD_ALL * a, "R", 32),
        ("P01", "1", "face_a.png", "img_a", 2, 552.0, 250.0, (810.5 - 660) * a, 720.0, PPD_ALL * a, "R", 37),
        ("P01", "2", "face_b_crop.jpg", "img_b", 0, -10.0, 192.0, 202.5, 175.0, PPD_ALL * 0.5, "R", 45),
        ("P01", "2", "face_b_crop.jpg", "img_b", 1, 212.0, 250.0, 250.0, 250.0, PPD_ALL * 0.5, "R", 49),
        ("P01", "3", "face_a.png", "img_a", 0, 30.0, 272.0, 400.0, 250.0, fill, "R", 56),
        ("P01", "3", "face_a.png", "img_a", 1, 302.0, 200.0, 200.0, 750.0, fill, "R", 59),
    ], "eyelink_asc", "P01.asc")
    assert_frame_equal(result.fixations, want, rtol=1e-12)
    assert result.problems.empty


def test_eyelink_asc_broken(tables):
    result = read("P01_broken.asc", "eyelink_asc", tables, participant="P01")
    got = problems(result)
    assert [line for line, _ in got] == [7, 14, 15, 16, 20, 21, 24, 28, 29, 30]
    reasons = dict(got)
    assert reasons[7] == "EFIX outside a trial (before any TRIALID or after TRIAL_RESULT)"
    assert reasons[14].startswith("MSG line without a time")
    assert reasons[15].startswith("malformed EFIX event") and "'.'" not in reasons[16]
    assert "'SCALE' is not one the Data Viewer manual documents" in reasons[20]
    assert reasons[21].startswith("its image cannot be placed: line 20")
    assert reasons[24] == "trial '3' (line 23) has no !V IMGLOAD message"
    assert reasons[28] == reasons[29] == "stimulus 'unknown.png' is not in the stimulus table"
    assert reasons[30] == "duration -20.0 ms is negative"
    assert result.fixations["line"].tolist() == [13, 17]
    assert result.fixations["participant"].unique().tolist() == ["P01"]
    assert result.fixations["fixation"].tolist() == [0, 1]
    # one eye of a binocular recording
    right = read("P01_broken.asc", "eyelink_asc", tables, participant="P01", eye="R")
    assert 29 not in right.problems["line"].tolist()


# --- EyeLink Data Viewer fixation report ---------------------------------------------------------------------------

def test_eyelink_dataviewer(tables):
    result = read("dataviewer_fixations.txt", "eyelink_dataviewer", tables)
    a = 4 / 3  # display.csv: the 400×500 stimulus at 600×750 on screen; face_a is the photo ×0.5
    want = expected([
        ("P01", "1", "face_a.png", "img_a", 0, 0.0, 181.0, (958.2 - 660) * a, (538.7 - 165) * a, PPD_ALL * a, "R", 2),
        ("P01", "1", "face_a.png", "img_a", 1, 230.0, 261.0, 600.0, (412 - 165) * a, PPD_ALL * a, "R", 3),
        # decimal commas (960,0 540,0); face_b_crop is img_b's box (100, 50, 200, 250) at 400×500
        ("P01", "2", "face_b_crop.jpg", "img_b", 0, 12.0, 300.0, 200.0, 175.0, PPD_ALL * SCALE_B, "R", 4),
        # P02's display row: image at (340, 137)
        ("P02", "1", "face_a.png", "img_a", 0, 15.0, 201.0, 400.0, 500.0, PPD_P02 * a, "L", 5),
    ], "eyelink_dataviewer", "dataviewer_fixations.txt")
    assert_frame_equal(result.fixations, want, rtol=1e-12)
    assert result.problems.empty
    renamed = read("dataviewer_fixations.txt", "eyelink_dataviewer", tables, stimulus_column="image",
                   participant="P02")
    x = renamed.fixations.set_index("line")["x"]  # everyone read as P02: P02's display row places the image
    assert x[2] == pytest.approx((958.2 - 340) * a, rel=1e-12) and x[5] == pytest.approx(400.0, rel=1e-12)


def test_eyelink_dataviewer_broken(tables):
    result = read("dataviewer_fixations_broken.txt", "eyelink_dataviewer", tables)
    assert problems(result) == [
        (3, "CURRENT_FIX_X = '.' is not a number; CURRENT_FIX_Y = '.' is not a number"),
        (4, "CURRENT_FIX_DURATION = 'long' is not a number"),
        (5, "eye 'UP' is not L, R or B"),
        (6, "stimulus 'fixation_cross.png' is not in the stimulus table"),
    ]
    assert result.fixations["line"].tolist() == [2, 7]
    stimuli, display = tables
    no_rect = display.assign(image_left_px=np.nan)
    with pytest.raises(InputError, match="no image rectangle"):
        read_fixations(DATA / "dataviewer_fixations.txt", "eyelink_dataviewer", stimuli=stimuli, display=no_rect,
                       photo_sizes=PHOTO_SIZES)
    with pytest.raises(InputError, match="no row for participant 'P01'"):
        read_fixations(DATA / "dataviewer_fixations.txt", "eyelink_dataviewer", stimuli=stimuli,
                       display=display.iloc[1:], photo_sizes=PHOTO_SIZES)


# --- Tobii Pro Lab -------------------------------------------------------------------------------------------------

def test_tobii_tsv(tables):
    """Swedish-locale export: decimal commas, μs timestamps without a unit in the header, one row per sample."""
    result = read("tobii_prolab.tsv", "tobii_tsv", tables)
    a = 4 / 3  # Presented Media width/height 600×750 for the 400×500 stimuli
    want = expected([
        # MCSnorm (0.5, 0.4) of face_a (400×500, the 800×1000 photo): three samples, one fixation
        ("P01", "Recording1/1", "face_a.png", "img_a", 0, 8.333, 250.0, 400.0, 400.0, PPD_ALL * a, "", 6),
        ("P01", "Recording1/1", "face_a.png", "img_a", 1, 50.0, 183.0, 200.0, 750.0, PPD_ALL * a, "", 11),
        ("P01", "Recording1/1", "face_a.png", "img_a", 2, 75.0, 100.0, 480.0, 300.0, PPD_ALL * a, "", 14),
        ("P01", "Recording1/2", "face_b_crop.jpg", "img_b", 0, 8.333, 300.0, 200.0, 175.0, PPD_ALL * SCALE_B, "",
         19),
    ], "tobii_tsv", "tobii_prolab.tsv")
    assert_frame_equal(result.fixations, want, rtol=1e-12)
    assert result.problems.empty
    as_ms = read("tobii_prolab.tsv", "tobii_tsv", tables, timestamp_unit="ms")
    assert as_ms.fixations["start_ms"].tolist() == [8333.0, 50000.0, 75000.0, 8333.0]


def test_tobii_tsv_broken(tables):
    """Newer headers (units in brackets, "[MCS norm]"), decimal points, broken fixations."""
    result = read("tobii_prolab_broken.tsv", "tobii_tsv", tables)
    assert problems(result) == [
        (3, "stimulus 'instructions.png' is not in the stimulus table"),
        (8, "Fixation point X [MCS norm] = '' is not a number; Fixation point Y [MCS norm] = '' is not a number"),
        (11, "Gaze event duration [ms] = 'abc' is not a number"),
        (12, "Eye movement type index = '' is not a number"),
    ]
    want = expected([
        ("P03", "Rec 7/2", "face_a.png", "img_a", 0, 8.333, 250.0, 400.0, 400.0, np.nan, "", 6),
        ("P03", "Rec 7/2", "face_a.png", "img_a", 1, 66.667, 150.0, 480.0, 300.0, np.nan, "", 13),
    ], "tobii_tsv", "tobii_prolab_broken.tsv")
    stimuli, _ = tables
    alone = read_fixations(DATA / "tobii_prolab_broken.tsv", "tobii_tsv", stimuli=stimuli, photo_sizes=PHOTO_SIZES)
    assert_frame_equal(alone.fixations, want, rtol=1e-12)
    assert_frame_equal(result.fixations.drop(columns="photo_px_per_degree"),
                       want.drop(columns="photo_px_per_degree"), rtol=1e-12)


# --- Pupil Core ----------------------------------------------------------------------------------------------------

def test_pupil_core(tables):
    path = "pupil/P01/exports/000/surfaces/fixations_on_surface_face_a.csv"
    result = read(path, "pupil_core", tables, trial_start_s=5203.2)
    a = 4 / 3
    want = expected([
        # four world frames of fixation 12, norm x 0.5/0.52/0.48/0.5 → mean 0.5; y flipped: (1 − 0.6)·500·2
        ("P01", "face_a", "face_a.png", "img_a", 0, (5203.4512 - 5203.2) * 1e3, 220.5, 400.0, 400.0, PPD_ALL * a,
         "", 2),
        # fixation 13: only its on-surface frame counts
        ("P01", "face_a", "face_a.png", "img_a", 1, (5203.7100 - 5203.2) * 1e3, 140.0, 200.0, 750.0, PPD_ALL * a,
         "", 7),
        # fixation 14 never on the surface: not on the stimulus, skipped
        ("P01", "face_a", "face_a.png", "img_a", 2, (5204.2700 - 5203.2) * 1e3, 180.25, 600.0, 100.0, PPD_ALL * a,
         "", 10),
    ], "pupil_core", "fixations_on_surface_face_a.csv")
    assert_frame_equal(result.fixations, want, rtol=1e-12)
    assert result.problems.empty


def test_pupil_core_broken(tables):
    result = read("fixations_on_surface_face_b_crop_broken.csv", "pupil_core", tables, participant="P09",
                  stimulus="face_b_crop.jpg", trial="t1")
    assert problems(result) == [
        (4, "norm_pos_x = 'abc' is not a number"),
        (6, "duration -310.0 ms is negative"),
        (7, "on_surf 'maybe' is not True or False"),
        (8, "duration = '' is not a number; norm_pos_x = '' is not a number; norm_pos_y = '' is not a number"),
    ]
    # face_b_crop: stimulus px ×0.5 + (100, 50) in img_b
    want = expected([
        ("P09", "t1", "face_b_crop.jpg", "img_b", 0, 5203.4512 * 1e3, 220.5, 0.51 * 200 + 100, 150.0,
         PPD_ALL * SCALE_B, "", 2),
        ("P09", "t1", "face_b_crop.jpg", "img_b", 1, 5203.7100 * 1e3, 140.0, 150.0, 237.5, PPD_ALL * SCALE_B, "", 5),
        ("P09", "t1", "face_b_crop.jpg", "img_b", 2, 5204.3400 * 1e3, 95.0, 120.0, 275.0, PPD_ALL * SCALE_B, "", 9),
    ], "pupil_core", "fixations_on_surface_face_b_crop_broken.csv")
    assert_frame_equal(result.fixations, want, rtol=1e-12)


def test_files_that_are_not_the_format_raise(tmp_path, tables):
    stimuli, display = tables
    garbage = tmp_path / "P07.asc"
    garbage.write_bytes(b"\x00\x01 this is not an EyeLink file\n")
    with pytest.raises(InputError, match="P07.asc.*no EFIX or MSG lines"):
        read_fixations(garbage, "eyelink_asc", stimuli=stimuli, photo_sizes=PHOTO_SIZES)
    with pytest.raises(InputError, match="generic.csv.*Eye movement type"):
        read_fixations(DATA / "generic.csv", "tobii_tsv", stimuli=stimuli, photo_sizes=PHOTO_SIZES)
    with pytest.raises(InputError, match="generic.csv.*CURRENT_FIX_X"):
        read_fixations(DATA / "generic.csv", "eyelink_dataviewer", stimuli=stimuli, photo_sizes=PHOTO_SIZES)
    with pytest.raises(InputError, match="missing column.*nope"):
        read_fixations(DATA / "dataviewer_fixations.txt", "eyelink_dataviewer", stimuli=stimuli, display=display,
                       photo_sizes=PHOTO_SIZES, stimulus_column="nope")
    unnamed = tmp_path / "report.txt"
    unnamed.write_text((DATA / "dataviewer_fixations.txt").read_text().replace("\timage\t", "\tphoto_file\t", 1))
    with pytest.raises(InputError, match="report.txt: no trial variable naming the image"):
        read_fixations(unnamed, "eyelink_dataviewer", stimuli=stimuli, display=display, photo_sizes=PHOTO_SIZES)
    with pytest.raises(InputError, match="fixations_on_surface_face_a.csv.*on_surf"):
        bad = tmp_path / "fixations_on_surface_face_a.csv"
        bad.write_text("fixation_id,start_timestamp,duration,norm_pos_x,norm_pos_y\n1,2,3,0.5,0.5\n")
        read_fixations(bad, "pupil_core", stimuli=stimuli, photo_sizes=PHOTO_SIZES)


def test_tobii_timestamp_unit_from_header(tmp_path, tables):
    text = (DATA / "tobii_prolab.tsv").read_text().replace("Recording timestamp\t", "Recording timestamp [ms]\t", 1)
    path = tmp_path / "tobii_ms.tsv"
    path.write_text(text)
    stimuli, display = tables
    result = read_fixations(path, "tobii_tsv", stimuli=stimuli, display=display, photo_sizes=PHOTO_SIZES)
    assert result.fixations["start_ms"].tolist() == [8333.0, 50000.0, 75000.0, 8333.0]
