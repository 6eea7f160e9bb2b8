"""Scoring maps against observers' fixations, and the tables a reader of an eye-tracking comparison needs.

The unit of analysis is the **observer** (Wilming et al., PLoS ONE 2011): every map is scored against each observer's
fixations on each image (:func:`score_image`), per-image values are averaged per observer, and every summary number
is a mean over observers with a percentile bootstrap interval over observers
(:func:`gestalt_xai.assess.stats.subject_bootstrap`). No number is pooled over observers only.

Maps scored per observer and image (``map`` column; ``kind`` says what each is):

* ``method`` — the model's explanation maps (:mod:`~gestalt_xai.store`), after a named normalisation
  (:func:`gestalt_xai.aggregate.composite.normalise`; positive part by default); a random-weight model's maps are
  ``control`` rows;
* ``baseline`` — ``face_prior`` (the other images' fixation density), ``centre_bias``, ``uniform`` (chance);
* ``ceiling`` — the other observers' fixation density on the same image (leave-one-observer-out);
* ``probe`` (synthetic cohorts) — ``planted_features`` (the photo's planted, crop-visible feature regions) and
  ``eyes_only`` (the atlas's periorbital regions), each blurred like a fixation map: maps whose place is known, to
  read which places the observers' fixations favour.

Fixation-based metrics (AUC-Judd, AUC-Borji, shuffled AUC, NSS, information gain) use the observer's in-crop
fixations; distribution-based ones (CC, SIM, KL, top-k IoU) the observer's own fixation density
(:mod:`~gestalt_xai.experiments.eyetracking.fixmaps`). Information gain is over the face prior, in bits per fixation,
each map turned into a density by normalising it and mixing in ``uniform_mix`` of the uniform density (a map with a
hard zero where someone looked would otherwise score −∞; Kümmerer et al., PNAS 2015).

**Relative scores** put each result between the face prior and the ceiling: ``(v − prior) / (ceiling − prior)``,
on each observer's means (0: no better than knowing where people look at faces; 1: as good as the other observers);
for KL, where lower is better, the same formula keeps that reading.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from gestalt_xai.aggregate.composite import normalise
from gestalt_xai.assess.stats import MIN_PAIRED, subject_bootstrap
from gestalt_xai.experiments.eyetracking import metrics as em

__all__ = ["METRICS", "LOWER_IS_BETTER", "ImageFixations", "score_image", "observer_means", "group_summary",
           "relative_scores", "probe_contrast", "region_dwell", "to_density"]

#: the metrics scored for every map, observer and image, in table order
METRICS: tuple[str, ...] = ("auc_judd", "auc_borji", "auc_shuffled", "nss", "cc", "sim", "kl_div",
                            "information_gain", "iou_topk")
LOWER_IS_BETTER = frozenset({"kl_div"})
#: map kinds that are references rather than results
REFERENCE_MAPS = ("face_prior", "centre_bias", "uniform", "ceiling")


@dataclass
class ImageFixations:
    """One image's filtered in-crop fixations with the densities its scores need.

    ``fixations`` has ``participant``, ``cx``, ``cy`` (crop pixels, pixel centres at integers); ``own`` and ``loo``
    map each observer to their own density and to the other observers' (:func:`~gestalt_xai.experiments.
    eyetracking.fixmaps.loo_densities`); ``shuffled`` are the in-crop fixations on the *other* images (grid
    coordinates), the shuffled AUC's negatives.
    """

    image_id: str
    fixations: pd.DataFrame
    own: dict[str, np.ndarray]
    loo: dict[str, np.ndarray]
    prior: np.ndarray
    shuffled: tuple[np.ndarray, np.ndarray]
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def to_density(m: np.ndarray, uniform_mix: float) -> np.ndarray:
    """A map as a strictly positive density: its positive part normalised to sum 1 (uniform without positive mass),
    mixed with ``uniform_mix`` of the uniform density.

    >>> to_density(np.array([[0.0, -1.0, 2.0, 2.0]]), 0.2).round(3).tolist()
    [[0.05, 0.05, 0.45, 0.45]]
    """
    pos = np.maximum(np.asarray(m, np.float64), 0.0)
    total = pos.sum()
    p = pos / total if total > 0 else np.full(pos.shape, 1.0 / pos.size)
    return (1.0 - uniform_mix) * p + uniform_mix / pos.size


def _grid(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Crop coordinates → the metrics' pixel grid, where pixel ``i`` spans ``[i, i + 1)`` (a fixation counts for
    the pixel whose centre is nearest)."""
    return frame["cx"].to_numpy(np.float64) + 0.5, frame["cy"].to_numpy(np.float64) + 0.5


def _seed(seed: int, *parts: str) -> int:
    """A seed per (image, observer): the same negatives for every map of one observer and image (paired
    comparisons), independent across them, and the same on every run."""
    return (seed * 1_000_003 + zlib.crc32("/".join(parts).encode())) % (2**32)


def score_image(image: ImageFixations, maps: Mapping[str, np.ndarray], *, seed: int = 0, k: float = 0.1,
                borji_splits: int = 100, uniform_mix: float = 0.01) -> pd.DataFrame:
    """Every metric of :data:`METRICS` for every map (already normalised) and observer of one image, plus the
    ``ceiling`` (that observer's leave-one-out density). Columns: ``participant, map, metric, value, n_fixations``.
    """
    rows = []
    prior_density = to_density(image.prior, uniform_mix)
    for obs in sorted(image.own):
        fix = image.fixations[image.fixations["participant"].astype(str) == obs]
        xs, ys = _grid(fix)
        own = image.own[obs]
        candidates = dict(maps)
        if obs in image.loo:
            candidates["ceiling"] = image.loo[obs]
        s = _seed(seed, image.image_id, obs)
        for label, m in candidates.items():
            values = {
                "auc_judd": em.auc_judd(m, xs, ys),
                "auc_borji": em.auc_borji(m, xs, ys, n_splits=borji_splits, seed=s),
                "auc_shuffled": (em.auc_shuffled(m, xs, ys, *image.shuffled) if len(image.shuffled[0])
                                 else np.nan),
                "nss": em.nss(m, xs, ys),
                "cc": em.cc(m, own),
                "sim": em.sim(m, own),
                "kl_div": em.kl_div(m, own),
                "information_gain": em.information_gain(to_density(m, uniform_mix), prior_density, xs, ys),
                "iou_topk": em.iou_topk(m, own, k=k),
            }
            rows.extend({"participant": obs, "map": label, "metric": name, "value": float(values[name]),
                         "n_fixations": len(xs)} for name in METRICS)
    return pd.DataFrame(rows, columns=["participant", "map", "metric", "value", "n_fixations"])


def prepare_maps(maps: Mapping[str, np.ndarray], normalisation: str) -> dict[str, np.ndarray]:
    """The method maps after the named normalisation (:func:`gestalt_xai.aggregate.composite.normalise`)."""
    return {label: normalise(m, normalisation) for label, m in maps.items()}


def observer_means(scores: pd.DataFrame, keys: Sequence[str] = ("group", "participant", "map", "metric")
                   ) -> pd.DataFrame:
    """Per observer (and map and metric): the mean over their images, and the images used."""
    finite = scores[np.isfinite(scores["value"].to_numpy(np.float64))]
    return (finite.groupby(list(keys), sort=True, dropna=False)["value"]
            .agg(value="mean", n_images="size").reset_index())


def relative_scores(per_observer: pd.DataFrame) -> pd.DataFrame:
    """``per_observer`` with each observer's ``face_prior`` and ``ceiling`` values (of the same breakdown: every
    column but ``map``, ``value`` and ``n_images`` is a key) beside every row, and
    ``relative = (value − prior) / (ceiling − prior)`` (NaN where ceiling equals prior)."""
    keys = [c for c in per_observer.columns if c not in ("map", "value", "n_images")]
    ref = per_observer[per_observer["map"].isin(["face_prior", "ceiling"])].pivot_table(
        index=keys, columns="map", values="value", aggfunc="first").reset_index()
    ref = ref.rename(columns={"face_prior": "prior"})
    for col in ("prior", "ceiling"):
        if col not in ref:
            ref[col] = np.nan
    out = per_observer.merge(ref[[*keys, "prior", "ceiling"]], on=keys, how="left")
    span = (out["ceiling"] - out["prior"]).to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["relative"] = np.where(np.abs(span) > 1e-12, (out["value"] - out["prior"]) / span, np.nan)
    return out


def group_summary(relative: pd.DataFrame, keys: Sequence[str] = ("group", "map", "metric"), *, seed: int = 0
                  ) -> pd.DataFrame:
    """Per ``keys``: the mean over observers of the raw value and of the relative score, each with its 95 %
    bootstrap interval over observers, beside the prior and the ceiling; ``n_observers``."""
    rows = []
    for key, g in relative.groupby(list(keys), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        who = g["participant"].astype(str).to_numpy()
        mean, lo, hi = subject_bootstrap(g["value"].to_numpy(), who, seed=seed)
        rel, rlo, rhi = subject_bootstrap(g["relative"].to_numpy(), who, seed=seed)
        rows.append({**dict(zip(keys, key, strict=True)), "mean": mean, "ci_lo": lo, "ci_hi": hi,
                     "prior": float(g["prior"].mean()), "ceiling": float(g["ceiling"].mean()),
                     "relative": rel, "rel_ci_lo": rlo, "rel_ci_hi": rhi, "n_observers": len(set(who))})
    return pd.DataFrame(rows)


def probe_contrast(scores: pd.DataFrame, away: set[str], *, a: str = "planted_features", b: str = "eyes_only",
                   seed: int = 0) -> pd.DataFrame:
    """Does each group's gaze favour the planted features over the eyes, on the images of syndromes whose planted
    features lie away from the eyes (``away``)?

    Per group × metric: each observer's mean of ``a`` and ``b`` over those images, then relative to their prior and
    ceiling; the mean difference ``a − b`` (sign-flipped for KL so that > 0 always means "``a`` better") over
    observers with its bootstrap interval, and the one-sided (``a`` better) Wilcoxon signed-rank p-value over
    observers.
    """
    sel = scores[scores["syndrome_id"].astype(str).isin(away)]
    if not len(sel):
        return pd.DataFrame()
    per_obs = relative_scores(observer_means(sel))
    rows = []
    for (group, metric), g in per_obs.groupby(["group", "metric"], sort=True):
        wide = g.pivot_table(index="participant", values=["value", "relative"], columns="map", aggfunc="first")
        if ("value", a) not in wide or ("value", b) not in wide:
            continue
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        diff = sign * (wide[("value", a)] - wide[("value", b)]).dropna()
        rdiff = (wide[("relative", a)] - wide[("relative", b)]).dropna()
        mean, lo, hi = subject_bootstrap(diff.to_numpy(), diff.index.to_numpy(), seed=seed)
        rmean, rlo, rhi = subject_bootstrap(rdiff.to_numpy(), rdiff.index.to_numpy(), seed=seed)
        if len(diff) < MIN_PAIRED:
            p, reason = np.nan, f"{len(diff)} observers < {MIN_PAIRED}"
        elif not diff.to_numpy().any():
            p, reason = 1.0, "all differences zero"
        else:
            p, reason = float(wilcoxon(diff.to_numpy(), alternative="greater").pvalue), ""
        rows.append({"group": group, "metric": metric, "a": a, "b": b, "n_observers": len(diff),
                     "a_value": float(wide[("value", a)].mean()), "b_value": float(wide[("value", b)].mean()),
                     "diff": mean, "diff_ci_lo": lo, "diff_ci_hi": hi,
                     "a_relative": float(wide[("relative", a)].mean()),
                     "b_relative": float(wide[("relative", b)].mean()),
                     "relative_diff": rmean, "relative_diff_ci_lo": rlo, "relative_diff_ci_hi": rhi,
                     "p": p, "reason": reason})
    return pd.DataFrame(rows)


def region_dwell(fixations: pd.DataFrame, atlases: Mapping[str, np.ndarray], regions: Sequence[str]) -> pd.DataFrame:
    """Per observer × image × atlas region: the share of the observer's dwell time (in-crop fixations' durations)
    in the region, by the region the fixation's nearest pixel belongs to in that image's atlas."""
    rows = []
    f = fixations[fixations["in_crop"].astype(bool)]
    for image_id, g in f.groupby("image_id", sort=True):
        labels = atlases.get(str(image_id))
        if labels is None:
            continue
        size = labels.shape[0]
        xi = np.clip(np.rint(g["cx"].to_numpy()).astype(int), 0, size - 1)
        yi = np.clip(np.rint(g["cy"].to_numpy()).astype(int), 0, size - 1)
        lab = labels[yi, xi]
        for obs, idx in g.groupby("participant", sort=True).indices.items():
            dur = g["duration_ms"].to_numpy(np.float64)[idx]
            mass = np.bincount(lab[idx], weights=dur, minlength=len(regions))[: len(regions)]
            total = mass.sum()
            rows.extend({"participant": obs, "image_id": str(image_id), "region": r,
                         "dwell_share": float(mass[i] / total) if total > 0 else np.nan}
                        for i, r in enumerate(regions))
    return pd.DataFrame(rows, columns=["participant", "image_id", "region", "dwell_share"])
