"""Localisation metrics (assess/localisation.py) on hand-computed cases and against Quantus 0.6, contrastivity on
constructed maps, and the localisation tables (assess/localisation_run.py) on the synthetic fixture with both mask
kinds."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from gestalt_xai.assess.localisation import (
    area_share,
    contrastivity,
    face_region,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from gestalt_xai.assess.metric import METRICS

FACE = face_region()


def _box(y0, y1, x0, x1, shape=(112, 112)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_are_registered_with_their_direction_and_reference():
    for name, direction in (("relevance_mass_accuracy", "higher"), ("relevance_rank_accuracy", "higher"),
                            ("pointing_game", "higher"), ("area_share", "lower"), ("contrastivity", "higher")):
        info = METRICS.get(name).info
        assert info.family == "localisation" and info.direction == direction and info.reference


def test_rma_is_one_inside_the_mask_and_the_area_share_for_a_uniform_map():
    nose, mouth = _box(55, 75, 45, 67), _box(85, 97, 38, 74)
    masks = np.stack([nose, mouth])
    inside = np.where(nose, 1.0 + np.arange(112 * 112).reshape(112, 112) % 7, -2.0)  # negative relevance outside
    assert relevance_mass_accuracy(inside, nose) == 1.0 and relevance_mass_accuracy(inside, mouth) == 0.0
    uniform = np.full((112, 112), 0.3)
    assert relevance_mass_accuracy(uniform, masks) == pytest.approx(area_share(masks))
    assert relevance_mass_accuracy(uniform, masks, FACE) == pytest.approx(area_share(masks, FACE))
    assert area_share(nose, FACE) == pytest.approx(nose.sum() / FACE.sum())
    # broadcasting: (N, 1, H, W) maps against (K, H, W) masks is every pair; (N, H, W) against (N, H, W) row-wise
    pairs = relevance_mass_accuracy(np.stack([inside, uniform])[:, None], masks, FACE)
    assert pairs.shape == (2, 2) and pairs[0] == pytest.approx([1.0, 0.0])
    rowwise = relevance_mass_accuracy(np.stack([inside, uniform]), masks, FACE)
    assert rowwise == pytest.approx([1.0, mouth.sum() / FACE.sum()])
    # NaN: an empty mask, or no positive mass in the region
    assert np.isnan(relevance_mass_accuracy(uniform, np.zeros((112, 112), bool)))
    assert np.isnan(relevance_mass_accuracy(-uniform, nose))


def test_rank_accuracy_on_hand_computed_cases():
    m = np.zeros((4, 4), bool)
    m[0, :3] = True  # K = 3
    r = np.zeros((4, 4))
    r[0, 0], r[0, 1], r[2, 2], r[3, 3] = 9.0, 8.0, 7.0, -1.0  # top 3: two inside, one outside
    assert relevance_rank_accuracy(r, m) == pytest.approx(2 / 3)
    r[0, 2] = 7.5  # now the top 3 are the mask
    assert relevance_rank_accuracy(r, m) == 1.0
    # a tie at the K-th value is shared: (0,0) is inside; 2 slots left among 4 tied pixels, 1 of them inside
    t = np.zeros((4, 4))
    t[0, 0], t[0, 1], t[1, 0], t[1, 1], t[2, 2] = 5.0, 1.0, 1.0, 1.0, 1.0
    assert relevance_rank_accuracy(t, m) == pytest.approx((1 + 2 * 1 / 4) / 3)
    assert relevance_rank_accuracy(np.ones((4, 4)), m) == pytest.approx(3 / 16)  # constant map: the area share
    # the region: pixels outside it neither rank nor count
    region = np.zeros((4, 4), bool)
    region[:2] = True
    r2 = np.zeros((4, 4))
    r2[3, 3], r2[0, 0], r2[1, 3] = 100.0, 2.0, 1.0
    # in the region: 2 (inside), 1 (outside), then one slot among six tied zeros, two of them inside
    assert relevance_rank_accuracy(r2, m, region) == pytest.approx((1 + 2 / 6) / 3)
    assert np.isnan(relevance_rank_accuracy(r, np.zeros((4, 4), bool)))


def test_pointing_game_on_hand_computed_cases():
    m = _box(10, 20, 10, 20)
    r = np.zeros((112, 112))
    r[15, 15] = 1.0
    assert pointing_game(r, m) == 1.0
    r[15, 15], r[15, 30] = 0.0, 1.0  # 11 px right of the mask's last column
    assert pointing_game(r, m) == 0.0
    assert pointing_game(r, m, tolerance_px=10) == 0.0 and pointing_game(r, m, tolerance_px=11) == 1.0
    # ties: the share of the maxima inside the mask (Quantus: a hit if any is)
    r[15, 12] = 1.0
    assert pointing_game(r, m) == 0.5
    assert pointing_game(np.ones((112, 112)), m, FACE) == pytest.approx(area_share(m, FACE))
    # a maximum outside the region does not count: the region's own maximum does
    bg = np.zeros((112, 112))
    bg[0, 0], bg[60, 56] = 10.0, 1.0
    assert not FACE[0, 0] and FACE[60, 56]
    assert pointing_game(bg, _box(55, 65, 50, 60), FACE) == 1.0 and pointing_game(bg, _box(55, 65, 50, 60)) == 0.0


def test_values_agree_with_quantus_with_conventions_matched():
    quantus = pytest.importorskip("quantus")
    rng = np.random.default_rng(0)
    n = 6
    maps = rng.gamma(2.0, 1.0, (n, 112, 112)).astype(np.float32)  # non-negative, continuous: a unique maximum
    masks = np.zeros((n, 112, 112), bool)
    for i in range(n):
        y, x = rng.integers(10, 80, 2)
        masks[i, y: y + 25, x: x + 20] = True
    masks[1] |= maps[1] == maps[1].max()  # one map's maximum inside its mask: a hit
    x_batch = rng.random((n, 3, 112, 112)).astype(np.float32)
    y_batch = np.zeros(n, int)
    kwargs = {"model": None, "x_batch": x_batch, "y_batch": y_batch, "a_batch": maps[:, None],
              "s_batch": masks[:, None].astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rma_q = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True)(**kwargs)
        pg_q = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)(**kwargs)
        rra_q = quantus.RelevanceRankAccuracy(abs=False, normalise=False, disable_warnings=True)(**kwargs)
    np.testing.assert_allclose(relevance_mass_accuracy(maps, masks), np.asarray(rma_q, np.float64), rtol=1e-5)
    np.testing.assert_array_equal(pointing_game(maps, masks), np.asarray(pg_q, np.float64))
    assert pointing_game(maps, masks)[1] == 1.0
    np.testing.assert_allclose(relevance_rank_accuracy(maps, masks), np.asarray(rra_q, np.float64), rtol=1e-6)
    # the differences the module docstring records: Quantus sums the signed map, and counts any tied maximum a hit
    signed = maps - 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rma_signed = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True)(
            **{**kwargs, "a_batch": signed[:, None]})
        ties = np.zeros((1, 1, 112, 112), np.float32)
        ties[0, 0, 15, 15] = ties[0, 0, 90, 90] = 1.0
        pg_ties = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)(
            **{**kwargs, "x_batch": x_batch[:1], "y_batch": y_batch[:1], "a_batch": ties,
               "s_batch": _box(10, 20, 10, 20)[None, None].astype(np.float32)})
    assert not np.allclose(relevance_mass_accuracy(signed, masks), np.asarray(rma_signed, np.float64))
    assert bool(pg_ties[0]) and pointing_game(ties[0, 0], _box(10, 20, 10, 20)) == 0.5


# ------------------------------------------------------------------------------------------------ contrastivity
def test_contrastivity_on_constructed_maps():
    a, b = _box(40, 60, 20, 50), _box(80, 95, 40, 72)
    assert FACE[a].all() and FACE[b].all()
    own_a, own_b = np.where(a, 1.0, 0.0), np.where(b, 1.0, 0.0)
    out = contrastivity(own_a, own_b, a, b, FACE)
    assert (out["mass_own_a"], out["mass_other_a"], out["mass_own_b"], out["mass_other_b"]) == (1.0, 0.0, 1.0, 0.0)
    assert out["contrastive"] == 1.0 and out["target_sensitive"] == 1.0
    assert out["area_a"] == pytest.approx(a.sum() / FACE.sum())
    swapped = contrastivity(own_b, own_a, a, b, FACE)  # each map on the other's regions
    assert swapped["contrastive"] == 0.0 and swapped["target_sensitive"] == 0.0
    # per unit area: uniform maps favour neither side, however different the regions' sizes
    uniform = np.ones((112, 112))
    flat = contrastivity(uniform, uniform, a, b, FACE)
    assert flat["mass_own_a"] > flat["mass_other_a"] and flat["contrastive"] == 0.0
    # a large region A, a small B, B's map spread over the face with 3 × the mass per pixel on B: less mass on B than
    # on A in all, yet it favours B per unit area
    big, small = _box(30, 70, 30, 80), _box(85, 95, 50, 62)
    spread = np.where(small, 3.0, 1.0)
    mixed = contrastivity(np.where(big, 1.0, 0.0), spread, big, small, FACE)
    assert mixed["mass_own_b"] < mixed["mass_other_b"] and mixed["contrastive"] == 1.0
    # shared pixels are dropped from both masks; batched over a leading axis; no positive mass: undefined (NaN)
    both = _box(65, 78, 40, 50)  # a part both syndromes have
    shared = contrastivity(own_a + both, own_b + both, a | both, b | both, FACE)
    assert shared["area_a"] == pytest.approx(out["area_a"]) and shared["contrastive"] == 1.0
    batch = contrastivity(np.stack([own_a, own_b]), np.stack([own_b, own_a]), a, b, FACE)
    assert batch["contrastive"].tolist() == [1.0, 0.0]
    assert np.isnan(contrastivity(own_a, -own_b, a, b, FACE)["contrastive"])


# ------------------------------------------------------------------------------------------------ run tables
@pytest.fixture(scope="module")
def scored(synthetic_run, tmp_path_factory):
    """A copy of the synthetic fixture with a constructed map store: for an S01 test photo its change masks
    weighted 4:2:1 (method ``weighted``) and a uniform map; for an S03 photo maps towards S03 and S02 on each
    syndrome's regions of its face and their contrast (method ``regions``); effects ordered as the weights."""
    from gestalt_xai.aggregate.regions import template_landmarks
    from gestalt_xai.assess.localisation_run import localisation_tables
    from gestalt_xai.assess.planted import planted_regions, read_truth, truth_landmarks
    from gestalt_xai.attribution.effects import upsert_effects
    from gestalt_xai.faces.regions import LABEL, landmark_atlas
    from gestalt_xai.runs import Run
    from gestalt_xai.store import MapKey

    run = Run(shutil.copytree(synthetic_run.path, tmp_path_factory.mktemp("assess_local") / "run"))
    truth = read_truth(run)[0]
    cf = run.counterfactuals()
    syndrome = run.image_table().set_index("image_id")["syndrome_id"]
    s01 = sorted(i for i in set(cf["image_id"]) if syndrome[i] == "S01")[0]
    s03 = sorted(i for i in set(cf["image_id"]) if syndrome[i] == "S03")[0]
    weights = {"hypertelorism": 4.0, "wide_mouth": 2.0, "micrognathia": 1.0}  # a value ≥ 4 lies on the eyes
    change = run.change_masks(s01)
    weighted = sum(w * change[f"without_{f}"] for f, w in weights.items()).astype(np.float32)
    regions = planted_regions(truth)
    atlas = landmark_atlas(template_landmarks(run, truth_landmarks(truth))[s03])
    on = {s: np.isin(atlas, [LABEL[r] for r in regions[s] - regions[o]]).astype(np.float32)
          for s, o in (("S03", "S02"), ("S02", "S03"))}
    detail = json.dumps({})
    store = run.map_store()
    with store.writer() as w:
        for method, m in (("weighted", weighted), ("uniform", np.ones((112, 112), np.float32))):
            w.add(MapKey(s01, "m", "centroid:S01", method, ""), m, target_kind="centroid", target_detail=detail)
        w.add(MapKey(s03, "m", "centroid:S03", "regions", ""), on["S03"], target_kind="centroid",
              target_detail=detail)
        w.add(MapKey(s03, "m", "centroid:S02", "regions", ""), on["S02"], target_kind="centroid",
              target_detail=detail)
        w.add(MapKey(s03, "m", "contrast:S03-S02", "regions", ""), on["S03"] - on["S02"], target_kind="contrast",
              target_detail=detail)
    store.compact()
    face_px = {f: int((change[f"without_{f}"] & FACE).sum()) for f in weights}
    upsert_effects(run, pd.DataFrame([
        {"image_id": s01, "model_id": "m", "target": "centroid:S01", "variant": f"without_{f}", "feature": f,
         "change": "remove", "score": 0.5, "counterfactual_score": 0.5 - w * face_px[f] * 1e-4,
         "delta": w * face_px[f] * 1e-4, "model_hash": ""} for f, w in weights.items()]))
    errors: list = []
    tables, lines = localisation_tables(run, store, store.index(), errors=errors)
    return run, tables, lines, errors, (s01, s03, weighted, change)


