"""The two tables that place a stimulus on the screen and in its cohort photo, and the geometry they give.

**Stimulus table** (``stimuli.csv``, :func:`read_stimuli`): one row per stimulus file shown to observers.

========================  ==========================================================================================
column                    meaning
========================  ==========================================================================================
``stimulus``              the file name as shown (a folder part is dropped: recordings name files by their own paths)
``image_id``              the cohort photo the stimulus was made from
``width``, ``height``     the stimulus's own size in pixels
``crop_left``,            optional, all four or none: the stimulus is this box of the photo (photo pixels) resized to
``crop_top``,             ``width × height``. Without them the stimulus is the whole photo, possibly resized: the
``crop_width``,           photo's size comes from the run's alignment table (``photo_width``, ``photo_height``)
``crop_height``           and is passed in by the caller.
========================  ==========================================================================================

**Display table** (``display.csv``, :func:`read_display`): one row per participant (``participant`` = ``*`` for
everyone not listed) with ``screen_width_px, screen_height_px, screen_width_mm, screen_height_mm,
viewing_distance_mm`` and, optionally, the stimulus's rectangle on screen ``image_left_px, image_top_px,
image_width_px, image_height_px`` (formats that carry the placement themselves, such as EyeLink's ``!V IMGLOAD``
message, do not need it).

Coordinates are continuous pixel coordinates measured from the top-left corner of the screen, stimulus or photo
(the corner of the first pixel is 0), as eye trackers report them: a point at ``x`` on a stimulus resized by ``s``
lies at ``s·x``. The screen → image mapping ``x_img = (x_screen − left) · W_native / W_shown`` and the visual angle
of one pixel, ``D·tan(1°) / pitch`` pixels per degree for a viewing distance ``D`` and pixel pitch ``pitch`` (mm),
are the standard ones of eye-movement research (Holmqvist et al., *Eye Tracking: A Comprehensive Guide to Methods
and Measures*, Oxford University Press 2011).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.errors import InputError

STIMULUS_COLUMNS = ["stimulus", "image_id", "width", "height"]
CROP_COLUMNS = ["crop_left", "crop_top", "crop_width", "crop_height"]
DISPLAY_COLUMNS = ["participant", "screen_width_px", "screen_height_px", "screen_width_mm", "screen_height_mm",
                   "viewing_distance_mm"]
IMAGE_RECT_COLUMNS = ["image_left_px", "image_top_px", "image_width_px", "image_height_px"]
EVERYONE = "*"


def base_name(name: str) -> str:
    """The file name of a path written with ``/`` or ``\\`` separators (recordings made on Windows use the latter).

    >>> base_name(r"..\\images\\face 1.jpg"), base_name("../images/face1.jpg"), base_name(" face1.jpg ")
    ('face 1.jpg', 'face1.jpg', 'face1.jpg')
    """
    return str(name).strip().replace("\\", "/").rsplit("/", 1)[-1]


def numbers(values: pd.Series) -> pd.Series:
    """Parse text cells as floats; a decimal comma (``"0,5234"``, Tobii exports in some locales) counts as a point.

    Empty cells, EyeLink's ``.`` for missing data and anything else that is not a number become NaN.

    >>> numbers(pd.Series(["0,5234", "12", ".", "", "x", " 3.5 "])).tolist()
    [0.5234, 12.0, nan, nan, nan, 3.5]
    """
    text = values.astype(str).str.strip().str.replace(",", ".", regex=False)
    return pd.to_numeric(text, errors="coerce").astype(np.float64)


def read_table(path: str | Path, required: list[str], sep: str = ",") -> pd.DataFrame:
    """Read a small configuration table as text; an unreadable file or a missing column raises :class:`InputError`."""
    path = Path(path)
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, OverflowError) as exc:  # ParserError, EmptyDataError, UnicodeDecodeError
        raise InputError(f"{path}: cannot read table: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(df.columns)})")
    return df


def _positive_numbers(path: Path, df: pd.DataFrame, columns: list[str], key: str, allow_missing: bool = False,
                      allow_zero: bool = False) -> None:
    for col in columns:
        values = numbers(df[col])
        blank = df[col].astype(str).str.strip() == ""
        bad = values.isna() & ~(blank & allow_missing)
        bad |= values.notna() & ((values < 0) if allow_zero else (values <= 0))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}: line {i + 2} ({key} {df[key].iloc[i]!r}): {col} = {df[col].iloc[i]!r} is not "
                             f"a {'non-negative' if allow_zero else 'positive'} number")
        df[col] = values


def read_stimuli(path: str | Path) -> pd.DataFrame:
    """Read ``stimuli.csv`` (see the module docstring) into one row per stimulus, sizes and crop boxes as floats.

    Stimulus names are reduced to their file name; a name listed twice, a crop box given in part or a size that is
    not a positive number raises :class:`InputError`.
    """
    path = Path(path)
    df = read_table(path, STIMULUS_COLUMNS)
    df["stimulus"] = df["stimulus"].map(base_name)
    df["image_id"] = df["image_id"].astype(str).str.strip()
    if (df["stimulus"] == "").any() or (df["image_id"] == "").any():
        i = int(np.flatnonzero(((df["stimulus"] == "") | (df["image_id"] == "")).to_numpy())[0])
        raise InputError(f"{path}: line {i + 2}: empty stimulus or image_id")
    repeated = sorted(set(df.loc[df["stimulus"].duplicated(), "stimulus"]))
    if repeated:
        raise InputError(f"{path}: stimulus name(s) {', '.join(map(repr, repeated[:5]))} listed more than once")
    _positive_numbers(path, df, ["width", "height"], "stimulus")
    present = [c for c in CROP_COLUMNS if c in df.columns]
    if present and len(present) < len(CROP_COLUMNS):
        raise InputError(f"{path}: a crop box needs all of {', '.join(CROP_COLUMNS)} (has {', '.join(present)})")
    if present:
        blank = df[CROP_COLUMNS].apply(lambda c: c.astype(str).str.strip() == "")
        partial = blank.any(axis=1) & ~blank.all(axis=1)
        if partial.any():
            i = int(np.flatnonzero(partial.to_numpy())[0])
            raise InputError(f"{path}: line {i + 2}: crop box given in part (all four crop_* values or none)")
        _positive_numbers(path, df, ["crop_left", "crop_top"], "stimulus", allow_missing=True, allow_zero=True)
        _positive_numbers(path, df, ["crop_width", "crop_height"], "stimulus", allow_missing=True)
    else:
        for col in CROP_COLUMNS:
            df[col] = np.nan
    return df[STIMULUS_COLUMNS + CROP_COLUMNS].reset_index(drop=True)


def read_display(path: str | Path) -> pd.DataFrame:
    """Read ``display.csv`` (see the module docstring): sizes and distances as floats, the image rectangle NaN where
    a row leaves it empty. A participant listed twice or a size that is not a positive number raises
    :class:`InputError`."""
    path = Path(path)
    df = read_table(path, DISPLAY_COLUMNS)
    df["participant"] = df["participant"].astype(str).str.strip()
    repeated = sorted(set(df.loc[df["participant"].duplicated(), "participant"]))
    if repeated:
        raise InputError(f"{path}: participant(s) {', '.join(map(repr, repeated[:5]))} listed more than once")
    _positive_numbers(path, df, DISPLAY_COLUMNS[1:], "participant")
    for col in IMAGE_RECT_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    _positive_numbers(path, df, IMAGE_RECT_COLUMNS[:2], "participant", allow_missing=True, allow_zero=True)
    _positive_numbers(path, df, IMAGE_RECT_COLUMNS[2:], "participant", allow_missing=True)
    return df[DISPLAY_COLUMNS + IMAGE_RECT_COLUMNS].reset_index(drop=True)


def display_row(display: pd.DataFrame | None, participant: str, required: str | None = None) -> pd.Series | None:
    """The display-table row of ``participant``, else the ``*`` row, else None.

    ``required`` names what needs the row (e.g. ``"the image rectangle of Data Viewer reports"``): with it, a missing
    row raises :class:`InputError` instead of returning None.

    >>> d = pd.DataFrame({"participant": ["*", "p2"], "viewing_distance_mm": [600.0, 700.0]})
    >>> float(display_row(d, "p2")["viewing_distance_mm"]), float(display_row(d, "p9")["viewing_distance_mm"])
    (700.0, 600.0)
    """
    if display is not None and len(display):
        ids = display["participant"].astype(str)
        for key in (str(participant), EVERYONE):
            hit = np.flatnonzero((ids == key).to_numpy())
            if hit.size:
                return display.iloc[int(hit[0])]
    if required:
        raise InputError(f"display table has no row for participant {participant!r} and no '{EVERYONE}' row, "
                         f"needed for {required}")
    return None


def pixels_per_degree(row: pd.Series | Mapping) -> float:
    """Screen pixels per degree of visual angle, ``D·tan(1°) / pitch``.

    ``pitch`` (mm per pixel) is the geometric mean of the horizontal and vertical pitches (equal on a display with
    square pixels); ``D`` is ``viewing_distance_mm``.

    >>> round(pixels_per_degree({"screen_width_px": 1920, "screen_height_px": 1080, "screen_width_mm": 531.4,
    ...                          "screen_height_mm": 298.9, "viewing_distance_mm": 600}), 3)
    37.841
    """
    pitch_x = float(row["screen_width_mm"]) / float(row["screen_width_px"])
    pitch_y = float(row["screen_height_mm"]) / float(row["screen_height_px"])
    return float(row["viewing_distance_mm"]) * math.tan(math.radians(1.0)) / math.sqrt(pitch_x * pitch_y)


def has_crop(row: pd.Series | Mapping) -> bool:
    """Whether a stimulus-table row carries a crop box."""
    value = row.get("crop_width", np.nan) if hasattr(row, "get") else np.nan
    return value is not None and not pd.isna(value)


def stimulus_to_photo_matrix(row: pd.Series | Mapping, photo_size: tuple[float, float] | None) -> np.ndarray:
    """The 2×3 float64 matrix taking stimulus pixels of a stimulus-table ``row`` to photo pixels.

    With a crop box the stimulus is that box resized to ``width × height``; without one it is the whole photo of
    size ``photo_size = (width, height)`` resized. ``photo_size`` may be None only for a crop box.

    >>> stimulus_to_photo_matrix({"width": 400, "height": 500}, (800, 1000))
    array([[2., 0., 0.],
           [0., 2., 0.]])
    >>> stimulus_to_photo_matrix({"width": 200, "height": 300, "crop_left": 50, "crop_top": 20, "crop_width": 100,
    ...                           "crop_height": 150}, None)
    array([[ 0.5,  0. , 50. ],
           [ 0. ,  0.5, 20. ]])
    """
    w, h = float(row["width"]), float(row["height"])
    if has_crop(row):
        left, top = float(row["crop_left"]), float(row["crop_top"])
        cw, ch = float(row["crop_width"]), float(row["crop_height"])
    else:
        if photo_size is None:
            raise InputError(f"stimulus {row.get('stimulus', '?')!r}: no crop box and no photo size to scale to")
        left, top = 0.0, 0.0
        cw, ch = float(photo_size[0]), float(photo_size[1])
    return np.array([[cw / w, 0.0, left], [0.0, ch / h, top]], dtype=np.float64)
