"""Localisation: does a map put its relevance where the planted causes are?

**Metrics** (array functions, each a :func:`~gestalt_xai.assess.metric.metric`). For a map ``R`` with positive part
``R⁺``, a ground-truth mask ``M`` and an optional *region* ``F`` the comparison is restricted to (the crop's face,
:func:`face_region`, in every table of this package; the whole image when ``region`` is ``None``)::

    relevance mass accuracy  RMA = Σ_{M∩F} R⁺ / Σ_F R⁺                    (Arras et al., Information Fusion 2022)
    relevance rank accuracy  RRA = |top-K(R on F) ∩ M| / K,  K = |M∩F|     (Arras et al., Information Fusion 2022)
    pointing game            hit = [argmax_F R lies within tolerance_px of M∩F]   (Zhang et al., IJCV 2018)
    area share (chance)      a   = |M∩F| / |F|
    ratio                    RMA / a

A map uniform over ``F`` has ``RMA = RRA = pointing = a`` (the chance level of all three), ratio 1 whatever the mask;
a map with all its positive mass inside the mask has ``RMA = 1``, ratio ``1/a``. Conventions: RRA ranks the signed
map; ties at the K-th value are shared, i.e. the expected RRA under a random tie-break (a constant map scores ``a``).
The pointing game scores the share of the map's maxima that fall in the (dilated) mask: 1 or 0 for a unique maximum,
``a`` for a constant map — again the expectation under a random tie-break (Zhang et al. take one maximum and a 15 px
tolerance; ``tolerance_px`` dilates the mask by a disc). A metric is NaN for an empty ``M∩F``, and RMA also for a map
without positive mass in ``F``. All broadcast over leading axes: maps ``(…, H, W)`` against masks ``(…, H, W)``
(one map against ``K`` masks: ``(H, W)`` with ``(K, H, W)``; all pairs: ``(N, 1, H, W)`` with ``(K, H, W)``).

**Quantus 0.6** (Hedström et al., JMLR 2023; ``tests/test_assess_localisation.py`` checks agreement). With
``abs=False, normalise=False`` and explicit ``a_batch``/``s_batch``: ``RelevanceMassAccuracy`` equals RMA with
``region=None`` for non-negative maps; it sums the *signed* map (no positive part, so a map with negative relevance
differs) and always uses the whole image, not the face. ``PointingGame`` equals ours with ``region=None``,
``tolerance_px=0`` whenever the maximum is unique; on ties it counts a hit when *any* maximum is in the mask (ours:
the share of maxima). ``RelevanceRankAccuracy`` breaks ties by ``argsort`` order.

**Contrastivity** (:func:`contrastivity`: target sensitivity, Hesse et al., ICCV 2023 "FunnyBirds"). Two maps of one
patient towards syndromes ``A`` and ``B``, and the two syndromes' region masks on the patient's face; pixels in both
masks are dropped from both (a part both syndromes share cannot tell them apart). Each map's RMA on its own and on
the other syndrome's regions: ``contrastive`` when each map favours its own per unit area (RMA / area share, so a
larger region is no advantage); ``target_sensitive`` (FunnyBirds' protocol: the two maps compared on the same parts)
when map A has more mass on A's regions than map B has, and map B more on B's than map A.

**Tables** (built by :mod:`gestalt_xai.assess.localisation_run` for the assess stage):

* :class:`Localiser` — per (image, model, target, method, layer, feature, mask kind) for own-syndrome targets (target
  groups ``<kind>:own``): the metrics against each planted feature's masks of two kinds, ``region`` (the feature's
  region in the synthetic truth: every pixel it may change) and ``change`` (its counterfactual's change mask: the
  pixels removing it changes, :meth:`~gestalt_xai.runs.Run.change_masks`); on marked photos of the confounded
  syndrome also the mark (feature ``mark``). A mask is scored when it has a pixel in ``F`` (in the crop).
* :func:`rank_correlations` — per patient map and mask kind: Spearman's ρ between per-feature RMA and Δscore
  (:func:`~gestalt_xai.attribution.effects.load_effects`): does the map rank the features as the model uses them?
  Fewer than :data:`MIN_FEATURES` features (or constant RMA or Δ): ρ = NaN, counted, not averaged.
* :func:`localisation_summary` — per model, method, layer, target group and mask kind: means of the metrics beside
  their chance level, the mark's, mean ρ; a random-model control's numbers beside the trained model's.
* :func:`mark_effects` — the Clever-Hans effect of the mark (the ``centroid:<confounded>`` rows of the effects table)
  per model and protocol set, with Wilson 95 % intervals (:func:`wilson_interval`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import cv2
import numpy as np
import pandas as pd

from gestalt_xai.assess.metric import metric
from gestalt_xai.errors import GestaltXAIError
from gestalt_xai.faces.regions import LABEL, template_atlas
from gestalt_xai.runs import ErrorRow

__all__ = ["MIN_FEATURES", "MASK_KINDS", "face_region", "relevance_mass_accuracy", "relevance_rank_accuracy",
           "pointing_game", "area_share", "localisation_scores", "contrastivity", "MaskSource", "change_mask_source",
           "Localiser", "rank_correlations", "spearman_by_group", "localisation_summary", "mark_effects",
           "wilson_interval", "model_label"]

log = logging.getLogger(__name__)

#: fewest in-crop features a patient needs for a rank correlation
MIN_FEATURES = 3
#: the kinds of ground-truth mask a map is scored against (module docstring)
MASK_KINDS = ("region", "change")
#: the per-map key of localisation rows (besides the feature and mask kind)
MAP_KEY = ["image_id", "model_id", "target", "method", "layer"]
SUMMARY_KEY = ["model_id", "method", "layer", "target_group", "mask_kind"]
_Z95 = 1.959963984540054


@cache
def face_region() -> np.ndarray:
    """The crop's face pixels: the template atlas without its background (read-only ``bool`` 112×112)."""
    face = template_atlas() != LABEL["background"]
    face.setflags(write=False)
    return face


