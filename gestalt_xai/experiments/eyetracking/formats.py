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
    SR Research EDF2ASC output (EyeLink 1000 Plus User Manual, chapter "Data Files": ``EFIX <eye> <start> <end>
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
    Tracker → Export"; written by ``_export_fixations_on_surface`` in pupil-labs/pupil
    ``pupil_src/shared_modules/surface_tracker/background_tasks.py``: columns ``fixation_id, start_timestamp`` (s),
    ``duration`` (ms), ``norm_pos_x, norm_pos_y, on_surf``). A fixation is written once per world frame: its rows
    with ``on_surf`` True are averaged (the surface moves in the world camera between frames), the others dropped.
    Surface coordinates have their origin bottom-left, so ``y = (1 − norm_pos_y)·H``; the surface must be defined
    on the image's corners. Stimulus and trial are the surface name unless the options ``stimulus`` and ``trial``
    say otherwise; the participant is the option, else the recording folder (the one holding ``exports``).
    ``start_ms`` is on the recording clock less ``trial_start_s``.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.experiments.eyetracking.display import (
    FIXATION_COLUMNS,
    FIXATION_DTYPES,
    PROBLEM_COLUMNS,
    Problems,
    ReadResult,
    StimulusLookup,
    as_table,
    base_name,
    display_row,
    fixation_table,
    numbers,
    parse_columns,
    pixels_per_degree,
    read_display,
    read_stimuli,
    read_table,
    stimulus_to_photo_matrix,
)

__all__ = ["FIXATION_COLUMNS", "FIXATION_DTYPES", "PROBLEM_COLUMNS", "READERS", "STIMULUS_COLUMN_NAMES",
           "ReadResult", "display_row", "pixels_per_degree", "read_display", "read_eyelink_asc",
           "read_eyelink_dataviewer", "read_fixations", "read_generic_csv", "read_pupil_core", "read_stimuli",
           "read_tobii_tsv", "stimulus_to_photo_matrix"]

log = logging.getLogger(__name__)

#: trial variables tried, in this order and ignoring case, for the image of a Data Viewer fixation report
STIMULUS_COLUMN_NAMES = ["stimulus", "image", "image_file", "imagefile", "img", "picture", "stim", "trial_image"]
EYES = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R", "B": "B", "BOTH": "B", "BINOCULAR": "B", "": ""}


def _eyes(values: pd.Series, lines: pd.Series, problems: Problems) -> tuple[pd.Series, pd.Series]:
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
    problems = Problems(path.name)
    df = read_table(path, ["trial", "start_ms", "duration_ms", "x", "y"] + ([] if participant else ["participant"]))
    if "image_id" not in df.columns and "stimulus" not in df.columns:
        raise InputError(f"{path}: needs an image_id or a stimulus column (has {', '.join(df.columns)})")
    lines = pd.Series(df.index + 2, index=df.index)
    cols = {"start_ms": "start_ms", "duration_ms": "duration_ms", "x": "x", "y": "y"}
    optional = tuple(c for c in ("fixation", "photo_px_per_degree") if c in df.columns)
    cols.update({("ppd" if c == "photo_px_per_degree" else c): c for c in optional})
    num, ok = parse_columns(df, cols, problems, lines, optional=("ppd",))
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
    return fixation_table(raw.loc[ok], problems, fmt="generic_csv", stimuli=stimuli, display=display,
                          photo_sizes=photo_sizes, coords="photo")


# --- EyeLink ASC ---------------------------------------------------------------------------------------------------

_ASC_EVENT = re.compile(rb"^(EFIX|MSG)[ \t]+([^\r\n]*)", re.M)
_INTEGER = re.compile(r"^[-+]?\d+$")


