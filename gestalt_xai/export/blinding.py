"""Blinding of a questionnaire: the case order, each case's shown methods and their letters, drawn from the seed.

The raters see maps labelled A, B, … only; the key (case → pseudonym, letter → method) is for the analyst and is
written apart from every file a rater or a survey platform receives. The two methods of the A/B preference always
get the letters A and B (which one is A is drawn per case); further maps (C, D) are drawn per case from the remaining
methods. Everything is drawn from one NumPy generator seeded with the questionnaire's seed, so the same seed gives
the same key and another seed another order and blinding.
"""

from __future__ import annotations

import string

import numpy as np
import pandas as pd

from gestalt_xai.export.questionnaire_def import QuestionnaireDef

__all__ = ["KEY_COLUMNS", "blinding_key", "case_form"]

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
