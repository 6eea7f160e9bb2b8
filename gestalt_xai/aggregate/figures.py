"""Figures of the aggregate stage, in the toolkit's visual language (:mod:`gestalt_xai.viz`).

* Signed maps: diverging ``RdBu_r`` centred at 0 with a symmetric range (red = evidence *for* the explained score,
  blue = against); non-negative maps: sequential ``inferno`` from 0.
* Maps are drawn over a grayscale face (the group's composite face when the privacy guard allows it, else the
  all-subjects face or a schematic) with an opacity that grows with |value|, so the face stays readable where the
  map is near zero.
* Grids share one colour scale per method (per column), with a colourbar, and name the number of subjects.
* Every figure is written as PNG and SVG through :func:`gestalt_xai.viz.save_figure` (no metadata; same bytes for
  the same inputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.viz import SIGNED_CMAP, UNSIGNED_CMAP, save_figure

__all__ = [
    "FORMATS",
    "FIGURE_FORMATS",
    "draw_map",
    "shared_scale",
    "composite_grid",
    "faces_figure",
    "region_heatmap",
    "spray_figure",
    "pair_figure",
    "patient_syndrome_figure",
]

FORMATS = ("png", "svg")
#: formats the figures of the current aggregate run are written in (set from ``AggregateConfig.figure_formats``)
FIGURE_FORMATS: ContextVar[tuple[str, ...]] = ContextVar("FIGURE_FORMATS", default=FORMATS)
DPI = 130


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _gray(face: np.ndarray) -> np.ndarray:
    f = np.asarray(face, np.float32)
    if f.ndim == 3:
        f = f @ np.array([0.299, 0.587, 0.114], np.float32)
    return f / 255.0 if f.max() > 1.5 else f


def shared_scale(maps: Sequence[np.ndarray], signed: bool, q: float = 99.5) -> float:
    """One colour limit for several maps: the ``q``-th percentile of |values| (signed) or values (unsigned)."""
    vals = [np.abs(m).ravel() if signed else np.asarray(m).ravel() for m in maps if m is not None]
    if not vals:
        return 1.0
    v = float(np.percentile(np.concatenate(vals), q))
    return v if v > 0 else 1.0


def draw_map(ax, face: np.ndarray, map_: np.ndarray | None, *, signed: bool, vmax: float,  # type: ignore[no-untyped-def]
             alpha: float = 0.75):
    """Gray face + map with |value|-proportional opacity; returns the image handle (for a colourbar)."""
    import matplotlib
    import matplotlib.cm as cm
    from matplotlib.colors import Normalize

    ax.imshow(_gray(face), cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    cmap = matplotlib.colormaps[SIGNED_CMAP if signed else UNSIGNED_CMAP]
    norm = Normalize(-vmax, vmax) if signed else Normalize(0, vmax)
    handle = cm.ScalarMappable(norm=norm, cmap=cmap)
    if map_ is None:
        return handle
    m = np.asarray(map_, np.float64)
    rgba = cmap(norm(m))
    strength = np.clip(np.abs(m) / vmax, 0, 1) if signed else np.clip(m / vmax, 0, 1)
    rgba[..., 3] = alpha * strength
    ax.imshow(rgba, interpolation="bilinear")
    return handle


def composite_grid(cells: Mapping[tuple[str, str], tuple[np.ndarray, int]], rows: Sequence[str],
                   cols: Sequence[str], backgrounds: Mapping[str, np.ndarray], signed: Mapping[str, bool],
                   path: Path, title: str, row_labels: Mapping[str, str] | None = None,
                   colorbar_label: str = "") -> list[Path]:
    """A rows × methods grid of composites; ``cells[(row, method)] = (map, n_subjects)``; shared scale per column.

    ``backgrounds[row]`` is the face each row's maps are drawn over (already privacy-guarded).
    """
    plt = _plt()
    scale = {c: shared_scale([cells[(r, c)][0] for r in rows if (r, c) in cells], signed.get(c, True))
             for c in cols}
    width = max(2.0 * len(cols) + 0.4, 6.4)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(width, 2.0 * len(rows) + 1.6), squeeze=False,
                             layout="constrained")
    handles = {}
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i, j]
            cell = cells.get((r, c))
            handles[c] = draw_map(ax, backgrounds[r], cell[0] if cell else None, signed=signed.get(c, True),
                                  vmax=scale[c])
            n = f"n={cell[1]}" if cell else "no maps"
            head = f"{c}\n" if i == 0 else ""
            ax.set_title(f"{head}{(row_labels or {}).get(r, r)} · {n}", fontsize=8)
    for j, c in enumerate(cols):
        cb = fig.colorbar(handles[c], ax=list(axes[:, j]), location="bottom", shrink=0.9, aspect=14, pad=0.01,
                          fraction=0.12 / max(len(rows), 1))
        cb.ax.tick_params(labelsize=6)
        cb.set_label(colorbar_label, fontsize=7)
    fig.suptitle(_wrap(title, width), fontsize=9)
    return save_figure(fig, path, formats=FIGURE_FORMATS.get(), dpi=DPI)


def _wrap(text: str, width_in: float) -> str:
    import textwrap

    chars = max(40, int(width_in * 13))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def faces_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray | None, str]], signed: bool, path: Path,
                 title: str, colorbar_label: str = "") -> list[Path]:
    """One column per group: the (guarded) face on top, the composite map over it below.

    ``panels`` = ``[(group title, face, map or None, face label), …]``; one shared colour scale.
    """
    plt = _plt()
    n = len(panels)
    vmax = shared_scale([p[2] for p in panels if p[2] is not None], signed)
    fig, axes = plt.subplots(2, n, figsize=(max(1.65 * n + 0.9, 6.0), 4.3), squeeze=False, layout="constrained")
    handle = None
    for j, (name, face, m, face_label) in enumerate(panels):
        axes[0, j].imshow(face)
        axes[0, j].set_xticks([])
        axes[0, j].set_yticks([])
        axes[0, j].set_title(name, fontsize=8, fontweight="bold")
        axes[0, j].set_xlabel(face_label, fontsize=6.5)
        handle = draw_map(axes[1, j], face, m, signed=signed, vmax=vmax)
    if handle is not None:
        cb = fig.colorbar(handle, ax=list(axes[1, :]), shrink=0.9, pad=0.01)
        cb.ax.tick_params(labelsize=6)
        cb.set_label(colorbar_label, fontsize=7)
    fig.suptitle(_wrap(title, max(1.65 * n + 0.9, 6.0)), fontsize=9)
    return save_figure(fig, path, formats=FIGURE_FORMATS.get(), dpi=DPI)


def region_heatmap(table: pd.DataFrame, path: Path, title: str, planted: Mapping[str, set[str]] | None = None,
                   row_labels: Mapping[str, str] | None = None) -> list[Path]:
    """Syndrome × region heatmap of log2 enrichment (seaborn); planted regions boxed, the top region starred.

    ``table`` has ``syndrome_id, region, enrichment, rank, n_subjects`` rows of one method (one atlas).
    ``planted[syndrome]`` holds the atlas regions of its planted features (synthetic cohorts).
    """
    import seaborn as sns
    from matplotlib.patches import Rectangle

    from gestalt_xai.aggregate.regions import FACE_REGIONS

    plt = _plt()
    regions = [r for r in FACE_REGIONS if r in set(table["region"])]
    syndromes = sorted(table["syndrome_id"].unique())
    pivot = table.pivot_table(index="syndrome_id", columns="region", values="enrichment", aggfunc="mean")
    pivot = pivot.reindex(index=syndromes, columns=regions)
    data = np.log2(np.maximum(pivot.to_numpy(np.float64), 1 / 64))
    n_subj = table.groupby("syndrome_id")["n_subjects"].max()
    labels = [f"{(row_labels or {}).get(s, s)} (n={int(n_subj.get(s, 0))})" for s in syndromes]
    fig, ax = plt.subplots(figsize=(0.62 * len(regions) + 3.2, 0.42 * len(syndromes) + 2.4))
    lim = max(1.0, float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0)
    annot = np.vectorize(lambda v: "" if not np.isfinite(v) else f"{2 ** v:.1f}")(data)
    sns.heatmap(pd.DataFrame(data, index=labels, columns=[r.replace("_", " ") for r in regions]), ax=ax,
                cmap=SIGNED_CMAP, center=0, vmin=-lim, vmax=lim, annot=annot, fmt="", annot_kws={"fontsize": 6},
                linewidths=0.4, linecolor="white", cbar_kws={"label": "log2 enrichment (share / area)"})
    top = table[table["rank"] == 1].set_index("syndrome_id")["region"]
    for i, s in enumerate(syndromes):
        if s in top.index and top[s] in regions:
            j = regions.index(top[s])
            ax.text(j + 0.9, i + 0.25, "★", ha="right", va="center", fontsize=7, color="black")
        for r in (planted or {}).get(s, set()):
            if r in regions:
                ax.add_patch(Rectangle((regions.index(r), i), 1, 1, fill=False, lw=1.4, ec="black"))
    ax.set_xlabel("atlas region (template space)", fontsize=8)
    ax.set_ylabel("")
    ax.tick_params(labelsize=7)
    note = "numbers: enrichment; ★ highest facial region"
    if planted:
        note += "; boxed: regions of planted features"
    ax.set_title(f"{title}\n{note}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, formats=FIGURE_FORMATS.get(), dpi=DPI)


def spray_figure(result, cluster_maps: Sequence[tuple[np.ndarray, np.ndarray, str]], signed: bool,  # type: ignore[no-untyped-def]
                 path: Path, title: str, marker: np.ndarray | None = None, marker_label: str = "",
                 cue_mask: np.ndarray | None = None) -> list[Path]:
    """Eigenvalue spectrum, 2-D spectral embedding coloured by cluster, and each cluster's composite map.

    ``cluster_maps`` = ``[(face, composite map, caption), …]`` per cluster (faces already privacy-guarded);
    ``marker`` (bool per subject) draws hollow rings, e.g. subjects whose photos carry the confounder;
    ``cue_mask`` (template space) is outlined in green on the cluster maps.
    """
    plt = _plt()
    k = len(cluster_maps)
    fig, axes = plt.subplots(1, 2 + k, figsize=(2.4 * (2 + k) + 0.8, 3.3), squeeze=False, layout="constrained")
    axes = axes[0]
    ev = np.asarray(result.eigenvalues)
    axes[0].bar(np.arange(len(ev)), ev, color=["tab:red" if i < result.n_clusters else "0.6" for i in range(len(ev))])
    axes[0].set_title(f"Laplacian spectrum\neigengap → {result.n_clusters} cluster(s)", fontsize=8)
    axes[0].set_xlabel("index", fontsize=7)
    axes[0].tick_params(labelsize=6)
    colors = plt.get_cmap("tab10")
    emb = np.asarray(result.embedding)
    for c in range(result.n_clusters):
        sel = result.labels == c
        axes[1].scatter(emb[sel, 0], emb[sel, 1], s=18, color=colors(c), label=f"cluster {c} (n={sel.sum()})")
    if marker is not None and marker.any():
        axes[1].scatter(emb[marker, 0], emb[marker, 1], s=60, facecolors="none", edgecolors="black", lw=0.8,
                        label=marker_label)
    axes[1].legend(fontsize=6, loc="best")
    axes[1].set_title("spectral embedding", fontsize=8)
    axes[1].tick_params(labelsize=6)
    vmax = shared_scale([m for _, m, _ in cluster_maps], signed)
    handle = None
    for c, (face, m, caption) in enumerate(cluster_maps):
        handle = draw_map(axes[2 + c], face, m, signed=signed, vmax=vmax)
        if cue_mask is not None and cue_mask.any():
            axes[2 + c].contour(cue_mask.astype(float), levels=[0.5], colors="lime", linewidths=0.9)
        axes[2 + c].set_title(f"cluster {c}", fontsize=8, color=colors(c), fontweight="bold")
        axes[2 + c].set_xlabel(caption, fontsize=6)
    if handle is not None:
        cb = fig.colorbar(handle, ax=list(axes[2:]), shrink=0.85, pad=0.01)
        cb.ax.tick_params(labelsize=6)
    fig.suptitle(_wrap(title, 2.4 * (2 + k) + 0.8), fontsize=9)
    return save_figure(fig, path, formats=FIGURE_FORMATS.get(), dpi=DPI)


def pair_figure(face_a: np.ndarray, face_b: np.ndarray, rows: Sequence[tuple[str, np.ndarray | None,
                np.ndarray | None, bool]], path: Path, title: str, label_a: str, label_b: str) -> list[Path]:
    """Two faces side by side with both directions of their similarity maps, one row per method.

    ``rows`` = ``[(method, map on A towards B, map on B towards A, signed), …]``. Columns: A's face, A's map,
    B's map, B's face — each map sits next to the face it explains.
    """
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 4, figsize=(8.6, 2.2 * len(rows) + 0.8), squeeze=False, layout="constrained")
    for i, (method, ma, mb, signed) in enumerate(rows):
        vmax = shared_scale([m for m in (ma, mb) if m is not None], signed)
        axes[i, 0].imshow(face_a)
        axes[i, 3].imshow(face_b)
        h = draw_map(axes[i, 1], face_a, ma, signed=signed, vmax=vmax)
        draw_map(axes[i, 2], face_b, mb, signed=signed, vmax=vmax)
        axes[i, 1].set_title(f"{method}\non A, towards B" if ma is not None else f"{method}\nnot stored", fontsize=7)
        axes[i, 2].set_title(f"{method}\non B, towards A" if mb is not None else f"{method}\nnot stored", fontsize=7)
        cb = fig.colorbar(h, ax=list(axes[i, :]), shrink=0.85, pad=0.01)
        cb.ax.tick_params(labelsize=6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title(f"A: {label_a}", fontsize=7)
    axes[0, 3].set_title(f"B: {label_b}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, formats=FIGURE_FORMATS.get(), dpi=DPI)


def patient_syndrome_figure(face: np.ndarray, centroid: np.ndarray | None, neighbours: Sequence[tuple[str, str,
                            np.ndarray, np.ndarray, np.ndarray | None]], signed: bool, path: Path,
                            title: str) -> list[Path]:
    """A patient against a syndrome: the centroid map, then per nearest gallery image the patient's map towards
    it and the gallery face with its map towards the patient.

    ``neighbours`` = ``[(caption, gallery id, map on patient, gallery face, map on gallery or None), …]``.
    """
    plt = _plt()
    ncol = 1 + 2 * max(len(neighbours), 0) + 1
    fig, axes = plt.subplots(1, ncol, figsize=(max(1.9 * ncol + 0.6, 6.0), 2.8), squeeze=False, layout="constrained")
    axes = axes[0]
    maps = [centroid] + [n[2] for n in neighbours] + [n[4] for n in neighbours]
    vmax = shared_scale([m for m in maps if m is not None], signed)
    axes[0].imshow(face)
    axes[0].set_title("patient", fontsize=7)
    h = draw_map(axes[1], face, centroid, signed=signed, vmax=vmax)
    axes[1].set_title("towards centroid" if centroid is not None else "no centroid map", fontsize=7)
    for i, (caption, gid, m_p, g_face, m_g) in enumerate(neighbours):
        draw_map(axes[2 + 2 * i], face, m_p, signed=signed, vmax=vmax)
        axes[2 + 2 * i].set_title(f"towards {gid}", fontsize=7)
        axes[2 + 2 * i].set_xlabel(caption, fontsize=6)
        draw_map(axes[3 + 2 * i], g_face, m_g, signed=signed, vmax=vmax)
        axes[3 + 2 * i].set_title(f"{gid} towards patient" if m_g is not None else f"{gid} (no reverse map)",
                                  fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    cb = fig.colorbar(h, ax=list(axes), shrink=0.85, pad=0.01)
    cb.ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, formats=FIGURE_FORMATS.get(), dpi=DPI)
