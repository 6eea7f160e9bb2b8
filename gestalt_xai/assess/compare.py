"""Map-to-map similarity: the one implementation of the package (sanity checks, occlusion agreement, eye tracking).

Each metric is a function of two 2-D maps of one shape returning a float, registered with
:func:`~gestalt_xai.assess.metric.metric` (family ``"comparison"``); :func:`compare_maps` computes several of them for
``N`` pairs of maps at once (vectorised except SSIM and EMD, which loop). Every function takes an optional boolean
``mask`` (H, W): pixel-wise metrics then use only the pixels inside it.

Conventions (the literature differs; Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018):

* **Correlations** (:func:`spearman`, :func:`spearman_abs`, :func:`pearson`) over pixels; Spearman ranks ties by their
  average rank (``scipy.stats.rankdata``). A constant map (or, for :func:`cosine`, an all-zero map) has no defined
  correlation: NaN, without a ``RuntimeWarning``. :func:`spearman_abs` compares ``|a|`` and ``|b|`` (Adebayo's
  "absolute value" variant, for methods whose sign is arbitrary).
* **SSIM** (:func:`ssim`): scikit-image's ``structural_similarity`` (Wang et al., IEEE TIP 2004; 7×7 uniform window,
  sample covariance, the image border of 3 pixels left out of the mean) on each map min-max rescaled to [0, 1],
  ``data_range=1``, as Adebayo et al. do. Quantus 0.6 instead uses the joint range of both raw maps; both agree for
  maps already in [0, 1] spanning it. A constant map rescales to all zeros: two constant maps have SSIM 1, a constant
  map against a varying one the SSIM of a zero image against it (low, never NaN). With a mask, the rescaling uses the
  pixels inside it and the local SSIM image is averaged over them (windows at the mask's edge see their neighbours).
* **Top-k IoU** (:func:`topk_iou`): the ``round(k · P)`` pixels (at least 1) of largest *signed* value of each map,
  ties broken towards the lower row-major pixel index (a stable sort), and the intersection over union of the two
  sets.
* **EMD** (:func:`emd`): each map's positive part, summed into ``size × size`` blocks (block-mean downsampling up to
  the blocks' areas), normalised to a distribution; the 2-D Earth Mover's (Wasserstein-1) distance with Euclidean
  ground distance between block centres in *original* pixel units (Rubner et al., IJCV 2000), so a point mass moved
  by ``d`` pixels (a whole number of blocks) costs ``d``. A map without positive mass gives NaN.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import sparse
from scipy.optimize import linprog
from scipy.spatial import distance_matrix
from scipy.stats import rankdata
from skimage.metrics import structural_similarity

from gestalt_xai.assess.metric import metric
from gestalt_xai.errors import ConfigError

__all__ = ["ssim", "spearman", "spearman_abs", "pearson", "cosine", "topk_iou", "emd", "compare_maps", "COMPARISONS"]

_ADEBAYO = "Adebayo et al., NeurIPS 2018"


def _pairs(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)  # float32 maps stay float32 for ranking (3× faster); sums run in float64
    a, b = (x if x.dtype.kind == "f" else x.astype(np.float64) for x in (a, b))
    if a.shape != b.shape or a.ndim != ndim:
        raise ValueError(f"need two {ndim}-D arrays of one shape, got {a.shape} and {b.shape}")
    if mask is not None and np.asarray(mask).shape != a.shape[-2:]:
        raise ValueError(f"mask shape {np.asarray(mask).shape} does not match maps {a.shape[-2:]}")
    return a, b


def _pixels(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(N, H, W) → (N, P): all pixels, or those inside ``mask``."""
    return x.reshape(len(x), -1) if mask is None else x[:, np.asarray(mask, bool)]


