"""Facial region atlas in ArcFace template space (112×112), and per-image regions from 68-point landmarks.

The atlas is a *label map*: every crop pixel belongs to exactly one region, so attribution shares over regions sum to
one. Regions are built from simple shapes placed relative to the template's landmarks (eyes at y ≈ 51.6, nose tip at
y ≈ 71.7, mouth corners at y ≈ 92.3, inter-ocular distance ≈ 35 px) and painted in priority order, small features
last. "left"/"right" are *image* left/right, as for landmarks (the patient's right eye is ``periorbital_left``).

Ears and most of the forehead lie outside the 112² crop: no region of the atlas can carry their evidence, and HPO
terms of the ear branch (e.g. low-set ears) can never be localised in template space.

Each region belongs to a group of ``hpo_face_regions.tsv`` (HPO release 2025-01-16) that names its HPO anchor terms.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np

from gestalt_xai.faces.align import ARCFACE_TEMPLATE, CROP_SIZE

__all__ = [
    "REGIONS",
    "REGION_GROUP",
    "Region",
    "region_table",
    "hpo_anchors",
    "template_atlas",
    "landmark_atlas",
    "region_masks",
    "atlas_figure",
]

#: atlas regions, in label order (label value = index)
REGIONS: tuple[str, ...] = (
    "forehead_visible", "brow_left", "brow_right", "periorbital_left", "periorbital_right", "nasal_bridge", "nose",
    "philtrum", "upper_lip", "mouth", "chin", "cheek_left", "cheek_right", "other_face", "background",
)
#: atlas region → toolkit region group of ``hpo_face_regions.tsv`` (None: no HPO anchor)
REGION_GROUP: dict[str, str | None] = {
    "forehead_visible": "forehead",
    "brow_left": "periorbital_eyes_brows", "brow_right": "periorbital_eyes_brows",
    "periorbital_left": "periorbital_eyes_brows", "periorbital_right": "periorbital_eyes_brows",
    "nasal_bridge": "nose", "nose": "nose",
    "philtrum": "philtrum",
    "upper_lip": "mouth_lips", "mouth": "mouth_lips",
    "chin": "chin_mandible",
    "cheek_left": "midface_cheeks", "cheek_right": "midface_cheeks",
    "other_face": "global_face_shape",
    "background": None,
}
LABEL = {name: i for i, name in enumerate(REGIONS)}


@dataclass(frozen=True)
class Region:
    """One atlas region with its HPO anchors."""

    name: str
    label: int
    group: str | None
    hpo_ids: tuple[str, ...]
    hpo_names: tuple[str, ...]


@cache
def _hpo_rows() -> tuple[dict[str, str], ...]:
    text = files("gestalt_xai.resources").joinpath("hpo_face_regions.tsv").read_text(encoding="utf-8")
    return tuple(csv.DictReader(text.splitlines(), delimiter="\t"))


def hpo_anchors(group: str | None) -> list[tuple[str, str]]:
    """HPO ``(id, name)`` anchor terms of a toolkit region group (empty for ``None``)."""
    return [(r["hpo_id"], r["hpo_name"]) for r in _hpo_rows() if r["toolkit_region"] == group]


def region_table() -> list[Region]:
    """All atlas regions in label order, with group and HPO anchors."""
    out = []
    for name in REGIONS:
        group = REGION_GROUP[name]
        anchors = hpo_anchors(group)
        out.append(Region(name, LABEL[name], group, tuple(a for a, _ in anchors), tuple(b for _, b in anchors)))
    return out


def _ellipse(mask: np.ndarray, center: tuple[float, float], axes: tuple[float, float], angle: float = 0.0) -> None:
    # drawn at 16× sub-pixel precision so region borders do not snap to whole pixels
    shift = 4
    c = (round(center[0] * 16), round(center[1] * 16))
    a = (round(axes[0] * 16), round(axes[1] * 16))
    cv2.ellipse(mask, c, a, angle, 0, 360, 1, thickness=-1, lineType=cv2.LINE_8, shift=shift)


def _poly(mask: np.ndarray, points: np.ndarray) -> None:
    cv2.fillPoly(mask, [np.round(np.asarray(points) * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)


def _paint(labels: np.ndarray, name: str, mask: np.ndarray, within: np.ndarray) -> None:
    labels[(mask > 0) & within] = LABEL[name]


@cache
def _template_atlas(size: int) -> np.ndarray:
    s = size / CROP_SIZE
    eye_l, eye_r, nose, mouth_l, mouth_r = ARCFACE_TEMPLATE * s
    io = float(np.linalg.norm(eye_r - eye_l))  # ≈ 35 px at 112²
    labels = np.full((size, size), LABEL["background"], np.uint8)
    face = np.zeros((size, size), np.uint8)
    _ellipse(face, (56 * s, 56 * s), (46 * s, 62 * s))
    inside = face > 0
    labels[inside] = LABEL["other_face"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    brow_y = (eye_l[1] + eye_r[1]) / 2 - 0.33 * io
    _paint(labels, "forehead_visible", (yy < brow_y - 0.12 * io).astype(np.uint8), inside)
    cheek_top, mouth_y = nose[1] - 0.35 * io, (mouth_l[1] + mouth_r[1]) / 2
    _paint(labels, "cheek_left", ((xx < mouth_l[0] - 0.1 * io) & (yy > cheek_top) & (yy < mouth_y + 0.2 * io))
           .astype(np.uint8), inside)
    _paint(labels, "cheek_right", ((xx > mouth_r[0] + 0.1 * io) & (yy > cheek_top) & (yy < mouth_y + 0.2 * io))
           .astype(np.uint8), inside)
    chin = np.zeros_like(face)
    _poly(chin, np.array([[mouth_l[0] - 0.25 * io, mouth_y + 0.2 * io], [mouth_r[0] + 0.25 * io, mouth_y + 0.2 * io],
                          [mouth_r[0] + 0.3 * io, size], [mouth_l[0] - 0.3 * io, size]]))
    _paint(labels, "chin", chin, inside)
    nose_base = nose[1] + 0.16 * io
    lip_top = mouth_y - 0.2 * io
    upper = np.zeros_like(face)
    _poly(upper, np.array([[mouth_l[0] - 0.1 * io, nose_base], [mouth_r[0] + 0.1 * io, nose_base],
                           [mouth_r[0] + 0.1 * io, lip_top + 0.06 * io], [mouth_l[0] - 0.1 * io, lip_top + 0.06 * io]]))
    _paint(labels, "upper_lip", upper, inside)
    philtrum = np.zeros_like(face)
    _poly(philtrum, np.array([[nose[0] - 0.2 * io, nose_base], [nose[0] + 0.2 * io, nose_base],
                              [nose[0] + 0.22 * io, lip_top], [nose[0] - 0.22 * io, lip_top]]))
    _paint(labels, "philtrum", philtrum, inside)
    mouth = np.zeros_like(face)
    _ellipse(mouth, ((mouth_l[0] + mouth_r[0]) / 2, mouth_y), (0.56 * io, 0.2 * io))
    _paint(labels, "mouth", mouth, inside)
    nose_m = np.zeros_like(face)
    _poly(nose_m, np.array([[nose[0] - 0.2 * io, nose[1] - 0.4 * io], [nose[0] + 0.2 * io, nose[1] - 0.4 * io],
                            [nose[0] + 0.38 * io, nose[1] + 0.02 * io], [nose[0] + 0.3 * io, nose_base],
                            [nose[0] - 0.3 * io, nose_base], [nose[0] - 0.38 * io, nose[1] + 0.02 * io]]))
    _paint(labels, "nose", nose_m, inside)
    mid_x = (eye_l[0] + eye_r[0]) / 2
    bridge = np.zeros_like(face)
    _poly(bridge, np.array([[mid_x - 0.17 * io, brow_y], [mid_x + 0.17 * io, brow_y],
                            [mid_x + 0.2 * io, nose[1] - 0.4 * io], [mid_x - 0.2 * io, nose[1] - 0.4 * io]]))
    _paint(labels, "nasal_bridge", bridge, inside)
    for side, eye in (("left", eye_l), ("right", eye_r)):
        peri = np.zeros_like(face)
        _ellipse(peri, (eye[0], eye[1] + 0.02 * io), (0.38 * io, 0.24 * io))
        _paint(labels, f"periorbital_{side}", peri, inside)
        brow = np.zeros_like(face)
        _ellipse(brow, (eye[0] + (0.03 if side == "right" else -0.03) * io, brow_y), (0.4 * io, 0.12 * io))
        _paint(labels, f"brow_{side}", brow, inside)
    labels.setflags(write=False)
    return labels


def template_atlas(size: int = CROP_SIZE) -> np.ndarray:
    """Label map (``size×size`` uint8, read-only) of the atlas in template space; values index :data:`REGIONS`."""
    return _template_atlas(size)


def region_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean mask per region name from a label map."""
    return {name: labels == LABEL[name] for name in REGIONS}


