"""Figures of the eye-tracking stage, in the package's visual language (:mod:`gestalt_xai.viz`): observers' fixations
over the aligned face next to each method's map, and per-observer metric distributions per map with the face prior
and the ceiling drawn as lines."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.experiments.eyetracking.report import LABELS, map_order
from gestalt_xai.viz import _plt, draw_map, save_figure, shared_scale

__all__ = ["draw", "fixations_figure", "distribution_figure"]

_TAG = " — SIMULATED observers"


def _group_colours(groups: list[str]) -> dict[str, object]:
    cmap = _plt().get_cmap("Set1")
    return {g: cmap(i % 9) for i, g in enumerate(sorted(groups))}


def fixations_figure(faces: Mapping[str, np.ndarray], kept: pd.DataFrame, maps: Mapping[str, Mapping[str, np.ndarray]],
                     columns: list[str], path: Path, formats: tuple[str, ...], title: str,
                     row_labels: Mapping[str, str] | None = None) -> list[Path]:
    """A row per image: the face with every kept in-crop fixation (colour = observer group), then each map of
    ``columns`` over the face (one colour scale per map)."""
    plt = _plt()
    ids = list(faces)
    colours = _group_colours(list(kept["group"].astype(str).unique()))
    fig, axes = plt.subplots(len(ids), 1 + len(columns), figsize=(1.25 * (1 + len(columns)), 1.4 * len(ids)),
                             squeeze=False)
    for r, image_id in enumerate(ids):
        ax = axes[r][0]
        draw_map(ax, faces[image_id], None, signed=False, vmax=1.0)
        f = kept[(kept["image_id"].astype(str) == image_id) & kept["in_crop"].astype(bool)]
        for group, g in f.groupby("group", sort=True):
            ax.scatter(g["cx"], g["cy"], s=5, color=colours[str(group)], alpha=0.7, lw=0, label=str(group))
        ax.set_xlim(-0.5, 111.5)
        ax.set_ylim(111.5, -0.5)
        ax.set_ylabel((row_labels or {}).get(image_id, image_id), fontsize=7)
        if r == 0:
            ax.set_title("fixations", fontsize=7)
            ax.legend(fontsize=5, frameon=False, loc="lower left", markerscale=1.5)
        for c, label in enumerate(columns, start=1):
            m = maps.get(image_id, {}).get(label)
            draw_map(axes[r][c], faces[image_id], m, signed=False, vmax=shared_scale([m], signed=False))
            if r == 0:
                axes[r][c].set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, formats)


def distribution_figure(per_obs: pd.DataFrame, metrics: list[str], path: Path, formats: tuple[str, ...],
                        title: str) -> list[Path]:
    """One panel per metric: each observer's mean per map (dots coloured by group), the group's mean face prior
    (dashed) and ceiling (dotted) as horizontal lines."""
    plt = _plt()
    kinds = dict(zip(per_obs["map"], per_obs["kind"], strict=False))
    maps = [m for m in map_order(sorted(set(per_obs["map"])), kinds) if m != "ceiling"]
    colours = _group_colours(list(per_obs["group"].astype(str).unique()))
    groups = sorted(colours)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.45 * len(maps)), 2.1 * len(metrics)),
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        part = per_obs[per_obs["metric"] == metric]
        for gi, group in enumerate(groups):
            g = part[part["group"].astype(str) == group]
            offset = (gi - (len(groups) - 1) / 2) * 0.18
            for i, m in enumerate(maps):
                v = g.loc[g["map"] == m, "value"].to_numpy()
                ax.scatter(np.full(len(v), i + offset), v, s=7, color=colours[group], alpha=0.75, lw=0,
                           label=group if i == 0 else None)
            for ref, style in (("face_prior", "--"), ("ceiling", ":")):
                ref_v = g.loc[g["map"] == ref, "value"].mean()
                if np.isfinite(ref_v):
                    ax.axhline(ref_v, color=colours[group], ls=style, lw=0.8)
        ax.set_ylabel(LABELS.get(metric, metric), fontsize=7)
        ax.set_xticks(range(len(maps)))
        ax.set_xticklabels(maps if ax is axes[-1, 0] else [], rotation=45, ha="right", fontsize=6)
        ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6, frameon=False, loc="best")
    fig.suptitle(title + " (dashed: face prior, dotted: ceiling, per group)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, formats)


def draw(run, folder: Path, kept: pd.DataFrame, per_obs: pd.DataFrame,  # type: ignore[no-untyped-def]
         maps: Mapping[str, Mapping[str, np.ndarray]], probes: Mapping[str, Mapping[str, np.ndarray]],
         per_image: Mapping[str, object], probe_table: pd.DataFrame, away: set[str], simulated: bool,
         formats: tuple[str, ...]) -> list[Path]:
    """The stage's figures: fixations next to maps for up to four images (those of syndromes with planted features
    away from the eyes first), and the metric distributions."""
    tag = _TAG if simulated else ""
    images = run.image_table()
    syn = dict(zip(images["image_id"].astype(str), images["syndrome_id"].astype(str), strict=True))
    ids = sorted(per_image, key=lambda i: (syn.get(i) not in away, syn.get(i, ""), i))
    chosen: list[str] = []
    for i in ids:  # one image per syndrome, at most four
        if syn.get(i) not in {syn.get(c) for c in chosen} and len(chosen) < 4:
            chosen.append(i)
    written: list[Path] = []
    if chosen:
        faces = dict(zip(chosen, run.crops(chosen), strict=True))
        labels = sorted({k for i in chosen for k in maps.get(i, {}) if "[" not in k})
        both = {i: {**maps.get(i, {}), **probes.get(i, {})} for i in chosen}
        probe_cols = [p for p in ("planted_features", "eyes_only") if any(p in probes.get(i, {}) for i in chosen)]
        written += fixations_figure(faces, kept, both, labels + probe_cols, folder / "fixations_and_maps", formats,
                                    "Fixations over the aligned face and the model's maps" + tag,
                                    {i: f"{i} ({syn.get(i, '?')})" for i in chosen})
    metrics = [m for m in ("nss", "auc_judd", "cc", "information_gain") if m in set(per_obs["metric"])]
    if metrics:
        written += distribution_figure(per_obs, metrics, folder / "metric_distributions", formats,
                                       "Per-observer scores per map" + tag)
    return written
