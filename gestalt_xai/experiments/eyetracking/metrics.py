"""Saliency metrics of the MIT/Tübingen benchmark: how well a map predicts where observers looked.

Every definition is that of pysaliency 0.2.22 (Kümmerer, Wallis & Bethge, "Saliency benchmarking made easy", ECCV
2018), the reference implementation of the MIT/Tübingen saliency benchmark; the metrics are reviewed by Bylinskii,
Judd, Oliva, Torralba & Durand, "What do different evaluation metrics tell us about saliency models?", IEEE TPAMI
2019. Each is a NumPy function of one image, decorated with :func:`~gestalt_xai.assess.metric.metric` (family
``"eyetracking"``).

Conventions:

* A **saliency map** ``smap`` is a 2-D array (H, W) of finite values; larger = more salient.
* **Fixations** ``xs, ys`` are 1-D arrays in the map's pixel grid (x: column, y: row, origin top-left). They may be
  fractional: fixation ``(x, y)`` falls in pixel ``(int(y), int(x))``, the truncation of pysaliency's
  ``Fixations.x_int`` / ``y_int``, so pixel ``j`` covers ``[j, j + 1)``. Each must lie in ``0 ≤ x < W, 0 ≤ y < H``
  (a ``ValueError`` otherwise: truncation would move ``x = -0.5`` into column 0). A pixel fixated twice counts twice.
* A **fixation density** (second argument of :func:`cc`, :func:`sim`, :func:`kl_div`, :func:`iou_topk`) is a map of
  the same shape, e.g. the Gaussian-blurred fixation map; :func:`sim` and :func:`kl_div` normalise both maps with
  :func:`to_density`, so any non-negative scale will do. :func:`information_gain` takes true densities.
* **Random draws** (AUC-Borji's negatives, the subsampled shuffled AUC, AUC-Judd's jitter) are seeded: the same
  arguments give the same bytes.

Where the MIT benchmark's MATLAB code differs from pysaliency, pysaliency is followed and the difference is named in
the function's docstring.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from gestalt_xai.assess import compare
from gestalt_xai.assess.metric import metric

__all__ = ["auc_judd", "auc_borji", "auc_shuffled", "nss", "cc", "sim", "kl_div", "information_gain", "iou_topk",
           "to_density", "KL_EPS", "JITTER"]

#: the regulariser of MIT_KLDiv (pysaliency 0.2.22 ``metrics.MIT_KLDiv``; MATLAB's ``eps``)
KL_EPS = 2.2204e-16
#: standard deviation of the noise AUC-Judd adds to break ties (pysaliency ``RandomNoiseSaliencyMapModel``)
JITTER = 1e-7
#: tolerance on a density's sum in :func:`information_gain`
_SUM_TOL = 1e-5

_BYLINSKII = "Bylinskii et al., IEEE TPAMI 2019"
_PYSALIENCY = "Kümmerer et al., ECCV 2018 (pysaliency 0.2.22)"


# --------------------------------------------------------------------------------------------------------- checks
def _as_map(m: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(m)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} has {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr.astype(np.float64, copy=False)


def _same_shape(a: np.ndarray, b: np.ndarray, what_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what_b} shape {b.shape} does not match the saliency map's {a.shape}")


def _pixels(xs, ys, shape: tuple[int, int], what: str = "fixations") -> tuple[np.ndarray, np.ndarray]:
    """Validated fixations → integer pixel indices ``(cols, rows)`` (pysaliency's ``x_int``/``y_int``)."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{what}: xs and ys must be 1-D arrays of one length, got shapes {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError(f"{what}: no fixations")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{what}: non-finite coordinates")
    h, w = shape
    outside = (x < 0) | (x >= w) | (y < 0) | (y >= h)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"{what}: {int(outside.sum())} of {len(x)} lie outside the {w}×{h} grid "
                         f"(0 ≤ x < {w}, 0 ≤ y < {h}), e.g. #{i} at ({x[i]:g}, {y[i]:g})")
    return x.astype(np.intp), y.astype(np.intp)


