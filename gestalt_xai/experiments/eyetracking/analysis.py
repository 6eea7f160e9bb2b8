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

**Relative scores** put each result between the face prior and the ceiling: ``(v̄ − prior) / (ceiling − prior)``
on the means over observers (0: no better than knowing where people look at faces; 1: as good as the other
observers; Kümmerer et al., PNAS 2015), with a bootstrap interval over observers. On aligned faces the face prior
is strong and a few observers' density is noisy, so the ceiling can be no better than the prior: the relative score
is then left undefined, and the span ``ceiling − prior`` says so.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from gestalt_xai.assess.stats import MIN_PAIRED, subject_bootstrap
from gestalt_xai.experiments.eyetracking import metrics as em

__all__ = ["METRICS", "LOWER_IS_BETTER", "ImageFixations", "score_image", "observer_means", "group_summary",
           "relative_scores", "probe_contrast", "region_dwell", "to_density"]

#: the metrics scored for every map, observer and image, in table order
METRICS: tuple[str, ...] = ("auc_judd", "auc_borji", "auc_shuffled", "nss", "cc", "sim", "kl_div",
                            "information_gain", "iou_topk")
#: metrics where lower is better, from each metric's registered direction
LOWER_IS_BETTER = frozenset(name for name in METRICS if getattr(em, name).info.direction == "lower")


