"""Blinding of a questionnaire: the case order, each case's shown methods and their letters, drawn from the seed.

The raters see maps labelled A, B, … only; the key (case → pseudonym, letter → method) is for the analyst and is
written apart from every file a rater or a survey platform receives. The two methods of the A/B preference always
get the letters A and B (which one is A is drawn per case); further maps (C, D) are drawn per case from the remaining
methods. Everything is drawn from one NumPy generator seeded with the questionnaire's seed, so the same seed gives
the same key and another seed another order and blinding.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.export.questionnaire_def import QuestionnaireDef
from gestalt_xai.runs import atomic_write_bytes

__all__ = ["KEY_COLUMNS", "blinding_key", "case_form", "write_analyst_key"]

#: one row per shown map: the case's position (1-based) and form, its pseudonym, the letter and the hidden method
KEY_COLUMNS = ["case_no", "form", "pseudonym", "label", "method", "preference_pair"]


def case_form(case_no: int) -> str:
    """The REDCap form (instrument) name of the ``case_no``-th case (1-based)."""
    return f"case_{case_no:02d}"


def blinding_key(q: QuestionnaireDef, pseudonyms: list[str]) -> pd.DataFrame:
    """The analyst's key for cases given by their pseudonyms (never raw ids): columns :data:`KEY_COLUMNS`.

    >>> from gestalt_xai.export.questionnaire_def import MapSelection, QuestionnaireDef
    >>> q = QuestionnaireDef(name="t", title="test", maps=MapSelection(methods=["a", "b", "c"], per_case=3),
    ...                      case_items=[{"type": "free_text"}])
    >>> key = blinding_key(q, ["C-X", "C-Y"])
    >>> sorted(key.loc[key["case_no"] == 1, "label"])
    ['A', 'B', 'C']
    >>> sorted(set(key.loc[key["label"].isin(["A", "B"]), "method"]))
    ['a', 'b']
    """
    if len(set(pseudonyms)) != len(pseudonyms):
        raise ValueError("case pseudonyms repeat")
    rng = np.random.default_rng(q.seed)
    pair = list(q.maps.preference_pair)
    others = [m for m in q.maps.methods if m not in pair]
    rows = []
    for case_no, i in enumerate(rng.permutation(len(pseudonyms)), start=1):
        first = [pair[j] for j in rng.permutation(2)]
        extra = [others[j] for j in rng.permutation(len(others))[: q.maps.per_case - 2]]
        for label, method in zip(string.ascii_uppercase, first + extra, strict=False):
            rows.append({"case_no": case_no, "form": case_form(case_no), "pseudonym": pseudonyms[int(i)],
                         "label": label, "method": method, "preference_pair": method in pair})
    return pd.DataFrame(rows, columns=KEY_COLUMNS)


def write_analyst_key(folder: str | Path, key: pd.DataFrame, cases: pd.DataFrame,
                      region_groups: tuple[str, ...]) -> dict[str, Path]:
    """Write the analyst-only key into ``folder`` (a run's ``private/`` folder, never sent to raters):
    ``blinding_key.csv`` (case → letter → method), ``cases_key.csv`` (pseudonym → raw id, only the cases of this
    export, from :meth:`~gestalt_xai.pseudonyms.PseudonymMap.table`) and ``regions_key.csv`` (checkbox code → the
    anatomical region group). Returns label → path.
    """
    folder = Path(folder)
    missing = sorted(set(key["pseudonym"]) - set(cases["pseudonym"]))
    if missing:
        raise ValueError(f"cases {missing[:3]} of the key have no entry in the pseudonym table")
    shown = cases[cases["pseudonym"].isin(set(key["pseudonym"]))].sort_values("pseudonym", kind="stable")
    regions = pd.DataFrame({"code": range(1, len(region_groups) + 1), "region_group": list(region_groups)})
    out = {"blinding_key": folder / "blinding_key.csv", "cases_key": folder / "cases_key.csv",
           "regions_key": folder / "regions_key.csv"}
    for label, table in (("blinding_key", key), ("cases_key", shown[["pseudonym", "raw_id"]]),
                         ("regions_key", regions)):
        atomic_write_bytes(out[label], table.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return out
