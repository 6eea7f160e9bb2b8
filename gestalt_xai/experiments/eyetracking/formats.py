"""Read observers' fixations from eye-tracker exports into one fixation table in photo pixels.

:func:`read_fixations` dispatches on ``fmt`` (one of :data:`READERS`) and returns a :class:`ReadResult`: the
fixation table (:data:`FIXATION_COLUMNS`, one row per fixation, sorted by participant, trial, fixation) and the
problems (``file, line, reason``: every row or event that could not be used, with its 1-based line number; nothing
is dropped silently). A file that cannot be read at all raises :class:`~gestalt_xai.errors.InputError` naming it.
Every reader maps its coordinates to stimulus pixels, then to photo pixels with
:func:`~gestalt_xai.experiments.eyetracking.display.stimulus_to_photo_matrix`; ``photo_px_per_degree`` comes from
the display table (:mod:`~gestalt_xai.experiments.eyetracking.display`) and the stimulus's size on screen when both
are known, else NaN. Participant ids are kept as recorded (the stage pseudonymises them). ``fixation`` is the vendor's
per-trial index where the format has one (generic CSV, Data Viewer), else the rank by start time within the trial.

Formats
-------
``generic_csv`` (:func:`read_generic_csv`)
    The format a lab converts anything else to: a comma-separated file with a header and the columns
    ``participant, trial, image_id`` and/or ``stimulus, start_ms, duration_ms, x, y`` (``x, y`` in pixels of the
    cohort photo, origin top-left) and optional ``fixation`` (0-based index in the trial), ``eye`` (L, R, B) and
    ``photo_px_per_degree``. Without ``stimulus`` the photo itself counts as the stimulus shown.
``eyelink_asc`` (:func:`read_eyelink_asc`)
    SR Research EDF2ASC output (EyeLink 1000 Plus User Manual, "Data file" chapter: ``EFIX <eye> <start> <end>
    <dur> <x> <y> <pupil>`` end-of-fixation events in screen pixels, ``.`` for missing values; ``MSG <time>
    [<offset>] <text>`` messages whose event time is ``time − offset``). Trials run from ``MSG TRIALID <id>`` to
    ``TRIAL_RESULT`` (or the next TRIALID); ``start_ms`` counts from the trial's ``SYNCTIME`` message, else its
    TRIALID. The image shown and its placement come from the Data Viewer integration messages (EyeLink Data Viewer
    User Manual, "Protocol for EyeLink Data to Viewer Integration → Image commands"): ``!V IMGLOAD CENTER <file> <xc>
    <yc> [<w> <h>]``, ``!V IMGLOAD TOP_LEFT <file> <x> <y> [<w> <h>]`` (size defaults to the stimulus's own) and
    ``!V IMGLOAD FILL <file>`` (stretched over the display given by ``MSG DISPLAY_COORDS <left> <top> <right>
    <bottom>``, else the display table's screen size). A trial with one IMGLOAD holds one image; with several, each
    fixation belongs to the last one sent before it started. Samples, SFIX, SSACC/ESACC, SBLINK/EBLINK and other
    lines are skipped. The participant is the ``participant`` option, else the file name's stem.
``eyelink_dataviewer`` (:func:`read_eyelink_dataviewer`)
    A Data Viewer fixation report (tab-separated; Data Viewer User Manual, "Fixation report" variables):
    ``RECORDING_SESSION_LABEL, TRIAL_INDEX, CURRENT_FIX_INDEX`` (1-based), ``CURRENT_FIX_X, CURRENT_FIX_Y`` (screen
    pixels), ``CURRENT_FIX_START`` (ms from trial start), ``CURRENT_FIX_DURATION``, ``EYE_USED`` and a trial variable
    naming the image (option ``stimulus_column``; by default the first of :data:`STIMULUS_COLUMN_NAMES` present);
    ``.`` means missing. Screen pixels map to the stimulus through the display table's image rectangle.
``tobii_tsv`` (:func:`read_tobii_tsv`)
    A Tobii Pro Lab data export (Tobii Pro Lab User Manual, "Data export" column definitions): one row per gaze
    sample, so the rows with ``Eye movement type`` = Fixation are reduced to one per (``Participant name``,
    ``Recording name``, ``Eye movement type index``), keeping the first. ``Fixation point X/Y (MCSnorm)`` are 0–1 of
    the media (origin top-left), ``Gaze event duration`` is in ms, the image is ``Presented Media name`` (else
    ``Presented Stimulus name``; rows with neither are outside any stimulus and skipped). ``start_ms`` counts from the
    presentation's first sample's ``Recording timestamp``, whose unit is read from the header (``[μs]``, ``[ms]``),
    else inferred from the spans of the fixations' samples against their durations, else μs. Decimal commas are
    read as points; newer headers (``Fixation point X [MCS norm]``) are recognised. A trial is ``<recording>/<k>``,
    the k-th presentation of the recording.
``pupil_core`` (:func:`read_pupil_core`)
    A Pupil Player surface-tracker export ``fixations_on_surface_<surface>.csv`` (Pupil Core documentation, "Surface
    Tracker → Export"; columns ``fixation_id, start_timestamp`` (s), ``duration`` (ms), ``norm_pos_x, norm_pos_y,
    on_surf``). A fixation is written once per world frame: rows with ``on_surf`` True are averaged per
    ``fixation_id``. Surface coordinates have their origin bottom-left, so ``y = (1 − norm_pos_y)·H``; the surface
    must be defined on the image's corners. Stimulus and trial are the surface name unless the options ``stimulus``
    and ``trial`` say otherwise; the participant is the option, else the recording folder (the one holding
    ``exports``). ``start_ms`` is on the recording clock less ``trial_start_s``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.experiments.eyetracking.display import (
    base_name,
    display_row,
    numbers,
    pixels_per_degree,
    read_display,
    read_stimuli,
    stimulus_to_photo_matrix,
)

__all__ = ["FIXATION_COLUMNS", "FIXATION_DTYPES", "PROBLEM_COLUMNS", "READERS", "STIMULUS_COLUMN_NAMES",
           "ReadResult", "display_row", "pixels_per_degree", "read_display", "read_fixations", "read_generic_csv",
           "read_stimuli", "stimulus_to_photo_matrix"]

log = logging.getLogger(__name__)

FIXATION_COLUMNS = ["participant", "trial", "stimulus", "image_id", "fixation", "start_ms", "duration_ms", "x", "y",
                    "photo_px_per_degree", "eye", "format", "source", "line"]
FIXATION_DTYPES = {"participant": str, "trial": str, "stimulus": str, "image_id": str, "fixation": np.int64,
                   "start_ms": np.float64, "duration_ms": np.float64, "x": np.float64, "y": np.float64,
                   "photo_px_per_degree": np.float64, "eye": str, "format": str, "source": str, "line": np.int64}
PROBLEM_COLUMNS = ["file", "line", "reason"]
#: trial variables tried, in this order and ignoring case, for the image of a Data Viewer fixation report
STIMULUS_COLUMN_NAMES = ["stimulus", "image", "image_file", "imagefile", "img", "picture", "stim", "trial_image"]
EYES = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R", "B": "B", "BOTH": "B", "BINOCULAR": "B", "": ""}


@dataclass(frozen=True)
class ReadResult:
    """What a reader returns: the fixation table and the rows it could not use."""

    fixations: pd.DataFrame
    problems: pd.DataFrame


class _Problems:
    """Problems of one file, collected as (line, reason)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[np.ndarray] = []
        self.reasons: list[np.ndarray] = []

    def add(self, lines, reasons) -> None:
        lines = np.atleast_1d(np.asarray(lines, dtype=np.int64))
        reasons = np.broadcast_to(np.asarray(reasons, dtype=object), lines.shape)
        self.lines.append(lines)
        self.reasons.append(np.asarray(reasons, dtype=object))

    def frame(self) -> pd.DataFrame:
        lines = np.concatenate(self.lines) if self.lines else np.zeros(0, np.int64)
        reasons = np.concatenate(self.reasons) if self.reasons else np.zeros(0, object)
        df = pd.DataFrame({"file": self.source, "line": lines, "reason": reasons.astype(str)})
        df = df.astype({"file": str, "line": np.int64, "reason": str})
        return df.sort_values("line", kind="stable").reset_index(drop=True)


