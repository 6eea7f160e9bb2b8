"""Map-to-map comparison metrics (gestalt_xai.assess.compare): hand-computed cases, invariances, masks, registry."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from skimage.metrics import structural_similarity

from gestalt_xai.assess import compare as C
from gestalt_xai.assess.metric import METRICS
from gestalt_xai.errors import ConfigError

NAMES = ["ssim", "spearman", "spearman_abs", "pearson", "cosine", "topk_iou", "emd"]
SIMILARITIES = ["ssim", "spearman", "spearman_abs", "pearson", "cosine", "topk_iou"]


def _maps(n: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size))


def test_registered_with_direction():
    for name in NAMES:
        fn = METRICS.get(name)
        assert fn is getattr(C, name)
        assert fn.info.family == "comparison"
        assert fn.info.direction == ("lower" if name == "emd" else "higher")
        assert fn.info.reference


def test_hand_computed_cases():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[2.0, 1.0], [4.0, 8.0]])
    # ranks of b: 2 1 3 4 against 1 2 3 4 → ρ = 1 − 6·Σd² / (n(n²−1)) = 1 − 6·2/60 = 0.8
    assert C.spearman(a, b) == pytest.approx(0.8)
    assert C.pearson(a, b) == pytest.approx(pearsonr(a.ravel(), b.ravel())[0])
    assert C.cosine(a, b) == pytest.approx(48 / (np.sqrt(30) * np.sqrt(85)))
    # top half (pixels by value): a → {2, 3}, b → {2, 3}: identical sets
    assert C.topk_iou(a, b, k=0.5) == 1.0
    c = np.array([[4.0, 3.0], [2.0, 1.0]])  # top half {0, 1} vs a's {2, 3}: disjoint
    assert C.topk_iou(a, c, k=0.5) == 0.0


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, size=(10, 10)).astype(float)  # many ties
    b = a + rng.integers(0, 3, size=(10, 10))
    assert C.spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert C.spearman_abs(a - 2, b) == pytest.approx(spearmanr(np.abs(a - 2).ravel(), b.ravel())[0], abs=1e-12)


def test_topk_ties_broken_towards_lower_index():
    flat = np.zeros((1, 10))
    # a constant map's top 3 are pixels 0, 1, 2: the same set as a map peaked there, disjoint from one peaked at the end
    assert C.topk_iou(flat, np.array([[3.0, 2, 1, 0, 0, 0, 0, 0, 0, 0]]), k=0.3) == 1.0
    assert C.topk_iou(flat, np.array([[0.0, 0, 0, 0, 0, 0, 0, 1, 2, 3]]), k=0.3) == 0.0


def test_identical_maps():
    a = _maps(1)[0]
    for name in SIMILARITIES:
        assert getattr(C, name)(a, a) == pytest.approx(1.0), name
    assert C.emd(a, a) == pytest.approx(0.0, abs=1e-9)


def test_negation():
    a = _maps(1)[0]
    assert C.pearson(a, -a) == pytest.approx(-1.0)
    assert C.spearman(a, -a) == pytest.approx(-1.0)
    assert C.cosine(a, -a) == pytest.approx(-1.0)
    assert C.spearman_abs(a, -a) == pytest.approx(1.0)
    assert C.topk_iou(a, -a, k=0.1) == 0.0  # the largest 10 % of a are the smallest of −a
    assert C.ssim(a, -a) < 0  # rescaled: x against 1 − x
    assert C.emd(a, -a) > 1.0  # the positive parts sit on complementary pixels


def test_spearman_invariant_to_monotone_transform_pearson_not():
    a = _maps(1)[0]
    b = np.exp(3 * a)
    assert C.spearman(a, b) == pytest.approx(1.0)
    assert C.pearson(a, b) < 0.9
    assert C.ssim(a, 5 * a + 3) == pytest.approx(1.0)  # min-max rescaling: invariant to positive affine maps


def test_ssim_convention():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 20, 20))
    ra, rb = (a - a.min()) / np.ptp(a), (b - b.min()) / np.ptp(b)
    assert C.ssim(a, b) == pytest.approx(structural_similarity(ra, rb, data_range=1.0))


def test_constant_maps_no_warnings():
    a = _maps(1)[0]
    const = np.full_like(a, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("spearman", "spearman_abs", "pearson"):
            assert np.isnan(getattr(C, name)(a, const)), name
            assert np.isnan(getattr(C, name)(const, const)), name
        assert np.isnan(C.cosine(a, np.zeros_like(a)))
        assert C.ssim(const, 2 * const) == 1.0  # both rescale to zeros
        assert np.isfinite(C.ssim(a, const)) and C.ssim(a, const) < 0.5
        assert np.isnan(C.emd(a, -np.abs(a)))  # no positive mass
        out = C.compare_maps(np.stack([a, const]), np.stack([a, a]), NAMES)
    assert np.isnan(out["spearman"][1]) and out["spearman"][0] == pytest.approx(1.0)


def test_emd_point_mass_in_pixels():
    def point(r, c):
        x = np.zeros((112, 112))
        x[r, c] = 1.0
        return x

    # 16 × 16 blocks of 7 pixels: shifts by whole blocks cost exactly their pixel length
    assert C.emd(point(10, 10), point(24, 10)) == pytest.approx(14.0)
    assert C.emd(point(10, 10), point(17, 17)) == pytest.approx(7 * np.sqrt(2))
    assert C.emd(point(10, 10), point(10, 11)) == 0.0  # same block
    # no downsampling: any shift
    assert C.emd(point(10, 10), point(13, 14), size=112) == pytest.approx(5.0)
    # mass split: half moved by 21 px costs 10.5
    assert C.emd(point(10, 10) + point(50, 50), point(31, 10) + point(50, 50)) == pytest.approx(10.5)


def test_emd_matches_scipy_wasserstein_nd():
    wasserstein_distance_nd = pytest.importorskip("scipy.stats").__dict__.get("wasserstein_distance_nd")
    if wasserstein_distance_nd is None:
        pytest.skip("scipy < 1.13 has no wasserstein_distance_nd")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 24, 24))
    edges, centres = C._blocks((24, 24), 6)
    p = np.maximum(a, 0).reshape(6, 4, 6, 4).sum((1, 3)).ravel()
    q = np.maximum(b, 0).reshape(6, 4, 6, 4).sum((1, 3)).ravel()
    assert centres[0].tolist() == [1.5, 1.5]  # block centres in original pixel coordinates
    ref = wasserstein_distance_nd(centres, centres, p, q)
    assert C.emd(a, b, size=6) == pytest.approx(ref, rel=1e-7)


def test_compare_maps_equals_per_map_functions():
    a, b = _maps(3, 28, 4), _maps(3, 28, 5)
    b[1] = a[1] + 0.1 * b[1]
    out = C.compare_maps(a, b, NAMES, k=0.2, size=7)
    for name in NAMES:
        kw = {"k": 0.2} if name == "topk_iou" else {"size": 7} if name == "emd" else {}
        expected = [getattr(C, name)(x, y, **kw) for x, y in zip(a, b, strict=True)]
        np.testing.assert_allclose(out[name], expected, rtol=1e-12, err_msg=name)
    assert out["spearman"][1] > out["spearman"][0]
    assert set(C.compare_maps(a, b)) == {"spearman", "spearman_abs", "ssim"}


def test_masks_restrict_pixels():
    a, b = _maps(2, 32, 6)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    out = C.compare_maps(a[None], b[None], NAMES, mask=mask, size=8)
    assert out["spearman"][0] == pytest.approx(spearmanr(a[mask], b[mask])[0])
    assert out["pearson"][0] == pytest.approx(pearsonr(a[mask], b[mask])[0])
    # pixels outside the mask do not matter (for SSIM: beyond its 7 × 7 window's reach)
    far = np.ones((32, 32), bool)
    far[5:27, 5:27] = False
    a2 = np.where(far, 100 * np.random.default_rng(7).normal(size=a.shape), a)
    out2 = C.compare_maps(a2[None], b[None], NAMES, mask=mask, size=8)
    for name in NAMES:
        assert out2[name][0] == pytest.approx(out[name][0], abs=1e-9), name
    assert C.spearman(a2, b, mask=mask) == pytest.approx(out["spearman"][0])
    assert C.compare_maps(a2[None], b[None], ["spearman"])["spearman"][0] != pytest.approx(out["spearman"][0])


def test_bad_input():
    a = _maps(1, 16)[0]
    with pytest.raises(ValueError):
        C.spearman(a, a[:8])
    with pytest.raises(ValueError):
        C.spearman(a, a, mask=np.ones((8, 8), bool))
    with pytest.raises(ConfigError):
        C.compare_maps(a[None], a[None], ["kendall"])
    with pytest.raises(ConfigError):
        C.topk_iou(a, a, k=0)
    with pytest.raises(ConfigError):
        C.emd(a, a, size=32)


def test_float32_maps_as_float64():
    a, b = _maps(2, 24, 8)
    a[a < 0.5] = 0  # ties
    out32 = C.compare_maps(a[None].astype(np.float32), b[None].astype(np.float32), NAMES, size=6)
    out64 = C.compare_maps(a[None].astype(np.float32).astype(np.float64), b[None].astype(np.float32).astype(np.float64),
                           NAMES, size=6)
    for name in NAMES:
        assert out32[name][0] == pytest.approx(out64[name][0], rel=1e-9), name
