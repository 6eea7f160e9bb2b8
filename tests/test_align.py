"""Detection and alignment on real photos shipped inside installed packages, and the geometry both ways."""

from __future__ import annotations

import numpy as np
import pytest

from gestalt_xai.data.images import load_image
from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.faces.align import (
    ARCFACE_TEMPLATE,
    Alignment,
    align_face,
    estimate_transform,
    invert_transform,
    transform_points,
    warp_crop_to_photo,
    warp_photo_to_crop,
    warp_to_crop,
    yaw_proxy,
)
from gestalt_xai.faces.detect import make_detector


def _frontal_first(dets):
    frontal = [d for d in dets if abs(yaw_proxy(d.landmarks)) <= 0.2]
    return (frontal or dets)[0]


@pytest.mark.parametrize("name", ["insightface_t1", "skimage_astronaut"])
def test_real_photos_align_onto_template(name: str, example_photos, mtcnn) -> None:
    photo = load_image(example_photos[name])
    dets = mtcnn.detect(photo)
    assert dets, f"MTCNN found no face in {name}"
    if name == "insightface_t1":
        assert len(dets) == 6  # a group photo of six people
    det = _frontal_first(dets)
    crop, M = align_face(photo, det.landmarks)
    assert crop.shape == (112, 112, 3)
    residual = np.linalg.norm(transform_points(det.landmarks, M) - ARCFACE_TEMPLATE, axis=1)
    assert residual[:2].max() < 3.0, residual  # both eyes
    assert residual.max() < 8.0, residual  # every landmark


def test_profile_face_is_recognised_as_not_frontal(example_photos, mtcnn) -> None:
    dets = mtcnn.detect(load_image(example_photos["insightface_t1"]))
    yaws = sorted(abs(yaw_proxy(d.landmarks)) for d in dets)
    assert yaws[0] < 0.1 and yaws[-1] > 0.4  # t1 has frontal faces and a near profile


def test_realigning_an_aligned_face_is_near_identity(example_photos, mtcnn) -> None:
    crop = load_image(example_photos["insightface_tom_hanks_aligned"])
    assert crop.shape == (112, 112, 3)
    det = mtcnn.detect(crop)[0]
    al = Alignment(estimate_transform(det.landmarks), det.landmarks, det.score, 1, "mtcnn")
    assert abs(al.scale - 1.0) < 0.10
    assert abs(al.rotation_deg) < 5.0


def test_point_round_trip_photo_crop_photo() -> None:
    rng = np.random.default_rng(0)
    lm = ARCFACE_TEMPLATE * 3.1 + [140.0, 75.0]
    theta = np.deg2rad(17)
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    lm = (lm - lm.mean(0)) @ R.T + lm.mean(0)
    M = estimate_transform(lm)
    pts = rng.uniform(0, 500, size=(200, 2))
    back = transform_points(transform_points(pts, M), invert_transform(M))
    assert np.abs(back - pts).max() < 1e-3
    assert np.allclose(transform_points(lm, M), ARCFACE_TEMPLATE, atol=1e-6)  # exact similarity
    al = Alignment(M, lm, 1.0, 1, "x")
    assert al.scale == pytest.approx(1 / 3.1, rel=1e-6) and al.rotation_deg == pytest.approx(-17, abs=1e-6)


def test_map_crop_photo_crop_preserved_inside_face() -> None:
    lm = ARCFACE_TEMPLATE * 2.6 + [60.0, 40.0]
    M = estimate_transform(lm)
    yy, xx = np.mgrid[0:112, 0:112]
    smooth = np.sin(xx / 9.0) * np.cos(yy / 13.0) + 0.01 * xx  # a smooth signed map
    photo_map = warp_crop_to_photo(smooth.astype(np.float32), M, (420, 400))
    back = warp_photo_to_crop(photo_map, M)
    inner = (slice(8, 104), slice(8, 104))
    assert np.abs(back[inner] - smooth[inner]).max() < 0.02
    mask = np.zeros((112, 112), bool)
    mask[40:70, 30:80] = True
    photo_mask = warp_crop_to_photo(mask, M, (420, 400))
    assert photo_mask.dtype == bool and photo_mask.sum() == pytest.approx(mask.sum() * 2.6**2, rel=0.05)
    assert (warp_photo_to_crop(photo_mask, M) == mask).mean() > 0.995


def test_warp_crop_matches_point_mapping() -> None:
    """A bright dot at a photo point lands at the mapped crop point."""
    photo = np.zeros((300, 300, 3), np.uint8)
    photo[150, 120] = 255
    lm = ARCFACE_TEMPLATE * 2 + [30.0, 20.0]
    M = estimate_transform(lm)
    crop = warp_to_crop(photo, M)
    y, x = np.unravel_index(np.argmax(crop[..., 0]), crop.shape[:2])
    px, py = transform_points([[120, 150]], M)[0]
    assert abs(x - px) <= 1 and abs(y - py) <= 1


def test_degenerate_landmarks_rejected() -> None:
    with pytest.raises(InputError, match="degenerate"):
        estimate_transform(np.ones((5, 2)))
    with pytest.raises(InputError, match="NaN"):
        estimate_transform(np.full((5, 2), np.nan))
    with pytest.raises(InputError, match=r"\(5, 2\)"):
        estimate_transform(np.zeros((4, 2)))


def test_detector_factory_errors() -> None:
    with pytest.raises(ConfigError, match="detector-weights"):
        make_detector("retinaface")
    with pytest.raises(ConfigError, match="unknown detector"):
        make_detector("dlib")
    with pytest.raises(ConfigError, match="shipped inside facenet-pytorch"):
        make_detector("mtcnn", weights="x.pth")


def test_alignment_matrix_equals_insightface_estimate_norm() -> None:
    """Our least-squares similarity onto the ArcFace template is insightface's own ``estimate_norm`` (the reference
    GestaltMatcher-Arc aligns with), on random head poses, scales and positions."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # insightface's skimage call warns about a deprecated API
        from insightface.utils.face_align import estimate_norm

        rng = np.random.default_rng(0)
        for _ in range(20):
            angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.3, 4.0)
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            photo = (ARCFACE_TEMPLATE @ rot.T) * scale + rng.uniform(0, 500, 2) + rng.normal(0, 2.0, (5, 2))
            ours = estimate_transform(photo)
            theirs = estimate_norm(photo.astype(np.float32), image_size=112, mode="arcface")
            np.testing.assert_allclose(ours, theirs, atol=1e-3 * max(1.0, np.abs(theirs).max()))
