"""Region atlas: a partition of the crop, plausible placement, HPO anchors, landmark-based regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gestalt_xai.faces.align import ARCFACE_TEMPLATE
from gestalt_xai.faces.regions import (
    REGION_GROUP,
    REGIONS,
    atlas_figure,
    hpo_anchors,
    landmark_atlas,
    region_masks,
    region_table,
    template_atlas,
)


def test_atlas_partitions_the_crop() -> None:
    labels = template_atlas()
    assert labels.shape == (112, 112)
    masks = region_masks(labels)
    cover = np.sum([m.astype(int) for m in masks.values()], axis=0)
    assert (cover == 1).all()  # every pixel exactly once
    assert all(m.any() for m in masks.values())  # no empty region
    assert not labels.flags.writeable  # a shared cached array must not be modified


def _label_at(labels: np.ndarray, xy) -> str:
    x, y = np.round(xy).astype(int)
    return REGIONS[labels[y, x]]


def test_atlas_regions_sit_on_their_landmarks() -> None:
    labels = template_atlas()
    eye_l, eye_r, nose, mouth_l, mouth_r = ARCFACE_TEMPLATE
    assert _label_at(labels, eye_l) == "periorbital_left"
    assert _label_at(labels, eye_r) == "periorbital_right"
    assert _label_at(labels, nose) == "nose"
    assert _label_at(labels, (mouth_l + mouth_r) / 2) == "mouth"
    assert _label_at(labels, (56, 8)) == "forehead_visible"
    assert _label_at(labels, (56, 108)) == "chin"
    assert _label_at(labels, (1, 1)) == "background" and _label_at(labels, (110, 60)) == "background"
    assert _label_at(labels, ((eye_l[0] + eye_r[0]) / 2, 52)) == "nasal_bridge"
    assert _label_at(labels, (nose[0], 80)) == "philtrum"
    assert _label_at(labels, (24, 75)) == "cheek_left" and _label_at(labels, (88, 75)) == "cheek_right"
    # left/right are image left/right, mirror-symmetric in area
    m = region_masks(labels)
    for a, b in (("brow_left", "brow_right"), ("periorbital_left", "periorbital_right"),
                 ("cheek_left", "cheek_right")):
        assert abs(int(m[a].sum()) - int(m[b].sum())) <= 0.1 * m[a].sum()


def test_hpo_anchors_from_table() -> None:
    table = {r.name: r for r in region_table()}
    assert set(table) == set(REGIONS)
    assert "HP:0000288" in table["philtrum"].hpo_ids  # Abnormality of the philtrum
    assert "HP:0000315" in table["periorbital_left"].hpo_ids
    assert table["background"].hpo_ids == ()
    assert set(REGION_GROUP.values()) - {None} <= {g for g in REGION_GROUP.values() if g and hpo_anchors(g)}
    assert hpo_anchors("ears")  # ears have anchors in the table but no region: they are outside the crop
    assert "ears" not in set(REGION_GROUP.values())


def _template_68() -> np.ndarray:
    """A plausible 68-point layout in template space built around the 5 template points."""
    eye_l, eye_r, nose, mouth_l, mouth_r = ARCFACE_TEMPLATE
    p = np.zeros((68, 2))
    t = np.linspace(0, np.pi, 17)
    p[0:17] = np.c_[56 - 46 * np.cos(t), 45 + 58 * np.sin(t)]  # jaw from image-left to image-right
    p[17:22] = np.c_[np.linspace(24, 50, 5), [40, 37, 36, 37, 39]]
    p[22:27] = np.c_[np.linspace(62, 88, 5), [39, 37, 36, 37, 40]]
    p[27:31] = np.c_[[56] * 4, np.linspace(50, 66, 4)]
    p[31:36] = np.c_[np.linspace(48, 64, 5), [76, 77, 78, 77, 76]]
    for base, c in ((36, eye_l), (42, eye_r)):
        ang = np.linspace(0, 2 * np.pi, 7)[:-1]
        p[base:base + 6] = c + np.c_[-8 * np.cos(ang), -3 * np.sin(ang)]
    ang = np.linspace(0, 2 * np.pi, 13)[:-1]
    p[48:60] = (mouth_l + mouth_r) / 2 + np.c_[-14.6 * np.cos(ang), -5 * np.sin(ang)]
    inner = np.linspace(0, 2 * np.pi, 9)[:-1]
    p[60:68] = (mouth_l + mouth_r) / 2 + np.c_[-10 * np.cos(inner), -1.5 * np.sin(inner)]
    return p


def test_landmark_atlas_partitions_and_places_regions() -> None:
    p = _template_68()
    labels = landmark_atlas(p)
    masks = region_masks(labels)
    assert (np.sum([m.astype(int) for m in masks.values()], axis=0) == 1).all()
    assert _label_at(labels, ARCFACE_TEMPLATE[0]) == "periorbital_left"
    assert _label_at(labels, ARCFACE_TEMPLATE[1]) == "periorbital_right"
    assert _label_at(labels, (ARCFACE_TEMPLATE[3] + ARCFACE_TEMPLATE[4]) / 2) == "mouth"
    assert _label_at(labels, p[33] - [0, 3]) == "nose"
    assert _label_at(labels, (56, 100)) == "chin"  # the constructed jaw ends at y ≈ 103
    # agrees broadly with the template atlas on a template-like face
    assert (labels == template_atlas()).mean() > 0.5


def test_atlas_figure_written(tmp_path: Path) -> None:
    face = np.full((112, 112, 3), 180, np.uint8)
    atlas_figure(face, path=tmp_path / "atlas.png")
    data = (tmp_path / "atlas.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"tEXt" not in data and len(data) > 5000