def _corr_rows(x: np.ndarray, y: np.ndarray, centre: bool = True) -> np.ndarray:
    """Row-wise Pearson correlation (``centre``) or cosine similarity of (N, P) arrays; NaN for a constant (zero)
    row, computed without warnings."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    if centre:
        x = x - x.mean(1, keepdims=True)
        y = y - y.mean(1, keepdims=True)
        degenerate = (np.ptp(x, 1) == 0) | (np.ptp(y, 1) == 0)
    else:
        degenerate = ~(x != 0).any(1) | ~(y != 0).any(1)
    den = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    out = np.full(len(x), np.nan)
    ok = ~degenerate & (den > 0)
    out[ok] = np.clip((x[ok] * y[ok]).sum(1) / den[ok], -1.0, 1.0)
    return out


def _pearson_n(a, b, mask=None):
    return _corr_rows(_pixels(a, mask), _pixels(b, mask))


def _spearman_n(a, b, mask=None):
    return _corr_rows(rankdata(_pixels(a, mask), axis=1), rankdata(_pixels(b, mask), axis=1))


def _spearman_abs_n(a, b, mask=None):
    return _spearman_n(np.abs(a), np.abs(b), mask)


def _cosine_n(a, b, mask=None):
    return _corr_rows(_pixels(a, mask), _pixels(b, mask), centre=False)


def _topk_n(a, b, mask=None, k: float = 0.1):
    x, y = _pixels(a, mask), _pixels(b, mask)
    if not 0 < k <= 1:
        raise ConfigError(f"k must be a fraction in (0, 1], got {k}")
    n = max(1, int(round(k * x.shape[1])))
    top = [_top_n(v, n) for v in (x, y)]
    inter = (top[0] & top[1]).sum(1)
    return inter / (2 * n - inter)


def _top_n(v: np.ndarray, n: int) -> np.ndarray:
    """Boolean (N, P): each row's ``n`` largest values, ties at the threshold broken towards the lower index — the
    first ``n`` of a stable descending sort, found by partition (O(P), not O(P log P)).

    >>> _top_n(np.array([[1.0, 3.0, 3.0, 3.0, 0.0]]), 3).astype(int).tolist()
    [[0, 1, 1, 1, 0]]
    >>> _top_n(np.array([[1.0, 3.0, 3.0, 3.0, 0.0]]), 2).astype(int).tolist()
    [[0, 1, 1, 0, 0]]
    """
    thr = -np.partition(-v, n - 1, axis=1)[:, n - 1 : n]  # the n-th largest value of each row
    above = v > thr
    tied = v == thr
    need = n - above.sum(1, keepdims=True)
    return above | (tied & (np.cumsum(tied, axis=1) <= need))


def _rescale(x: np.ndarray, inside: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    lo, hi = x[inside].min(), x[inside].max()
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def _ssim_n(a, b, mask=None):
    inside = np.ones(a.shape[1:], bool) if mask is None else np.asarray(mask, bool)
    out = np.empty(len(a))
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        x, y = _rescale(x, inside), _rescale(y, inside)
        if mask is None:
            out[i] = structural_similarity(x, y, data_range=1.0)
        else:
            _, local = structural_similarity(x, y, data_range=1.0, full=True)
            out[i] = local[inside].mean()
    return out


def _blocks(shape: tuple[int, int], size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Block edges per axis and the blocks' centres (size*size, 2) in pixel coordinates."""
    if not 1 <= size <= min(shape):
        raise ConfigError(f"size must be in [1, {min(shape)}] for maps of shape {shape}, got {size}")
    edges = [np.round(np.linspace(0, n, size + 1)).astype(int) for n in shape]
    centres = [(e[:-1] + e[1:] - 1) / 2 for e in edges]
    return edges, np.stack(np.meshgrid(*centres, indexing="ij"), -1).reshape(-1, 2)


def _emd_one(p: np.ndarray, q: np.ndarray, centres: np.ndarray) -> float:
    """EMD between distributions ``p`` and ``q`` on ``centres``: the transport LP (Rubner et al., IJCV 2000) over the
    occupied blocks, solved in primal form by HiGHS (measured ≈ 5× faster here than ``wasserstein_distance_nd``,
    which solves the dual of the same LP; they agree to 1e-9)."""
    iu, iv = np.flatnonzero(p), np.flatnonzero(q)
    m, n = len(iu), len(iv)
    cost = distance_matrix(centres[iu], centres[iv]).ravel()
    a_eq = sparse.vstack([sparse.kron(sparse.eye(m), np.ones((1, n))), sparse.kron(np.ones((1, m)), sparse.eye(n))])
    res = linprog(cost, A_eq=a_eq.tocsr(), b_eq=np.concatenate([p[iu], q[iv]]), bounds=(0, None), method="highs")
    if not res.success:
        raise RuntimeError(f"EMD transport problem not solved: {res.message}")
    return float(res.fun)


def _emd_n(a, b, mask=None, size: int = 16):
    edges, centres = _blocks(a.shape[1:], size)
    keep = 1.0 if mask is None else np.asarray(mask, np.float64)
    out = np.full(len(a), np.nan)
    dists = []
    for x in (a, b):
        pos = np.maximum(x.astype(np.float64), 0.0) * keep
        summed = np.add.reduceat(np.add.reduceat(pos, edges[0][:-1], axis=1), edges[1][:-1], axis=2)
        total = summed.reshape(len(x), -1).sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            dists.append(summed.reshape(len(x), -1) / total)
    for i, (p, q) in enumerate(zip(*dists, strict=True)):
        if np.isfinite(p).all() and np.isfinite(q).all():
            out[i] = _emd_one(p, q, centres)
    return out


#: the vectorised implementation of each comparison metric, by name
COMPARISONS = {"ssim": _ssim_n, "spearman": _spearman_n, "spearman_abs": _spearman_abs_n, "pearson": _pearson_n,
               "cosine": _cosine_n, "topk_iou": _topk_n, "emd": _emd_n}


def _one(name: str, a, b, mask, **kw) -> float:
    a, b = _pairs(a, b, mask, 2)
    return float(COMPARISONS[name](a[None], b[None], mask, **kw)[0])