def landmark_atlas(landmarks68: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Per-image label map from 68 iBUG landmarks given in the same (template) space.

    Landmark regions (0-based): jaw 0–16, brows 17–21 / 22–26, nose bridge 27–30, lower nose 31–35, eyes 36–41 /
    42–47, outer lip 48–59; philtrum polygon [32, 33, 34, 52, 51, 50]; chin polygon [6–10, 55–59]. The face outline
    is the jaw closed over the brows raised by one brow–eye distance (the visible forehead).
    """
    p = np.asarray(landmarks68, dtype=np.float64).reshape(68, 2)
    labels = np.full((size, size), LABEL["background"], np.uint8)
    io = float(np.linalg.norm(p[36:42].mean(0) - p[42:48].mean(0)))
    lift = np.array([0.0, 0.9 * io])
    outline = np.vstack([p[0:17], p[26:21:-1] - lift, p[21:16:-1] - lift])
    face = np.zeros((size, size), np.uint8)
    _poly(face, outline)
    inside = face > 0
    labels[inside] = LABEL["other_face"]

    def poly(name: str, pts: np.ndarray, grow: float = 0.0) -> None:
        m = np.zeros((size, size), np.uint8)
        pts = np.asarray(pts, np.float64)
        if grow:
            c = pts.mean(0)
            pts = c + (pts - c) * (1 + grow)
        _poly(m, cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2))
        _paint(labels, name, m, inside)

    brow_top = min(p[17:27, 1])
    forehead = np.zeros((size, size), np.uint8)
    forehead[: max(0, int(round(brow_top - 0.1 * io))), :] = 1
    _paint(labels, "forehead_visible", forehead, inside)
    poly("cheek_left", np.vstack([p[1:6], p[31], p[48], p[36], p[41]]))
    poly("cheek_right", np.vstack([p[11:16], p[35], p[54], p[45], p[46]]))
    poly("chin", np.vstack([p[6:11], p[55:60]]))
    poly("upper_lip", np.vstack([p[31:36], p[48:55]]))
    poly("philtrum", p[[32, 33, 34, 52, 51, 50]])
    poly("mouth", p[48:60], grow=0.08)
    poly("nose", np.vstack([p[29:36], p[31] - [0.1 * io, 0], p[35] + [0.1 * io, 0]]))
    poly("nasal_bridge", np.vstack([p[27:30] - [0.15 * io, 0], p[27:30] + [0.15 * io, 0]]))
    poly("periorbital_left", p[36:42], grow=0.6)
    poly("periorbital_right", p[42:48], grow=0.6)
    poly("brow_left", np.vstack([p[17:22], p[17:22] + [0, 0.12 * io]]), grow=0.15)
    poly("brow_right", np.vstack([p[22:27], p[22:27] + [0, 0.12 * io]]), grow=0.15)
    return labels


def atlas_figure(face_rgb: np.ndarray, labels: np.ndarray | None = None, path: str | Path | None = None,
                 title: str = "Region atlas"):
    """Draw the atlas over a face crop (region colours, borders and names); save to ``path`` (PNG/SVG) if given.

    Returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = template_atlas(face_rgb.shape[0]) if labels is None else labels
    cmap = plt.get_cmap("tab20", len(REGIONS))
    fig, ax = plt.subplots(figsize=(5.2, 5.2), dpi=120)
    ax.imshow(face_rgb)
    overlay = np.ma.masked_where(labels == LABEL["background"], labels)
    ax.imshow(overlay, cmap=cmap, vmin=-0.5, vmax=len(REGIONS) - 0.5, alpha=0.38, interpolation="nearest")
    edges = cv2.Canny(labels.astype(np.uint8) * 10, 1, 1) > 0
    ax.imshow(np.ma.masked_where(~edges, edges), cmap="gray_r", alpha=0.6, interpolation="nearest")
    for name in REGIONS[:-1]:
        mask = (labels == LABEL[name]).astype(np.uint8)
        if mask.any():
            # label at the region's most interior pixel, so names of non-convex regions sit inside them
            dist = cv2.distanceTransform(np.pad(mask, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
            y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
            ax.text(x, y, name.replace("_", "\n"), ha="center", va="center", fontsize=5.5,
                    color="black", bbox={"boxstyle": "round,pad=0.1", "fc": "white", "alpha": 0.6, "lw": 0})
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        from gestalt_xai.viz import save_figure

        save_figure(fig, path)
    return fig
