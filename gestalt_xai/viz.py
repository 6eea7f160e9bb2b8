"""Figures: one visual language for every plot the toolkit draws (matplotlib, Agg backend, no display needed).

Conventions
-----------
* Signed maps use a **diverging** colour map (:data:`SIGNED_CMAP`, ``RdBu_r``: red = evidence for the explained
  score, blue = against) centred at 0 with a symmetric range ``[−v, v]``; non-negative maps a sequential one
  (:data:`UNSIGNED_CMAP`, ``inferno``) from 0.
* A map is drawn over the grayscale face with an opacity that grows with |value| (:func:`draw_map`), so the face
  stays readable where the map is near zero.
* A figure that compares maps shares one colour scale per kind of map (per method column in grids, per kind of map
  in overlays) and shows it in a colour bar; titles name method, layer and the number of subjects.
* Every figure is written by :func:`save_figure` at one resolution (:data:`DPI`): PNG without text chunks, SVG with a
  fixed hash salt and no date, PDF without dates, atomically, so the same inputs give the same bytes wherever the
  run folder lies. Anything drawn from a set is drawn in sorted order (the order of a set of strings changes from
  one Python process to the next, and overlapping shapes drawn in another order change anti-aliased pixels).

Overlays of single images (:func:`overlay_figure`, :func:`method_grid`) serve the explain stage; composite grids,
region heatmaps, SpRAy, pair and patient × syndrome figures (:func:`composite_grid` … :func:`patient_syndrome_figure`)
serve the aggregate stage (:mod:`gestalt_xai.aggregate.report` decides what to draw).
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "SIGNED_CMAP",
    "UNSIGNED_CMAP",
    "DPI",
    "FORMATS",
    "FIGURE_FORMATS",
    "save_figure",
    "figure_bytes",
    "file_stem",
    "shared_scale",
    "draw_map",
    "map_on_photo",
    "overlay_figure",
    "method_grid",
    "composite_grid",
    "faces_figure",
    "region_heatmap",
    "spray_figure",
    "pair_figure",
    "patient_syndrome_figure",
]

SIGNED_CMAP = "RdBu_r"
UNSIGNED_CMAP = "inferno"
#: resolution of every PNG the toolkit writes
DPI = 130
FORMATS = ("png", "svg")
#: formats the figures of the current aggregate run are written in (set from ``AggregateConfig.figure_formats``)
FIGURE_FORMATS: ContextVar[tuple[str, ...]] = ContextVar("FIGURE_FORMATS", default=FORMATS)


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, formats: tuple[str, ...] | None = None,  # type: ignore[no-untyped-def]
                dpi: int = DPI) -> list[Path]:
    """Save ``fig`` without metadata (no software/date text chunks) and close it.

    ``path``'s suffix picks the format; ``formats`` (e.g. ``("png", "svg")``) writes one file per format beside it.
    SVGs get no date and a fixed hash salt (their element ids are then content hashes), so the same figure gives the
    same bytes. Returns the written paths.
    """
    from gestalt_xai.runs import atomic_write_bytes

    plt = _plt()
    path = Path(path)
    kinds = formats or (path.suffix.lstrip(".") or "png",)
    written = []
    for kind in kinds:
        target = path.with_suffix(f".{kind}")
        atomic_write_bytes(target, figure_bytes(fig, kind, dpi))
        written.append(target)
    plt.close(fig)
    return written


def figure_bytes(fig, kind: str = "png", dpi: int = DPI) -> bytes:  # type: ignore[no-untyped-def]
    """``fig`` encoded as ``kind`` without metadata (see :func:`save_figure`, which writes these bytes); the figure
    stays open."""
    import matplotlib

    buf = io.BytesIO()
    if kind == "svg":
        with matplotlib.rc_context({"svg.hashsalt": "gestalt-xai"}):
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    elif kind == "pdf":
        fig.savefig(buf, format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})
    else:
        fig.savefig(buf, format=kind, dpi=dpi, metadata={"Software": None} if kind == "png" else None)
    return buf.getvalue()


def file_stem(name: str) -> str:
    """A label as a file-name part: letters, digits and ``-_.+`` kept, anything else (``:``, ``/``, spaces) → ``-``.

    >>> file_stem("centroid:own"), file_stem("sex:F / 2-5y")
    ('centroid-own', 'sex-F---2-5y')
    """
    return "".join(c if c.isalnum() or c in "-_.+" else "-" for c in str(name))


def _gray(face: np.ndarray) -> np.ndarray:
    """A face (RGB or gray, uint8 or [0, 1]) as gray in [0, 1] (BT.601 luma weights)."""
    f = np.asarray(face, np.float32)
    if f.ndim == 3:
        f = f @ np.array([0.299, 0.587, 0.114], np.float32)
    return f / 255.0 if f.max() > 1.5 else f


def _wrap(text: str, width_in: float) -> str:
    """Wrap a title to the figure's width (inches)."""
    chars = max(40, int(width_in * 13))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _no_ticks(axes) -> None:  # type: ignore[no-untyped-def]
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])