@dataclass
class ImageFixations:
    """One image's filtered in-crop fixations with the densities its scores need.

    ``fixations`` has ``participant``, ``cx``, ``cy`` (crop pixels, pixel centres at integers); ``own``, ``loo``
    and ``prior`` map each observer to their own density, to the other observers' (the ceiling; :func:`~gestalt_xai.
    experiments.eyetracking.fixmaps.observer_densities`) and to the face prior they are compared with (both from
    the observer's reference set: their group, or everyone); ``shuffled`` are the in-crop fixations on the *other*
    images (grid coordinates), the shuffled AUC's negatives.
    """

    image_id: str
    fixations: pd.DataFrame
    own: dict[str, np.ndarray]
    loo: dict[str, np.ndarray]
    prior: dict[str, np.ndarray]
    shuffled: tuple[np.ndarray, np.ndarray]
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def to_density(m: np.ndarray, uniform_mix: float) -> np.ndarray:
    """A map as a strictly positive density: its positive part normalised to sum 1 (uniform without positive mass;
    :func:`gestalt_xai.experiments.eyetracking.metrics.to_density`), mixed with ``uniform_mix`` of the uniform
    density.

    >>> to_density(np.array([[0.0, -1.0, 2.0, 2.0]]), 0.2).round(3).tolist()
    [[0.05, 0.05, 0.45, 0.45]]
    """
    p = em.to_density(np.maximum(np.asarray(m, np.float64), 0.0))
    return (1.0 - uniform_mix) * p + uniform_mix / p.size


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
    observer's ``face_prior`` and ``ceiling`` (leave-one-out density). Columns: ``participant, map, metric, value,
    n_fixations``.
    """
    rows = []
    for obs in sorted(image.own):
        if obs not in image.prior:
            continue
        prior_density = to_density(image.prior[obs], uniform_mix)
        fix = image.fixations[image.fixations["participant"].astype(str) == obs]
        xs, ys = _grid(fix)
        own = image.own[obs]
        candidates = {**maps, "face_prior": image.prior[obs]}
        if obs in image.loo:
            candidates["ceiling"] = image.loo[obs]
        s = _seed(seed, image.image_id, obs)
        labels = list(candidates)
        stack = np.stack([candidates[label] for label in labels])
        batched = em.cc_iou_many(stack, np.broadcast_to(own, stack.shape), k=k)
        for j, label in enumerate(labels):
            m = stack[j]
            values = {
                "auc_judd": em.auc_judd(m, xs, ys),
                "auc_borji": em.auc_borji(m, xs, ys, n_splits=borji_splits, seed=s),
                "auc_shuffled": (em.auc_shuffled(m, xs, ys, *image.shuffled) if len(image.shuffled[0])
                                 else np.nan),
                "nss": em.nss(m, xs, ys),
                "cc": batched["cc"][j],
                "sim": em.sim(m, own),
                "kl_div": em.kl_div(m, own),
                "information_gain": em.information_gain(to_density(m, uniform_mix), prior_density, xs, ys),
                "iou_topk": batched["iou_topk"][j],
            }
            rows.extend({"participant": obs, "map": label, "metric": name, "value": float(values[name]),
                         "n_fixations": len(xs)} for name in METRICS)
    return pd.DataFrame(rows, columns=["participant", "map", "metric", "value", "n_fixations"])


def observer_means(scores: pd.DataFrame, keys: Sequence[str] = ("group", "participant", "map", "metric")
                   ) -> pd.DataFrame:
    """Per observer (and map and metric): the mean over their images, and the images used."""
    finite = scores[np.isfinite(scores["value"].to_numpy(np.float64))]
    return (finite.groupby(list(keys), sort=True, dropna=False)["value"]
            .agg(value="mean", n_images="size").reset_index())


def relative_scores(per_observer: pd.DataFrame) -> pd.DataFrame:
    """``per_observer`` with each observer's ``face_prior`` and ``ceiling`` values of the same breakdown (every
    column but ``map``, ``value`` and ``n_images`` is a key) beside every row: the references
    :func:`group_summary` puts each result between."""
    keys = [c for c in per_observer.columns if c not in ("map", "value", "n_images", "prior", "ceiling")]
    ref = per_observer[per_observer["map"].isin(["face_prior", "ceiling"])].pivot_table(
        index=keys, columns="map", values="value", aggfunc="first").reset_index()
    ref = ref.rename(columns={"face_prior": "prior"})
    for col in ("prior", "ceiling"):
        if col not in ref:
            ref[col] = np.nan
    return per_observer.drop(columns=["prior", "ceiling"], errors="ignore").merge(
        ref[[*keys, "prior", "ceiling"]], on=keys, how="left")


def _relative(v: np.ndarray, p: np.ndarray, c: np.ndarray, *, n_boot: int = 2000, seed: int = 0
              ) -> dict[str, float]:
    """Ratio of means ``(v̄ − p̄) / (c̄ − p̄)`` over observers and its percentile bootstrap interval (observers
    resampled with their three values together), with the span ``c̄ − p̄`` and its interval. Undefined (NaN) unless
    the span's interval lies above 0: where the other observers predict no better than the face prior, there is
    no scale to put a result on."""
    ok = np.isfinite(v) & np.isfinite(p) & np.isfinite(c)
    v, p, c = v[ok], p[ok], c[ok]
    out = dict.fromkeys(("relative", "rel_ci_lo", "rel_ci_hi", "span", "span_ci_lo", "span_ci_hi"), np.nan)
    if len(v) < 2:
        return out
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    span_b = c[idx].mean(1) - p[idx].mean(1)
    out["span"] = float(c.mean() - p.mean())
    out["span_ci_lo"], out["span_ci_hi"] = (float(x) for x in np.quantile(span_b, [0.025, 0.975]))
    if out["span_ci_lo"] <= 0:
        return out
    out["relative"] = float((v.mean() - p.mean()) / out["span"])
    rel_b = (v[idx].mean(1) - p[idx].mean(1)) / span_b
    out["rel_ci_lo"], out["rel_ci_hi"] = (float(x) for x in np.quantile(rel_b, [0.025, 0.975]))
    return out


def group_summary(relative: pd.DataFrame, keys: Sequence[str] = ("group", "map", "metric"), *, seed: int = 0
                  ) -> pd.DataFrame:
    """Per ``keys``: the mean over observers with its 95 % bootstrap interval over observers, the prior and the
    ceiling beside it, and the relative score ``(v̄ − prior) / (ceiling − prior)`` with its interval (NaN where the
    ceiling is not credibly above the prior: ``span`` says by how much it is); ``n_observers``. For KL (lower is
    better) the prior and ceiling are compared the other way round, so 1 still means "at the ceiling"."""
    rows = []
    cols = {c: relative[c].to_numpy(np.float64) for c in ("value", "prior", "ceiling")}
    who_all = relative["participant"].astype(str).to_numpy()
    metric_all = relative["metric"].astype(str).to_numpy()
    # group positions once (a pandas sub-frame per group costs more than the bootstrap itself)
    for key, idx in relative.groupby(list(keys), sort=True, dropna=False).indices.items():
        key = key if isinstance(key, tuple) else (key,)
        who = who_all[idx]
        v, p, c = (cols[k][idx] for k in ("value", "prior", "ceiling"))
        mean, lo, hi = subject_bootstrap(v, who, seed=seed)
        sign = -1.0 if metric_all[idx[0]] in LOWER_IS_BETTER else 1.0
        rel = _relative(sign * v, sign * p, sign * c, seed=seed)
        if sign < 0:
            rel["span"], rel["span_ci_lo"], rel["span_ci_hi"] = -rel["span"], -rel["span_ci_hi"], -rel["span_ci_lo"]
        rows.append({**dict(zip(keys, key, strict=True)), "mean": mean, "ci_lo": lo, "ci_hi": hi,
                     "prior": float(np.nanmean(p)) if np.isfinite(p).any() else np.nan,
                     "ceiling": float(np.nanmean(c)) if np.isfinite(c).any() else np.nan, **rel,
                     "n_observers": len(set(who))})
    return pd.DataFrame(rows)


def probe_contrast(scores: pd.DataFrame, away: set[str], *, a: str = "planted_features", b: str = "eyes_only",
                   seed: int = 0) -> pd.DataFrame:
    """Does each group's gaze favour the planted features over the eyes, on the images of syndromes whose planted
    features lie away from the eyes (``away``)?

    Per group × metric: each observer's mean of ``a`` and ``b`` over those images; the mean difference ``a − b``
    (sign-flipped for KL so that > 0 always means "``a`` better") over observers with its bootstrap interval and
    the one-sided (``a`` better) Wilcoxon signed-rank p-value over observers; and each map's relative score between
    the face prior and the ceiling on the same images (:func:`group_summary`).
    """
    sel = scores[scores["syndrome_id"].astype(str).isin(away)]
    if not len(sel):
        return pd.DataFrame()
    per_obs = relative_scores(observer_means(sel))
    summary = group_summary(per_obs[per_obs["map"].isin([a, b])], seed=seed).set_index(["group", "map", "metric"])
    rows = []
    for (group, metric), g in per_obs.groupby(["group", "metric"], sort=True):
        wide = g.pivot_table(index="participant", values="value", columns="map", aggfunc="first")
        if a not in wide or b not in wide:
            continue
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        diff = sign * (wide[a] - wide[b]).dropna()
        mean, lo, hi = subject_bootstrap(diff.to_numpy(), diff.index.to_numpy(), seed=seed)
        if len(diff) < MIN_PAIRED:
            p, reason = np.nan, f"{len(diff)} observers < {MIN_PAIRED}"
        elif not diff.to_numpy().any():
            p, reason = 1.0, "all differences zero"
        else:
            p, reason = float(wilcoxon(diff.to_numpy(), alternative="greater").pvalue), ""
        ra, rb = summary.loc[(group, a, metric)], summary.loc[(group, b, metric)]
        rows.append({"group": group, "metric": metric, "a": a, "b": b, "n_observers": len(diff),
                     "a_value": float(wide[a].mean()), "b_value": float(wide[b].mean()),
                     "diff": mean, "diff_ci_lo": lo, "diff_ci_hi": hi, "prior": float(ra["prior"]),
                     "ceiling": float(ra["ceiling"]), "span": float(ra["span"]), "span_ci_lo": float(ra["span_ci_lo"]),
                     "span_ci_hi": float(ra["span_ci_hi"]), "a_relative": float(ra["relative"]),
                     "b_relative": float(rb["relative"]), "p": p, "reason": reason})
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