def empty_fixations() -> pd.DataFrame:
    """A fixation table without rows, with the table's dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in FIXATION_DTYPES.items()})[FIXATION_COLUMNS]


def _parse(df: pd.DataFrame, columns: dict[str, str], problems: _Problems, lines: pd.Series,
           optional: tuple[str, ...] = ()) -> tuple[pd.DataFrame, pd.Series]:
    """Parse text columns ``{name: column}`` as numbers; rows with a cell that is not one become problems.

    Returns the numbers (named by the keys) and the mask of rows whose cells all parsed; ``optional`` names may be
    empty (NaN) but not malformed.
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


class _Stimuli:
    """Look stimulus names up in the stimulus table: by file name, else by stem when that is unambiguous."""

    def __init__(self, stimuli: pd.DataFrame) -> None:
        self.table = stimuli.set_index("stimulus", drop=False)
        names = list(self.table.index)
        self.keys = {n: n for n in names}
        stems = pd.Series(names, dtype=object).map(lambda n: Path(n).stem)
        for stem, name in zip(stems, names, strict=True):
            if (stems == stem).sum() == 1 and stem not in self.keys:
                self.keys[stem] = name

    def resolve(self, names: pd.Series) -> pd.Series:
        key = names.astype(str).map(base_name)
        return key.map(self.keys)