def shared_scale(maps: Sequence[np.ndarray | None], signed: bool, q: float = 99.5) -> float:
    """One colour limit for several maps: the ``q``-th percentile of |values| (signed) or values (unsigned).

    >>> shared_scale([np.array([-4.0, 1.0]), None], signed=True, q=100)
    4.0
    """
    vals = [np.abs(m).ravel() if signed else np.asarray(m).ravel() for m in maps if m is not None]
    vals = [v[np.isfinite(v)] for v in vals]
    if not vals or not sum(len(v) for v in vals):
        return 1.0
    v = float(np.percentile(np.concatenate(vals), q))
    return v if v > 0 else 1.0


def draw_map(ax, face: np.ndarray, map_: np.ndarray | None, *, signed: bool, vmax: float,  # type: ignore[no-untyped-def]
             alpha: float = 0.75):
    """Gray face + map with |value|-proportional opacity (NaN: transparent); returns a handle for a colour bar."""
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
    rgba[..., 3] = alpha * np.nan_to_num(strength, nan=0.0)
    ax.imshow(rgba, interpolation="bilinear")
    return handle


def map_on_photo(map_: np.ndarray, matrix: np.ndarray, photo_hw: tuple[int, int]) -> np.ndarray:
    """A template-space map drawn back onto the photo grid through the inverse alignment (NaN outside the crop)."""
    from gestalt_xai.faces.align import warp_crop_to_photo

    return warp_crop_to_photo(np.asarray(map_, np.float32), matrix, photo_hw, fill=np.nan)


