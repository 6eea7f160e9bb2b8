"""Subject-level statistics for the assess summaries: bootstrap intervals, strata breakdowns, paired method tests.

Photos of one subject are not independent (same face, often the same session), so every interval and test here
works on **per-subject means**: a subject's values are averaged first and each subject counts once.

* :func:`subject_bootstrap` — the mean of the subject means with a percentile bootstrap interval over subjects
  (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13; the cluster bootstrap of Field & Welsh,
  JRSS-B 2007, resampling whole subjects).
* :func:`breakdown` — that summary per group (e.g. method × metric), overall and per stratum of the cohort (sex, age
  band, ancestry), with strata labelled as the aggregate stage labels them (``all``, ``sex:F``, ``age_band:2-5y``:
  :func:`gestalt_xai.aggregate.faces.subject_strata`).
* :func:`paired_tests` — per pair of methods, the Wilcoxon signed-rank test (Wilcoxon, Biometrics Bulletin 1945) on
  the per-subject differences of the subjects both methods have, with Holm's step-down adjustment across the pairs
  of a group (:func:`holm`; Holm, Scand. J. Statist. 1979).

NaN values (an undefined correlation, a map without mass) are dropped before averaging; counts report the values
used.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from gestalt_xai.aggregate.faces import WHOLE, subject_strata

__all__ = ["MIN_PAIRED", "subject_means", "subject_bootstrap", "breakdown", "holm", "paired_tests"]

#: fewest subjects with both methods for a paired test (below 6 the two-sided exact p cannot reach 0.05)
MIN_PAIRED = 6


def subject_means(values: Sequence[float] | np.ndarray, subjects: Sequence | np.ndarray) -> pd.Series:
    """Mean of each subject's finite values, indexed by subject (sorted); subjects without any are left out.

    >>> subject_means([1.0, 3.0, 5.0, np.nan], ["a", "a", "b", "c"]).to_dict()
    {'a': 2.0, 'b': 5.0}
    """
    v, subj = np.asarray(values, np.float64), np.asarray(subjects)
    if v.shape != subj.shape:
        raise ValueError(f"values {v.shape} and subjects {subj.shape} differ in length")
    ok = np.isfinite(v)
    keys, inverse = np.unique(subj[ok], return_inverse=True)  # sorted, as a sorted groupby (NumPy: 10× faster)
    sums = np.bincount(inverse, weights=v[ok], minlength=len(keys))
    return pd.Series(sums / np.bincount(inverse, minlength=len(keys)), index=pd.Index(keys, name="subject"))


def _percentile_interval(means: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``means`` (scipy.stats.bootstrap's ``method="percentile"``),
    drawn with ``numpy.random.default_rng(seed)`` so it is the same on every scipy version."""
    if len(means) < 2:
        return np.nan, np.nan
    rng = np.random.default_rng(seed)
    boot = means[rng.integers(0, len(means), size=(n_boot, len(means)))].mean(1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def subject_bootstrap(values: Sequence[float] | np.ndarray, subjects: Sequence | np.ndarray, *, n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of per-subject means and its percentile bootstrap interval over subjects.

    Deterministic for a ``seed``; the interval is NaN with fewer than two subjects (the mean is NaN without any).

    >>> subject_bootstrap([1.0, 1.0, 1.0, 3.0], ["a", "a", "a", "b"], n_boot=200)[0]
    2.0
    >>> subject_bootstrap([1.0, 2.0], ["a", "a"])
    (1.5, nan, nan)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means = subject_means(values, subjects).to_numpy()
    mean = float(means.mean()) if len(means) else np.nan
    return (mean, *_percentile_interval(means, n_boot, level, seed))


def _stratum_key(label: str, order: dict[str, int]) -> tuple:
    """Strata in kind order, values in natural order (``age_band:2-5y`` before ``age_band:10-18y``)."""
    kind = label.split(":", 1)[0]
    parts = re.split(r"(\d+(?:\.\d+)?)", label)
    return order[kind], [(0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts)]


def breakdown(frame: pd.DataFrame, value: str, keys: Sequence[str], strata_table: pd.DataFrame | None,
              strata: Sequence[str] = ("sex", "age_band", "ancestry"), subject: str = "subject_id", seed: int = 0,
              n_boot: int = 2000, level: float = 0.95) -> pd.DataFrame:
    """Per group of ``keys``: the overall row (``stratum="all"``) and one row per stratum value (``"sex:F"`` …).

    ``frame`` holds one row per image (or per image and feature …) with ``value``, ``subject`` and ``keys``;
    ``strata_table`` is :func:`gestalt_xai.aggregate.faces.strata_of`'s per-subject table (``None``: overall rows
    only). Stratum kinds the table lacks are skipped; a subject missing from it counts in ``all`` only. Columns:
    ``*keys, stratum, mean, ci_lo, ci_hi, n_images, n_subjects`` (:func:`subject_bootstrap`; ``n_images`` counts
    the finite values used).

    >>> f = pd.DataFrame({"m": "x", "v": [1.0, 2.0, 3.0], "subject_id": ["a", "b", "c"]})
    >>> t = pd.DataFrame({"subject_id": ["a", "b", "c"], "sex": ["F", "F", "M"]})
    >>> breakdown(f, "v", ["m"], t)[["m", "stratum", "mean", "n_subjects"]].values.tolist()
    [['x', 'all', 2.0, 3], ['x', 'sex:F', 1.5, 2], ['x', 'sex:M', 3.0, 1]]
    """
    keys = list(keys)
    kinds = [] if strata_table is None else [k for k in strata if k in strata_table.columns]
    of_subject = {} if strata_table is None else subject_strata(strata_table, kinds)
    order = {kind: i for i, kind in enumerate([WHOLE, *kinds])}
    rows = []
    groups = frame.groupby(keys, sort=True, dropna=False) if keys else [((), frame)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        finite = group[np.isfinite(group[value].to_numpy(np.float64))]
        subj = finite[subject].astype(str).to_numpy()
        labels = [of_subject.get(s, [WHOLE]) for s in subj]
        found = sorted({lab for labs in labels for lab in labs} | {WHOLE}, key=lambda lab: _stratum_key(lab, order))
        for label in found:
            sel = np.array([label in labs for labs in labels], bool)
            vals, ids = finite[value].to_numpy(np.float64)[sel], subj[sel]
            mean, lo, hi = subject_bootstrap(vals, ids, n_boot=n_boot, level=level, seed=seed)
            rows.append({**dict(zip(keys, key, strict=True)), "stratum": label, "mean": mean, "ci_lo": lo,
                         "ci_hi": hi, "n_images": int(sel.sum()), "n_subjects": len(set(ids))})
    columns = [*keys, "stratum", "mean", "ci_lo", "ci_hi", "n_images", "n_subjects"]
    return pd.DataFrame(rows, columns=columns)


def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN entries stay NaN and are not counted.

    >>> holm([0.01, 0.04, 0.03, np.nan]).round(4).tolist()
    [0.03, 0.06, 0.06, nan]
    """
    p = np.asarray(p, np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order]) if m else np.empty(0)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def paired_tests(frame: pd.DataFrame, value: str, method: str = "method", subject: str = "subject_id",
                 keys: Sequence[str] = (), alternative: str = "two-sided") -> pd.DataFrame:
    """Wilcoxon signed-rank tests between every pair of methods within each group of ``keys``.

    Per pair ``(method_a, method_b)`` (sorted names, ``a < b``): the subjects with finite values for both, the
    per-subject mean difference ``a − b``, its median, the two-sided (or ``alternative``: ``"greater"`` means a > b)
    p-value of ``scipy.stats.wilcoxon`` (zero differences dropped, Wilcoxon's convention), and ``p_holm``, Holm-
    adjusted over the pairs of the group. With fewer than :data:`MIN_PAIRED` subjects ``p`` is NaN and ``reason``
    says why; all-zero differences give ``p = 1`` (no difference to test); ``reason`` is ``""`` otherwise.
    Columns: ``*keys, method_a, method_b, n_subjects, median_diff, p, p_holm, reason``.

    >>> rng = np.random.default_rng(0); s = np.repeat(np.arange(10), 2)
    >>> f = pd.DataFrame({"method": ["a", "b"] * 10, "subject_id": s, "v": rng.normal(size=20) + [1, 0] * 10})
    >>> t = paired_tests(f, "v")
    >>> t[["method_a", "method_b", "n_subjects"]].values.tolist(), bool(t["p"][0] < 0.05)
    ([['a', 'b', 10]], True)
    """
    keys = list(keys)
    rows = []
    groups = frame.groupby(keys, sort=True, dropna=False) if keys else [((), frame)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        finite = group[np.isfinite(group[value].to_numpy(np.float64))]
        table = finite.groupby([subject, method])[value].mean().unstack(method)
        first = len(rows)
        for a, b in itertools.combinations(sorted(table.columns, key=str), 2):
            diff = (table[a] - table[b]).dropna().to_numpy()
            row = {**dict(zip(keys, key, strict=True)), "method_a": a, "method_b": b, "n_subjects": len(diff),
                   "median_diff": float(np.median(diff)) if len(diff) else np.nan, "p": np.nan, "reason": ""}
            if len(diff) < MIN_PAIRED:
                row["reason"] = f"{len(diff)} paired subjects < {MIN_PAIRED}"
            elif not diff.any():
                row["p"], row["reason"] = 1.0, "all differences zero"
            else:
                row["p"] = float(wilcoxon(diff, alternative=alternative).pvalue)
            rows.append(row)
        for row, adj in zip(rows[first:], holm([r["p"] for r in rows[first:]]), strict=True):
            row["p_holm"] = float(adj)
    columns = [*keys, "method_a", "method_b", "n_subjects", "median_diff", "p", "p_holm", "reason"]
    return pd.DataFrame(rows, columns=columns)