# ------------------------------------------------------------------------------------------------ metrics
def _flat(maps: Any, masks: Any, region: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(maps (…, P) float64, masks ∩ region (…, P) bool, region (P,) bool)``."""
    maps = np.asarray(maps, np.float64)
    masks = np.asarray(masks, bool)
    hw = maps.shape[-2:]
    if masks.shape[-2:] != hw:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in their last two axes")
    reg = np.ones(hw, bool) if region is None else np.asarray(region, bool)
    if reg.shape != hw:
        raise ValueError(f"region {reg.shape} is not of the maps' shape {hw}")
    reg = reg.reshape(-1)
    return maps.reshape(*maps.shape[:-2], -1), masks.reshape(*masks.shape[:-2], -1) & reg, reg


def _nan_where(values: np.ndarray, bad: np.ndarray) -> np.ndarray:
    out = np.where(bad, np.nan, values)
    return out[()] if out.ndim == 0 else out


@metric("area_share", family="localisation", direction="lower", reference="chance level of a localisation metric: "
        "the share of the region a mask covers (Arras et al., Information Fusion 2022)")
def area_share(masks: Any, region: Any = None) -> np.ndarray:
    """``|M∩F| / |F|`` of masks ``(…, H, W)`` (module docstring); the chance level of RMA, RRA and the pointing game.

    >>> m = np.zeros((4, 4), bool); m[:2, :2] = True
    >>> float(area_share(m)), float(area_share(m, region=np.eye(4, dtype=bool)))
    (0.25, 0.5)
    """
    masks = np.asarray(masks, bool)
    _, inside, reg = _flat(np.zeros(masks.shape[-2:]), masks, region)
    return _nan_where(inside.sum(-1) / max(int(reg.sum()), 1), np.asarray(not reg.any()))


@metric("relevance_mass_accuracy", family="localisation", direction="higher",
        reference="Arras et al., Information Fusion 2022 (CLEVR-XAI)")
def relevance_mass_accuracy(maps: Any, masks: Any, region: Any = None) -> np.ndarray:
    """``Σ_{M∩F} R⁺ / Σ_F R⁺`` (module docstring), broadcast over leading axes.

    >>> m = np.zeros((4, 4), bool); m[:2, :2] = True
    >>> float(relevance_mass_accuracy(np.where(m, 2.0, -1.0), m)), float(relevance_mass_accuracy(np.ones((4, 4)), m))
    (1.0, 0.25)
    """
    flat, inside, reg = _flat(maps, masks, region)
    pos = np.maximum(flat, 0.0) * reg
    total = pos.sum(-1)
    within = (pos * inside).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = within / np.where(total > 0, total, 1.0)
    return _nan_where(value, (total <= 0) | ~inside.any(-1))


@metric("relevance_rank_accuracy", family="localisation", direction="higher",
        reference="Arras et al., Information Fusion 2022 (CLEVR-XAI)")
def relevance_rank_accuracy(maps: Any, masks: Any, region: Any = None) -> np.ndarray:
    """Share of the ``K = |M∩F|`` highest-ranked pixels of ``F`` that lie in ``M``; ties at the K-th value shared
    (module docstring).

    >>> m = np.zeros((4, 4), bool); m[0, :2] = True
    >>> r = np.zeros((4, 4)); r[0, 0], r[3, 3] = 5.0, 4.0
    >>> float(relevance_rank_accuracy(r, m)), float(relevance_rank_accuracy(np.ones((4, 4)), m))
    (0.5, 0.125)
    """
    flat, inside, reg = _flat(maps, masks, region)
    vals = np.where(reg, flat, -np.inf)
    n = inside.sum(-1)
    lead = np.broadcast_shapes(vals.shape[:-1], n.shape)
    ordered = np.broadcast_to(-np.sort(-vals, axis=-1), (*lead, vals.shape[-1]))
    kth = np.take_along_axis(ordered, np.clip(np.broadcast_to(n, lead) - 1, 0, None)[..., None], -1)
    above = vals > kth
    tied = (vals == kth) & reg
    n_tied = tied.sum(-1)
    hits = (above & inside).sum(-1) + (n - above.sum(-1)) * (tied & inside).sum(-1) / np.maximum(n_tied, 1)
    return _nan_where(hits / np.maximum(n, 1), n == 0)


def _dilate(masks: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return masks
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    flat = masks.reshape(-1, *masks.shape[-2:]).astype(np.uint8)
    return np.stack([cv2.dilate(m, disc) for m in flat]).astype(bool).reshape(masks.shape)


@metric("pointing_game", family="localisation", direction="higher", reference="Zhang et al., IJCV 2018")
def pointing_game(maps: Any, masks: Any, region: Any = None, tolerance_px: int = 0) -> np.ndarray:
    """Whether the map's maximum over ``F`` lies within ``tolerance_px`` of ``M∩F``: the share of its maxima that do
    (module docstring; 1 or 0 for a unique maximum).

    >>> m = np.zeros((5, 5), bool); m[0, 0] = True
    >>> r = np.zeros((5, 5)); r[2, 2] = 1.0
    >>> float(pointing_game(r, m)), float(pointing_game(r, m, tolerance_px=3)), float(pointing_game(np.ones((5, 5)), m))
    (0.0, 1.0, 0.04)
    """
    flat, inside, reg = _flat(maps, masks, region)
    near = inside
    if tolerance_px > 0:
        shape = np.shape(masks)
        near = _dilate(inside.reshape(shape), int(tolerance_px)).reshape(inside.shape) & reg
    vals = np.where(reg, flat, -np.inf)
    top = (vals == vals.max(-1, keepdims=True)) & reg
    hits = (top & near).sum(-1) / np.maximum(top.sum(-1), 1)
    return _nan_where(hits, ~inside.any(-1) | ~top.any(-1))


def localisation_scores(map_: np.ndarray, masks: np.ndarray, region: np.ndarray | None = None,
                        tolerance_px: int = 0) -> dict[str, np.ndarray]:
    """One map ``(H, W)`` against masks ``(K, H, W)``: ``mask_px`` (``|M∩F|``), ``area_share``, ``rma``, ``rra``,
    ``pointing`` and ``ratio`` (RMA / area share), each ``(K,)``."""
    area = np.asarray(area_share(masks, region), np.float64)
    rma = np.asarray(relevance_mass_accuracy(map_, masks, region), np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = rma / area
    reg = np.ones(masks.shape[-2:], bool) if region is None else region
    return {"mask_px": (masks & reg).reshape(len(masks), -1).sum(1).astype(np.int64), "area_share": area, "rma": rma,
            "rra": np.asarray(relevance_rank_accuracy(map_, masks, region), np.float64),
            "pointing": np.asarray(pointing_game(map_, masks, region, tolerance_px), np.float64), "ratio": ratio}


@metric("contrastivity", family="localisation", direction="higher",
        reference="Hesse et al., ICCV 2023 (FunnyBirds: target sensitivity)")
def contrastivity(map_a: Any, map_b: Any, mask_a: Any, mask_b: Any, region: Any = None) -> dict[str, np.ndarray]:
    """Maps towards syndromes A and B against their region masks (module docstring), broadcast over leading axes.

    Returns ``area_a, area_b`` (area shares of the exclusive masks), ``mass_own_a`` (map A's RMA on A's regions),
    ``mass_other_a`` (map A on B's), ``mass_own_b``, ``mass_other_b``, ``contrastive`` and ``target_sensitive``
    (1.0 or 0.0; NaN where a mass is NaN: a map without positive mass in the face, or an empty exclusive mask).

    >>> a = np.zeros((4, 4), bool); a[:, :2] = True
    >>> out = contrastivity(a * 1.0, ~a * 1.0, a, ~a)
    >>> [float(out[k]) for k in ("mass_own_a", "mass_other_b", "contrastive", "target_sensitive")]
    [1.0, 0.0, 1.0, 1.0]
    """
    a, b = np.asarray(mask_a, bool), np.asarray(mask_b, bool)
    own_a, own_b = a & ~b, b & ~a
    out = {"area_a": np.asarray(area_share(own_a, region)), "area_b": np.asarray(area_share(own_b, region)),
           "mass_own_a": np.asarray(relevance_mass_accuracy(map_a, own_a, region)),
           "mass_other_a": np.asarray(relevance_mass_accuracy(map_a, own_b, region)),
           "mass_own_b": np.asarray(relevance_mass_accuracy(map_b, own_b, region)),
           "mass_other_b": np.asarray(relevance_mass_accuracy(map_b, own_a, region))}
    undefined = np.isnan(out["mass_own_a"] + out["mass_other_a"] + out["mass_own_b"] + out["mass_other_b"])
    with np.errstate(invalid="ignore", divide="ignore"):
        contrastive = ((out["mass_own_a"] / out["area_a"] > out["mass_other_a"] / out["area_b"])
                       & (out["mass_own_b"] / out["area_b"] > out["mass_other_b"] / out["area_a"]))
    sensitive = (out["mass_own_a"] > out["mass_other_b"]) & (out["mass_own_b"] > out["mass_other_a"])
    out["contrastive"] = np.where(undefined, np.nan, contrastive.astype(np.float64))
    out["target_sensitive"] = np.where(undefined, np.nan, sensitive.astype(np.float64))
    return {k: v[()] if v.ndim == 0 else v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ per-map rows
#: image id → ``[(feature, variant, crop mask (H, W) bool), …]``: the masks of one kind to score an image's maps against
MaskSource = Callable[[str], list[tuple[str, str, np.ndarray]]]


def change_mask_source(variants: pd.DataFrame, change_masks: Callable[[str], Mapping[str, np.ndarray]]) -> MaskSource:
    """The ``change`` masks of an image: each removal counterfactual of one feature (``without_<feature>``) and
    ``without_mark``, from the counterfactual table (``image_id, variant, feature, change``) and a reader of crop-space
    change masks (:meth:`~gestalt_xai.runs.Run.change_masks`). A listed variant without a mask raises ``KeyError``."""
    keep = ((variants["change"] == "remove") & ~variants["feature"].isin(["all"])
            & ((variants["feature"] != "mark") | (variants["variant"] == "without_mark")))
    by_image = {str(i): g.sort_values("variant")[["feature", "variant"]].astype(str).to_records(index=False).tolist()
                for i, g in variants[keep].groupby(variants["image_id"].astype(str), sort=True)}

    def source(image_id: str) -> list[tuple[str, str, np.ndarray]]:
        wanted = by_image.get(image_id, [])
        if not wanted:
            return []
        masks = change_masks(image_id)
        return [(f, v, np.asarray(masks[v], bool)) for f, v in wanted]

    return source


_ImageMasks = tuple[list[tuple[str, str, str]], np.ndarray]


class Localiser:
    """Per-map localisation rows (module docstring), fed map by map.

    Parameters
    ----------
    sources : mask kind (``region``, ``change``) → :data:`MaskSource`.
    confounded : the syndrome carrying the confounder mark (mark rows only on its photos).
    errors : where images whose masks cannot be read are reported (one row per image and kind).
    tolerance_px : the pointing game's tolerance.
    """

    def __init__(self, sources: Mapping[str, MaskSource], confounded: str | None, errors: list[ErrorRow],
                 tolerance_px: int = 0) -> None:
        self.sources = dict(sources)
        self.confounded = confounded
        self.errors = errors
        self.tolerance_px = tolerance_px
        self._masks: dict[tuple[str, bool], _ImageMasks | None] = {}
        self.rows: list[pd.DataFrame] = []
        #: seconds spent in :meth:`add` (reading masks, scoring maps)
        self.seconds = 0.0

    def _image(self, image_id: str, marked: bool) -> _ImageMasks | None:
        key = (image_id, marked)
        if key not in self._masks:
            labels, stack = [], []
            for kind, source in self.sources.items():
                try:
                    found = [(f, v, m) for f, v, m in source(image_id) if marked or f != "mark"]
                except (GestaltXAIError, OSError, KeyError, ValueError) as exc:
                    self.errors.append(ErrorRow(image_id, "input", f"{kind} masks unreadable, their localisation "
                                                                   f"skipped ({type(exc).__name__}: {exc})",
                                                {"mask_kind": kind}))
                    continue
                for f, v, m in found:
                    if (m & face_region()).any():  # in the crop
                        labels.append((f, kind, v))
                        stack.append(m)
            self._masks[key] = (labels, np.stack(stack)) if stack else None
        return self._masks[key]

    def add(self, row: Mapping[str, Any], map_: np.ndarray) -> None:
        """Score one stored map (an annotated index row, :func:`gestalt_xai.aggregate.annotate.annotate_index`)."""
        if not str(row["target_group"]).endswith(":own"):
            return
        t0 = time.perf_counter()
        try:
            found = self._image(str(row["image_id"]), self.confounded is not None
                                and row["syndrome_id"] == self.confounded)
            if found is not None:
                labels, stack = found
                scores = localisation_scores(np.asarray(map_, np.float64), stack, face_region(), self.tolerance_px)
                self.rows.append(pd.DataFrame({
                    **{c: [str(row[c])] * len(labels) for c in (*MAP_KEY, "subject_id", "syndrome_id",
                                                                "target_group")},
                    "feature": [f for f, _, _ in labels], "mask_kind": [k for _, k, _ in labels],
                    "variant": [v for _, _, v in labels], **scores}))
        finally:
            self.seconds += time.perf_counter() - t0

    def table(self) -> pd.DataFrame:
        """All rows, sorted by map key, mask kind and feature."""
        if not self.rows:
            return pd.DataFrame(columns=[*MAP_KEY, "subject_id", "syndrome_id", "target_group", "feature",
                                         "mask_kind", "variant", "mask_px", "area_share", "rma", "rra", "pointing",
                                         "ratio"])
        return pd.concat(self.rows, ignore_index=True).sort_values([*MAP_KEY, "mask_kind", "feature"],
                                                                   kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ per patient
def spearman_by_group(frame: pd.DataFrame, keys: list[str], x: str, y: str) -> pd.DataFrame:
    """Spearman's ρ of columns ``x`` and ``y`` within each group of ``keys`` (average ranks for ties; NaN when either
    is constant), with ``n`` per group; vectorised over groups.

    >>> f = pd.DataFrame({"g": [1, 1, 1, 2, 2, 2], "x": [1, 2, 3, 1, 2, 3], "y": [10, 20, 30, 3, 2, 1]})
    >>> spearman_by_group(f, ["g"], "x", "y")[["g", "rho", "n"]].values.tolist()
    [[1.0, 1.0, 3.0], [2.0, -1.0, 3.0]]
    """
    g = frame.groupby(keys, sort=True, dropna=False)
    dx = g[x].rank(method="average")
    dy = g[y].rank(method="average")
    dx = dx - dx.groupby([frame[k] for k in keys], dropna=False).transform("mean")
    dy = dy - dy.groupby([frame[k] for k in keys], dropna=False).transform("mean")
    parts = pd.DataFrame({**{k: frame[k] for k in keys}, "xy": dx * dy, "xx": dx * dx, "yy": dy * dy})
    sums = parts.groupby(keys, sort=True, dropna=False).agg(xy=("xy", "sum"), xx=("xx", "sum"), yy=("yy", "sum"),
                                                            n=("xy", "size")).reset_index()
    den = np.sqrt(sums["xx"] * sums["yy"])
    sums["rho"] = np.where(den > 0, sums["xy"] / den.where(den > 0, 1.0), np.nan)
    return sums[[*keys, "rho", "n"]]


def rank_correlations(features: pd.DataFrame, effects: pd.DataFrame, min_features: int = MIN_FEATURES
                      ) -> pd.DataFrame:
    """Per patient map and mask kind: Spearman's ρ between the planted features' RMA and their Δscores (module
    docstring).

    ``features`` are :class:`Localiser` rows (the mark is left out), ``effects`` the effects table. Returns
    ``MAP_KEY + subject_id, syndrome_id, target_group, mask_kind, n_features, rho`` (ρ NaN below ``min_features``).
    """
    keys = [*MAP_KEY, "subject_id", "syndrome_id", "target_group", "mask_kind"]
    feats = features[(features["feature"] != "mark") & features["rma"].notna()] if len(features) else features
    merged = feats.merge(effects[["image_id", "model_id", "target", "variant", "delta"]],
                         on=["image_id", "model_id", "target", "variant"], how="inner") if len(feats) else feats
    if not len(merged):
        return pd.DataFrame(columns=[*keys, "n_features", "rho"])
    out = spearman_by_group(merged, keys, "rma", "delta").rename(columns={"n": "n_features"})
    out.loc[out["n_features"] < min_features, "rho"] = np.nan
    return out.astype({"n_features": np.int64})


# ------------------------------------------------------------------------------------------------ summaries
def wilson_interval(k: int | np.ndarray, n: int | np.ndarray, z: float = _Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion ``k / n`` (Wilson, JASA 1927); NaN for ``n = 0``.

    >>> [round(float(v), 4) for v in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        den = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / den
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return centre - half, centre + half


def model_label(model_id: str, controls: Mapping[str, str | None]) -> str:
    """``model_id``, marked as a random control (and of which model) when it is one."""
    if model_id not in controls:
        return model_id
    source = controls[model_id]
    return f"{model_id}, random control" + (f" of {source}" if source else "")


def _fmt(value: float, spec: str = ".2f") -> str:
    return "—" if value is None or not np.isfinite(value) else format(value, spec)


def localisation_summary(features: pd.DataFrame, patients: pd.DataFrame, controls: Mapping[str, str | None],
                         confounded: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Per model, method, layer, target group and mask kind: ``n_features``, ``n_images``, means of ``rma``, ``rra``,
    ``pointing`` beside ``chance`` (mean area share), mean / median ``ratio``, the mark's (``mark_*``), mean ρ with
    its n, the uniform-map ratio (1); one summary line per trained model, method, layer and target group with its
    random control (:func:`~gestalt_xai.models.declaration.random_controls`) beside it."""
    if not len(features):
        return pd.DataFrame(), []
    feats = features[features["feature"] != "mark"]
    mark = features[features["feature"] == "mark"]
    table = feats.groupby(SUMMARY_KEY, sort=True).agg(
        n_features=("ratio", "count"), n_images=("image_id", "nunique"), rma_mean=("rma", "mean"),
        rra_mean=("rra", "mean"), pointing_mean=("pointing", "mean"), chance=("area_share", "mean"),
        ratio_mean=("ratio", "mean"), ratio_median=("ratio", "median"))
    table = table.join(mark.groupby(SUMMARY_KEY).agg(n_mark=("ratio", "count"), mark_rma_mean=("rma", "mean"),
                                                     mark_chance=("area_share", "mean"),
                                                     mark_ratio_mean=("ratio", "mean")), how="outer")
    if len(patients):
        p = patients.groupby(SUMMARY_KEY).agg(n_patients=("rho", "count"), rho_mean=("rho", "mean"),
                                              rho_median=("rho", "median"), n_patients_all=("rho", "size"))
        table = table.join(p, how="left")
    table = table.reset_index()
    for c in ("n_features", "n_images", "n_mark", "n_patients", "n_patients_all"):
        table[c] = table[c].fillna(0).astype(np.int64) if c in table else 0
    for c in ("rho_mean", "rho_median"):
        if c not in table:
            table[c] = np.nan
    table["uniform_ratio"] = 1.0
    table["random_control"] = table["model_id"].isin(list(controls))
    table["control_of"] = table["model_id"].map(lambda m: controls.get(m) or "")
    key = ["model_id", "method", "layer", "target_group"]
    lines = []
    for k, grp in table.groupby(key, sort=True):
        d = dict(zip(key, k, strict=True))
        if d["model_id"] in controls and controls[d["model_id"]] in set(table["model_id"]):
            continue  # printed beside its trained model
        line = "assess: localisation " + _line(d, grp, confounded, model_label(d["model_id"], controls))
        for c in sorted(m for m, src in controls.items() if src == d["model_id"]):
            other = table[(table["model_id"] == c) & (table["method"] == d["method"]) & (table["layer"] == d["layer"])
                          & (table["target_group"] == d["target_group"])]
            if len(other):
                line += f"; beside it the random control {c}: " + "; ".join(_numbers(r) for r in
                                                                              other.to_dict("records"))
        lines.append(line)
    return table, lines


def _numbers(r: Mapping[str, Any]) -> str:
    return (f"{r['mask_kind']} masks RMA {_fmt(r['rma_mean'])} (chance {_fmt(r['chance'])}, {_fmt(r['ratio_mean'])}×)"
            f", RRA {_fmt(r['rra_mean'])}, pointing {_fmt(r['pointing_mean'])}, ρ {_fmt(r['rho_mean'], '+.2f')}")


def _line(d: Mapping[str, Any], grp: pd.DataFrame, confounded: str | None, label: str) -> str:
    layer = f" [{d['layer']}]" if d["layer"] else ""
    parts = []
    for r in grp.sort_values("mask_kind").to_dict("records"):
        text = (f"{r['mask_kind']} masks: RMA {_fmt(r['rma_mean'])} vs chance {_fmt(r['chance'])} "
                f"({_fmt(r['ratio_mean'])}× per feature, median {_fmt(r['ratio_median'])}), RRA "
                f"{_fmt(r['rra_mean'])}, pointing game {_fmt(r['pointing_mean'])} (n = {r['n_features']} features of "
                f"{r['n_images']} images)")
        if r["n_mark"]:
            text += (f", mark {_fmt(r['mark_ratio_mean'])}× (n = {r['n_mark']} marked {confounded} photos)")
        text += (f", ρ with Δscore {_fmt(r['rho_mean'], '+.2f')} (n = {r['n_patients']} of {r['n_patients_all']} "
                 f"patient maps with ≥ {MIN_FEATURES} features)")
        parts.append(text)
    return f"{d['method']}{layer} ({label}, {d['target_group']}): " + "; ".join(parts) + "; uniform map = 1×"


def mark_effects(effects: pd.DataFrame, images: pd.DataFrame, confounded: str | None,
                 controls: Mapping[str, str | None] | None = None,
                 report_sets: tuple[str, ...] = ("train", "test")) -> tuple[pd.DataFrame, list[str]]:
    """The Clever-Hans effect of the mark per model, protocol set and change (module docstring); ``images`` is
    :meth:`~gestalt_xai.runs.Run.image_table` (``sets``); one summary line per model and set in ``report_sets``.

    Rows: ``model_id, set, change, n, n_expected`` (score drops on removal / rises on addition), ``share``,
    ``ci_low, ci_high`` (Wilson 95 %), ``mean_delta, median_delta`` (Δ = factual − counterfactual score).
    """
    if confounded is None or not len(effects):
        return pd.DataFrame(), []
    rows = effects[(effects["target"] == f"centroid:{confounded}") & (effects["feature"] == "mark")]
    meta = images.assign(image_id=images["image_id"].astype(str))[["image_id", "syndrome_id", "sets", "undiagnosed"]]
    rows = rows.merge(meta, on="image_id", how="inner")
    own = rows["syndrome_id"].astype(str) == confounded
    rows = rows[((rows["change"] == "remove") & own) | ((rows["change"] == "add") & ~own & ~rows["undiagnosed"])]
    if not len(rows):
        return pd.DataFrame(), []
    rows = rows.assign(set=rows["sets"].str.split(",")).explode("set")
    rows = rows[rows["set"].astype(str) != ""]
    rows["expected"] = np.where(rows["change"] == "remove", rows["delta"] > 0, rows["delta"] < 0)
    table = rows.groupby(["model_id", "set", "change"], sort=True).agg(
        n=("delta", "size"), n_expected=("expected", "sum"), mean_delta=("delta", "mean"),
        median_delta=("delta", "median")).reset_index()
    table["n_expected"] = table["n_expected"].astype(np.int64)
    table["share"] = table["n_expected"] / table["n"]
    table["ci_low"], table["ci_high"] = wilson_interval(table["n_expected"].to_numpy(), table["n"].to_numpy())
    lines = []
    for (model, set_), grp in table[table["set"].isin(report_sets)].groupby(["model_id", "set"], sort=True):
        parts = []
        for r in grp.sort_values("change", ascending=False).to_dict("records"):
            what = (f"removing it lowers the score on {r['n_expected']}/{r['n']} marked {confounded} photos"
                    if r["change"] == "remove" else
                    f"adding it raises the score on {r['n_expected']}/{r['n']} photos of other syndromes")
            parts.append(f"{what} ({r['share']:.0%}, 95 % CI {r['ci_low']:.0%}–{r['ci_high']:.0%}; mean Δ = "
                         f"{r['mean_delta']:+.3f})")
        lines.append(f"assess: Clever Hans ({model_label(model, controls or {})}, {set_} set): mark on the "
                     f"centroid:{confounded} score: " + "; ".join(parts))
    return table, lines
