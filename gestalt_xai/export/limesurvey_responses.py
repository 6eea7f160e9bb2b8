"""Import of LimeSurvey response exports of the questionnaire's LimeSurvey survey (``limesurvey/<name>.txt``).

LimeSurvey's *Export responses* (LimeSurvey Manual, "Export responses"; the RemoteControl API's
``export_responses`` with ``sHeadingType="code"`` and ``sResponseType="short"``) writes CSV with one row per
response: the response ``id`` and the survey's own columns (``submitdate``, ``lastpage``, ``startlanguage``,
``seed``, ``startdate``, ``datestamp``, …) first, then one column per question code; an array question's (``F``)
and a multiple-choice question's (``M``) subquestions are columns ``<question code>[<subquestion code>]``. With
"answer codes" a list (``L``) or array cell holds the answer code (here ``A1``, ``A2``, …), a multiple-choice cell
``Y`` when ticked and empty otherwise (the export's "Convert Y to" option may turn it into ``1``; ``N``/``0`` are
read as not ticked). An unsubmitted response has an empty ``submitdate``.

The export is translated, code by code, into the layout of a REDCap raw-data export of the same questionnaire
(:func:`~gestalt_xai.export.questionnaire_responses.expected_columns`, the codes of
:func:`~gestalt_xai.export.questionnaire.limesurvey_tsv` being the REDCap variable names without ``_``) and then
checked and un-blinded exactly as a REDCap export is. Headings as full question texts, or answers as full texts,
fail naming the file and the first missing code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from gestalt_xai.errors import InputError
from gestalt_xai.export.questionnaire_def import QuestionnaireDef
from gestalt_xai.export.questionnaire_responses import (
    AnalystKey,
    Responses,
    checked_responses,
    expected_columns,
)
from gestalt_xai.export.redcap import RECORD_ID

__all__ = ["limesurvey_column", "read_limesurvey_export"]

_TICKED = {"Y": "1", "1": "1", "N": "0", "0": "0", "": "0"}


def limesurvey_column(redcap_column: str, q: QuestionnaireDef) -> str | None:
    """The LimeSurvey export heading of a REDCap export column (``None`` for ``<form>_complete``).

    >>> from gestalt_xai.export.questionnaire_def import load_questionnaire
    >>> q = load_questionnaire(Path(__file__).resolve().parents[2] / "questionnaires" / "default.yaml")
    >>> [limesurvey_column(c, q) for c in ["c01_b_trust", "c01_regions___3", "scs_04", "c02_dx1", "case_01_complete"]]
    ['c01likb[trust]', 'c01regions[R3]', 'scs[SCS04]', 'c02dx1', None]
    """
    if redcap_column.endswith("_complete"):
        return None
    if m := re.fullmatch(r"(c\d\d)_([a-d])_([a-z][a-z0-9_]*)", redcap_column):
        likert = q.item("likert")
        if likert is not None and m.group(3) in {s.id for s in likert.statements}:
            return f"{m.group(1)}lik{m.group(2)}[{m.group(3)}]"
    if m := re.fullmatch(r"(c\d\d)_regions___(\d+)", redcap_column):
        return f"{m.group(1)}regions[R{m.group(2)}]"
    if m := re.fullmatch(r"scs_(\d\d)", redcap_column):
        return f"scs[SCS{m.group(1)}]"
    return redcap_column.replace("_", "")


def read_limesurvey_export(path: str | Path, q: QuestionnaireDef, key: AnalystKey) -> Responses:
    """Read a LimeSurvey CSV response export (question-code headings, answer codes) of ``q`` and un-blind it with
    ``key``; a wrong file raises :class:`~gestalt_xai.errors.InputError` naming ``path`` and the problem."""
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", sep=None, engine="python")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, ValueError) as e:
        raise InputError(f"{path}: cannot be read as a LimeSurvey CSV export ({e})") from e
    if "id" not in raw.columns or "submitdate" not in raw.columns:
        raise InputError(f"{path}: not a LimeSurvey response export with question-code headings (no 'id' and "
                         "'submitdate' columns)")
    out = pd.DataFrame(index=raw.index)
    for col in expected_columns(q, key.blinding):
        if col == RECORD_ID:
            out[col] = raw["id"]
            continue
        ls = limesurvey_column(col, q)
        if ls is None:  # REDCap's form status: complete when the response was submitted
            out[col] = raw["submitdate"].map(lambda d: "2" if d.strip() else "0")
            continue
        if ls not in raw.columns:
            raise InputError(f"{path}: column {ls!r} missing (an export of another questionnaire or key, or headings "
                             "not as question codes `code[subcode]`: export with question-code headings, without "
                             "ExpressionScript codes)")
        values = raw[ls].str.strip()
        if "___" in col:
            bad = sorted(set(values) - set(_TICKED))
            if bad:
                raise InputError(f"{path}: multiple-choice column {ls!r} holds {bad[:5]}, not Y or empty")
            values = values.map(_TICKED)
        elif re.fullmatch(r"scs\[.*|c\d\dlik.*|specialty|c\d\dpref", ls):
            values = values.map(lambda v: v[1:] if re.fullmatch(r"A\d+", v) else v if v == "" else f"?{v}")
        out[col] = values
    return checked_responses(out, path, q, key)
