"""Figures: one visual language for every plot the toolkit draws (matplotlib, Agg backend, no display needed).

Conventions
-----------
* Signed maps use a **diverging** colour map (``RdBu_r``: red = evidence for the explained score, blue = against)
  centred at 0 with a symmetric range ``[−v, v]``; non-negative maps use a sequential one (``inferno``) from 0.
* A figure that compares maps shares one colour scale per kind of map (all signed panels one ``v``, all unsigned
  panels one maximum) after the named view from :mod:`gestalt_xai.attribution.postprocess` (default
  ``max-abs``: every map scaled by its own max |value|, so panels of different methods are comparable in shape).
* Maps are drawn over the grayscale face at ``alpha`` so the face stays readable; titles name method and layer.
* Figures are written atomically without metadata (:func:`save_figure`, the lead's; signature kept): the same
  inputs give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["SIGNED_CMAP", "UNSIGNED_CMAP", "overlay_figure", "method_grid", "save_figure", "map_on_photo"]

SIGNED_CMAP = "RdBu_r"
UNSIGNED_CMAP = "inferno"
DPI = 110


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, formats: tuple[str, ...] | None = None,  # type: ignore[no-untyped-def]
                dpi: int = 150) -> list[Path]:
    """Save ``fig`` without metadata (no software/date text chunks) and close it.

    ``path``'s suffix picks the format; ``formats`` (e.g. ``("png", "svg")``) writes one file per format beside it.
    SVGs get no date and a fixed hash salt, so the same figure gives the same bytes. Returns the written paths.
    """
    import matplotlib

    from gestalt_xai.runs import atomic_write_bytes

    plt = _plt()
    path = Path(path)
    kinds = formats or (path.suffix.lstrip(".") or "png",)
    written = []
    for kind in kinds:
        target = path.with_suffix(f".{kind}")
        buf = io.BytesIO()
        if kind == "svg":
            with matplotlib.rc_context({"svg.hashsalt": "gestalt-xai"}):
                fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        elif kind == "pdf":
            fig.savefig(buf, format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})
        else:
            fig.savefig(buf, format=kind, dpi=dpi, metadata={"Software": None} if kind == "png" else None)
        atomic_write_bytes(target, buf.getvalue())
        written.append(target)
    plt.close(fig)
    return written


def _gray(face: np.ndarray) -> np.ndarray:
    f = np.asarray(face, dtype=np.float32)
    if f.ndim == 3:
        f = f @ np.array([0.299, 0.587, 0.114], np.float32)
    return f / 255.0 if f.max() > 1.5 else f


def map_on_photo(map_: np.ndarray, matrix: np.ndarray, photo_hw: tuple[int, int]) -> np.ndarray:
    """A template-space map drawn back onto the photo grid through the inverse alignment (NaN outside the crop)."""
    from gestalt_xai.faces.align import warp_crop_to_photo

    return warp_crop_to_photo(np.asarray(map_, np.float32), matrix, photo_hw, fill=np.nan)


def overlay_figure(
    face: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    signed: Mapping[str, bool] | None = None,
    view: str = "max-abs",
    title: str = "",
    alpha: float = 0.6,
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

    background = _gray(face) if photo is None else _gray(photo)
    if photo is not None and matrix is not None:
        shown = {n: map_on_photo(m, matrix, background.shape[:2]) for n, m in shown.items()}

    n = len(names) + 1
    kinds = sorted({is_signed[k] for k in names}, reverse=True)  # signed bar first
    # one thin colour-bar column per kind, separated by an empty column that leaves room for tick labels
    ratios = [1.0] * n + ([0.06] if len(kinds) == 1 else [0.06, 0.45, 0.06])
    fig, all_axes = plt.subplots(1, len(ratios), figsize=(1.9 * n + 0.9 * len(kinds), 2.3), squeeze=False,
                                 gridspec_kw={"width_ratios": ratios, "wspace": 0.15})
    axes, bar_axes = all_axes[0][:n], list(all_axes[0][n::2])
    for spacer in all_axes[0][n + 1::2]:
        spacer.axis("off")
    axes[0].imshow(np.asarray(face) if photo is None else np.asarray(photo))
    axes[0].set_title("face", fontsize=8)
    handles = {}
    for ax, name in zip(axes[1:], names, strict=True):
        ax.imshow(background, cmap="gray", vmin=0, vmax=1)
        if is_signed[name]:
            im = ax.imshow(shown[name], cmap=SIGNED_CMAP, vmin=-vmax_signed, vmax=vmax_signed, alpha=alpha)
        else:
            im = ax.imshow(shown[name], cmap=UNSIGNED_CMAP, vmin=0, vmax=vmax_unsigned, alpha=alpha)
        handles[is_signed[name]] = im
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for cax, s in zip(bar_axes, kinds, strict=True):
        cb = fig.colorbar(handles[s], cax=cax)
        shown_view = view if s else view.replace("max-abs", "min-max")
        cb.set_label(f"{'signed' if s else 'unsigned'}: {shown_view}", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    if path is not None:
        return save_figure(fig, path, dpi=DPI)[0]
    return fig


def method_grid(faces: Sequence[np.ndarray], rows: Sequence[Mapping[str, np.ndarray]], path: str | Path,
                view: str = "max-abs", row_titles: Sequence[str] | None = None) -> Path:
    """Several images × methods in one figure (one :func:`overlay_figure` row each, same conventions)."""
    plt = _plt()
    from gestalt_xai.attribution.postprocess import apply_view

    names = list(rows[0]) if rows else []
    fig, axes = plt.subplots(len(rows), len(names) + 1, figsize=(1.8 * (len(names) + 1), 1.9 * len(rows)),
                             squeeze=False)
    for r, (face, maps) in enumerate(zip(faces, rows, strict=True)):
        axes[r, 0].imshow(face)
        if row_titles:
            axes[r, 0].set_ylabel(row_titles[r], fontsize=7)
        for c, name in enumerate(names, start=1):
            m = np.asarray(apply_view(np.asarray(maps[name], np.float32), view))
            axes[r, c].imshow(_gray(face), cmap="gray", vmin=0, vmax=1)
            if (m < 0).any():
                axes[r, c].imshow(m, cmap=SIGNED_CMAP, vmin=-1, vmax=1, alpha=0.6)
            else:
                axes[r, c].imshow(m, cmap=UNSIGNED_CMAP, vmin=0, vmax=1, alpha=0.6)
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path, dpi=DPI)[0]
