"""Eye-tracking metrics against pysaliency 0.2.22 (the MIT/Tübingen benchmark's reference implementation) on random
maps, maps with ties and maps with hard zeros; chance and ceiling; validation; seeded, byte-identical reruns."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from gestalt_xai.assess import compare
from gestalt_xai.assess.metric import METRICS
from gestalt_xai.experiments.eyetracking import metrics as em

with warnings.catch_warnings():  # pysaliency imports pkg_resources (a UserWarning) and deprecated modules
    warnings.simplefilter("ignore")
    import pysaliency
    from pysaliency.metrics import CC, SIM, MIT_KLDiv
    from pysaliency.roc import general_roc

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # np.trapz inside pysaliency
              pytest.mark.filterwarnings("ignore::RuntimeWarning:pysaliency.*")]  # its log(0) in MIT_KLDiv

H, W = 24, 32  # not square: a swapped x/y fails
NAMES = ["auc_judd", "auc_borji", "auc_shuffled", "nss", "cc", "sim", "kl_div", "information_gain", "iou_topk"]


# ------------------------------------------------------------------------------------------------ pysaliency glue
class _Maps(pysaliency.SaliencyMapModel):
    """A pysaliency saliency model returning given maps: stimulus ``n`` is an image filled with ``n``."""

    def __init__(self, maps):
        super().__init__(caching=False)
        self.maps = maps

    def _saliency_map(self, stimulus):
        return self.maps[int(stimulus[0, 0])]


class _Densities(pysaliency.Model):
    def __init__(self, densities):
        super().__init__(caching=False)
        self.densities = densities

    def _log_density(self, stimulus):
        return np.log(self.densities[int(stimulus[0, 0])])


def _stimuli(n: int, shape=(H, W)) -> pysaliency.Stimuli:
    return pysaliency.Stimuli([np.full(shape, i, dtype=np.uint8) for i in range(n)])


def _fixations(xs, ys, ns=None) -> pysaliency.Fixations:
    ns = np.zeros(len(xs), int) if ns is None else np.asarray(ns)
    return pysaliency.Fixations.create_without_history(np.asarray(xs, float), np.asarray(ys, float), ns)


# ----------------------------------------------------------------------------------------------------- test data
def _random_map(rng, kind: str, shape=(H, W)) -> np.ndarray:
    m = rng.random(shape)
    if kind == "ties":
        m = np.round(m * 4) / 4  # five values only
    elif kind == "zeros":
        m[:, : shape[1] // 2] = 0.0  # half the map hard zero
        m = np.round(m * 8) / 8
    elif kind == "signed":
        m = m - 0.5
    return m


def _random_fixations(rng, n: int, shape=(H, W)) -> tuple[np.ndarray, np.ndarray]:
    """Fractional fixations, a few at the grid's last column/row and two on one pixel."""
    xs = rng.uniform(0, shape[1], n)
    ys = rng.uniform(0, shape[0], n)
    xs[0], ys[0] = shape[1] - 1e-6, shape[0] - 0.5
    xs[1], ys[1] = xs[2] + 0.3 * (xs[2] % 1 < 0.7), ys[2]  # same pixel as fixation 2
    return xs, ys


def _density(xs, ys, shape=(H, W), sigma=2.0) -> np.ndarray:
    counts = np.zeros(shape)
    np.add.at(counts, (np.asarray(ys, int), np.asarray(xs, int)), 1.0)
    d = gaussian_filter(counts, sigma) + 1e-6
    return d / d.sum()


KINDS = ["random", "ties", "zeros", "signed"]


# ------------------------------------------------------------------------------------------------------ registry
def test_every_metric_is_registered_with_its_direction() -> None:
    for name in NAMES:
        fn = getattr(em, name)
        assert METRICS.get(name) is fn
        assert fn.info.family == "eyetracking" and fn.info.reference
        assert fn.info.direction == ("lower" if name == "kl_div" else "higher")


# ---------------------------------------------------------------------------------------- agreement, ROC kernels
_values = st.lists(st.integers(0, 5).map(float), min_size=1, max_size=25)  # few distinct values: many ties