def _as_table(table, reader) -> pd.DataFrame | None:
    if table is None or isinstance(table, pd.DataFrame):
        return table
    return reader(table)


def _finish(raw: pd.DataFrame, problems: _Problems, *, fmt: str, stimuli: pd.DataFrame,
            display: pd.DataFrame | None, photo_sizes: dict, coords: str) -> ReadResult:
    """Map reader rows to photo pixels and assemble the fixation table.

    ``raw`` holds participant, trial, stimulus, start_ms, duration_ms, x, y, eye, line and, as the format has them,
    fixation, image_id (generic CSV), ppd (photo px per degree given), and the placement on screen: anchor
    ("center"/"top_left"), ax, ay, shown_w, shown_h. ``coords``: "photo" (x, y are photo pixels), "screen" (screen
    pixels placed by anchor/ax/ay/shown_w/shown_h; NaN placements come from the display table's image rectangle),
    "norm" (0–1 of the stimulus).
    """
    raw = raw.copy()
    for col, default in (("fixation", np.nan), ("ppd", np.nan), ("image_id", ""), ("shown_w", np.nan),
                         ("shown_h", np.nan), ("anchor", "top_left"), ("ax", np.nan), ("ay", np.nan)):
        if col not in raw.columns:
            raw[col] = default

    def drop(bad: pd.Series, reasons) -> None:
        nonlocal raw
        if bad.any():
            r = reasons[bad].to_numpy() if isinstance(reasons, pd.Series) else reasons
            problems.add(raw.loc[bad, "line"].to_numpy(), r)
            raw = raw.loc[~bad]

    drop(raw["duration_ms"] < 0, "duration " + raw["duration_ms"].map(repr) + " ms is negative")
    stim = _Stimuli(stimuli)
    name = raw["stimulus"].astype(str).str.strip()
    resolved = stim.resolve(name)
    if coords == "photo":
        unknown = resolved.isna() & (name != "")
    else:
        unknown = resolved.isna()
    drop(unknown, "stimulus " + name.map(repr) + " is not in the stimulus table")
    resolved = resolved.loc[raw.index]
    known = resolved.notna()
    table_image = resolved.map(stim.table["image_id"]).fillna("")
    given = raw["image_id"].astype(str).str.strip()
    drop(known & (given != "") & (given != table_image),
         "image_id " + given.map(repr) + " differs from the stimulus table's " + table_image.map(repr))
    resolved, known, table_image, given = (s.loc[raw.index] for s in (resolved, known, table_image, given))
    image_id = table_image.where(known, given)
    drop(image_id == "", "no image_id or stimulus")
    image_id = image_id.loc[raw.index]
    drop(~image_id.isin(list(photo_sizes)), "image " + image_id.map(repr) + " is not among the run's photos")
    image_id, resolved, known = (s.loc[raw.index] for s in (image_id, resolved, known))

    # stimulus size and stimulus → photo matrix per row (the photo itself where the generic CSV names no stimulus)
    mats = {s: stimulus_to_photo_matrix(stim.table.loc[s], photo_sizes.get(stim.table.loc[s, "image_id"]))
            for s in resolved[known].unique()}
    photo_w = image_id.map(lambda i: float(photo_sizes[i][0]))
    photo_h = image_id.map(lambda i: float(photo_sizes[i][1]))
    width = resolved.map(stim.table["width"]).astype(np.float64).where(known, photo_w)
    height = resolved.map(stim.table["height"]).astype(np.float64).where(known, photo_h)
    a, c, e, f = ([np.nan if pd.isna(s) else mats[s][i] for s in resolved] for i in ((0, 0), (0, 2), (1, 1), (1, 2)))
    a = pd.Series(a, index=raw.index).fillna(1.0)
    c = pd.Series(c, index=raw.index).fillna(0.0)
    e = pd.Series(e, index=raw.index).fillna(1.0)
    f = pd.Series(f, index=raw.index).fillna(0.0)

    # display geometry per participant: pixels per degree and the image rectangle on screen
    participants = raw["participant"].astype(str)
    need_rect = coords == "screen" and raw["ax"].isna().any()
    rows = {p: display_row(display, p, required="the image rectangle on screen" if need_rect else None)
            for p in participants.unique()}
    if need_rect:
        for p, row in rows.items():
            if row[["image_left_px", "image_top_px", "image_width_px", "image_height_px"]].isna().any():
                raise InputError(f"display table row {row['participant']!r} (for participant {p!r}) has no image "
                                 "rectangle (image_left_px, image_top_px, image_width_px, image_height_px)")

    def from_display(col: str) -> pd.Series:
        return participants.map({p: (np.nan if r is None else r[col]) for p, r in rows.items()}).astype(np.float64)

    screen_ppd = participants.map({p: (np.nan if r is None else pixels_per_degree(r)) for p, r in rows.items()})
    rect_missing = raw["ax"].isna()
    shown_w = raw["shown_w"].astype(np.float64).fillna(from_display("image_width_px"))
    shown_h = raw["shown_h"].astype(np.float64).fillna(from_display("image_height_px"))
    x, y = raw["x"].astype(np.float64), raw["y"].astype(np.float64)
    if coords == "screen":
        ax = raw["ax"].astype(np.float64).where(~rect_missing, from_display("image_left_px"))
        ay = raw["ay"].astype(np.float64).where(~rect_missing, from_display("image_top_px"))
        centre = (raw["anchor"] == "center") & ~rect_missing
        left = ax - np.where(centre, shown_w / 2, 0.0)
        top = ay - np.where(centre, shown_h / 2, 0.0)
        x, y = (x - left) * width / shown_w, (y - top) * height / shown_h
    elif coords == "norm":
        x, y = x * width, y * height
    if coords != "photo":
        x, y = a * x + c, e * y + f
    scale = np.sqrt(width / shown_w * height / shown_h * a * e)
    ppd = raw["ppd"].astype(np.float64).fillna(screen_ppd.astype(np.float64) * scale)

    out = pd.DataFrame({
        "participant": participants, "trial": raw["trial"].astype(str),
        "stimulus": resolved.where(known, image_id), "image_id": image_id, "fixation": raw["fixation"],
        "start_ms": raw["start_ms"], "duration_ms": raw["duration_ms"], "x": x, "y": y,
        "photo_px_per_degree": ppd, "eye": raw["eye"], "format": fmt, "source": problems.source,
        "line": raw["line"]})
    order = out.sort_values(["participant", "trial", "start_ms", "line"], kind="stable")
    rank = order.groupby(["participant", "trial"], sort=False).cumcount()
    out["fixation"] = out["fixation"].fillna(rank.reindex(out.index).astype(np.float64))
    out = out.astype(FIXATION_DTYPES)[FIXATION_COLUMNS]
    out = out.sort_values(["participant", "trial", "fixation", "line"], kind="stable").reset_index(drop=True)
    return ReadResult(out, problems.frame())


