"""Faithfulness: does removing what a map calls relevant change the explained score?

Curves
------
For an image ``x``, its explained score ``f`` (one row of a
:class:`~gestalt_xai.attribution.score_model.ScoreModel`: a logit or a (linearised) cosine, raw — no softmax), a
map ``R`` and a baseline image ``b``, the map ranks *units*: single pixels (``unit="pixels"``, 112² = 12 544) or
non-overlapping ``region_size``×``region_size`` patches ranked by their summed relevance (``unit="regions"``; 8 px
on 112² gives 14×14 = 196 regions), most relevant first (``order="morf"``) or least relevant first
(``order="lerf"``, the MoRF order reversed). Step ``k`` of ``S`` changes the first ``n_k = round(k·n/S)`` of the
``n`` units, all three channels of a pixel together:

* deletion (Petsiuk et al., BMVC 2018; "pixel flipping", Bach et al., PLoS ONE 2015): ``x_k`` is ``x`` with those
  units replaced by ``b``, so ``x_0 = x`` and ``x_S = b``;
* insertion: ``x_k`` is ``b`` with those units taken from ``x``, so ``x_0 = b`` and ``x_S = x``.

A curve is ``f(x_k)`` over the fraction ``n_k/n ∈ [0, 1]`` changed. Its area (trapezoid over the fraction:
:func:`deletion_auc`, lower is better; :func:`insertion_auc`, higher is better), and for deletion curves AOPC
(Samek et al., IEEE TNNLS 2017) ``1/(L+1) Σ_{k=0..L} f(x) − f(x_k)`` with ``L = S``: high for MoRF
(:func:`aopc_morf`), low for LeRF (:func:`aopc_lerf`); ``AOPC_MoRF − AOPC_LeRF`` is the mean gap between the two
curves, ABPC (Schulz et al., ICLR 2020; :func:`abpc`). Scores are not divided by ``f(x)``: methods are compared on
the same images, always beside the random-map baseline. Unlike Samek et al. (L = 100 small regions filled with
uniform noise) our curves run to complete removal, with the baselines below. LeRF deletion at step ``k`` keeps
``x`` on the most relevant ``n − n_k`` units: it is MoRF insertion at step ``S − k`` (same unit and baseline, ``S``
dividing ``n``), so either curve gives the other read backwards.

Ties in a map (flat Grad-CAM areas, zero maps, equal region sums) are broken by a seeded random permutation: the
units of each item are shuffled by ``np.random.default_rng(seed)`` — the same permutation for every method of an
item — then stably sorted by relevance (:func:`deletion_order`); maps without ties give the plain descending order.

Baselines (pixel space, then GM-Arc's ``(x/255 − 0.5)/0.5``, as occlusion's: :func:`baseline_images`): ``black`` =
pixel 0 (−1 normalised); ``blur`` = the image itself blurred with a Gaussian of σ = :data:`BLUR_SIGMA` px (kernel
``2⌈3σ⌉ + 1``, reflected border; :func:`~gestalt_xai.attribution.occlusion.occlusion_baseline`); ``mean`` = a mean
face ``(112, 112, 3)`` supplied by the caller (the stage averages training crops); or any pixel-space array
``(112, 112, 3)`` or ``(B, 112, 112, 3)``. Baselines are not rounded to uint8.

:func:`perturbation_curves` adds ``random_maps`` seeded uniform random maps per image as the method ``"random"``
(their curves averaged): the random-map baseline every method's number is read beside.

Cost
----
Every distinct perturbed image is scored exactly once. ``x_0`` and ``x_S`` are the same two images (``x`` and
``b``) for every method, so they are scored once per image, not once per method; the ``S − 1`` intermediate images
of each (method, image) are built in torch from a per-pixel rank (one ``torch.where`` per chunk, no numpy round
trip per step) and scored ``batch_size`` at a time, steps × images × methods stacked, through
``score_model.select(owner rows)`` (as :func:`~gestalt_xai.attribution.effects.effect_scores` does): ``2 + M(S − 1)``
images per item for ``M`` curves instead of ``M·S``. With ``fast=True`` the members run as BN-folded channels-last
inference copies (:func:`~gestalt_xai.attribution.occlusion.inference_copy`; scores differ from the original
model's by float rounding, ~1e-6 relative).

Occlusion's patch-local recomputation (:mod:`~gestalt_xai.attribution.occlusion_local`) does not apply: it pays
when one small window changes, leaving most early activations as they were. A deletion step changes ``n/S`` units
wherever the map ranks them — after step 1 of 16, 784 pixels (or 12 regions) scattered over the face — so after the
stem and the first blocks the changed region covers the whole activation map, and local recomputation would cost a
full forward plus its gathers.

Quantus
-------
Quantus 0.6 ``PixelFlipping`` gives the same deletion curves (tests/test_assess_faithfulness.py,
benchmarks/assess.py) once its conventions are matched: ``softmax=False`` (its default applies a softmax);
``normalise=False`` (default: divide by max |R|, order-preserving) and ``abs=False`` (default); a Quantus feature is
one channel value of one pixel, and its default ``features_in_step=1`` makes 37 632 steps per image, so a step of
``112²/S`` whole pixels is ``features_in_step = 3·112²/S`` with the map repeated over the channels (its flattened
channel-major order keeps a pixel's three tied copies adjacent, so they leave together); it requires
``features_in_step`` to divide H·W, which 3·784 does not (112² has no factor 3), so it gets each image as one
channel ``(3·112, 112)`` (the channel planes stacked: the same flat order) and the wrapped model reshapes it back;
maps without ties (its ``np.argsort(-a)`` orders ties arbitrarily); ``perturb_baseline`` an explicit array (its
``"black"`` is each image's current minimum, not pixel 0, and a baseline is a per-step value array of shape
``(B, features_in_step)``, so a blurred or mean-face baseline image needs a custom ``perturb_func``); a model
returning class scores ``(B, C)``: the ScoreModel wrapped to ``(B, 1)``, "class" 0 (``y_batch`` zeros), one Quantus
batch holding the whole batch (our targets are per row). Its curve omits ``f(x_0)`` and its AUC is
``np.trapz(dx=1)`` over its ``S`` points; ours is over the fraction with ``f(x_0)``:
``AUC_ours = (AUC_quantus + (f(x_0) + f(x_1))/2) / S``. It has no region unit (``RegionPerturbation`` is a separate
metric with its own patches and AOPC).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from gestalt_xai.assess.metric import metric
from gestalt_xai.attribution.occlusion import inference_copy, occlusion_baseline
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.errors import ConfigError, InputError

__all__ = ["BLUR_SIGMA", "MODES", "UNITS", "ORDERS", "RANDOM", "Curves", "unit_labels", "deletion_order",
           "baseline_images", "perturbation_curves", "curve_auc", "deletion_auc", "insertion_auc", "aopc_morf",
           "aopc_lerf", "abpc", "occlusion_agreement"]

#: Gaussian σ (pixels) of the ``blur`` baseline (occlusion's default)
BLUR_SIGMA = 5.0
MODES = ("deletion", "insertion")
UNITS = ("pixels", "regions")
ORDERS = ("morf", "lerf")
#: the method name of the random-map baseline
RANDOM = "random"
_RANDOM_STREAM = 1  # random maps draw from default_rng([seed, 1]); tie-breaking from default_rng(seed)

Mode = Literal["deletion", "insertion"]
Unit = Literal["pixels", "regions"]
Order = Literal["morf", "lerf"]


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def unit_labels(shape: tuple[int, int], unit: Unit = "pixels", region_size: int = 8) -> np.ndarray:
    """The unit of each pixel ``(H, W)`` (int64, reading order): itself, or its ``region_size``² patch.

    >>> unit_labels((4, 4), "regions", 2)[:, :3].tolist()
    [[0, 0, 1], [0, 0, 1], [2, 2, 3], [2, 2, 3]]
    """
    _choice("unit", unit, UNITS)
    h, w = shape
    if unit == "pixels":
        return np.arange(h * w, dtype=np.int64).reshape(h, w)
    if region_size < 1 or h % region_size or w % region_size:
        raise ConfigError(f"region_size must divide the map size {h}×{w} (equal regions, equal steps), "
                          f"got {region_size}")
    rows, cols = np.arange(h) // region_size, np.arange(w) // region_size
    return rows[:, None] * (w // region_size) + cols[None, :]


def _unit_values(maps: np.ndarray, unit: Unit, region_size: int) -> np.ndarray:
    """Relevance per unit ``(B, n)``: the pixel's value, or the region's sum (float64)."""
    b, h, w = maps.shape
    maps = maps.astype(np.float64)
    if unit == "pixels":
        return maps.reshape(b, h * w)
    unit_labels((h, w), unit, region_size)  # validates the region size
    r = region_size
    return maps.reshape(b, h // r, r, w // r, r).sum((2, 4)).reshape(b, -1)


def deletion_order(maps: np.ndarray, *, unit: Unit = "pixels", region_size: int = 8, order: Order = "morf",
                   seed: int = 0) -> np.ndarray:
    """Units ``(B, n)`` of maps ``(B, H, W)`` in removal order (indices into :func:`unit_labels`).

    ``morf``: descending relevance, ties in a seeded random order (one permutation per map from
    ``np.random.default_rng(seed)``, then a stable sort); ``lerf``: that order reversed.

    >>> deletion_order(np.array([[[0.1, 0.9], [0.5, 0.2]]])).tolist()
    [[1, 2, 3, 0]]
    >>> deletion_order(np.array([[[1.0, 3.0], [1.0, 1.0]]]), order="lerf")[0, -1]
    np.int64(1)
    """
    _choice("order", order, ORDERS)
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise InputError(f"maps must be (B, H, W), got shape {maps.shape}")
    if not np.isfinite(maps).all():
        raise InputError("maps contain NaN or infinite values; a deletion order needs finite relevance")
    values = _unit_values(maps, unit, region_size)
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(values.shape[1]) for _ in range(len(values))]) if len(values) else \
        np.zeros((0, values.shape[1]), np.int64)
    ranked = np.argsort(-np.take_along_axis(values, perm, 1), axis=1, kind="stable")
    out = np.take_along_axis(perm, ranked, 1)
    return out if order == "morf" else out[:, ::-1].copy()


def baseline_images(x: torch.Tensor, baseline: str | np.ndarray = "black", *, mean_face: np.ndarray | None = None,
                    blur_sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """The baseline ``(B, 3, H, W)`` for normalised images ``x`` (module docstring): ``"black"`` | ``"blur"`` |
    ``"mean"`` (needs ``mean_face``) | a pixel-space array ``(H, W, 3)`` or ``(B, H, W, 3)`` in 0…255.

    >>> float(baseline_images(torch.zeros(1, 3, 4, 4), np.full((4, 4, 3), 255.0)).min())
    1.0
    """
    if isinstance(baseline, str):
        _choice("baseline", baseline, ("black", "blur", "mean"))
        if baseline != "mean":
            return occlusion_baseline(x, baseline, blur_sigma).contiguous()
        if mean_face is None:
            raise ConfigError("baseline 'mean' needs mean_face: a (112, 112, 3) mean of training crops")
        baseline = mean_face
    arr = torch.as_tensor(np.asarray(baseline, np.float32), device=x.device)
    shaped = arr.ndim in (3, 4) and arr.shape[-3:] == (x.shape[2], x.shape[3], 3)
    if not shaped or (arr.ndim == 4 and len(arr) != len(x)):
        raise InputError(f"a baseline array must be (H, W, 3) or (B, H, W, 3) pixel values for images of shape "
                         f"{tuple(x.shape)}, got {tuple(arr.shape)}")
    arr = arr.reshape(-1, *arr.shape[-3:]).permute(0, 3, 1, 2)
    return arr.div(255.0).sub(0.5).div(0.5).expand_as(x).contiguous()  # the arithmetic of models.preprocess


# --------------------------------------------------------------------------------------------------- metrics
def curve_auc(scores: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Trapezoid area of curves ``(..., S+1)`` over ``fractions`` ``(S+1,)``.

    >>> float(curve_auc(np.array([1.0, 0.0]), np.array([0.0, 1.0])))
    0.5
    """
    return np.trapezoid(np.asarray(scores, np.float64), np.asarray(fractions, np.float64), axis=-1)


