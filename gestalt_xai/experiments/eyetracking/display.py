"""The tables of the eye-tracking readers and the geometry that takes a fixation from the screen to the photo.

The readers of :mod:`~gestalt_xai.experiments.eyetracking.formats` parse each vendor's export into rows in screen,
stimulus-normalised or photo coordinates; :func:`fixation_table` places them through these tables and assembles the
fixation table (:data:`FIXATION_COLUMNS`), collecting what cannot be placed in :class:`Problems`.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
FIXATION_COLUMNS = ["participant", "trial", "stimulus", "image_id", "fixation", "start_ms", "duration_ms", "x", "y",
                    "photo_px_per_degree", "eye", "format", "source", "line"]
FIXATION_DTYPES = {"participant": str, "trial": str, "stimulus": str, "image_id": str, "fixation": np.int64,
                   "start_ms": np.float64, "duration_ms": np.float64, "x": np.float64, "y": np.float64,
                   "photo_px_per_degree": np.float64, "eye": str, "format": str, "source": str, "line": np.int64}
PROBLEM_COLUMNS = ["file", "line", "reason"]


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


def read_table(path: str | Path, required: list[str] | tuple[str, ...] = (), sep: str = ",",
               usecols: list[str] | None = None) -> pd.DataFrame:
    """Read a delimited table as text cells, without its blank lines; row ``i`` of the index sits on line ``i + 2``.

    A file that cannot be read or lacks a ``required`` column raises :class:`InputError` naming it.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False,
                         encoding="utf-8-sig", usecols=usecols)
    except (OSError, ValueError, OverflowError) as exc:  # ParserError, EmptyDataError, UnicodeDecodeError
        raise InputError(f"{path}: cannot read: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(df.columns)})")
    blank = (df.apply(lambda c: c.str.strip()) == "").all(axis=1)
    return df.loc[~blank]


def _first_line(df: pd.DataFrame, mask: pd.Series) -> int:
    return int(mask[mask].index[0]) + 2


def _positive_numbers(path: Path, df: pd.DataFrame, columns: list[str], key: str, allow_missing: bool = False,
                      allow_zero: bool = False, any_sign: bool = False) -> None:
    for col in columns:
        values = numbers(df[col])
        blank = df[col].astype(str).str.strip() == ""
        bad = values.isna() & ~(blank & allow_missing)
        if not any_sign:
            bad |= values.notna() & ((values < 0) if allow_zero else (values <= 0))
        bad |= values.notna() & ~np.isfinite(values)
        if bad.any():
            i = bad[bad].index[0]
            kind = "finite" if any_sign else "non-negative" if allow_zero else "positive"
            raise InputError(f"{path}: line {i + 2} ({key} {df.at[i, key]!r}): {col} = {df.at[i, col]!r} is not "
                             f"a {kind} number")
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
        line = _first_line(df, (df["stimulus"] == "") | (df["image_id"] == ""))
        raise InputError(f"{path}: line {line}: empty stimulus or image_id")
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
            line = _first_line(df, partial)
            raise InputError(f"{path}: line {line}: crop box given in part (all four crop_* values or none)")
        # a box may reach past the photo's edge (the stimulus was padded, e.g. a square cut around a portrait photo)
        _positive_numbers(path, df, ["crop_left", "crop_top"], "stimulus", allow_missing=True, any_sign=True)
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


# --- from reader rows to the fixation table ------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadResult:
    """What a reader returns: the fixation table and the rows it could not use (``file, line, reason``)."""

    fixations: pd.DataFrame
    problems: pd.DataFrame


