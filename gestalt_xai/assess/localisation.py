"""Localisation read against change masks: does a map put its relevance where an edit changes the model's score?

A synthetic photo's counterfactual renderings (:mod:`gestalt_xai.attribution.effects`) give, per planted feature and
for the confounder mark, a *change mask*: the crop pixels the edit changes (:meth:`~gestalt_xai.runs.Run.change_masks`,
crop space). Against it, for a map ``R`` with positive part ``R⁺``, inside the crop's face region ``F`` (the template
atlas's facial pixels, background excluded: :func:`face_region`)::

    mass share  m = Σ_{M∩F} R⁺ / Σ_F R⁺          area share  a = |M∩F| / |F|          ratio  m / a

the one definition of this issue and of the assess stage (relevance mass accuracy of Arras et al., Information Fusion
2022, normalised by the mask's size, so that a map uniform over the face scores exactly 1 whatever the mask: the
*uniform-map reference*; a map with all its positive mass inside the mask scores ``1/a``). Relevance outside the face
is ignored. A feature is *in the crop* when its change mask has a pixel in ``F``.

Tables (the aggregate stage writes them under ``aggregate/``):

* :class:`Localiser` — per (image, model, target, method, layer, feature) for own-syndrome targets (target groups
  ``<kind>:own``): the planted features' change masks (``without_<feature>``) and, on marked photos of the
  confounded syndrome, the mark's (``without_mark``; feature ``mark``).
* :func:`rank_correlations` — per patient (image, model, target, method, layer): Spearman's ρ between per-feature mass
  share and per-feature Δscore (:func:`~gestalt_xai.attribution.effects.load_effects`): does the map rank the
  features as the model uses them? Over in-crop features; a patient with fewer than :data:`MIN_FEATURES` features
  (or constant mass or Δ) has ρ = NaN and is counted, not averaged (``n_features`` says why).
* :func:`localisation_summary` — per model, method, layer and target group: mean / median per-feature ratio, the mark
  ratio, mean ρ with n; a random-model control's numbers beside the trained model's.
* :func:`mark_effects` — the Clever-Hans effect of the mark (the ``centroid:<confounded>`` rows of the effects table)
  per model and protocol set: share of marked photos of the syndrome whose score drops when the mark is removed, and
  of other syndromes' photos whose score rises when it is added, with Wilson 95 % intervals (:func:`wilson_interval`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.errors import GestaltXAIError
from gestalt_xai.faces.regions import LABEL, template_atlas
from gestalt_xai.runs import ErrorRow

__all__ = ["MIN_FEATURES", "face_region", "mask_shares", "Localiser", "rank_correlations", "spearman_by_group",
           "localisation_summary", "mark_effects", "wilson_interval", "model_label", "run_localiser"]

log = logging.getLogger(__name__)

#: fewest in-crop features a patient needs for a rank correlation
MIN_FEATURES = 3
#: the per-map key of localisation rows (besides the feature)
MAP_KEY = ["image_id", "model_id", "target", "method", "layer"]
SUMMARY_KEY = ["model_id", "method", "layer", "target_group"]
_Z95 = 1.959963984540054


@cache
def face_region() -> np.ndarray:
    """The crop's face pixels: the template atlas without its background (read-only ``bool`` 112×112)."""
    face = template_atlas() != LABEL["background"]
    face.setflags(write=False)
    return face