def _number(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        return float("nan")


def _message(text: str) -> tuple[float, str] | None:
    """``<time> [<offset>] <text>`` of an ASC MSG line as (event time = time − offset, text); None if malformed."""
    parts = text.split(None, 2)
    t = _number(parts[0]) if parts else float("nan")
    if not np.isfinite(t):
        return None
    if len(parts) == 3 and _INTEGER.match(parts[1]):
        return t - float(parts[1]), parts[2].strip()
    return t, " ".join(parts[1:]).strip()


def _imgload(body: str, display_size: tuple | None) -> dict:
    """Parse the text after ``!V IMGLOAD``; raise ValueError with the reason when it cannot be placed."""
    tokens = body.split()
    kind = tokens[0].upper() if tokens else ""
    rest = tokens[1:]
    if kind == "FILL":
        if not rest:
            raise ValueError("IMGLOAD FILL names no file")
        if display_size is None:
            raise ValueError("IMGLOAD FILL without a display size (no DISPLAY_COORDS message, no display table row)")
        left, top, w, h = display_size
        return {"file": " ".join(rest), "anchor": "top_left", "ax": left, "ay": top, "w": w, "h": h}
    if kind in ("CENTER", "TOP_LEFT"):
        numeric = 0
        while numeric < len(rest) and np.isfinite(_number(rest[-1 - numeric])):
            numeric += 1
        n = 4 if numeric >= 4 and len(rest) >= 5 else 2 if numeric >= 2 and len(rest) >= 3 else 0
        if not n:
            raise ValueError(f"IMGLOAD {kind} needs <file> <x> <y> [<width> <height>]")
        nums = [float(v) for v in rest[-n:]] + [np.nan] * (4 - n)
        return {"file": " ".join(rest[:-n]), "anchor": kind.lower(), "ax": nums[0], "ay": nums[1], "w": nums[2],
                "h": nums[3]}
    raise ValueError(f"IMGLOAD variant {kind!r} is not one the Data Viewer manual documents (FILL, TOP_LEFT, CENTER)")


def read_eyelink_asc(path: str | Path, *, stimuli: pd.DataFrame, display: pd.DataFrame | None = None,
                     photo_sizes: dict, participant: str | None = None, eye: str | None = None) -> ReadResult:
    """Read EFIX events of an EyeLink ASC file placed by ``!V IMGLOAD`` messages (see the module docstring).

    ``participant`` defaults to the file name's stem; ``eye`` ("L" or "R") keeps one eye of a binocular recording
    (default: both, each its own fixation).
    """
    if eye not in (None, "L", "R"):
        raise ConfigError(f"eye must be 'L', 'R' or None (both), not {eye!r}")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    matches = list(_ASC_EVENT.finditer(data))
    if not matches:
        raise InputError(f"{path}: no EFIX or MSG lines: not an EDF2ASC file with events")
    newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    lines = np.searchsorted(newlines, [m.start() for m in matches], side="right") + 1
    problems = Problems(path.name)
    pid = participant or path.stem
    stim = StimulusLookup(stimuli)
    sizes = dict(zip(stim.table.index, zip(stim.table["width"], stim.table["height"], strict=True), strict=True))
    screen = display_row(display, pid)
    display_size = None if screen is None else (0.0, 0.0, screen["screen_width_px"], screen["screen_height_px"])
    rows: list[dict] = []
    trial: dict | None = None

    def close() -> None:
        nonlocal trial
        if trial is None:
            return
        t0 = trial["sync"] if trial["sync"] is not None else trial["t"]
        images = sorted(trial["images"], key=lambda img: img["t"])  # offsets may reorder the messages
        times = np.array([img["t"] for img in images])
        for fix in trial["fixations"]:
            if not images:
                problems.add(fix["line"], f"trial {trial['id']!r} (line {trial['line']}) has no !V IMGLOAD message")
                continue
            k = max(int(np.searchsorted(times, fix["start"], side="right")) - 1, 0) if len(images) > 1 else 0
            img = images[k]
            if "error" in img:
                problems.add(fix["line"], f"its image cannot be placed: line {img['line']}: {img['error']}")
                continue
            name = base_name(img["file"])
            size = sizes.get(stim.keys.get(name), (np.nan, np.nan))
            w = img["w"] if np.isfinite(img["w"]) else float(size[0])
            h = img["h"] if np.isfinite(img["h"]) else float(size[1])
            rows.append({"participant": pid, "trial": trial["id"], "stimulus": name, "start_ms": fix["start"] - t0,
                         "duration_ms": fix["dur"], "x": fix["x"], "y": fix["y"], "eye": fix["eye"],
                         "line": fix["line"], "anchor": img["anchor"], "ax": img["ax"], "ay": img["ay"],
                         "shown_w": w, "shown_h": h})
        trial = None

    for m, line in zip(matches, lines.tolist(), strict=True):
        text = m.group(2).decode("utf-8", "replace").strip()
        if m.group(1) == b"MSG":
            msg = _message(text)
            if msg is None:
                problems.add(line, f"MSG line without a time: {text!r}")
                continue
            t, body = msg
            word = body.split(None, 1)[0] if body else ""
            if word == "TRIALID":
                close()
                trial = {"id": body[len("TRIALID"):].strip(), "t": t, "line": line, "sync": None, "images": [],
                         "fixations": []}
            elif word == "TRIAL_RESULT":
                close()
            elif word == "SYNCTIME" and trial is not None and trial["sync"] is None:
                trial["sync"] = t
            elif word == "DISPLAY_COORDS":
                c = [_number(v) for v in body.split()[1:5]]
                if len(c) == 4 and np.all(np.isfinite(c)):
                    display_size = (c[0], c[1], c[2] - c[0] + 1, c[3] - c[1] + 1)
                else:
                    problems.add(line, f"malformed DISPLAY_COORDS message: {body!r}")
            elif body.startswith("!V IMGLOAD") and trial is not None:
                try:
                    img = _imgload(body[len("!V IMGLOAD"):], display_size)
                except ValueError as exc:
                    img = {"error": str(exc)}
                    problems.add(line, str(exc))
                trial["images"].append({**img, "t": t, "line": line})
            continue
        tokens = text.split()
        values = [_number(v) for v in tokens[1:6]]
        if len(tokens) < 6 or tokens[0] not in ("L", "R") or not np.all(np.isfinite(values)):
            problems.add(line, f"malformed EFIX event (want EFIX <eye> <start> <end> <duration> <x> <y> <pupil>): "
                               f"{'EFIX ' + text!r}")
        elif trial is None:
            problems.add(line, "EFIX outside a trial (before any TRIALID or after TRIAL_RESULT)")
        elif eye is None or tokens[0] == eye:
            trial["fixations"].append({"line": line, "eye": tokens[0], "start": values[0], "dur": values[2],
                                       "x": values[3], "y": values[4]})
    close()
    raw = pd.DataFrame(rows, columns=["participant", "trial", "stimulus", "start_ms", "duration_ms", "x", "y", "eye",
                                      "line", "anchor", "ax", "ay", "shown_w", "shown_h"])
    return fixation_table(raw, problems, fmt="eyelink_asc", stimuli=stimuli, display=display,
                          photo_sizes=photo_sizes, coords="screen")


# --- EyeLink Data Viewer fixation report -----------------------------------------------------------------------------

def read_eyelink_dataviewer(path: str | Path, *, stimuli: pd.DataFrame, display: pd.DataFrame | None = None,
                            photo_sizes: dict, participant: str | None = None,
                            stimulus_column: str | None = None) -> ReadResult:
    """Read a Data Viewer fixation report (see the module docstring); the display table must give the image
    rectangle. ``participant`` overrides RECORDING_SESSION_LABEL; ``stimulus_column`` names the trial variable
    holding the image file (default: the first of :data:`STIMULUS_COLUMN_NAMES` present, ignoring case)."""
    path = Path(path)
    problems = Problems(path.name)
    need = ["TRIAL_INDEX", "CURRENT_FIX_X", "CURRENT_FIX_Y", "CURRENT_FIX_START", "CURRENT_FIX_DURATION"]
    df = read_table(path, need + ([] if participant else ["RECORDING_SESSION_LABEL"]), sep="\t")
    if stimulus_column is None:
        lower = {c.lower(): c for c in df.columns}
        stimulus_column = next((lower[n] for n in STIMULUS_COLUMN_NAMES if n in lower), None)
        if stimulus_column is None:
            raise InputError(f"{path}: no trial variable naming the image (tried {', '.join(STIMULUS_COLUMN_NAMES)}; "
                             "name it with the stimulus_column option)")
    if stimulus_column not in df.columns:
        raise InputError(f"{path}: missing column {stimulus_column} (the stimulus_column option)")
    lines = pd.Series(df.index + 2, index=df.index)
    cols = {"start_ms": "CURRENT_FIX_START", "duration_ms": "CURRENT_FIX_DURATION", "x": "CURRENT_FIX_X",
            "y": "CURRENT_FIX_Y"}
    if "CURRENT_FIX_INDEX" in df.columns:
        cols["fixation"] = "CURRENT_FIX_INDEX"
    num, ok = parse_columns(df, cols, problems, lines)
    if "fixation" in num:
        num["fixation"] -= 1  # Data Viewer counts from 1
    eye, eye_ok = _eyes(df["EYE_USED"] if "EYE_USED" in df.columns else pd.Series("", index=df.index), lines,
                        problems)
    raw = num.assign(participant=participant if participant else df["RECORDING_SESSION_LABEL"].str.strip(),
                     trial=df["TRIAL_INDEX"].str.strip(), stimulus=df[stimulus_column].map(base_name), eye=eye,
                     line=lines)
    return fixation_table(raw.loc[ok & eye_ok], problems, fmt="eyelink_dataviewer", stimuli=stimuli,
                          display=display, photo_sizes=photo_sizes, coords="screen")


# --- Tobii Pro Lab ---------------------------------------------------------------------------------------------------

TOBII_COLUMNS = {"participant": "Participant name", "recording": "Recording name",
                 "timestamp": "Recording timestamp", "type": "Eye movement type", "index": "Eye movement type index",
                 "duration": "Gaze event duration", "x": "Fixation point X (MCSnorm)",
                 "y": "Fixation point Y (MCSnorm)", "media": "Presented Media name",
                 "stimulus": "Presented Stimulus name", "media_w": "Presented Media width",
                 "media_h": "Presented Media height"}
#: milliseconds per unit of a timestamp column
TIME_UNITS = {"ms": 1.0, "μs": 1e-3, "µs": 1e-3, "us": 1e-3, "s": 1e3}
_UNIT = re.compile(r"\s*\[([^\]]*)\]\s*$")


def _tobii_key(name: str) -> tuple[str, str | None]:
    """A Pro Lab column name without spacing, case, brackets or a trailing unit; and the unit when there is one.

    >>> _tobii_key("Fixation point X [MCS norm]") == _tobii_key("Fixation point X (MCSnorm)")
    True
    >>> _tobii_key("Recording timestamp [μs]")
    ('recordingtimestamp', 'μs')
    """
    unit = None
    m = _UNIT.search(name)
    if m and m.group(1).replace(" ", "").lower() in set(TIME_UNITS) | {"px", "mm"}:
        unit, name = m.group(1).replace(" ", "").lower(), name[:m.start()]
    return re.sub(r"[^0-9a-z]", "", name.lower()), unit


def read_tobii_tsv(path: str | Path, *, stimuli: pd.DataFrame, display: pd.DataFrame | None = None,
                   photo_sizes: dict, participant: str | None = None,
                   timestamp_unit: str | None = None) -> ReadResult:
    """Read a Tobii Pro Lab data export (see the module docstring). ``participant`` overrides Participant name;
    ``timestamp_unit`` (ms, us, s) overrides the unit of Recording timestamp."""
    path = Path(path)
    problems = Problems(path.name)
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            header = fh.readline().rstrip("\r\n").split("\t")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    found = {}
    for col in header:
        key, unit = _tobii_key(col)
        found.setdefault(key, (col, unit))
    have = {k: found[_tobii_key(v)[0]] for k, v in TOBII_COLUMNS.items() if _tobii_key(v)[0] in found}
    need = ["recording", "timestamp", "type", "index", "duration", "x", "y"] + ([] if participant else ["participant"])
    missing = [TOBII_COLUMNS[k] for k in need if k not in have]
    if missing or ("media" not in have and "stimulus" not in have):
        if "media" not in have and "stimulus" not in have:
            missing.append("Presented Media name or Presented Stimulus name")
        raise InputError(f"{path}: not a Tobii Pro Lab export with fixations: missing column(s) {', '.join(missing)}")
    df = read_table(path, sep="\t", usecols=[c for c, _ in have.values()])
    col = {k: c for k, (c, _) in have.items()}
    lines = pd.Series(df.index + 2, index=df.index)
    unit = timestamp_unit or have["timestamp"][1]
    if unit is not None and unit not in TIME_UNITS:
        raise ConfigError(f"timestamp_unit {unit!r} is not one of {', '.join(TIME_UNITS)}")
    pid = pd.Series(participant, index=df.index) if participant else df[col["participant"]].str.strip()
    rec = df[col["recording"]].str.strip()
    name = df[col["media"]].str.strip() if "media" in col else pd.Series("", index=df.index)
    if "stimulus" in col:
        name = name.where(name != "", df[col["stimulus"]].str.strip())
    # presentations: runs of consecutive rows showing the same stimulus in one recording
    key = pid + "\x1f" + rec + "\x1f" + name
    pres = (key != key.shift()).cumsum()
    ts = numbers(df[col["timestamp"]])
    pres_start = ts.groupby(pres).transform("first")
    shown = name != ""
    firsts = pd.DataFrame({"pid": pid, "rec": rec, "pres": pres})[shown].drop_duplicates("pres")
    ordinal = (firsts.groupby(["pid", "rec"]).cumcount() + 1).set_axis(firsts["pres"])
    fix = shown & (df[col["type"]].str.strip().str.lower() == "fixation")
    index = df[col["index"]].str.strip()
    group = pid + "\x1f" + rec + "\x1f" + index
    first = fix & ~group.where(fix).duplicated()  # the index counts each movement type apart: fixations only
    sub = df.loc[first]
    parse = {"x": col["x"], "y": col["y"], "duration_ms": col["duration"], "index": col["index"],
             "timestamp": col["timestamp"]}
    parse.update({k: col[k] for k in ("media_w", "media_h") if k in col})
    num, ok = parse_columns(sub, parse, problems, lines[first], optional=("media_w", "media_h"))
    if unit is None:
        samples = ts[fix].groupby(group[fix])
        spans = samples.max() - samples.min()
        ratio = (spans / num.set_axis(group[first])["duration_ms"].reindex(spans.index)).replace(np.inf, np.nan)
        ratio = ratio[spans > 0].median()
        unit = "us" if not np.isfinite(ratio) or ratio > 30 else "ms"
        log.info("%s: Recording timestamp has no unit in its header; read as %s", path.name, unit)
    raw = pd.DataFrame({
        "participant": pid[first], "trial": rec[first] + "/" + pres[first].map(ordinal).astype(str),
        "stimulus": name[first], "start_ms": (num["timestamp"] - pres_start[first]) * TIME_UNITS[unit],
        "duration_ms": num["duration_ms"], "x": num["x"], "y": num["y"], "eye": "", "line": lines[first],
        "shown_w": num.get("media_w", np.nan), "shown_h": num.get("media_h", np.nan)})
    return fixation_table(raw.loc[ok], problems, fmt="tobii_tsv", stimuli=stimuli, display=display,
                          photo_sizes=photo_sizes, coords="norm")


# --- Pupil Core surface fixations ------------------------------------------------------------------------------------

def _recording_folder(path: Path) -> str:
    parts = path.resolve().parts
    if "exports" in parts:
        i = len(parts) - 1 - parts[::-1].index("exports")
        if i > 0:
            return parts[i - 1]
    return path.resolve().parent.name


def read_pupil_core(path: str | Path, *, stimuli: pd.DataFrame, display: pd.DataFrame | None = None,
                    photo_sizes: dict, participant: str | None = None, stimulus: str | None = None,
                    trial: str | None = None, trial_start_s: float = 0.0) -> ReadResult:
    """Read a Pupil Player ``fixations_on_surface_<surface>.csv`` (see the module docstring). ``stimulus`` and
    ``trial`` default to the surface name, ``participant`` to the recording folder; ``trial_start_s`` (Pupil time,
    seconds) is subtracted from the start times."""
    path = Path(path)
    problems = Problems(path.name)
    df = read_table(path, ["fixation_id", "start_timestamp", "duration", "norm_pos_x", "norm_pos_y", "on_surf"])
    surface = path.stem.removeprefix("fixations_on_surface_")
    lines = pd.Series(df.index + 2, index=df.index)
    on = df["on_surf"].str.strip().str.lower().map({"true": True, "false": False, "1": True, "0": False})
    num, ok = parse_columns(df, {"id": "fixation_id", "start": "start_timestamp", "duration_ms": "duration",
                                 "nx": "norm_pos_x", "ny": "norm_pos_y"}, problems, lines)
    bad = ok & on.isna()
    problems.add(lines[bad].to_numpy(), ("on_surf " + df.loc[bad, "on_surf"].map(repr) + " is not True or False"))
    keep = ok & on.eq(True)
    g = num.loc[keep].assign(line=lines[keep]).groupby("id", sort=False)
    fix = g.agg(start=("start", "first"), duration_ms=("duration_ms", "first"), nx=("nx", "mean"),
                ny=("ny", "mean"), line=("line", "first"))
    raw = pd.DataFrame({"participant": participant or _recording_folder(path), "trial": trial or surface,
                        "stimulus": stimulus or surface, "start_ms": (fix["start"] - trial_start_s) * 1e3,
                        "duration_ms": fix["duration_ms"], "x": fix["nx"], "y": 1.0 - fix["ny"], "eye": "",
                        "line": fix["line"]}).reset_index(drop=True)
    return fixation_table(raw, problems, fmt="pupil_core", stimuli=stimuli, display=display,
                          photo_sizes=photo_sizes, coords="norm")


READERS = {"generic_csv": read_generic_csv, "eyelink_asc": read_eyelink_asc,
           "eyelink_dataviewer": read_eyelink_dataviewer, "tobii_tsv": read_tobii_tsv,
           "pupil_core": read_pupil_core}


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
    stimuli = as_table(stimuli, read_stimuli)
    display = as_table(display, read_display)
    allowed = [p for p, v in inspect.signature(reader).parameters.items() if v.kind is v.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"format {fmt!r} has no option(s) {', '.join(unknown)}; it takes "
                          f"{', '.join(a for a in allowed if a not in ('stimuli', 'display', 'photo_sizes'))}")
    result = reader(path, stimuli=stimuli, display=display, photo_sizes=photo_sizes, **options)
    log.info("%s (%s): %d fixations, %d problems", Path(path).name, fmt, len(result.fixations), len(result.problems))
    return result