class Problems:
    """The problems of one file, collected as (1-based line, reason)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[np.ndarray] = []
        self.reasons: list[np.ndarray] = []

    def add(self, lines, reasons) -> None:
        """Add one problem or several (``reasons`` one string for all, or one per line)."""
        lines = np.atleast_1d(np.asarray(lines, dtype=np.int64))
        self.lines.append(lines)
        self.reasons.append(np.broadcast_to(np.asarray(reasons, dtype=object), lines.shape).copy())

    def frame(self) -> pd.DataFrame:
        lines = np.concatenate(self.lines) if self.lines else np.zeros(0, np.int64)
        reasons = np.concatenate(self.reasons) if self.reasons else np.zeros(0, object)
        df = pd.DataFrame({"file": self.source, "line": lines, "reason": reasons.astype(str)})
        df = df.astype({"file": str, "line": np.int64, "reason": str})
        return df.sort_values("line", kind="stable").reset_index(drop=True)


def parse_columns(df: pd.DataFrame, columns: dict[str, str], problems: Problems, lines: pd.Series,
                  optional: tuple[str, ...] = ()) -> tuple[pd.DataFrame, pd.Series]:
    """Parse the text columns ``{name: column}`` of ``df`` as numbers (see :func:`numbers`).

    Returns the numbers (named by the keys) and the mask of rows whose cells all parsed; each other row becomes one
    problem naming its bad cells. Cells of ``optional`` names may be empty (NaN) but not malformed.
    """
    out = pd.DataFrame(index=df.index)
    reason = pd.Series("", index=df.index, dtype=object)
    for name, col in columns.items():
        text = df[col].astype(str).str.strip()
        values = numbers(text)
        bad = values.isna() & ~((text == "") & (name in optional))
        if bad.any():
            reason[bad] = reason[bad] + "; " + col + " = " + text[bad].map(repr) + " is not a number"
        out[name] = values
    ok = reason == ""
    if not ok.all():
        problems.add(lines[~ok].to_numpy(), reason[~ok].str.slice(2).to_numpy())
    return out, ok


class StimulusLookup:
    """Find stimulus-table rows by the names recordings give: the file name, else its stem when unambiguous
    (Tobii's "Presented Stimulus name" and Pupil surface names usually drop the extension)."""

    def __init__(self, stimuli: pd.DataFrame) -> None:
        self.table = stimuli.set_index("stimulus", drop=False)
        names = pd.Series(self.table.index, dtype=object)
        stems = names.map(lambda n: Path(n).stem)
        unique = stems[~stems.duplicated(keep=False) & ~stems.isin(names)]
        self.keys = {**dict(zip(unique, names[unique.index], strict=True)), **{n: n for n in names}}

    def resolve(self, names: pd.Series) -> pd.Series:
        """The stimulus-table name of each of ``names`` (NaN where none matches)."""
        return names.astype(str).map(base_name).map(self.keys)


def as_table(table, reader: Callable[[str | Path], pd.DataFrame]) -> pd.DataFrame | None:
    """A table given as a DataFrame, a path (read with ``reader``) or None."""
    return table if table is None or isinstance(table, pd.DataFrame) else reader(table)


def fixation_table(raw: pd.DataFrame, problems: Problems, *, fmt: str, stimuli: pd.DataFrame,
                   display: pd.DataFrame | None, photo_sizes: dict, coords: str) -> ReadResult:
    """Place reader rows in photo pixels and assemble the fixation table; unplaceable rows become problems.

    ``raw`` holds participant, trial, stimulus, start_ms, duration_ms, x, y, eye, line and, where the format has
    them, fixation (the vendor's 0-based index; else the rank by start time), image_id (generic CSV), ppd (photo px
    per degree as given), and the stimulus's placement on screen: anchor ("center" or "top_left"), ax, ay,
    shown_w, shown_h (screen px). ``coords`` says what x, y are: "photo" pixels, "screen" pixels (placed by the
    anchor, else by the display table's image rectangle), or "norm" (0–1 of the stimulus, origin top-left).
    A negative duration, a stimulus not in the table, an image_id that contradicts it or an image not in
    ``photo_sizes`` (the run's photos) is a problem.
    """
    defaults = {"fixation": np.nan, "ppd": np.nan, "image_id": "", "shown_w": np.nan, "shown_h": np.nan,
                "anchor": "top_left", "ax": np.nan, "ay": np.nan}
    raw = raw.assign(**{c: v for c, v in defaults.items() if c not in raw.columns})
    lookup = StimulusLookup(stimuli)
    name = raw["stimulus"].astype(str).str.strip()
    raw = raw.assign(stimulus=lookup.resolve(name), given=raw["image_id"].astype(str).str.strip(), name=name)
    raw["image_id"] = raw["stimulus"].map(lookup.table["image_id"]).fillna(raw["given"])
    checks = [  # (bad rows, reason), in order: a row is reported for the first that applies
        (lambda r: r["duration_ms"] < 0, lambda r: "duration " + r["duration_ms"].map(repr) + " ms is negative"),
        (lambda r: r["stimulus"].isna() & ((r["name"] != "") | (coords != "photo")),
         lambda r: "stimulus " + r["name"].map(repr) + " is not in the stimulus table"),
        (lambda r: r["stimulus"].notna() & (r["given"] != "") & (r["given"] != r["image_id"]),
         lambda r: "image_id " + r["given"].map(repr) + " differs from the stimulus table's "
         + r["image_id"].map(repr)),
        (lambda r: r["image_id"] == "", lambda r: pd.Series("no image_id or stimulus", index=r.index)),
        (lambda r: ~r["image_id"].isin(list(photo_sizes)),
         lambda r: "image " + r["image_id"].map(repr) + " is not among the run's photos"),
    ]
    for bad_rows, reasons in checks:
        bad = bad_rows(raw)
        if bad.any():
            problems.add(raw.loc[bad, "line"].to_numpy(), reasons(raw.loc[bad]).to_numpy())
            raw = raw.loc[~bad]
    known = raw["stimulus"].notna()

    # stimulus size and the stimulus → photo matrix (where a generic CSV names no stimulus, the photo itself)
    mats = {s: stimulus_to_photo_matrix(lookup.table.loc[s], photo_sizes.get(lookup.table.loc[s, "image_id"]))
            for s in raw.loc[known, "stimulus"].unique()}
    photo_w = raw["image_id"].map({i: float(v[0]) for i, v in photo_sizes.items()})
    photo_h = raw["image_id"].map({i: float(v[1]) for i, v in photo_sizes.items()})
    width = raw["stimulus"].map(lookup.table["width"]).astype(np.float64).where(known, photo_w)
    height = raw["stimulus"].map(lookup.table["height"]).astype(np.float64).where(known, photo_h)
    a, c, e, f = (raw["stimulus"].map({s: m[ij] for s, m in mats.items()}).astype(np.float64).fillna(fill)
                  for ij, fill in (((0, 0), 1.0), ((0, 2), 0.0), ((1, 1), 1.0), ((1, 2), 0.0)))

    # display geometry per participant: pixels per degree and the image rectangle on screen
    participants = raw["participant"].astype(str)
    need_rect = coords == "screen" and bool(raw["ax"].isna().any())
    rows = {p: display_row(display, p, required="the image rectangle on screen" if need_rect else None)
            for p in participants.unique()}
    if need_rect:
        for p, row in rows.items():
            if row[IMAGE_RECT_COLUMNS].isna().any():
                raise InputError(f"display table row {row['participant']!r} (for participant {p!r}) has no image "
                                 f"rectangle ({', '.join(IMAGE_RECT_COLUMNS)})")

    def from_display(value: Callable[[pd.Series], float]) -> pd.Series:
        return participants.map({p: (np.nan if r is None else value(r)) for p, r in rows.items()}).astype(np.float64)

    screen_ppd = from_display(pixels_per_degree)
    shown_w = raw["shown_w"].astype(np.float64).fillna(from_display(lambda r: r["image_width_px"]))
    shown_h = raw["shown_h"].astype(np.float64).fillna(from_display(lambda r: r["image_height_px"]))
    x, y = raw["x"].astype(np.float64), raw["y"].astype(np.float64)
    if coords == "screen":
        placed = raw["ax"].notna()
        centre = (raw["anchor"] == "center") & placed
        left = raw["ax"].where(placed, from_display(lambda r: r["image_left_px"])) - shown_w.where(centre, 0.0) / 2
        top = raw["ay"].where(placed, from_display(lambda r: r["image_top_px"])) - shown_h.where(centre, 0.0) / 2
        x, y = (x - left) * width / shown_w, (y - top) * height / shown_h
    elif coords == "norm":
        x, y = x * width, y * height
    if coords != "photo":
        x, y = a * x + c, e * y + f
    ppd = raw["ppd"].astype(np.float64).fillna(screen_ppd * np.sqrt(width / shown_w * height / shown_h * a * e))

    out = pd.DataFrame({
        "participant": participants, "trial": raw["trial"].astype(str),
        "stimulus": raw["stimulus"].where(known, raw["image_id"]), "image_id": raw["image_id"],
        "fixation": raw["fixation"].astype(np.float64), "start_ms": raw["start_ms"],
        "duration_ms": raw["duration_ms"], "x": x, "y": y, "photo_px_per_degree": ppd, "eye": raw["eye"],
        "format": fmt, "source": problems.source, "line": raw["line"]})
    order = out.sort_values(["participant", "trial", "start_ms", "line"], kind="stable")
    rank = order.groupby(["participant", "trial"], sort=False).cumcount()
    out["fixation"] = out["fixation"].fillna(rank.reindex(out.index).astype(np.float64))
    out = out.astype(FIXATION_DTYPES)[FIXATION_COLUMNS]
    out = out.sort_values(["participant", "trial", "fixation", "line"], kind="stable").reset_index(drop=True)
    return ReadResult(out, problems.frame())