def test_region_and_change_masks_are_both_scored(scored):
    from gestalt_xai.assess.planted import read_truth, region_mask_source
    from gestalt_xai.faces.regions import LABEL, template_atlas

    run, tables, lines, errors, (s01, _s03, weighted, change) = scored
    assert not errors
    loc = tables["localisation"]
    mine = loc[loc["image_id"] == s01]
    assert set(mine["mask_kind"]) == {"region", "change"} and (mine["target_group"] == "centroid:own").all()
    # the uniform map scores the chance level on every mask of either kind
    uni = mine[mine["method"] == "uniform"]
    for col in ("rma", "rra", "pointing"):
        np.testing.assert_allclose(uni[col], uni["area_share"], rtol=1e-9)
    np.testing.assert_allclose(uni["ratio"], 1.0)
    # the weighted map against the change masks: its mass share by definition, RMA = Σ_{C∩F} R / Σ_F R
    w = mine[(mine["method"] == "weighted")].set_index(["mask_kind", "feature"])
    for f in ("hypertelorism", "wide_mouth", "micrognathia"):
        mask = change[f"without_{f}"]
        assert w.loc[("change", f), "rma"] == pytest.approx(weighted[mask & FACE].sum() / weighted[FACE].sum())
        assert w.loc[("change", f), "mask_px"] == (mask & FACE).sum()
        # a feature's region holds its change mask: at least as much mass, never fewer pixels
        assert w.loc[("region", f), "rma"] >= w.loc[("change", f), "rma"] - 1e-12
        assert w.loc[("region", f), "mask_px"] >= w.loc[("change", f), "mask_px"]
    assert w.loc[("change", "hypertelorism"), "pointing"] == 1.0  # the weight-4 mask holds the maximum
    # the region masks are the truth's warped into the crop: the eyes' mask lies on the atlas' periorbital band
    source = dict((f, m) for f, _, m in region_mask_source(run, read_truth(run)[0])(s01))
    eyes = np.isin(template_atlas(), [LABEL[r] for r in ("periorbital_left", "periorbital_right", "brow_left",
                                                         "brow_right", "nasal_bridge")])
    assert (source["hypertelorism"] & eyes).sum() > 0.6 * source["hypertelorism"].sum()
    assert (change["without_hypertelorism"] <= source["hypertelorism"]).all()
    # the Δscore-rank agreement per mask kind: effects ordered as the change-mask masses give ρ = 1
    pat = tables["localisation_patients"].set_index(["method", "mask_kind"])
    assert pat.loc[("weighted", "change"), "rho"] == pytest.approx(1.0)
    assert pat.loc[("weighted", "change"), "n_features"] == 3
    summary = tables["localisation_summary"].set_index(["method", "mask_kind"])
    assert summary.loc[("uniform", "region"), "ratio_mean"] == pytest.approx(1.0)
    assert any(line.startswith("assess: localisation weighted (m, centroid:own): change masks") for line in lines)