def _read_text(path: Path, sep: str, header: int = 0, usecols=None) -> pd.DataFrame:
    """Read a delimited export as text cells (blank lines kept, so row i sits on line ``header + i + 2``)."""
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False,
                         encoding="utf-8-sig", header=header, usecols=usecols, quoting=0)
    except (OSError, ValueError, OverflowError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _require(path: Path, df: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(df.columns)})")


def _blank(df: pd.DataFrame) -> pd.Series:
    return (df.astype(str).apply(lambda c: c.str.strip()) == "").all(axis=1)


def _eyes(values: pd.Series, lines: pd.Series, problems: _Problems) -> tuple[pd.Series, pd.Series]:
    text = values.astype(str).str.strip().str.upper()
    eye = text.map(EYES)
    bad = eye.isna()
    if bad.any():
        problems.add(lines[bad].to_numpy(), ("eye " + values[bad].map(repr) + " is not L, R or B").to_numpy())
    return eye.fillna(""), ~bad


def read_generic_csv(path: str | Path, *, stimuli: pd.DataFrame, display: pd.DataFrame | None = None,
                     photo_sizes: dict, participant: str | None = None) -> ReadResult:
    """Read the documented generic CSV (see the module docstring); ``participant`` overrides the column."""
    path = Path(path)
    problems = _Problems(path.name)
    df = _read_text(path, ",")
    _require(path, df, ["trial", "start_ms", "duration_ms", "x", "y"] + ([] if participant else ["participant"]))
    if "image_id" not in df.columns and "stimulus" not in df.columns:
        raise InputError(f"{path}: needs an image_id or a stimulus column (has {', '.join(df.columns)})")
    df = df.loc[~_blank(df)]
    lines = pd.Series(df.index + 2, index=df.index)
    cols = {"start_ms": "start_ms", "duration_ms": "duration_ms", "x": "x", "y": "y"}
    optional = tuple(c for c in ("fixation", "photo_px_per_degree") if c in df.columns)
    cols.update({("ppd" if c == "photo_px_per_degree" else c): c for c in optional})
    num, ok = _parse(df, cols, problems, lines, optional=("ppd",))
    if "fixation" in num:
        bad = ok & ((num["fixation"] < 0) | (num["fixation"] % 1 != 0))
        problems.add(lines[bad].to_numpy(), ("fixation " + df.loc[bad, "fixation"].map(repr)
                                             + " is not a 0-based index").to_numpy())
        ok &= ~bad
    eye, eye_ok = _eyes(df["eye"] if "eye" in df.columns else pd.Series("", index=df.index), lines, problems)
    ok &= eye_ok
    raw = num.assign(participant=participant if participant else df["participant"].str.strip(),
                     trial=df["trial"].str.strip(), eye=eye, line=lines,
                     stimulus=df["stimulus"] if "stimulus" in df.columns else "",
                     image_id=df["image_id"] if "image_id" in df.columns else "")
    return _finish(raw.loc[ok], problems, fmt="generic_csv", stimuli=stimuli, display=display,
                   photo_sizes=photo_sizes, coords="photo")