@metric("ssim", family="comparison", direction="higher", reference=f"Wang et al., IEEE TIP 2004; {_ADEBAYO}")
def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Structural similarity of two maps, each min-max rescaled to [0, 1] (module docstring).

    >>> x = np.arange(144.0).reshape(12, 12)
    >>> ssim(x, 3 * x + 1), round(ssim(x, -x), 3)
    (1.0, -0.829)
    """
    return _one("ssim", a, b, mask)


@metric("spearman", family="comparison", direction="higher", reference=_ADEBAYO)
def spearman(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Spearman rank correlation of the maps' pixels; NaN for a constant map.

    >>> spearman(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 4.0], [9.0, 100.0]]))
    1.0
    """
    return _one("spearman", a, b, mask)


@metric("spearman_abs", family="comparison", direction="higher", reference=_ADEBAYO)
def spearman_abs(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Spearman rank correlation of ``|a|`` and ``|b|``; NaN for a constant ``|map|``.

    >>> spearman_abs(np.array([[1.0, -2.0], [3.0, -4.0]]), np.array([[-1.0, 2.0], [-3.0, 4.0]]))
    1.0
    """
    return _one("spearman_abs", a, b, mask)


@metric("pearson", family="comparison", direction="higher", reference="Pearson, Proc. R. Soc. London 1895")
def pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of the maps' pixels; NaN for a constant map.

    >>> round(pearson(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 4.0], [9.0, 16.0]])), 4)
    0.9844
    """
    return _one("pearson", a, b, mask)


@metric("cosine", family="comparison", direction="higher", reference="Hedström et al., JMLR 2023 (Quantus)")
def cosine(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Cosine similarity of the maps as pixel vectors (uncentred); NaN for an all-zero map.

    >>> round(cosine(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]])) ** 2, 12)
    0.5
    """
    return _one("cosine", a, b, mask)


@metric("topk_iou", family="comparison", direction="higher", reference="Hedström et al., JMLR 2023 (Quantus)")
def topk_iou(a: np.ndarray, b: np.ndarray, k: float = 0.1, mask: np.ndarray | None = None) -> float:
    """Intersection over union of the two maps' top-``k`` fractions of pixels by signed value (ties: lower index).

    >>> topk_iou(np.array([[4.0, 3.0, 2.0, 1.0]]), np.array([[4.0, 1.0, 3.0, 2.0]]), k=0.5)
    0.3333333333333333
    """
    return _one("topk_iou", a, b, mask, k=k)


@metric("emd", family="comparison", direction="lower", reference="Rubner et al., IJCV 2000")
def emd(a: np.ndarray, b: np.ndarray, size: int = 16, mask: np.ndarray | None = None) -> float:
    """Earth Mover's distance (pixels) between the maps' positive parts on a ``size × size`` grid; NaN for a map
    without positive mass.

    >>> x = np.zeros((4, 4)); y = np.zeros((4, 4)); x[0, 0] = 1; y[3, 0] = 1
    >>> round(emd(x, y, size=4), 6), round(emd(x, y, size=2), 6)
    (3.0, 2.0)
    """
    return _one("emd", a, b, mask, size=size)


def compare_maps(a: np.ndarray, b: np.ndarray, metrics: Iterable[str] = ("spearman", "spearman_abs", "ssim"),
                 mask: np.ndarray | None = None, k: float = 0.1, size: int = 16) -> dict[str, np.ndarray]:
    """The comparison ``metrics`` of each pair ``a[i], b[i]`` of maps ``(N, H, W)``: ``{name: values (N,)}``,
    equal to the per-pair functions (``k`` for ``topk_iou``, ``size`` for ``emd``). ``mask`` is one ``(H, W)`` mask
    for every pair or one per pair ``(N, H, W)`` (e.g. the pixels a re-warped map is valid in); pairs sharing a mask
    are computed together.

    >>> a = np.random.default_rng(0).normal(size=(3, 8, 8))
    >>> {k: v.round(3).tolist() for k, v in compare_maps(a, 2 * a, ("spearman", "pearson")).items()}
    {'spearman': [1.0, 1.0, 1.0], 'pearson': [1.0, 1.0, 1.0]}
    """
    if mask is not None and np.asarray(mask).ndim == 3:
        masks = np.asarray(mask, bool)
        if masks.shape != np.shape(a):
            raise ValueError(f"per-pair masks {masks.shape} do not match maps {np.shape(a)}")
        a, b = np.asarray(a), np.asarray(b)
        groups: dict[bytes, list[int]] = {}
        for i, m in enumerate(masks):
            groups.setdefault(np.packbits(m).tobytes(), []).append(i)
        out = {name: np.full(len(a), np.nan) for name in metrics}
        for rows in groups.values():
            part = compare_maps(a[rows], b[rows], metrics, masks[rows[0]], k, size)
            for name, values in part.items():
                out[name][rows] = values
        return out
    a, b = _pairs(a, b, mask, 3)
    out = {}
    for name in metrics:
        if name not in COMPARISONS:
            raise ConfigError(f"unknown comparison {name!r}; available: {', '.join(COMPARISONS)}")
        kw = {"k": k} if name == "topk_iou" else {"size": size} if name == "emd" else {}
        out[name] = COMPARISONS[name](a, b, mask, **kw)
    return out