# ------------------------------------------------------------------------------------- single images (explain)
def overlay_figure(
    face: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    signed: Mapping[str, bool] | None = None,
    view: str = "max-abs",
    title: str = "",
    alpha: float = 0.75,
    photo: np.ndarray | None = None,
    matrix: np.ndarray | None = None,
    path: str | Path | None = None,
):  # type: ignore[no-untyped-def]
    """Face + one panel per map (shared colour scale per kind), optionally drawn onto the original photo.

    Parameters
    ----------
    face : the aligned RGB crop ``(112, 112, 3)`` uint8.
    maps : panel title → raw map ``(112, 112)``.
    signed : panel title → whether the method's maps are signed (default: signed if any value < 0).
    view : named view applied before drawing (:func:`gestalt_xai.attribution.postprocess.apply_view`).
    alpha : opacity of a map where |value| reaches the colour limit (:func:`draw_map`).
    photo, matrix : the original photo and its 2×3 photo→crop matrix: panels are drawn on the photo instead.
    path : write the PNG there (and close the figure); otherwise return the figure.

    >>> fig = overlay_figure(np.zeros((112, 112, 3), np.uint8), {"a": np.random.randn(112, 112)})
    >>> len(fig.axes)  # face, one panel, one colour bar
    3
    """
    from gestalt_xai.attribution.postprocess import apply_view

    plt = _plt()
    names = list(maps)
    shown: dict[str, np.ndarray] = {}
    is_signed: dict[str, bool] = {}
    for name in names:
        raw = np.asarray(maps[name], np.float32)
        s = (signed or {}).get(name, bool((raw < 0).any()))
        shown[name] = np.asarray(apply_view(raw, view if s else view.replace("max-abs", "min-max")), np.float32)
        is_signed[name] = s
    vmax_signed = max([np.nanmax(np.abs(shown[n])) for n in names if is_signed[n]] or [1.0]) or 1.0
    vmax_unsigned = max([np.nanmax(shown[n]) for n in names if not is_signed[n]] or [1.0]) or 1.0

    background = face if photo is None else photo
    if photo is not None and matrix is not None:
        shown = {n: map_on_photo(m, matrix, np.asarray(photo).shape[:2]) for n, m in shown.items()}

    n = len(names) + 1
    kinds = sorted({is_signed[k] for k in names}, reverse=True)  # signed bar first
    # one thin colour-bar column per kind, separated by an empty column that leaves room for tick labels
    ratios = [1.0] * n + ([0.06] if len(kinds) == 1 else [0.06, 0.45, 0.06])
    fig, all_axes = plt.subplots(1, len(ratios), figsize=(1.9 * n + 0.9 * len(kinds), 2.3), squeeze=False,
                                 gridspec_kw={"width_ratios": ratios, "wspace": 0.15})
    axes, bar_axes = all_axes[0][:n], list(all_axes[0][n::2])
    for spacer in all_axes[0][n + 1::2]:
        spacer.axis("off")
    axes[0].imshow(np.asarray(background))
    axes[0].set_title("face", fontsize=8)
    handles = {}
    for ax, name in zip(axes[1:], names, strict=True):
        vmax = vmax_signed if is_signed[name] else vmax_unsigned
        handles[is_signed[name]] = draw_map(ax, background, shown[name], signed=is_signed[name], vmax=vmax,
                                            alpha=alpha)
        ax.set_title(name, fontsize=8)
    _no_ticks(axes)
    for cax, s in zip(bar_axes, kinds, strict=True):
        cb = fig.colorbar(handles[s], cax=cax)
        shown_view = view if s else view.replace("max-abs", "min-max")
        cb.set_label(f"{'signed' if s else 'unsigned'}: {shown_view}", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    if path is not None:
        return save_figure(fig, path)[0]
    return fig


def method_grid(faces: Sequence[np.ndarray], rows: Sequence[Mapping[str, np.ndarray]], path: str | Path,
                view: str = "max-abs", row_titles: Sequence[str] | None = None) -> Path:
    """Several images × methods in one figure (one :func:`overlay_figure` row each, same conventions)."""
    from gestalt_xai.attribution.postprocess import apply_view

    plt = _plt()
    names = list(rows[0]) if rows else []
    fig, axes = plt.subplots(len(rows), len(names) + 1, figsize=(1.8 * (len(names) + 1), 1.9 * len(rows)),
                             squeeze=False)
    for r, (face, maps) in enumerate(zip(faces, rows, strict=True)):
        axes[r, 0].imshow(face)
        if row_titles:
            axes[r, 0].set_ylabel(row_titles[r], fontsize=7)
        for c, name in enumerate(names, start=1):
            m = np.asarray(apply_view(np.asarray(maps[name], np.float32), view))
            draw_map(axes[r, c], face, m, signed=bool((m < 0).any()), vmax=1.0)
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
    _no_ticks(axes)
    return save_figure(fig, path)[0]


# ------------------------------------------------------------------------------------- groups (aggregate)
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
    return save_figure(fig, path, formats=FIGURE_FORMATS.get())


def faces_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray | None, str]], signed: bool, path: Path,
                 title: str, colorbar_label: str = "") -> list[Path]:
    """One column per group: the (guarded) face on top, the composite map over it below.

    ``panels`` = ``[(group title, face, map or None, face label), …]``; one shared colour scale.
    """
    plt = _plt()
    n = len(panels)
    width = max(1.65 * n + 0.9, 6.0)
    vmax = shared_scale([p[2] for p in panels], signed)
    fig, axes = plt.subplots(2, n, figsize=(width, 4.3), squeeze=False, layout="constrained")
    handle = None
    for j, (name, face, m, face_label) in enumerate(panels):
        axes[0, j].imshow(face)
        axes[0, j].set_title(name, fontsize=8, fontweight="bold")
        axes[0, j].set_xlabel(face_label, fontsize=6.5)
        handle = draw_map(axes[1, j], face, m, signed=signed, vmax=vmax)
    _no_ticks(axes[0])
    if handle is not None:
        cb = fig.colorbar(handle, ax=list(axes[1, :]), shrink=0.9, pad=0.01)
        cb.ax.tick_params(labelsize=6)
        cb.set_label(colorbar_label, fontsize=7)
    fig.suptitle(_wrap(title, width), fontsize=9)
    return save_figure(fig, path, formats=FIGURE_FORMATS.get())


