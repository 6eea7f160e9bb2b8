"""Simulated questionnaire responses, written as a REDCap raw-data CSV export, to exercise the analysis.

Every simulated rater's record id starts with :data:`~gestalt_xai.export.questionnaire_responses.SIMULATED_PREFIX`
(``SIMULATED-``), every free-text answer says "simulated", and the analysis labels every table and summary built
from them as simulated. The file has the layout of REDCap's raw-data export (see
:mod:`gestalt_xai.export.questionnaire_responses`): the record id, every non-descriptive field in dictionary order
(radio fields as choice codes, checkboxes as ``var___<code>`` columns of 0/1), ``<form>_complete`` = 2 after each
form; UTF-8, comma-separated, fields quoted where needed, LF line ends.

The answers follow a simple generative model drawn from one seeded NumPy generator: each method has a quality
(``method_quality``, on the Likert scale's steps; default 0 for every method), each rater a leniency
(normal, sd 0.5); a Likert answer is the scale's midpoint + quality + leniency + noise (sd 0.7), rounded and
clipped; the A/B preference is a logistic choice on the quality difference (10 % "no preference" when allowed);
the region checklist ticks each case's "true" regions (drawn per case: 2–4 groups, or ``true_regions``) with
probability 0.85 and others with 0.1. The same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.export.questionnaire_def import QuestionnaireDef
from gestalt_xai.export.questionnaire_responses import SIMULATED_PREFIX, expected_columns
from gestalt_xai.export.redcap import RECORD_ID, REGION_GROUPS
from gestalt_xai.runs import atomic_write_bytes

__all__ = ["simulate_redcap_export"]


def simulate_redcap_export(q: QuestionnaireDef, key: pd.DataFrame, n_raters: int, seed: int,
                           path: str | Path | None = None, method_quality: Mapping[str, float] | None = None,
                           true_regions: Mapping[str, Sequence[str]] | None = None) -> bytes:
    """Simulated responses of ``n_raters`` raters to ``q`` blinded by ``key`` (``blinding_key``), as the bytes of a
    REDCap raw-data CSV export (written to ``path`` when given).

    ``method_quality``: method → shift in Likert steps (positive: rated higher and preferred);
    ``true_regions``: case pseudonym → region groups the simulated clinicians tend to tick.
    """
    if n_raters < 1:
        raise ValueError("n_raters must be at least 1")
    rng = np.random.default_rng(seed)
    quality = {m: float((method_quality or {}).get(m, 0.0)) for m in q.maps.methods}
    cases = key.groupby("case_no", sort=True)
    truth = {}
    for _, maps in cases:
        pseudonym = str(maps["pseudonym"].iloc[0])
        if true_regions is not None and pseudonym in true_regions:
            truth[pseudonym] = set(true_regions[pseudonym])
        else:
            k = int(rng.integers(2, 5))
            truth[pseudonym] = {REGION_GROUPS[i] for i in rng.choice(len(REGION_GROUPS), size=k, replace=False)}
    columns = expected_columns(q, key)
    records = []
    for r in range(1, n_raters + 1):
        row = dict.fromkeys(columns, "")
        row[RECORD_ID] = f"{SIMULATED_PREFIX}{r:03d}"
        leniency = rng.normal(0.0, 0.5)
        if q.background is not None:
            row["specialty"] = str(int(rng.integers(1, len(q.background.specialties) + 1)))
            if "experience_years" in row:
                row["experience_years"] = str(int(rng.integers(1, 31)))
            if "cases_per_year" in row:
                row["cases_per_year"] = str(int(rng.integers(10, 500)))
        for case_no, maps in cases:
            p = f"c{int(case_no):02d}"
            pseudonym = str(maps["pseudonym"].iloc[0])
            method = dict(zip(maps["label"], maps["method"], strict=True))
            for item in q.case_items:
                if item.type == "likert":
                    top = len(item.scale)
                    for lab in maps["label"]:
                        for s in item.statements:
                            v = (top + 1) / 2 + quality[method[lab]] + leniency + rng.normal(0.0, 0.7)
                            row[f"{p}_{lab.lower()}_{s.id}"] = str(int(np.clip(np.rint(v), 1, top)))
                elif item.type == "preference":
                    if item.allow_no_preference and rng.random() < 0.1:
                        row[f"{p}_pref"] = "3"
                    else:
                        p_a = 1.0 / (1.0 + np.exp(-(quality[method["A"]] - quality[method["B"]])))
                        row[f"{p}_pref"] = "1" if rng.random() < p_a else "2"
                elif item.type == "regions":
                    for code, group in enumerate(REGION_GROUPS, start=1):
                        prob = 0.85 if group in truth[pseudonym] else 0.1
                        row[f"{p}_regions___{code}"] = "1" if rng.random() < prob else "0"
                elif item.type == "diagnosis":
                    for k in range(1, item.n + 1):
                        row[f"{p}_dx{k}"] = f"simulated syndrome {k}"
                elif item.type == "free_text":
                    row[f"{p}_comment"] = "simulated response"
        if q.scs is not None:
            for j in range(1, 11):
                row[f"scs_{j:02d}"] = str(int(np.clip(np.rint(3 + leniency + rng.normal(0, 0.7)), 1, 5)))
        for c in columns:
            if c.endswith("_complete"):
                row[c] = "2"
        records.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    data = buf.getvalue().encode("utf-8")
    if path is not None:
        atomic_write_bytes(path, data)
    return data