# ------------------------------------------------------------------------------------------------------------ ROC
def _count_at_least(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``#{v ≥ θ}`` for each of the ascending ``thresholds``: each value is placed among the thresholds (a binary
    search, so only the thresholds are sorted — AUC-Judd's few fixated values against every pixel)."""
    below = np.bincount(np.searchsorted(thresholds, values, side="right"), minlength=len(thresholds) + 1)
    return len(values) - np.cumsum(below)[: len(thresholds)]


def _general_roc(positives: np.ndarray, negatives: np.ndarray, judd: bool) -> float:
    """pysaliency's ``general_roc`` AUC, vectorised: hit and false-positive rates ``#{v ≥ θ}/n`` at every threshold
    ``θ`` in descending order (``judd``: the positives' values between one above the maximum and the minimum of all
    values; else every positive and negative value), from ``(0, 0)``, integrated with the trapezoidal rule."""
    if judd:
        lo, hi = min(positives.min(), negatives.min()), max(positives.max(), negatives.max())
        thresholds = np.sort(np.concatenate(([hi + 1.0], positives, [lo])))
    else:
        thresholds = np.sort(np.concatenate((positives, negatives)))
    hits = np.zeros(len(thresholds) + 1)
    false = np.zeros(len(thresholds) + 1)
    hits[1:] = _count_at_least(positives, thresholds)[::-1] / len(positives)
    false[1:] = _count_at_least(negatives, thresholds)[::-1] / len(negatives)
    return float(np.trapezoid(hits, false))


def _auc_splits(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """The all-threshold AUC (``_general_roc(..., judd=False)``) of ``positives`` (P,) against each row of
    ``negatives`` (S, N) at once: the trapezoidal area under the empirical ROC through every threshold is the
    Mann–Whitney statistic ``U / (P N)`` with ties counted 1/2 (Hanley & McNeil, Radiology 1982), from average ranks."""
    s, n = negatives.shape
    p = len(positives)
    both = np.concatenate((np.broadcast_to(positives, (s, p)), negatives), axis=1)
    rank_sum = rankdata(both, axis=1)[:, :p].sum(axis=1)
    return (rank_sum - p * (p + 1) / 2) / (p * n)


# -------------------------------------------------------------------------------------------------------- helpers
def to_density(smap: np.ndarray, minimum_value: float = 0.0) -> np.ndarray:
    """A map as a probability distribution over pixels, as pysaliency's ``convert_saliency_map_to_density``: shifted
    by its minimum if that is negative, plus ``minimum_value``, divided by its sum (uniform if the sum is 0).

    Not the toolkit's ``sum-norm`` view (``m / Σ|m|``, which neither shifts negative maps nor spreads a zero map):
    this is the normalisation the benchmark's SIM and KL apply.

    >>> to_density(np.array([[-1.0, 1.0], [0.0, 0.0]])).tolist()
    [[0.0, 0.5], [0.25, 0.25]]
    >>> to_density(np.zeros((1, 4))).tolist()
    [[0.25, 0.25, 0.25, 0.25]]
    """
    m = _as_map(smap, "map")
    if m.min() < 0:
        m = m - m.min()
    m = m + minimum_value
    total = m.sum()
    return m / total if total else np.full(m.shape, 1.0 / m.size)


# -------------------------------------------------------------------------------------------------------- metrics
@metric("auc_judd", family="eyetracking", direction="higher",
        reference=f"Judd et al., ICCV 2009; {_BYLINSKII}; {_PYSALIENCY}")
def auc_judd(smap: np.ndarray, xs, ys, jitter: bool = True, seed: int = 42) -> float:
    """AUC-Judd: the map as a classifier of fixated (positives: one value per fixation) against unfixated pixels
    (negatives: every pixel no fixation falls in), thresholded at the fixated values only.

    pysaliency ``SaliencyMapModel.AUC_Judd``: with ``jitter``, noise ``JITTER · N(0, 1)`` drawn from
    ``np.random.RandomState(seed)`` (the legacy generator, to draw pysaliency's numbers) is first added to the map, so
    ties (e.g. hard zeros) are broken at random; thresholds are the positives' values plus one above every value and
    the minimum of all (``general_roc(..., judd=1)``), rates are ``#{v ≥ θ}`` over the counts. MIT's MATLAB
    ``AUC_Judd`` normalises the map to [0, 1] first and counts each fixated pixel once.

    >>> smap = np.zeros((4, 4)); smap[1, 2] = 1.0
    >>> auc_judd(smap, [2.7], [1.2]), auc_judd(smap, [0.0], [0.0], jitter=False)
    (1.0, 0.5)
    """
    m = _as_map(smap, "saliency map")
    cols, rows = _pixels(xs, ys, m.shape)
    if jitter:
        m = m + np.random.RandomState(seed).randn(*m.shape) * JITTER
    fixated = np.zeros(m.shape, bool)
    fixated[rows, cols] = True
    if fixated.all():
        raise ValueError("every pixel is fixated: no unfixated pixel is left as a negative")
    return _general_roc(m[rows, cols], m[~fixated], judd=True)


@metric("auc_borji", family="eyetracking", direction="higher",
        reference=f"Borji, Sihite & Itti, IEEE TIP 2013; {_BYLINSKII}; {_PYSALIENCY}")
def auc_borji(smap: np.ndarray, xs, ys, n_splits: int = 100, seed: int = 0) -> float:
    """AUC-Borji: the mean over ``n_splits`` splits of the AUC of the fixated values against as many pixels drawn
    uniformly at random (with replacement), as MIT's ``AUC_Borji.m``; draws from ``np.random.default_rng(seed)``.

    Each split's AUC uses every value as a threshold (pysaliency's ``general_roc``, ties counting 1/2), not MATLAB's
    thresholds at steps of 0.1 of the [0, 1]-normalised map, so values differ from MIT's by that discretisation.

    >>> yy, xx = np.mgrid[:20, :20]
    >>> round(auc_borji(-((xx - 5.0) ** 2 + (yy - 5.0) ** 2), [5, 6, 4], [5, 4, 6]), 3)
    0.992
    """
    m = _as_map(smap, "saliency map")
    cols, rows = _pixels(xs, ys, m.shape)
    if n_splits < 1:
        raise ValueError(f"n_splits must be ≥ 1, got {n_splits}")
    draws = np.random.default_rng(seed).integers(0, m.size, size=(n_splits, len(cols)))
    return float(_auc_splits(m[rows, cols], m.ravel()[draws]).mean())


@metric("auc_shuffled", family="eyetracking", direction="higher",
        reference=f"Zhang et al., J. Vision 2008; {_BYLINSKII}; {_PYSALIENCY}")
def auc_shuffled(smap: np.ndarray, xs, ys, other_xs, other_ys, n_splits: int | None = None, seed: int = 0) -> float:
    """Shuffled AUC: the fixated values against the map's values at the fixations made on *other* images
    (``other_xs, other_ys``, already in this map's grid), so a map scoring only the observers' shared biases (centre,
    face layout) scores 0.5.

    ``n_splits=None``: one AUC against every other fixation, thresholds at every value — pysaliency's ``sAUC``
    (``FullShuffledNonfixationProvider``) for images of one size. ``n_splits=S``: the mean over ``S`` splits, each
    against ``min(#fixations, #other)`` other fixations drawn without replacement from
    ``np.random.default_rng(seed)``, as MIT's ``AUC_shuffled.m`` (which, unlike this, thresholds at steps of 0.1).

    >>> smap = np.zeros((8, 8)); smap[2, 2] = 1.0
    >>> round(auc_shuffled(smap, [2, 2], [2, 2], [5, 6, 2], [5, 6, 2]), 6)
    0.833333
    """
    m = _as_map(smap, "saliency map")
    cols, rows = _pixels(xs, ys, m.shape)
    ocols, orows = _pixels(other_xs, other_ys, m.shape, "other images' fixations")
    positives, negatives = m[rows, cols], m[orows, ocols]
    if n_splits is None:
        return _general_roc(positives, negatives, judd=False)
    if n_splits < 1:
        raise ValueError(f"n_splits must be ≥ 1 or None, got {n_splits}")
    k = min(len(positives), len(negatives))
    order = np.tile(np.arange(len(negatives)), (n_splits, 1))
    picks = np.random.default_rng(seed).permuted(order, axis=1)[:, :k]
    return float(_auc_splits(positives, negatives[picks]).mean())


@metric("nss", family="eyetracking", direction="higher",
        reference=f"Peters et al., Vision Research 2005; {_BYLINSKII}; {_PYSALIENCY}")
def nss(smap: np.ndarray, xs, ys) -> float:
    """Normalised scanpath saliency: the mean over fixations of the map's z-score (population standard deviation)
    at the fixated pixel (pysaliency ``NSS``, averaged over fixations).

    A constant map scores exactly 0. pysaliency skips the division only when ``std`` is exactly 0, which rounding
    misses for most constants (a map of 0.3 has ``std`` ≈ 5.6e-17 and mean − 0.3 ≈ −5.6e-17, so pysaliency gives
    NSS 1.0); here the test is ``max == min``.

    >>> round(nss(np.array([[0.0, 0.0], [0.0, 4.0]]), [1], [1]), 6)  # (4 - 1) / √3
    1.732051
    """
    m = _as_map(smap, "saliency map")
    cols, rows = _pixels(xs, ys, m.shape)
    if np.ptp(m) == 0:
        return 0.0
    return float(((m[rows, cols] - m.mean()) / m.std()).mean())


@metric("cc", family="eyetracking", direction="higher", reference=f"Le Meur et al., Vision Research 2007; {_BYLINSKII}")
def cc(smap: np.ndarray, density: np.ndarray) -> float:
    """Pearson correlation of the map and a fixation density over pixels: :func:`gestalt_xai.assess.compare.pearson`.

    One convention differs from ``pearson``: a constant saliency map against a varying density scores 0.0 (no
    linear relation), as pysaliency's ``CC`` does, where ``pearson`` gives NaN; a constant density stays NaN.

    >>> cc(np.ones((3, 3)), np.eye(3)), round(cc(np.eye(3), 2 * np.eye(3) + 1), 6)
    (0.0, 1.0)
    """
    m, d = _as_map(smap, "saliency map"), _as_map(density, "fixation density")
    _same_shape(m, d, "fixation density")
    if np.ptp(m) == 0 and np.ptp(d) > 0:
        return 0.0
    return compare.pearson(m, d)


@metric("sim", family="eyetracking", direction="higher", reference=f"Swain & Ballard, IJCV 1991; {_BYLINSKII}")
def sim(smap: np.ndarray, density: np.ndarray) -> float:
    """Similarity (histogram intersection): ``Σ min(P, Q)`` of the two maps as distributions (:func:`to_density`),
    1 for identical distributions, 0 for disjoint ones (pysaliency ``SIM``).

    >>> sim(np.array([[1.0, 1.0]]), np.array([[3.0, 1.0]]))
    0.75
    """
    m, d = _as_map(smap, "saliency map"), _as_map(density, "fixation density")
    _same_shape(m, d, "fixation density")
    return float(np.minimum(to_density(m), to_density(d)).sum())


@metric("kl_div", family="eyetracking", direction="lower", reference=f"{_BYLINSKII}; {_PYSALIENCY}")
def kl_div(smap: np.ndarray, density: np.ndarray) -> float:
    """Image-based KL divergence of the map ``P`` from the fixation density ``Q`` (both via :func:`to_density`):
    ``Σ Q log(ε + Q / (P + ε))`` with ``ε = KL_EPS`` (natural log) — pysaliency's ``MIT_KLDiv(smap, density)``,
    the MIT benchmark's ``KLdiv.m``. A map with hard zeros where ``Q > 0`` scores ≈ ``Q · 36`` there (log 1/ε):
    it is not robust to them.

    >>> abs(kl_div(np.array([[1.0, 1.0]]), np.array([[1.0, 1.0]]))) < 1e-12
    True
    >>> round(kl_div(np.array([[0.0, 1.0]]), np.array([[1.0, 1.0]])), 3)
    17.329
    """
    m, d = _as_map(smap, "saliency map"), _as_map(density, "fixation density")
    _same_shape(m, d, "fixation density")
    p, q = to_density(m), to_density(d)
    return float((q * np.log(KL_EPS + q / (p + KL_EPS))).sum())


def _check_density(d: np.ndarray, what: str) -> None:
    if (d <= 0).any():
        raise ValueError(f"{what} must be positive everywhere (log density); {int((d <= 0).sum())} pixels are ≤ 0")
    total = d.sum()
    if abs(total - 1.0) > _SUM_TOL:
        raise ValueError(f"{what} must sum to 1 (±{_SUM_TOL:g}), sums to {total:.8g}")


@metric("information_gain", family="eyetracking", direction="higher",
        reference=f"Kümmerer, Wallis & Bethge, PNAS 2015; {_PYSALIENCY}")
def information_gain(density: np.ndarray, baseline_density: np.ndarray, xs, ys) -> float:
    """Information gain of a density over a baseline density, in bits per fixation: the mean over fixations of
    ``log₂ p(x, y) − log₂ p_baseline(x, y)`` (pysaliency ``Model.information_gain``, average over fixations).

    Both arguments must be probability distributions over the map's pixels: positive everywhere and summing to 1
    (within 1e-5), else ``ValueError``; build them with :func:`to_density` and a ``minimum_value`` (or a mixture with
    a uniform map) from a map with zeros.

    >>> uniform = np.full((2, 2), 0.25)
    >>> information_gain(np.array([[0.5, 0.25], [0.125, 0.125]]), uniform, [0, 1], [0, 0])
    0.5
    """
    d, b = _as_map(density, "density"), _as_map(baseline_density, "baseline density")
    _same_shape(d, b, "baseline density")
    _check_density(d, "density")
    _check_density(b, "baseline density")
    cols, rows = _pixels(xs, ys, d.shape)
    return float(np.mean((np.log(d[rows, cols]) - np.log(b[rows, cols])) / np.log(2)))


@metric("iou_topk", family="eyetracking", direction="higher",
        reference="Duong et al., PLoS Genet 2024; Hedström et al., JMLR 2023 (Quantus)")
def iou_topk(smap: np.ndarray, density: np.ndarray, k: float = 0.1) -> float:
    """Intersection over union of the top-``k`` fractions of pixels of the map and of the fixation density:
    :func:`gestalt_xai.assess.compare.topk_iou` (ties towards the lower row-major index).

    >>> iou_topk(np.array([[4.0, 3.0, 2.0, 1.0]]), np.array([[4.0, 1.0, 3.0, 2.0]]), k=0.5)
    0.3333333333333333
    """
    m, d = _as_map(smap, "saliency map"), _as_map(density, "fixation density")
    _same_shape(m, d, "fixation density")
    return compare.topk_iou(m, d, k=k)


def cc_iou_many(smaps: np.ndarray, densities: np.ndarray, k: float = 0.1) -> dict[str, np.ndarray]:
    """:func:`cc` and :func:`iou_topk` of each pair ``smaps[i], densities[i]`` (``(N, H, W)`` each) in one
    :func:`gestalt_xai.assess.compare.compare_maps` call (the same implementation, vectorised over the pairs).

    >>> m = np.random.default_rng(0).random((3, 8, 8)); d = m / m.sum((1, 2), keepdims=True)
    >>> out = cc_iou_many(np.concatenate([m, np.ones((1, 8, 8))]), np.concatenate([d, d[:1]]))
    >>> out["cc"].round(6).tolist(), out["iou_topk"].round(4).tolist()
    ([1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0909])
    """
    smaps, densities = np.asarray(smaps), np.asarray(densities)
    if smaps.shape != densities.shape or smaps.ndim != 3:
        raise ValueError(f"need two (N, H, W) arrays of one shape, got {smaps.shape} and {densities.shape}")
    out = compare.compare_maps(smaps, densities, ("pearson", "topk_iou"), k=k)
    flat = np.ptp(smaps.reshape(len(smaps), -1), axis=1) == 0
    flat &= np.ptp(densities.reshape(len(smaps), -1), axis=1) > 0
    return {"cc": np.where(flat, 0.0, out["pearson"]), "iou_topk": out["topk_iou"]}