def test_contrastivity_table_pairs_targets_and_scores_a_contrast_map(scored):
    _run, tables, lines, _errors, (_s01, s03, _weighted, _change) = scored
    table = tables["contrastivity"].set_index("target_kind")
    assert list(table["image_id"].unique()) == [s03]
    pair = table.loc["centroid"]
    assert (pair["target_a"], pair["target_b"]) == ("centroid:S02", "centroid:S03")
    assert pair["regions_b"] == "cheek_left;cheek_right" and "philtrum" in pair["regions_a"]
    assert pair["mass_own_a"] == pytest.approx(1.0) and pair["mass_own_b"] == pytest.approx(1.0)
    assert pair["contrastive"] and pair["target_sensitive"]
    contrast = table.loc["contrast"]  # R = map(S03) − map(S02): +R on S03's cheeks, −R on S02's regions
    assert contrast["target_a"] == "contrast:S03-S02" and contrast["syndrome_a"] == "S03"
    assert contrast["mass_own_a"] == pytest.approx(1.0) and contrast["contrastive"]
    summary = tables["contrastivity_summary"].set_index("target_kind")
    assert summary.loc["centroid", "n_pairs"] == 1 and summary.loc["centroid", "share_contrastive"] == 1.0
    assert any("contrastivity regions (m, centroid pairs)" in line and "1/1 pairs" in line for line in lines)