@settings(max_examples=60, deadline=None)
@given(_values, _values, st.booleans())
def test_general_roc_matches_pysaliency(pos, neg, judd) -> None:
    pos, neg = np.array(pos), np.array(neg)
    assert em._general_roc(pos, neg, judd) == pytest.approx(general_roc(pos, neg, judd=int(judd))[0], abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(_values, st.lists(_values.filter(lambda v: len(v) >= 3).map(lambda v: v[:3]), min_size=1, max_size=4))
def test_split_aucs_match_general_roc_per_split(pos, splits) -> None:
    pos, negs = np.array(pos), np.array(splits)
    expected = [general_roc(pos, row, judd=0)[0] for row in negs]
    np.testing.assert_allclose(em._auc_splits(pos, negs), expected, atol=1e-12)


# ------------------------------------------------------------------------------------------ agreement, per metric
@pytest.mark.parametrize("kind", KINDS)
def test_auc_judd_matches_pysaliency(kind) -> None:
    rng = np.random.default_rng(1)
    m = _random_map(rng, kind)
    xs, ys = _random_fixations(rng, 15)
    model, stim, fix = _Maps([m]), _stimuli(1), _fixations(xs, ys)
    assert em.auc_judd(m, xs, ys) == pytest.approx(model.AUC_Judd(stim, fix), abs=1e-9)
    assert em.auc_judd(m, xs, ys, seed=7) == pytest.approx(model.AUC_Judd(stim, fix, random_seed=7), abs=1e-9)
    no_jitter = model.AUC_Judd(stim, fix, jitter=False)
    assert em.auc_judd(m, xs, ys, jitter=False) == pytest.approx(no_jitter, abs=1e-9)
    if kind in ("ties", "zeros"):  # the jitter matters on ties (so the check above is not vacuous)
        assert abs(em.auc_judd(m, xs, ys) - no_jitter) > 1e-3


def test_auc_judd_float32_map_matches_pysaliency() -> None:
    rng = np.random.default_rng(2)
    m = _random_map(rng, "zeros").astype(np.float32)
    xs, ys = _random_fixations(rng, 12)
    assert em.auc_judd(m, xs, ys) == pytest.approx(_Maps([m]).AUC_Judd(_stimuli(1), _fixations(xs, ys)), abs=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_auc_borji_is_the_mean_of_pysaliency_aucs_over_the_drawn_negatives(kind) -> None:
    rng = np.random.default_rng(3)
    m = _random_map(rng, kind)
    xs, ys = _random_fixations(rng, 10)
    n_splits, seed = 6, 11
    draws = np.random.default_rng(seed).integers(0, m.size, size=(n_splits, len(xs)))  # the documented draw
    model, stim, fix = _Maps([m]), _stimuli(1), _fixations(xs, ys)
    per_split = [model.AUC_per_image(stim, fix, nonfixations=_fixations(d % W, d // W), thresholds="all")[0]
                 for d in draws]
    assert em.auc_borji(m, xs, ys, n_splits=n_splits, seed=seed) == pytest.approx(np.mean(per_split), abs=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_auc_shuffled_matches_pysaliency_sauc_on_several_images(kind) -> None:
    rng = np.random.default_rng(4)
    maps = [_random_map(rng, kind) for _ in range(4)]
    per_image = [_random_fixations(rng, n) for n in (9, 14, 6, 11)]
    xs = np.concatenate([p[0] for p in per_image])
    ys = np.concatenate([p[1] for p in per_image])
    ns = np.repeat(np.arange(4), [len(p[0]) for p in per_image])
    model, stim, fix = _Maps(maps), _stimuli(4), _fixations(xs, ys, ns)
    expected = model.AUC_per_image(stim, fix, nonfixations="shuffled")
    ours = [em.auc_shuffled(maps[n], xs[ns == n], ys[ns == n], xs[ns != n], ys[ns != n]) for n in range(4)]
    np.testing.assert_allclose(ours, expected, atol=1e-9)
    # pysaliency's sAUC: per-image values weighted by the fixation counts
    assert np.average(ours, weights=np.bincount(ns)) == pytest.approx(model.sAUC(stim, fix), abs=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_nss_matches_pysaliency(kind) -> None:
    rng = np.random.default_rng(5)
    m = _random_map(rng, kind)
    xs, ys = _random_fixations(rng, 17)
    assert em.nss(m, xs, ys) == pytest.approx(_Maps([m]).NSS(_stimuli(1), _fixations(xs, ys)), abs=1e-9)
    assert em.nss(np.full((H, W), 3.0), xs, ys) == 0.0 == pysaliency.metrics.NSS(np.full((H, W), 3.0), xs, ys).mean()


def test_nss_of_a_constant_map_is_zero_where_pysaliency_rounds() -> None:
    """The one documented departure: pysaliency divides by a std that rounding leaves at ~1e-17."""
    flat = np.full((H, W), 0.3)
    assert pysaliency.metrics.NSS(flat, [1, 2], [3, 4]).mean() == pytest.approx(1.0)
    assert em.nss(flat, [1, 2], [3, 4]) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_map_to_density_metrics_match_pysaliency(kind) -> None:
    rng = np.random.default_rng(6)
    m = _random_map(rng, kind)
    d = _random_map(rng, "zeros") if kind == "zeros" else _density(*_random_fixations(rng, 20))
    assert em.cc(m, d) == pytest.approx(CC(m, d), abs=1e-9)
    assert em.sim(m, d) == pytest.approx(SIM(m, d), abs=1e-9)
    assert em.kl_div(m, d) == pytest.approx(MIT_KLDiv(m, d), rel=1e-9)
    stim = _stimuli(1)
    assert em.cc(m, d) == pytest.approx(_Maps([m]).CC(stim, _Maps([d])), abs=1e-9)
    assert em.sim(m, d) == pytest.approx(_Maps([m]).SIM(stim, _Maps([d])), abs=1e-9)


def test_kl_div_epsilon_matches_pysaliency_on_hard_zeros() -> None:
    """Where the map is 0 and the density is not, the term is Q log(ε + Q/ε) = Q (log Q − log ε): the ε sets the
    value, and it must be MIT's 2.2204e-16, not 1e-20."""
    rng = np.random.default_rng(7)
    d = _density(*_random_fixations(rng, 20))
    m = d.copy()
    m[:, : W // 4] = 0.0
    lost = d[:, : W // 4].sum()
    kl = em.kl_div(m, d)
    assert kl == pytest.approx(MIT_KLDiv(m, d), rel=1e-9)
    assert kl > 25 * lost  # dominated by the zeros: Q (log Q − log ε), log Q ≈ −7 here
    mit = pysaliency.SaliencyMapModel.image_based_kl_divergence  # the model-level route of the benchmark
    assert kl == pytest.approx(mit(_Maps([m]), _stimuli(1), _Maps([d]), minimum_value=0, log_regularization=em.KL_EPS,
                                   quotient_regularization=em.KL_EPS), rel=1e-9)
    # a different epsilon would change the value by ≈ lost · log(ratio)
    other = (d * np.log(1e-20 + d / (em.to_density(m) + 1e-20))).sum()
    assert abs(other - kl) > 1.0 * lost


@pytest.mark.parametrize("kind", ["random", "ties", "zeros"])
def test_information_gain_matches_pysaliency(kind) -> None:
    rng = np.random.default_rng(8)
    xs, ys = _random_fixations(rng, 16)
    dens = em.to_density(_random_map(rng, kind), minimum_value=0.01)
    base = _density(*_random_fixations(rng, 30), sigma=4.0)
    stim, fix = _stimuli(1), _fixations(xs, ys)
    expected = _Densities([dens]).information_gain(stim, fix, baseline_model=_Densities([base]))
    assert em.information_gain(dens, base, xs, ys) == pytest.approx(expected, abs=1e-9)
    uniform = np.full((H, W), 1.0 / (H * W))
    assert em.information_gain(dens, uniform, xs, ys) == pytest.approx(
        _Densities([dens]).information_gain(stim, fix), abs=1e-9)  # pysaliency's default baseline: uniform


def test_iou_topk_and_cc_are_the_compare_functions() -> None:
    rng = np.random.default_rng(9)
    m, d = _random_map(rng, "ties"), _density(*_random_fixations(rng, 20))
    for k in (0.05, 0.1, 0.5):
        assert em.iou_topk(m, d, k=k) == compare.topk_iou(m, d, k=k)
    assert em.cc(m, d) == compare.pearson(m, d)


def test_cc_constant_map_conventions() -> None:
    d = _density([3, 20], [4, 10])
    assert em.cc(np.ones((H, W)), d) == 0.0 == CC(np.ones((H, W)), d)  # pysaliency's convention
    assert np.isnan(compare.pearson(np.ones((H, W)), d))  # where pearson alone gives NaN
    assert np.isnan(em.cc(d, np.ones((H, W))))  # a constant density has no correlation


def test_to_density_matches_pysaliency() -> None:
    rng = np.random.default_rng(10)
    for kind in KINDS:
        m = _random_map(rng, kind)
        for floor in (0.0, 0.5):
            np.testing.assert_allclose(em.to_density(m, floor),
                                       pysaliency.metrics.convert_saliency_map_to_density(m.copy(), floor), atol=1e-15)
    np.testing.assert_allclose(em.to_density(np.zeros((H, W))), 1.0 / (H * W))


def test_fractional_fixations_truncate_like_x_int() -> None:
    m = np.zeros((4, 5))
    m[1, 3] = 1.0
    # (3.99, 1.01) is pixel (row 1, col 3); (4.0, 1.0) would be the next column
    assert em.nss(m, [3.99], [1.01]) == pytest.approx(pysaliency.metrics.NSS(m, [3.99], [1.01]).mean())
    assert em.nss(m, [3.99], [1.01]) > 0 > em.nss(m, [4.0], [1.0])


# ---------------------------------------------------------------------------------------------- chance, ceiling
def _study(seed=12, n=25):
    rng = np.random.default_rng(seed)
    xs, ys = rng.normal(8, 2, n).clip(0, W - 1), rng.normal(16, 2, n).clip(0, H - 1)  # a cluster, lower left
    others = rng.uniform(0, W, 60), rng.uniform(0, H, 60)
    return xs, ys, others, _density(xs, ys)


def _scores(smap, xs, ys, others, density) -> dict[str, float]:
    return {"auc_judd": em.auc_judd(smap, xs, ys), "auc_borji": em.auc_borji(smap, xs, ys),
            "auc_shuffled": em.auc_shuffled(smap, xs, ys, *others), "nss": em.nss(smap, xs, ys),
            "cc": em.cc(smap, density), "sim": em.sim(smap, density), "kl_div": em.kl_div(smap, density),
            "iou_topk": em.iou_topk(smap, density),
            "information_gain": em.information_gain(em.to_density(smap, 1e-3 / smap.size), density, xs, ys)}


def test_uniform_map_scores_at_chance() -> None:
    xs, ys, others, density = _study()
    flat = np.full((H, W), 0.3)
    assert em.auc_judd(flat, xs, ys, jitter=False) == 0.5
    assert em.auc_judd(flat, xs, ys) == pytest.approx(0.5, abs=0.2)  # jitter: a random ranking
    assert em.auc_borji(flat, xs, ys) == 0.5
    assert em.auc_shuffled(flat, xs, ys, *others) == 0.5
    assert em.nss(flat, xs, ys) == 0.0
    assert em.cc(flat, density) == 0.0
    uniform = np.full((H, W), 1.0 / (H * W))
    assert em.information_gain(uniform, uniform, xs, ys) == 0.0


def test_fixation_density_scores_at_the_ceiling_side_of_every_metric() -> None:
    xs, ys, others, density = _study()
    rng = np.random.default_rng(13)
    own = _scores(density, xs, ys, others, density)
    for rival in (np.full((H, W), 0.3), rng.random((H, W)), _density(*_study(seed=99)[:2])):  # uniform, noise, other
        theirs = _scores(rival, xs, ys, others, density)
        for name, value in own.items():
            assert METRICS.get(name).info.direction == ("lower" if name == "kl_div" else "higher")
            better = value < theirs[name] if name == "kl_div" else value > theirs[name]
            assert better, (name, value, theirs[name])
    assert own["cc"] == pytest.approx(1.0) and own["sim"] == pytest.approx(1.0) and own["iou_topk"] == 1.0
    assert abs(own["kl_div"]) < 1e-9 and own["auc_judd"] > 0.9 and own["nss"] > 1.0
    uniform = np.full((H, W), 1.0 / (H * W))
    assert em.information_gain(density, uniform, xs, ys) > 1.0  # bits over a uniform observer


def test_map_on_the_fixated_region_beats_one_elsewhere() -> None:
    xs, ys, others, density = _study()
    yy, xx = np.mgrid[:H, :W]
    on = np.exp(-((xx - 8.0) ** 2 + (yy - 16.0) ** 2) / 18)
    off = np.exp(-((xx - 25.0) ** 2 + (yy - 5.0) ** 2) / 18)
    good, bad = _scores(on, xs, ys, others, density), _scores(off, xs, ys, others, density)
    for name in NAMES:
        assert (good[name] < bad[name]) if name == "kl_div" else (good[name] > bad[name]), name


# ------------------------------------------------------------------------------------------------ reproducibility
def test_random_draws_are_seeded_and_byte_identical() -> None:
    rng = np.random.default_rng(14)
    m = _random_map(rng, "ties")
    xs, ys = _random_fixations(rng, 20)
    oxs, oys = _random_fixations(rng, 50)
    runs = [(em.auc_borji(m, xs, ys, seed=3), em.auc_shuffled(m, xs, ys, oxs, oys, n_splits=20, seed=3),
             em.auc_judd(m, xs, ys, seed=3)) for _ in range(2)]
    assert [v.hex() for v in runs[0]] == [v.hex() for v in runs[1]]
    other = (em.auc_borji(m, xs, ys, seed=4), em.auc_shuffled(m, xs, ys, oxs, oys, n_splits=20, seed=4),
             em.auc_judd(m, xs, ys, seed=4))
    assert all(a != b for a, b in zip(runs[0], other, strict=True))


def test_subsampled_shuffled_auc_uses_every_other_fixation_when_there_are_fewer() -> None:
    rng = np.random.default_rng(15)
    m = _random_map(rng, "ties")
    xs, ys = _random_fixations(rng, 30)
    oxs, oys = _random_fixations(rng, 12)  # fewer than 30: each split is a permutation of all of them
    assert em.auc_shuffled(m, xs, ys, oxs, oys, n_splits=5) == pytest.approx(em.auc_shuffled(m, xs, ys, oxs, oys))
    many_x, many_y = _random_fixations(rng, 400)  # more: the splits subsample, their mean near the full value
    sub = em.auc_shuffled(m, xs, ys, many_x, many_y, n_splits=200)
    full = em.auc_shuffled(m, xs, ys, many_x, many_y)
    assert sub != full and sub == pytest.approx(full, abs=0.03)


# ----------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("xs", "ys", "message"), [
    ([W], [0], "outside"), ([-0.5], [0], "outside"), ([0], [H + 0.1], "outside"), ([np.nan], [0], "non-finite"),
    ([], [], "no fixations"), ([1, 2], [1], "one length"), ([[1]], [[1]], "1-D"),
])
def test_fixations_are_checked(xs, ys, message) -> None:
    m = np.ones((H, W))
    for call in (lambda: em.auc_judd(m, xs, ys), lambda: em.auc_borji(m, xs, ys), lambda: em.nss(m, xs, ys),
                 lambda: em.auc_shuffled(m, [1], [1], xs, ys), lambda: em.auc_shuffled(m, xs, ys, [1], [1]),
                 lambda: em.information_gain(m / m.sum(), m / m.sum(), xs, ys)):
        with pytest.raises(ValueError, match=message):
            call()


def test_maps_are_checked() -> None:
    m, d = np.ones((H, W)), np.ones((H, W + 1))
    for fn in (em.cc, em.sim, em.kl_div, em.iou_topk):
        with pytest.raises(ValueError, match="does not match"):
            fn(m, d)
    with pytest.raises(ValueError, match="2-D"):
        em.nss(np.ones((2, H, W)), [1], [1])
    with pytest.raises(ValueError, match="non-finite"):
        em.sim(np.full((H, W), np.nan), m)
    with pytest.raises(ValueError, match="no unfixated pixel"):
        em.auc_judd(np.eye(2), [0, 1, 0, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="n_splits"):
        em.auc_borji(m, [1], [1], n_splits=0)


def test_information_gain_needs_true_densities() -> None:
    u = np.full((H, W), 1.0 / (H * W))
    zero = u.copy()
    zero[0, 0], zero[0, 1] = 0.0, 2 * u[0, 1]
    with pytest.raises(ValueError, match="positive"):
        em.information_gain(zero, u, [5], [5])
    with pytest.raises(ValueError, match="sum to 1"):
        em.information_gain(u, 2 * u, [5], [5])
    with pytest.raises(ValueError, match="sum to 1"):
        em.information_gain(np.ones((H, W)), u, [5], [5])
