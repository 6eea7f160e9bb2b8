"""Landmark-jitter robustness (gestalt_xai.assess.robustness): re-alignment, the warp back, seeds, and the engine on
the shared trained model."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from gestalt_xai.assess.compare import compare_maps
from gestalt_xai.assess.robustness import (
    JITTER_COLUMNS,
    compose,
    image_seed,
    jitter_landmarks,
    landmark_jitter,
    load_jitter_inputs,
    pair_baseline,
    summarise_jitter,
    to_original_frame,
)
from gestalt_xai.faces.align import ARCFACE_TEMPLATE, estimate_transform, invert_transform, warp_to_crop

METHODS = ["gradcam", "hirescam", "fullgrad", "saliency", "input_x_gradient"]


def smooth_field(shape: tuple[int, int], seed: int = 0, sigma: float = 2.0) -> np.ndarray:
    """A photo-space map with structure at a few pixels: sharp cross-correlation peaks, no periodicity."""
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), sigma)


def correlation_peak(a: np.ndarray, b: np.ndarray, valid: np.ndarray, reach: int = 4) -> tuple[int, int]:
    """The integer shift ``(dy, dx)`` of ``b`` that best matches ``a`` (Pearson over the valid interior)."""
    inner = valid.copy()
    inner[:reach + 1], inner[-reach - 1:], inner[:, :reach + 1], inner[:, -reach - 1:] = False, False, False, False
    best, where = -2.0, (0, 0)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            r = np.corrcoef(a[inner], np.roll(b, (dy, dx), axis=(0, 1))[inner])[0, 1]
            if r > best:
                best, where = r, (dy, dx)
    return where


# ------------------------------------------------------------------------------------------ geometry, no model
def test_identity_rewarp_returns_the_map():
    landmarks = ARCFACE_TEMPLATE * 2.3 + [40.0, 25.0]
    M = estimate_transform(landmarks @ np.array([[0.96, -0.28], [0.28, 0.96]]))  # rotated, scaled
    maps = np.stack([smooth_field((112, 112), s) for s in range(3)])
    back, valid = to_original_frame(maps, np.repeat(M[None], 3, 0), np.repeat(M[None], 3, 0))
    assert valid.all()
    assert np.abs(back - maps).max() < 1e-5
    assert (compare_maps(maps, back, metrics=("spearman",))["spearman"] > 0.9999).all()


def test_known_shift_is_undone_and_a_wrong_composition_is_caught():
    """Landmarks moved +2 photo px in x: the jittered crop sees the face shifted; warped back it lines up again."""
    photo = smooth_field((200, 220), seed=4)
    landmarks = ARCFACE_TEMPLATE * 1.3 + [30.0, 20.0]  # crop scale 1/1.3: 2 photo px ≈ 1.5 crop px
    m_orig = estimate_transform(landmarks)
    m_jit = estimate_transform(landmarks + [2.0, 0.0])
    orig, jit = warp_to_crop(photo, m_orig), warp_to_crop(photo, m_jit)
    # the jittered crop itself is displaced: its best match to the original is not at zero shift
    assert correlation_peak(orig, jit, np.ones_like(orig, bool)) != (0, 0)
    back, valid = to_original_frame(jit[None], m_orig[None], m_jit[None])
    assert 0.9 < valid.mean() < 1.0  # the strip the jittered crop did not cover is left out
    assert correlation_peak(orig, back[0], valid[0]) == (0, 0)
    r_back = np.corrcoef(orig[valid[0]], back[0][valid[0]])[0, 1]
    assert r_back > 0.99  # equal up to the two bilinear interpolations
    # the jittered matrix used the wrong way round (crop_orig → photo → crop_jit) doubles the shift instead
    wrong = warp_to_crop(jit, compose(m_jit, invert_transform(m_orig)))
    assert correlation_peak(orig, wrong, valid[0]) != (0, 0)
    assert np.corrcoef(orig[valid[0]], wrong[valid[0]])[0, 1] < r_back - 0.3


def test_jitter_draws_are_bounded_seeded_and_per_image():
    lm = ARCFACE_TEMPLATE * 3
    j = jitter_landmarks(lm, amplitude=2.0, draws=500, seed=image_seed(0, "00001"))
    assert j.shape == (500, 5, 2) and np.abs(j - lm).max() <= 2.0 and np.abs(j - lm).max() > 1.9
    assert abs(float((j - lm).mean())) < 0.1  # centred
    np.testing.assert_array_equal(j, jitter_landmarks(lm, amplitude=2.0, draws=500, seed=image_seed(0, "00001")))
    assert not np.array_equal(j, jitter_landmarks(lm, draws=500, seed=image_seed(0, "00002")))
    assert not np.array_equal(j, jitter_landmarks(lm, draws=500, seed=image_seed(1, "00001")))
    np.testing.assert_array_equal(jitter_landmarks(lm, amplitude=0.0, draws=2), np.stack([lm, lm]))
    # a SHA-256 seed: the same number on every platform and process (Python's hash() of a str is salted)
    assert image_seed(0, "00001") == 5855358489452347421


# ---------------------------------------------------------------------------------- the engine, trained model
@pytest.fixture(scope="module")
def setup(trained_run):
    from gestalt_xai.attribution.base import build_methods
    from gestalt_xai.attribution.explain import ExplainConfig
    from gestalt_xai.attribution.planning import ExplainSetup, build_targets
    from gestalt_xai.attribution.score_model import ScoreModel
    from gestalt_xai.models.gestaltmatcher import preprocess

    torch.set_num_threads(2)
    cfg = ExplainConfig(methods=METHODS, target="centroid", images="test", overlay=0)
    explain = ExplainSetup.build(trained_run, cfg)
    plan = next(explain.plans([], explain.image_ids[:3]))
    items = plan.items[:3]
    score_model = ScoreModel(plan.group, build_targets(items, plan.group, explain.slots, explain.kind),
                             explain.slots)
    ids = [it.image_id for it in items]
    x = preprocess(trained_run.crops(ids))
    maps = {mm.method: mm.maps.detach().numpy() for inst, names in build_methods(METHODS, {})
            for mm in inst.attribute(score_model, x, names, cfg.layers)}
    photos, landmarks, matrices = load_jitter_inputs(trained_run, ids)
    return score_model, ids, maps, photos, landmarks, matrices


def test_photos_recut_give_the_stored_crops(trained_run, setup):
    _, ids, _, photos, _, matrices = setup
    stored = trained_run.crops(ids)
    for photo, M, crop in zip(photos, matrices, stored, strict=True):
        np.testing.assert_array_equal(warp_to_crop(photo, M), crop)


def test_zero_amplitude_recomputes_the_original_maps(setup):
    score_model, ids, maps, photos, landmarks, matrices = setup
    table = landmark_jitter(score_model, photos, landmarks, matrices, maps, image_ids=ids, amplitude=0.0, draws=1,
                            control=False, batch_size=2)
    assert list(table.columns) == JITTER_COLUMNS
    assert len(table) == len(ids) * len(METHODS) and (table["draw"] == 1).all()
    assert (table["max_shift_px"] == 0).all() and (table["valid_fraction"] == 1).all()
    assert (table["spearman"] > 0.999).all() and (table["ssim"] > 0.999).all(), table
    assert (table["interp_spearman"] > 0.999).all()
    np.testing.assert_allclose(table["jitter_score"], table["score"], rtol=0, atol=1e-6)


def test_jitter_is_seeded_per_image_and_independent_of_batch_order(setup):
    score_model, ids, maps, photos, landmarks, matrices = setup
    kw = {"methods": ["gradcam", "saliency"], "amplitude": 2.0, "draws": 1, "seed": 3}
    table = landmark_jitter(score_model, photos, landmarks, matrices, maps, image_ids=ids, batch_size=4, **kw)
    again = landmark_jitter(score_model, photos, landmarks, matrices, maps, image_ids=ids, batch_size=4, **kw)
    pd.testing.assert_frame_equal(table, again)
    assert set(table["draw"]) == {0, 1}
    jittered, control = table[table["draw"] > 0], table[table["draw"] == 0]
    assert (jittered["max_shift_px"] > 0).all() and (jittered["max_shift_px"] <= 2 * np.sqrt(2)).all()
    assert (control["spearman"] > 0.999).all() and (control["max_shift_px"] == 0).all()
    assert (jittered["spearman"] < 0.999).any() and (jittered["jitter_score"] != jittered["score"]).all()
    # the same images reversed, in other batches: the same rows per image
    order = np.arange(len(ids))[::-1]
    rev_maps = {k: v[order] for k, v in maps.items()}
    reversed_ = landmark_jitter(score_model.select(order.tolist()), [photos[i] for i in order], landmarks[order],
                                matrices[order], rev_maps, image_ids=[ids[i] for i in order], batch_size=2, **kw)
    key = ["image_id", "method", "layer", "draw"]
    a = table.drop(columns="item").sort_values(key).reset_index(drop=True)
    b = reversed_.drop(columns="item").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, atol=1e-5, rtol=1e-5)

    baseline = pair_baseline({k: maps[k] for k in ("gradcam", "saliency")}, ids, seed=3)
    rev_baseline = pair_baseline(rev_maps, [ids[i] for i in order], seed=3)
    assert dict(zip(baseline["image_id"], baseline["partner_id"], strict=True)) == \
        dict(zip(rev_baseline["image_id"], rev_baseline["partner_id"], strict=True))
    assert (baseline["image_id"] != baseline["partner_id"]).all()
    summary = summarise_jitter(table, baseline)
    assert set(summary["method"]) == {"gradcam", "saliency"}
    assert (summary["control_spearman_median"] > 0.999).all()
    assert {"spearman_q25", "spearman_q75", "pair_spearman_median", "interp_ssim_median"} <= set(summary.columns)


def test_crop_unit_shifts_every_photo_the_same_in_the_crop(setup):
    score_model, ids, maps, photos, landmarks, matrices = setup
    table = landmark_jitter(score_model, photos, landmarks, matrices, {"saliency": maps["saliency"]},
                            image_ids=ids, amplitude=1.5, draws=1, unit="crop", control=False)
    assert (table["max_shift_crop_px"] <= 1.5 * np.sqrt(2) + 1e-9).all()
    assert (table["max_shift_crop_px"] > 0).all()
    with pytest.raises(ValueError, match="no original map"):
        landmark_jitter(score_model, photos, landmarks, matrices, {"saliency": maps["saliency"]},
                        methods=["gradcam"], image_ids=ids)