READERS = {"generic_csv": read_generic_csv}


def read_fixations(path: str | Path, fmt: str, *, stimuli, display=None, photo_sizes: dict,
                   **options) -> ReadResult:
    """Read one recording export ``path`` of format ``fmt`` (one of :data:`READERS`) into photo pixels.

    ``stimuli`` and ``display`` are the tables of :func:`read_stimuli` and :func:`read_display` (or their paths);
    ``photo_sizes`` maps each image_id of the run to its photo's ``(width, height)``; ``options`` go to the reader
    (documented with each). Unknown formats or options raise :class:`ConfigError`.
    """
    if fmt not in READERS:
        raise ConfigError(f"unknown fixation format {fmt!r}; known: {', '.join(READERS)}")
    reader = READERS[fmt]
    stimuli = _as_table(stimuli, read_stimuli)
    display = _as_table(display, read_display)
    import inspect

    allowed = [p for p, v in inspect.signature(reader).parameters.items() if v.kind is v.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"format {fmt!r} has no option(s) {', '.join(unknown)}; it takes "
                          f"{', '.join(a for a in allowed if a not in ('stimuli', 'display', 'photo_sizes'))}")
    result = reader(path, stimuli=stimuli, display=display, photo_sizes=photo_sizes, **options)
    log.info("%s (%s): %d fixations, %d problems", Path(path).name, fmt, len(result.fixations), len(result.problems))
    return result