def region_heatmap(table: pd.DataFrame, path: Path, title: str, planted: Mapping[str, set[str]] | None = None,
                   row_labels: Mapping[str, str] | None = None) -> list[Path]:
    """Syndrome × region heatmap of log2 enrichment (seaborn); planted regions boxed, the top region starred.

    ``table`` has ``syndrome_id, region, enrichment, rank, n_subjects`` rows of one method (one atlas), as in
    ``aggregate/region_syndromes.parquet`` (:func:`gestalt_xai.aggregate.regions.syndrome_region_scores`).
    ``planted[syndrome]`` holds the atlas regions of its planted features (synthetic cohorts,
    :func:`gestalt_xai.assess.planted.planted_regions`).
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
        for r in sorted((planted or {}).get(s, set())):  # sorted: a set's order changes between processes
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
    return save_figure(fig, path, formats=FIGURE_FORMATS.get())


def spray_figure(result, cluster_maps: Sequence[tuple[np.ndarray, np.ndarray, str]], signed: bool,  # type: ignore[no-untyped-def]
                 path: Path, title: str, marker: np.ndarray | None = None, marker_label: str = "",
                 cue_mask: np.ndarray | None = None) -> list[Path]:
    """Eigenvalue spectrum, 2-D spectral embedding coloured by cluster, and each cluster's composite map.

    ``result`` is a :class:`gestalt_xai.aggregate.spray.SprayResult` (SpRAy, Lapuschkin et al., Nat. Commun.
    2019); ``cluster_maps`` = ``[(face, composite map, caption), …]`` per cluster (faces already privacy-guarded);
    ``marker`` (bool per subject) draws hollow rings, e.g. subjects whose photos carry the confounder;
    ``cue_mask`` (template space) is outlined in green on the cluster maps.
    """
    plt = _plt()
    k = len(cluster_maps)
    width = 2.4 * (2 + k) + 0.8
    fig, axes = plt.subplots(1, 2 + k, figsize=(width, 3.3), squeeze=False, layout="constrained")
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
    fig.suptitle(_wrap(title, width), fontsize=9)
    return save_figure(fig, path, formats=FIGURE_FORMATS.get())


def pair_figure(face_a: np.ndarray, face_b: np.ndarray, rows: Sequence[tuple[str, np.ndarray | None,
                np.ndarray | None, bool]], path: Path, title: str, label_a: str, label_b: str) -> list[Path]:
    """Two faces side by side with both directions of their similarity maps, one row per method.

    ``rows`` = ``[(method, map on A towards B, map on B towards A, signed), …]`` (both directions:
    :func:`gestalt_xai.aggregate.similarity.pair_maps`). Columns: A's face, A's map, B's map, B's face — each map
    sits next to the face it explains.
    """
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 4, figsize=(8.6, 2.2 * len(rows) + 0.8), squeeze=False, layout="constrained")
    for i, (method, ma, mb, signed) in enumerate(rows):
        vmax = shared_scale([ma, mb], signed)
        axes[i, 0].imshow(face_a)
        axes[i, 3].imshow(face_b)
        h = draw_map(axes[i, 1], face_a, ma, signed=signed, vmax=vmax)
        draw_map(axes[i, 2], face_b, mb, signed=signed, vmax=vmax)
        axes[i, 1].set_title(f"{method}\non A, towards B" if ma is not None else f"{method}\nnot stored", fontsize=7)
        axes[i, 2].set_title(f"{method}\non B, towards A" if mb is not None else f"{method}\nnot stored", fontsize=7)
        cb = fig.colorbar(h, ax=list(axes[i, :]), shrink=0.85, pad=0.01)
        cb.ax.tick_params(labelsize=6)
    _no_ticks(axes)
    axes[0, 0].set_title(f"A: {label_a}", fontsize=7)
    axes[0, 3].set_title(f"B: {label_b}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, formats=FIGURE_FORMATS.get())


def patient_syndrome_figure(face: np.ndarray, centroid: np.ndarray | None, neighbours: Sequence[tuple[str, str,
                            np.ndarray, np.ndarray, np.ndarray | None]], signed: bool, path: Path,
                            title: str) -> list[Path]:
    """A patient against a syndrome: the centroid map, then per nearest gallery image the patient's map towards
    it and the gallery face with its map towards the patient.

    ``neighbours`` = ``[(caption, gallery id, map on patient, gallery face, map on gallery or None), …]``
    (:func:`gestalt_xai.aggregate.similarity.patient_syndrome_maps`).
    """
    plt = _plt()
    ncol = 2 + 2 * len(neighbours)
    fig, axes = plt.subplots(1, ncol, figsize=(max(1.9 * ncol + 0.6, 6.0), 2.8), squeeze=False, layout="constrained")
    axes = axes[0]
    vmax = shared_scale([centroid] + [n[2] for n in neighbours] + [n[4] for n in neighbours], signed)
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
    _no_ticks(axes)
    cb = fig.colorbar(h, ax=list(axes), shrink=0.85, pad=0.01)
    cb.ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, formats=FIGURE_FORMATS.get())