@metric("deletion_auc", family="faithfulness", direction="lower", reference="Petsiuk et al., BMVC 2018")
def deletion_auc(scores: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under deletion curves ``(..., S+1)`` over the fraction removed (lower: the score falls sooner)."""
    return curve_auc(scores, fractions)


@metric("insertion_auc", family="faithfulness", direction="higher", reference="Petsiuk et al., BMVC 2018")
def insertion_auc(scores: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under insertion curves ``(..., S+1)`` over the fraction inserted (higher: the score rises sooner)."""
    return curve_auc(scores, fractions)


def _aopc(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    return (scores[..., :1] - scores).mean(-1)


@metric("aopc_morf", family="faithfulness", direction="higher", reference="Samek et al., IEEE TNNLS 2017")
def aopc_morf(scores: np.ndarray) -> np.ndarray:
    """AOPC ``1/(L+1) Σ_{k=0..L} f(x) − f(x_k)`` of MoRF deletion curves ``(..., L+1)`` (``scores[..., 0] = f(x)``).

    >>> float(aopc_morf(np.array([1.0, 0.5, 0.0])))
    0.5
    """
    return _aopc(scores)


@metric("aopc_lerf", family="faithfulness", direction="lower", reference="Samek et al., IEEE TNNLS 2017")
def aopc_lerf(scores: np.ndarray) -> np.ndarray:
    """AOPC of LeRF deletion curves (least relevant first: a faithful map keeps the score, so lower is better)."""
    return _aopc(scores)


@metric("abpc", family="faithfulness", direction="higher", reference="Schulz et al., ICLR 2020")
def abpc(morf: np.ndarray, lerf: np.ndarray) -> np.ndarray:
    """Area between the LeRF and MoRF deletion curves, ``mean_k f(x_k^LeRF) − f(x_k^MoRF)`` = AOPC_MoRF − AOPC_LeRF.

    >>> float(abpc(np.array([1.0, 0.0, 0.0]), np.array([1.0, 1.0, 0.0])))
    0.3333333333333333
    """
    return _aopc(morf) - _aopc(lerf)


# --------------------------------------------------------------------------------------------------- curves
@dataclass(frozen=True)
class Curves:
    """Perturbation curves of one call of :func:`perturbation_curves`.

    ``fractions`` ``(S+1,)`` share of units changed at each step; ``scores`` ``(M, B, S+1)`` float64 explained
    scores, ``scores[m, i, k]`` of method ``methods[m]`` on item ``i`` after step ``k``; ``n_scored`` images
    actually scored (``B·(2 + M'(S−1))``, ``M'`` counting each random map).
    """

    fractions: np.ndarray
    scores: np.ndarray
    methods: tuple[str, ...]
    mode: str
    unit: str
    order: str
    baseline: str
    n_scored: int

    def _labels(self) -> dict[str, str]:
        return {"mode": self.mode, "unit": self.unit, "order": self.order, "baseline": self.baseline}

    def table(self) -> pd.DataFrame:
        """Tidy curves: one row per ``item, method`` and step, with ``mode, unit, order, baseline, fraction, score``."""
        m, b, s = self.scores.shape
        frame = pd.DataFrame({
            "item": np.tile(np.repeat(np.arange(b), s), m),
            "method": np.repeat(np.asarray(self.methods, dtype=object), b * s),
            **{k: v for k, v in self._labels().items()},
            "step": np.tile(np.arange(s), m * b),
            "fraction": np.tile(self.fractions, m * b),
            "score": self.scores.reshape(-1),
        })
        return frame[["item", "method", "mode", "unit", "order", "baseline", "step", "fraction", "score"]]

    def aucs(self) -> pd.DataFrame:
        """Per ``item, method``: ``auc`` (:func:`deletion_auc` / :func:`insertion_auc` by mode) and, for deletion,
        ``aopc`` (:func:`aopc_morf` or :func:`aopc_lerf` by order; NaN for insertion)."""
        m, b, _ = self.scores.shape
        area = deletion_auc if self.mode == "deletion" else insertion_auc
        aopc = (aopc_morf if self.order == "morf" else aopc_lerf)(self.scores) if self.mode == "deletion" else \
            np.full((m, b), np.nan)
        return pd.DataFrame({"item": np.tile(np.arange(b), m),
                             "method": np.repeat(np.asarray(self.methods, dtype=object), b),
                             **self._labels(),
                             "auc": area(self.scores, self.fractions).reshape(-1),
                             "aopc": np.asarray(aopc).reshape(-1)})

    def mean_curves(self) -> pd.DataFrame:
        """Per ``method`` and step: ``fraction``, ``mean`` and ``std`` (ddof 1) of the score over items, ``n``."""
        m, b, s = self.scores.shape
        std = self.scores.std(1, ddof=1) if b > 1 else np.full((m, s), np.nan)
        return pd.DataFrame({"method": np.repeat(np.asarray(self.methods, dtype=object), s), **self._labels(),
                             "step": np.tile(np.arange(s), m), "fraction": np.tile(self.fractions, m),
                             "mean": self.scores.mean(1).reshape(-1), "std": std.reshape(-1), "n": b})


def _fast_scorer(score_model: ScoreModel) -> ScoreModel:
    return score_model.with_models([inference_copy(m) for m in score_model.members])


def perturbation_curves(
    score_model: ScoreModel,
    crops: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    mode: Mode = "deletion",
    unit: Unit = "pixels",
    order: Order = "morf",
    baseline: str | np.ndarray = "black",
    mean_face: np.ndarray | None = None,
    steps: int = 16,
    region_size: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    random_maps: int = 1,
    blur_sigma: float = BLUR_SIGMA,
    fast: bool = True,
    device: torch.device | str = "cpu",
) -> Curves:
    """Deletion or insertion curves of every map in ``maps`` on ``crops``, all methods in one batched pass.

    Parameters
    ----------
    score_model : the explained scores; its targets have one row per crop (module docstring: scored once per
        distinct image through ``score_model.select``).
    crops : ``(B, H, W, 3)`` uint8 RGB crops (GM-Arc preprocessing is applied here).
    maps : method name → ``(B, H, W)`` raw signed maps, as stored (higher = more relevant).
    mode : ``"deletion"`` (from ``x`` towards the baseline) | ``"insertion"`` (from the baseline towards ``x``).
    unit : ``"pixels"`` | ``"regions"`` (``region_size``² patches ranked by summed relevance).
    order : ``"morf"`` most relevant first | ``"lerf"`` least relevant first (region perturbation: AOPC).
    baseline : ``"black"`` | ``"blur"`` (σ ``blur_sigma`` px) | ``"mean"`` (``mean_face``) | a pixel-space array.
    steps : ``S``; the curve has ``S + 1`` points from nothing changed to everything changed.
    batch_size : images per forward pass.
    seed : tie-breaking and random maps (same seed → same bytes on CPU).
    random_maps : uniform random maps per image, scored as method ``"random"`` (curves averaged); 0 for none.
    fast : score through BN-folded channels-last copies of the members.

    >>> from gestalt_xai.models import build_gestaltmatcher
    >>> from gestalt_xai.attribution.targets import LogitTarget
    >>> m = build_gestaltmatcher("r18", width=0.125, num_classes=2).eval()
    >>> crops = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    >>> c = perturbation_curves(ScoreModel([("m", m)], LogitTarget(0)), crops, {"a": np.ones((2, 112, 112))}, steps=4)
    >>> c.scores.shape, c.methods, c.n_scored
    ((2, 2, 5), ('a', 'random'), 16)
    """
    _choice("mode", mode, MODES)
    _choice("order", order, ORDERS)
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise InputError(f"crops must be (B, H, W, 3) uint8, got {crops.dtype} {crops.shape}")
    b, h, w, _ = crops.shape
    if RANDOM in maps:
        raise ConfigError(f"{RANDOM!r} is the random-map baseline's name; rename that method")
    if steps < 1 or batch_size < 1 or random_maps < 0:
        raise ConfigError(f"need steps ≥ 1, batch_size ≥ 1, random_maps ≥ 0; got {steps}, {batch_size}, "
                          f"{random_maps}")
    names = list(maps)
    stack = [np.asarray(maps[n]) for n in names]
    if bad := [n for n, a in zip(names, stack, strict=True) if a.shape != (b, h, w)]:
        raise InputError(f"maps of {bad} are not ({b}, {h}, {w}) like the crops")
    rng = np.random.default_rng([seed, _RANDOM_STREAM])
    stack += [rng.random((b, h, w), dtype=np.float32) for _ in range(random_maps)]
    if not stack:
        raise ConfigError("no maps and no random maps: nothing to perturb")
    labels = unit_labels((h, w), unit, region_size).reshape(-1)
    n_units = int(labels.max()) + 1
    if steps > n_units:
        raise ConfigError(f"{steps} steps for {n_units} {unit}: some steps would change nothing")
    # rank of each pixel's unit in its map's removal order: a pixel changes at step k iff rank < n_k
    ranks = np.empty((len(stack), b, h * w), np.int32)
    for m, a in enumerate(stack):
        unit_order = deletion_order(a, unit=unit, region_size=region_size, order=order, seed=seed)
        unit_rank = np.empty_like(unit_order)
        np.put_along_axis(unit_rank, unit_order, np.arange(n_units)[None], 1)
        ranks[m] = unit_rank[:, labels]
    counts = np.rint(np.linspace(0, n_units, steps + 1)).astype(np.int64)

    # jobs (curve, item, step): x_0 and x_S are shared by every curve (stored under curve 0), the rest per curve
    mid = np.arange(1, steps)
    shared = [(0, i, k) for k in (0, steps) for i in range(b)]
    own = [(m, i, int(k)) for m in range(len(stack)) for i in range(b) for k in mid]
    jobs = np.asarray(shared + own, np.int64).reshape(-1, 3)
    from gestalt_xai.models.gestaltmatcher import preprocess

    x = preprocess(crops, channel_order="RGB", device=device)
    base = baseline_images(x, baseline, mean_face=mean_face, blur_sigma=blur_sigma)
    start, end = (x, base) if mode == "deletion" else (base, x)
    scorer = _fast_scorer(score_model) if fast else score_model
    rank_t = torch.from_numpy(ranks).to(device)
    count_t = torch.from_numpy(counts).to(device)
    jobs_t = torch.from_numpy(jobs).to(device)
    out = np.empty(len(jobs), np.float64)
    with torch.no_grad():
        for a in range(0, len(jobs), batch_size):
            jm, ji, jk = jobs_t[a: a + batch_size].unbind(1)
            changed = (rank_t[jm, ji] < count_t[jk][:, None]).view(-1, 1, h, w)
            images = torch.where(changed, end[ji], start[ji])
            out[a: a + batch_size] = scorer.select(ji.tolist())(images).double().cpu().numpy()
    scores = np.empty((len(stack), b, steps + 1), np.float64)
    scores[:, :, 0] = out[:b]
    scores[:, :, steps] = out[b: 2 * b]
    scores[jobs[2 * b:, 0], jobs[2 * b:, 1], jobs[2 * b:, 2]] = out[2 * b:]
    if random_maps:
        scores = np.concatenate([scores[: len(names)], scores[len(names):].mean(0, keepdims=True)])
        names.append(RANDOM)
    label = baseline if isinstance(baseline, str) else "array"
    return Curves(counts / n_units, scores, tuple(names), mode, unit, order, label, len(jobs))


# --------------------------------------------------------------------------------------------------- agreement
@metric("occlusion_agreement", family="faithfulness", direction="higher",
        reference="Zeiler & Fergus, ECCV 2014 (occlusion); Spearman and SSIM as in gestalt_xai.assess.compare")
def occlusion_agreement(maps: Mapping[str, np.ndarray], occlusion_maps: np.ndarray, *,
                        metrics: Sequence[str] = ("spearman", "ssim"), mask: np.ndarray | None = None) -> pd.DataFrame:
    """Per ``item, method``: each map against the occlusion map of the same item (the measured score drop of a
    window), with :func:`gestalt_xai.assess.compare.compare_maps` (default: Spearman's ρ and SSIM). A method named
    ``occlusion`` is skipped (it would be compared with itself).

    Parameters
    ----------
    maps : method name → ``(B, H, W)`` raw maps.
    occlusion_maps : ``(B, H, W)`` occlusion maps of the same items and target.
    metrics, mask : passed to :func:`~gestalt_xai.assess.compare.compare_maps`.
    """
    from gestalt_xai.assess.compare import compare_maps

    occ = np.asarray(occlusion_maps)
    frames = []
    for name, a in maps.items():
        if name == "occlusion":
            continue
        a = np.asarray(a)
        if a.shape != occ.shape:
            raise InputError(f"maps of {name!r} have shape {a.shape}, the occlusion maps {occ.shape}")
        values = compare_maps(a, occ, metrics=tuple(metrics), mask=mask)
        frames.append(pd.DataFrame({"item": np.arange(len(a)), "method": name,
                                    **{k: np.asarray(values[k], np.float64) for k in metrics}}))
    if not frames:
        return pd.DataFrame({"item": pd.Series(dtype=np.int64), "method": pd.Series(dtype=object),
                             **{k: pd.Series(dtype=np.float64) for k in metrics}})
    return pd.concat(frames, ignore_index=True)