def mask_shares(maps: np.ndarray, masks: np.ndarray, face: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(mass share (N, F), area share (F,))`` of maps ``(N, H, W)`` in masks ``(F, H, W)`` within ``face``
    (module docstring); mass shares are NaN for a map without positive mass in the face.

    >>> masks = np.zeros((1, 112, 112), bool); masks[0, 50:60, 40:70] = True
    >>> mass, area = mask_shares(np.ones((1, 112, 112)), masks)
    >>> bool(np.isclose(mass[0, 0] / area[0], 1.0))
    True
    """
    face = face_region() if face is None else np.asarray(face, bool)
    maps = np.asarray(maps, np.float64).reshape(-1, face.size)
    inside = (np.asarray(masks, bool) & face).reshape(-1, face.size).astype(np.float64)
    pos = np.maximum(maps, 0.0) * face.reshape(1, -1)
    total = pos.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mass = np.where(total > 0, (pos @ inside.T) / np.where(total > 0, total, 1.0), np.nan)
    return mass, inside.sum(1) / face.sum()


class Localiser:
    """Per-map localisation rows (module docstring), fed map by map during the aggregate stage's streaming pass.

    Parameters
    ----------
    variants : the counterfactual variants whose crops exist (``image_id, variant, feature, change``).
    change_masks : ``image_id → {variant: bool (112, 112)}`` crop-space change masks (``Run.change_masks``).
    confounded : the syndrome carrying the confounder mark (mark rows only on its photos).
    errors : where images whose change masks cannot be read are reported.
    """

    def __init__(self, variants: pd.DataFrame, change_masks: Callable[[str], Mapping[str, np.ndarray]],
                 confounded: str | None, errors: list[ErrorRow]) -> None:
        keep = ((variants["change"] == "remove") & ~variants["feature"].isin(["all"])
                & ((variants["feature"] != "mark") | (variants["variant"] == "without_mark")))
        self.variants = {str(i): g.sort_values("variant").to_dict("records")
                         for i, g in variants[keep].groupby(variants["image_id"].astype(str), sort=True)}
        self.change_masks = change_masks
        self.confounded = confounded
        self.errors = errors
        self._masks: dict[tuple[str, bool], tuple[list[dict[str, Any]], np.ndarray, np.ndarray] | None] = {}
        self.rows: list[pd.DataFrame] = []
        #: seconds spent in :meth:`add` (reading masks, scoring maps)
        self.seconds = 0.0

    def _image(self, image_id: str, marked: bool) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray] | None:
        key = (image_id, marked)
        if key not in self._masks:
            wanted = [v for v in self.variants.get(image_id, []) if marked or v["feature"] != "mark"]
            out = None
            if wanted:
                try:
                    masks = self.change_masks(image_id)
                    stack = np.stack([np.asarray(masks[v["variant"]], bool) for v in wanted])
                except (GestaltXAIError, OSError, KeyError, ValueError) as exc:
                    self.errors.append(ErrorRow(image_id, "input", f"change masks unreadable, localisation skipped "
                                                                   f"({type(exc).__name__}: {exc})"))
                    stack = None
                if stack is not None:
                    inside = (stack & face_region()).reshape(len(wanted), -1).any(1)  # in-crop features only
                    out = ([v for v, ok in zip(wanted, inside, strict=True) if ok], stack[inside],
                           (stack[inside] & face_region()).reshape(int(inside.sum()), -1).sum(1))
            self._masks[key] = out if out is not None and len(out[0]) else None
        return self._masks[key]

    def add(self, row: Mapping[str, Any], map_: np.ndarray) -> None:
        """Score one stored map (an annotated index row, :func:`gestalt_xai.aggregate.annotate.annotate_index`)."""
        if not str(row["target_group"]).endswith(":own"):
            return
        t0 = time.perf_counter()
        try:
            self._add(row, map_)
        finally:
            self.seconds += time.perf_counter() - t0

    def _add(self, row: Mapping[str, Any], map_: np.ndarray) -> None:
        image_id = str(row["image_id"])
        found = self._image(image_id, marked=self.confounded is not None and row["syndrome_id"] == self.confounded)
        if found is None:
            return
        wanted, stack, px = found
        mass, area = mask_shares(map_[None], stack)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = mass[0] / area
        self.rows.append(pd.DataFrame({
            **{c: [str(row[c])] * len(wanted) for c in (*MAP_KEY, "subject_id", "syndrome_id", "target_group")},
            "feature": [str(v["feature"]) for v in wanted], "variant": [str(v["variant"]) for v in wanted],
            "mask_px": px.astype(np.int64), "area_share": area, "mass_share": mass[0], "ratio": ratio}))

    def table(self) -> pd.DataFrame:
        """All rows, sorted by map key and feature."""
        if not self.rows:
            return pd.DataFrame(columns=[*MAP_KEY, "subject_id", "syndrome_id", "target_group", "feature", "variant",
                                         "mask_px", "area_share", "mass_share", "ratio"])
        return pd.concat(self.rows, ignore_index=True).sort_values([*MAP_KEY, "feature"], kind="stable") \
            .reset_index(drop=True)


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
    """Per patient map: Spearman's ρ between the planted features' mass shares and their Δscores (module docstring).

    ``features`` are :class:`Localiser` rows (the mark is left out), ``effects`` the effects table. Returns
    ``MAP_KEY + subject_id, syndrome_id, target_group, n_features, rho`` (ρ NaN below ``min_features``).
    """
    feats = features[(features["feature"] != "mark") & features["mass_share"].notna()]
    merged = feats.merge(effects[["image_id", "model_id", "target", "variant", "delta"]],
                         on=["image_id", "model_id", "target", "variant"], how="inner")
    keys = [*MAP_KEY, "subject_id", "syndrome_id", "target_group"]
    if not len(merged):
        return pd.DataFrame(columns=[*keys, "n_features", "rho"])
    out = spearman_by_group(merged, keys, "mass_share", "delta").rename(columns={"n": "n_features"})
    out.loc[out["n_features"] < min_features, "rho"] = np.nan
    return out.astype({"n_features": np.int64})


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
    """Per model, method, layer and target group: mean / median per-feature ratio, the mark ratio, mean ρ with its n,
    the uniform-map reference (1 by definition); and one summary line per trained model with its random control
    beside it (:func:`~gestalt_xai.models.declaration.random_controls`)."""
    if not len(features):
        return pd.DataFrame(), []
    feats = features[features["feature"] != "mark"]
    mark = features[features["feature"] == "mark"]
    table = feats.groupby(SUMMARY_KEY, sort=True).agg(
        n_features=("ratio", "count"), ratio_mean=("ratio", "mean"), ratio_median=("ratio", "median"),
        n_images=("image_id", "nunique"))
    table = table.join(mark.groupby(SUMMARY_KEY).agg(n_mark=("ratio", "count"), mark_ratio_mean=("ratio", "mean"),
                                                     mark_ratio_median=("ratio", "median")), how="outer")
    if len(patients):
        p = patients.groupby(SUMMARY_KEY).agg(n_patients=("rho", "count"), rho_mean=("rho", "mean"),
                                              rho_median=("rho", "median"), n_patients_all=("rho", "size"))
        table = table.join(p, how="left")
    table = table.reset_index()
    for c in ("n_features", "n_images", "n_mark", "n_patients", "n_patients_all"):
        table[c] = table[c].fillna(0).astype(np.int64) if c in table else 0
    for c in ("ratio_mean", "ratio_median", "mark_ratio_mean", "mark_ratio_median", "rho_mean", "rho_median"):
        if c not in table:
            table[c] = np.nan
    table["uniform_ratio"] = 1.0
    table["random_control"] = table["model_id"].isin(list(controls))
    table["control_of"] = table["model_id"].map(lambda m: controls.get(m) or "")
    lines = []
    for r in table[~table["random_control"]].to_dict("records"):
        lines.append("aggregate: localisation " + _line(r, confounded))
        for c in table[(table["control_of"] == r["model_id"]) & (table["method"] == r["method"])
                       & (table["layer"] == r["layer"]) & (table["target_group"] == r["target_group"])
                       ].to_dict("records"):
            lines[-1] += f"; beside it the random control {c['model_id']}: " + _numbers(c)
    for r in table[table["random_control"] & ~table["control_of"].isin(set(table["model_id"]))].to_dict("records"):
        lines.append("aggregate: localisation " + _line(r, confounded, model_label(r["model_id"], controls)))
    return table, lines


def _numbers(r: Mapping[str, Any]) -> str:
    return (f"features {_fmt(r['ratio_mean'])}× (median {_fmt(r['ratio_median'])}), mark {_fmt(r['mark_ratio_mean'])}×,"
            f" ρ {_fmt(r['rho_mean'], '+.2f')}")


def _line(r: Mapping[str, Any], confounded: str | None, label: str | None = None) -> str:
    layer = f" [{r['layer']}]" if r["layer"] else ""
    text = (f"{r['method']}{layer} ({label or r['model_id']}, {r['target_group']}): positive relevance in the change "
            f"masks = {_fmt(r['ratio_mean'])}× the area share per feature (median {_fmt(r['ratio_median'])}, "
            f"n = {r['n_features']} features of {r['n_images']} images; uniform map = 1×)")
    if r["n_mark"]:
        text += f", {_fmt(r['mark_ratio_mean'])}× on the mark (n = {r['n_mark']} marked {confounded} photos)"
    text += (f"; rank correlation with Δscore ρ = {_fmt(r['rho_mean'], '+.2f')} (n = {r['n_patients']} of "
             f"{r['n_patients_all']} patient maps with ≥ {MIN_FEATURES} in-crop features)")
    return text


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
        lines.append(f"aggregate: Clever Hans ({model_label(model, controls or {})}, {set_} set): mark on the "
                     f"centroid:{confounded} score: " + "; ".join(parts))
    return table, lines


def run_localiser(run: Any, image_ids: set[str], confounded: str | None, errors: list[ErrorRow]) -> Localiser | None:
    """The :class:`Localiser` of ``run`` for the images with maps (``None`` without counterfactuals, costing
    nothing); a counterfactual listed in the cohort whose crop is missing is an error row."""
    from gestalt_xai.data.synthetic.truth import load_counterfactuals
    from gestalt_xai.runs import LAYOUT

    listed = load_counterfactuals(run.path / LAYOUT.cohort)[["image_id", "variant"]].astype(str)
    if not len(listed):
        return None
    have_crops = (run.path / LAYOUT.counterfactual_crop_table).exists()
    variants = run.counterfactuals() if have_crops else listed.iloc[:0].assign(feature="", change="")
    listed = listed[listed["image_id"].isin(image_ids)]
    have = set(zip(variants["image_id"].astype(str), variants["variant"].astype(str), strict=True))
    for image_id, variant in sorted(set(zip(listed["image_id"], listed["variant"], strict=True)) - have):
        errors.append(ErrorRow(image_id, "input", f"counterfactual {variant!r} has no aligned crop (run the align "
                                                  "stage); its localisation and effect are missing",
                               {"variant": variant}))
    if not len(variants):
        return None
    return Localiser(variants[variants["image_id"].astype(str).isin(image_ids)], run.change_masks, confounded, errors)
