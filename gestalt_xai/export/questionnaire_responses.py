"""Import of questionnaire responses: REDCap raw-data CSV exports, un-blinded with the analyst key.

REDCap's *Data Exports* ("CSV / Microsoft Excel (raw data)", REDCap Help & FAQ, "Data Export Tool", Vanderbilt
University) writes one row per record and one column per field of the data dictionary, in dictionary order, with
the record id first. Radio fields hold the choice *code*; a checkbox field ``var`` becomes one column per choice,
``var___<code>``, holding 1 (ticked) or 0; descriptive fields have no column; every instrument adds
``<form>_complete`` (0 incomplete, 1 unverified, 2 complete); exports of survey projects may add
``redcap_survey_identifier`` after the record id and ``<form>_timestamp`` before each form's fields, and longitudinal
or repeating projects ``redcap_event_name``, ``redcap_repeat_instrument`` and ``redcap_repeat_instance``. Files may
start with a UTF-8 byte-order mark. Unanswered fields are empty.

The expected columns are those of :func:`~gestalt_xai.export.redcap.data_dictionary` for the questionnaire and the
key, so a file from another questionnaire, a wrong key (another number of cases or letters) or a value outside a
field's choices fails with an :class:`~gestalt_xai.errors.InputError` naming the file and the problem. A key from
another export of the same shape is caught against the exported data dictionary (its "Case n (pseudonym)" labels).

Simulated responses (:mod:`gestalt_xai.export.simulate_responses`) carry record ids starting ``SIMULATED-``; the
import marks them (:attr:`Responses.simulated`) and every table and summary built from them says so.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from gestalt_xai.errors import InputError
from gestalt_xai.export.blinding import KEY_COLUMNS
from gestalt_xai.export.questionnaire_def import QuestionnaireDef
from gestalt_xai.export.redcap import RECORD_ID, REGION_GROUPS, _parse_choices, data_dictionary

__all__ = ["SIMULATED_PREFIX", "AnalystKey", "Responses", "checked_responses", "expected_columns", "load_analyst_key",
           "read_redcap_export"]

#: record ids of simulated raters start with this (the simulator writes them, the import recognises them)
SIMULATED_PREFIX = "SIMULATED-"
_OPTIONAL = {"redcap_survey_identifier", "redcap_event_name", "redcap_repeat_instrument", "redcap_repeat_instance",
             "redcap_data_access_group"}
_CASE_LABEL = re.compile(r"^Case (\d+) \(([^)]+)\)")


@dataclass(frozen=True)
class AnalystKey:
    """The analyst-only key written by :func:`~gestalt_xai.export.blinding.write_analyst_key`."""

    blinding: pd.DataFrame  # KEY_COLUMNS
    cases: pd.DataFrame  # pseudonym, raw_id
    regions: pd.DataFrame  # code, region_group
    folder: Path


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read as CSV ({e})") from e
    if list(table.columns) != columns:
        raise InputError(f"{path}: columns must be {columns}, got {list(table.columns)}")
    return table


def load_analyst_key(folder: str | Path) -> AnalystKey:
    """Read ``blinding_key.csv``, ``cases_key.csv`` and ``regions_key.csv`` from ``folder``; a missing file, wrong
    columns or an inconsistent key raise :class:`~gestalt_xai.errors.InputError` naming the file."""
    folder = Path(folder)
    paths = {n: folder / f"{n}_key.csv" for n in ("blinding", "cases", "regions")}
    for p in paths.values():
        if not p.is_file():
            raise InputError(f"{p}: the analyst key file is missing")
    blinding = _read_csv(paths["blinding"], KEY_COLUMNS)
    try:
        blinding["case_no"] = blinding["case_no"].astype(int)
    except ValueError as e:
        raise InputError(f"{paths['blinding']}: case_no must be whole numbers ({e})") from e
    blinding["preference_pair"] = blinding["preference_pair"].map({"True": True, "False": False})
    if blinding["preference_pair"].isna().any():
        raise InputError(f"{paths['blinding']}: preference_pair must be True or False")
    if blinding.duplicated(["case_no", "label"]).any():
        raise InputError(f"{paths['blinding']}: a case has the same letter twice")
    if (blinding.groupby("case_no")["pseudonym"].nunique() != 1).any():
        raise InputError(f"{paths['blinding']}: a case has more than one pseudonym")
    cases = _read_csv(paths["cases"], ["pseudonym", "raw_id"])
    regions = _read_csv(paths["regions"], ["code", "region_group"])
    if tuple(regions["region_group"]) != REGION_GROUPS or list(regions["code"]) != [
            str(i) for i in range(1, len(REGION_GROUPS) + 1)]:
        raise InputError(f"{paths['regions']}: the region codes are not those of this toolkit's checklist "
                         f"({list(REGION_GROUPS)})")
    missing = sorted(set(blinding["pseudonym"]) - set(cases["pseudonym"]))
    if missing:
        raise InputError(f"{paths['cases']}: no entry for the key's cases {missing[:3]}")
    return AnalystKey(blinding, cases, regions, folder)


def expected_columns(q: QuestionnaireDef, key: pd.DataFrame) -> list[str]:
    """The columns of a REDCap raw-data export of ``q`` with ``key``, in export order (without the optional
    survey, event and repeat columns and ``<form>_timestamp``)."""
    dd = data_dictionary(q, key)
    cols: list[str] = []
    for form, rows in dd.groupby("Form Name", sort=False):
        for _, r in rows.iterrows():
            if r["Field Type"] == "descriptive":
                continue
            if r["Field Type"] == "checkbox":
                cols += [f"{r['Variable / Field Name']}___{c}" for c, _ in
                         _parse_choices(r["Choices, Calculations, OR Slider Labels"]) or []]
            else:
                cols.append(r["Variable / Field Name"])
        cols.append(f"{form}_complete")
    return cols


@dataclass(frozen=True)
class Responses:
    """Un-blinded responses, one tidy table per kind of answer (methods named, cases by pseudonym).

    * ``likert``: record_id, case_no, pseudonym, label, method, item, value (choice code, 1 = lowest)
    * ``preference``: record_id, case_no, pseudonym, method_a, method_b, choice (``A``, ``B`` or ``none``),
      preferred (the method, or ``none``)
    * ``regions``: record_id, case_no, pseudonym, region_group, ticked (0/1); only cases whose checklist was
      answered (at least one tick)
    * ``diagnosis``: record_id, case_no, pseudonym, rank, text; ``comments``: record_id, case_no, pseudonym, text
    * ``background``: record_id, specialty (label), experience_years, cases_per_year
    * ``scs``: record_id, item (1–10), value; an SCS score is the sum over the ten items / 50
    """

    likert: pd.DataFrame
    preference: pd.DataFrame
    regions: pd.DataFrame
    diagnosis: pd.DataFrame
    comments: pd.DataFrame
    background: pd.DataFrame
    scs: pd.DataFrame
    simulated: bool
    source: str


def _check_dictionary(dictionary: Path, key: pd.DataFrame) -> None:
    try:
        dd = pd.read_csv(dictionary, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        labels = dd.loc[dd["Field Type"] == "descriptive", "Field Label"]
    except (OSError, KeyError, pd.errors.ParserError) as e:
        raise InputError(f"{dictionary}: cannot be read as a REDCap data dictionary ({e})") from e
    shown = {int(m.group(1)): m.group(2) for m in map(_CASE_LABEL.match, labels) if m}
    in_key = key.groupby("case_no")["pseudonym"].first().to_dict()
    if shown != in_key:
        diff = sorted(k for k in set(shown) | set(in_key) if shown.get(k) != in_key.get(k))
        raise InputError(f"{dictionary}: the key belongs to another export: case {diff[0]} is "
                         f"{shown.get(diff[0])!r} in the exported dictionary and {in_key.get(diff[0])!r} in the key")


def _codes(q: QuestionnaireDef, key: pd.DataFrame) -> dict[str, set[str]]:
    dd = data_dictionary(q, key)
    out = {}
    for _, r in dd[dd["Field Type"].isin(["radio", "dropdown"])].iterrows():
        out[r["Variable / Field Name"]] = {c for c, _ in _parse_choices(r["Choices, Calculations, OR Slider Labels"])
                                           or []}
    return out


def read_redcap_export(path: str | Path, q: QuestionnaireDef, key: AnalystKey,
                       dictionary: str | Path | None = None) -> Responses:
    """Read a REDCap raw-data CSV export of ``q`` and un-blind it with ``key``.

    ``dictionary``: the data dictionary exported with the questionnaire; when given, the key is checked to be the
    one of that export. Raises :class:`~gestalt_xai.errors.InputError` naming ``path`` for wrong columns, a value
    outside a field's choices, a checkbox other than 0/1, repeated or empty record ids, or a key of another shape.
    """
    path = Path(path)
    if dictionary is not None:
        _check_dictionary(Path(dictionary), key.blinding)
    try:
        text = path.read_bytes().decode("utf-8-sig")
        rows = list(csv.reader(io.StringIO(text)))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot be read as a CSV export ({e})") from e
    if len(rows) < 2:
        raise InputError(f"{path}: no responses (a header and at least one record are needed)")
    header, body = rows[0], rows[1:]
    if any(len(r) != len(header) for r in body):
        raise InputError(f"{path}: rows of unequal length (not a REDCap CSV export)")
    return checked_responses(pd.DataFrame(body, columns=header), path, q, key)


def checked_responses(df: pd.DataFrame, path: Path, q: QuestionnaireDef, key: AnalystKey) -> Responses:
    """Check a table in the layout of a REDCap raw-data export (strings, columns as exported) and un-blind it;
    problems raise :class:`~gestalt_xai.errors.InputError` naming ``path``."""
    header = list(df.columns)
    expected = expected_columns(q, key.blinding)
    present = [c for c in header if c not in _OPTIONAL and not c.endswith("_timestamp")]
    if present != expected:
        missing = [c for c in expected if c not in header]
        extra = [c for c in present if c not in expected]
        hint = ("; the key may belong to another export (other cases or letters)"
                if any(re.match(r"c\d\d_", c) for c in missing + extra) else "")
        detail = (f"missing {missing[:6]}{' …' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
                  if missing or extra else "the columns are out of REDCap's dictionary order")
        raise InputError(f"{path}: the columns are not those of a raw-data export of questionnaire {q.name!r} with "
                         f"this key: {detail}{hint}")
    ids = df[RECORD_ID]
    if (ids == "").any() or ids.duplicated().any():
        repeated = sorted(set(ids[ids.duplicated()]))
        raise InputError(f"{path}: record ids must be present and unique (repeated: {repeated})")
    for var, codes in _codes(q, key.blinding).items():
        bad = sorted(set(df[var]) - codes - {""})
        if bad:
            raise InputError(f"{path}: column {var!r} holds unknown choice codes {bad[:5]} (known: {sorted(codes)})")
    for col in [c for c in expected if "___" in c]:
        bad = sorted(set(df[col]) - {"0", "1", ""})
        if bad:
            raise InputError(f"{path}: checkbox column {col!r} must hold 0 or 1, got {bad[:5]}")
    simulated = ids.str.startswith(SIMULATED_PREFIX)
    if simulated.any() and not simulated.all():
        raise InputError(f"{path}: simulated ({SIMULATED_PREFIX}…) and real records mixed in one file")
    return _unblind(df, q, key, bool(simulated.all()), str(path))


def _unblind(df: pd.DataFrame, q: QuestionnaireDef, key: AnalystKey, simulated: bool, source: str) -> Responses:
    lik, pref, reg, dx, com = [], [], [], [], []
    likert, dx_item = q.item("likert"), q.item("diagnosis")
    for case_no, maps in key.blinding.groupby("case_no", sort=True):
        p, pseudonym = f"c{int(case_no):02d}", str(maps["pseudonym"].iloc[0])
        method = dict(zip(maps["label"], maps["method"], strict=True))
        for _, r in df.iterrows():
            base = {"record_id": r[RECORD_ID], "case_no": int(case_no), "pseudonym": pseudonym}
            if likert is not None:
                for lab in maps["label"]:
                    for s in likert.statements:
                        v = r[f"{p}_{lab.lower()}_{s.id}"]
                        if v != "":
                            lik.append({**base, "label": lab, "method": method[lab], "item": s.id, "value": int(v)})
            if q.item("preference") is not None and r[f"{p}_pref"] != "":
                choice = {"1": "A", "2": "B", "3": "none"}[r[f"{p}_pref"]]
                pref.append({**base, "method_a": method["A"], "method_b": method["B"], "choice": choice,
                             "preferred": method.get(choice, "none")})
            if q.item("regions") is not None:
                ticks = [int(r[f"{p}_regions___{c}"] or 0) for c in key.regions["code"]]
                if any(ticks):
                    reg += [{**base, "region_group": g, "ticked": t} for g, t in zip(REGION_GROUPS, ticks, strict=True)]
            if dx_item is not None:
                dx += [{**base, "rank": k, "text": r[f"{p}_dx{k}"]} for k in range(1, dx_item.n + 1)
                       if r[f"{p}_dx{k}"].strip()]
            if q.item("free_text") is not None and r[f"{p}_comment"].strip():
                com.append({**base, "text": r[f"{p}_comment"]})
    background = pd.DataFrame({"record_id": df[RECORD_ID]})
    if q.background is not None:
        background["specialty"] = df["specialty"].map(
            {str(i): s for i, s in enumerate(q.background.specialties, start=1)})
        for col in ("experience_years", "cases_per_year"):
            if col in df:
                background[col] = pd.to_numeric(df[col], errors="coerce")
    scs = pd.DataFrame(columns=["record_id", "item", "value"])
    if q.scs is not None:
        scs = df.melt(id_vars=[RECORD_ID], value_vars=[f"scs_{j:02d}" for j in range(1, 11)], var_name="item")
        scs = scs[scs["value"] != ""].assign(item=lambda t: t["item"].str[4:].astype(int),
                                             value=lambda t: t["value"].astype(int))
        scs = scs.sort_values([RECORD_ID, "item"], kind="stable").reset_index(drop=True)

    def frame(rows: list[dict], cols: list[str]) -> pd.DataFrame:
        return pd.DataFrame(rows, columns=cols)

    base = ["record_id", "case_no", "pseudonym"]
    return Responses(
        likert=frame(lik, [*base, "label", "method", "item", "value"]),
        preference=frame(pref, [*base, "method_a", "method_b", "choice", "preferred"]),
        regions=frame(reg, [*base, "region_group", "ticked"]),
        diagnosis=frame(dx, [*base, "rank", "text"]), comments=frame(com, [*base, "text"]),
        background=background, scs=scs, simulated=simulated, source=source)
