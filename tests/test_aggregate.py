"""Aggregation computations on constructed maps with known answers: composites, normalisations, streaming memory,
region shares and enrichment, SpRAy and its cue check, pair-map directions and the composite-face privacy guard."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from gestalt_xai.aggregate.composite import (
    CompositeAccumulator,
    GroupComposites,
    composite_of_maps,
    composite_table,
    normalise,
    stream_composites,
)
from gestalt_xai.aggregate.faces import ALL, WHOLE, FaceAccumulator, age_band, guarded_background
from gestalt_xai.aggregate.regions import (
    enrichment,
    region_area_shares,
    region_shares,
    subject_region_scores,
    syndrome_region_scores,
)
from gestalt_xai.aggregate.similarity import pair_maps, pair_table
from gestalt_xai.aggregate.spray import SprayResult, downsample, spray_cluster
from gestalt_xai.assess.planted import ConfounderCue, check_cue
from gestalt_xai.errors import InputError
from gestalt_xai.faces.regions import LABEL, REGIONS, template_atlas
from gestalt_xai.store import MapKey, MapStore


def _map(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(112, 112)).astype(np.float32)


def _store(tmp_path, maps: list[tuple[str, np.ndarray]], name: str = "maps", chunk: int = 64) -> MapStore:
    """A store of ``(image_id, map)`` for one model/target/method."""
    store = MapStore(tmp_path / name)
    with store.writer(chunk_maps=chunk) as w:
        for image_id, m in maps:
            w.add(MapKey(image_id, "m", "centroid:S1", "hirescam", ""), m)
    return store


def _rows(store: MapStore, subject_of: dict[str, str]) -> pd.DataFrame:
    idx = store.index()
    return idx.assign(subject_id=idx["image_id"].map(subject_of))


# ------------------------------------------------------------------------------------------------ composites
@pytest.mark.parametrize("norm", ["none", "max-abs", "zscore", "positive"])
def test_composite_of_identical_maps_equals_the_map(tmp_path, norm):
    m = _map(0)
    store = _store(tmp_path, [(f"i{k}", m) for k in range(7)])
    acc = stream_composites(store, _rows(store, {f"i{k}": f"s{k % 4}" for k in range(7)}), norm)[("all",)]
    np.testing.assert_allclose(acc.mean(), normalise(m, norm), rtol=0, atol=1e-12)
    assert acc.n_subjects == 4 and acc.n_images == 7
    np.testing.assert_allclose(acc.std(), 0.0, atol=1e-6)
    expected_sign = np.sign(normalise(m, norm))
    np.testing.assert_array_equal(acc.sign_agreement(), expected_sign)


def test_composite_is_invariant_to_patient_order(tmp_path):
    maps = [(f"i{k:02d}", _map(k)) for k in range(30)]
    subjects = {f"i{k:02d}": f"s{(k * 7) % 11}" for k in range(30)}
    a = _store(tmp_path, maps, "a", chunk=5)
    b = _store(tmp_path, maps[::-1], "b", chunk=7)
    shuffled = [maps[i] for i in np.random.default_rng(1).permutation(30)]
    c = _store(tmp_path, shuffled, "c", chunk=64)
    out = [stream_composites(s, _rows(s, subjects), "max-abs", block_maps=4)[("all",)] for s in (a, b, c)]
    for other in out[1:]:
        np.testing.assert_array_equal(out[0].mean(), other.mean())  # bit for bit
        np.testing.assert_array_equal(out[0].std(), other.std())


def test_subject_with_many_images_does_not_outweigh_others(tmp_path):
    a, b = np.zeros((112, 112), np.float32), np.zeros((112, 112), np.float32)
    a[10:20, 10:20] = 1.0
    b[60:70, 60:70] = 1.0
    maps = [("x0", a)] + [(f"y{k}", b) for k in range(10)]
    subjects = {"x0": "sx", **{f"y{k}": "sy" for k in range(10)}}
    store = _store(tmp_path, maps)
    acc = stream_composites(store, _rows(store, subjects), "none")[("all",)]
    np.testing.assert_allclose(acc.mean(), (a + b) / 2)  # per image it would be (a + 10 b) / 11
    assert acc.n_subjects == 2 and acc.n_images == 11
    assert np.allclose(acc.sign_agreement()[15, 15], 0.5) and np.allclose(acc.std()[15, 15], 0.5)


def test_group_composites_count_a_subject_in_its_syndrome_all_and_its_strata():
    comps = GroupComposites(["max-abs", "none"])
    key = ("m", "hirescam", "", "centroid:own")
    m = np.zeros((112, 112))
    m[0, 0] = -2.0
    m[0, 1] = 1.0
    primary = comps.add_subject(key, "S01", ["all", "sex:F"], [m])
    comps.add_subject(key, "S02", ["all", "sex:M"], [2 * m, 4 * m])
    np.testing.assert_allclose(primary, normalise(m, "max-abs"))
    # strata under the primary normalisation only; every subject also in ALL
    assert set(comps.accumulators) == {
        (g, s, *key, n) for g, s, n in [("S01", "all", "max-abs"), ("S01", "sex:F", "max-abs"),
                                        ("S02", "all", "max-abs"), ("S02", "sex:M", "max-abs"),
                                        ("ALL", "all", "max-abs"), ("ALL", "sex:F", "max-abs"),
                                        ("ALL", "sex:M", "max-abs"), ("S01", "all", "none"), ("S02", "all", "none"),
                                        ("ALL", "all", "none")]}
    table = composite_table([comps])
    s02 = table[(table["group"] == "S02") & (table["normalisation"] == "none")].iloc[0]
    assert s02["n_subjects"] == 1 and s02["n_images"] == 2
    every = table[(table["group"] == "ALL") & (table["normalisation"] == "none")].iloc[0]
    # ALL = mean of S01 (m) and S02 (3m): minus_all of S02 is 3m - 2m = m
    np.testing.assert_allclose(np.asarray(s02["minus_all"]).reshape(112, 112), m, atol=1e-6)
    assert every["minus_all"] is None and every["n_subjects"] == 2


def test_normalisations_follow_their_formulas():
    m = _map(3).astype(np.float64) * 4.0 + 1.0
    np.testing.assert_allclose(normalise(m, "none"), m)
    np.testing.assert_allclose(normalise(m, "max-abs"), m / np.abs(m).max(), rtol=1e-6)
    z = normalise(m, "zscore")
    np.testing.assert_allclose(z, (m - m.mean()) / m.std(), rtol=1e-6)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-6
    np.testing.assert_allclose(normalise(m, "positive"), np.maximum(m, 0))
    np.testing.assert_allclose(normalise(m, "sum-norm"), m / np.abs(m).sum(), rtol=1e-6)  # any postprocess view
    with pytest.raises(ValueError, match="unknown map view"):
        normalise(m, "nonsense")


def test_composite_consistency_maps_on_known_values():
    ones = np.ones((112, 112))
    acc = composite_of_maps([ones, -ones, 3 * ones], normalisation="none")
    np.testing.assert_allclose(acc.mean(), 1.0)
    np.testing.assert_allclose(acc.std(), np.std([1, -1, 3]))
    np.testing.assert_allclose(acc.sign_agreement(), 1 / 3)


def test_streaming_memory_is_flat_in_the_number_of_patients(tmp_path):
    def peak(n: int) -> tuple[int, CompositeAccumulator]:
        store = _store(tmp_path, [(f"i{k:04d}", _map(k % 5)) for k in range(n)], f"n{n}", chunk=64)
        rows = _rows(store, {f"i{k:04d}": f"s{k:04d}" for k in range(n)})
        tracemalloc.start()
        acc = stream_composites(store, rows, "max-abs", block_maps=16)[("all",)]
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, acc

    p50, acc50 = peak(50)
    p500, acc500 = peak(500)
    one_map = 112 * 112 * 8
    # stacking the maps would add ≥ 450 float32 maps (≈ 22 MB); streaming adds only index bookkeeping
    assert p500 - p50 < 20 * one_map, (p50, p500)
    assert acc500.n_subjects == 500 and acc500.nbytes() == acc50.nbytes()
    assert CompositeAccumulator.N_ARRAYS == 4


# ------------------------------------------------------------------------------------------------ regions
def test_region_shares_sum_to_one_and_enrichment_is_correct():
    labels = template_atlas()
    nose = labels == LABEL["nose"]
    m = np.where(nose, 2.0, 0.0) - 5.0 * (labels == LABEL["mouth"])  # negative evidence does not count
    share, area = region_shares(m, labels)
    assert np.isclose(share.sum(), 1.0) and np.isclose(area.sum(), 1.0)
    i = REGIONS.index("nose")
    assert share[i] == 1.0 and np.isclose(area[i], nose.mean())
    enr = enrichment(share, area)
    assert np.isclose(enr[i], 1.0 / nose.mean()) and np.all(enr[np.arange(len(REGIONS)) != i] == 0)
    # half the mass on the nose, half spread evenly: enrichment = 0.5/area + 0.5 inside the nose
    flat = np.ones((112, 112)) / labels.size
    m2 = 0.5 * nose / nose.sum() + 0.5 * flat
    share2, _ = region_shares(m2, labels)
    assert np.isclose(enrichment(share2, area)[i], 0.5 / area[i] + 0.5)
    share3, _ = region_shares(np.ones((112, 112)), labels)
    np.testing.assert_allclose(enrichment(share3, area), 1.0)
    assert np.isnan(region_shares(-np.ones((112, 112)), labels)[0]).all()  # no positive mass, no shares
    np.testing.assert_allclose(region_area_shares(labels), area)


def test_region_scores_per_subject_then_syndrome():
    labels = template_atlas()
    area = region_area_shares(labels)
    i_nose, i_mouth = REGIONS.index("nose"), REGIONS.index("mouth")
    rows = []
    # subject a: 3 images all on the nose; subject b: 1 image on the mouth → syndrome shares 0.5 / 0.5
    for img, subj, reg in [("a1", "a", i_nose), ("a2", "a", i_nose), ("a3", "a", i_nose), ("b1", "b", i_mouth)]:
        for r in range(len(REGIONS)):
            rows.append({"syndrome_id": "S", "subject_id": subj, "image_id": img, "region": REGIONS[r],
                         "share": float(r == reg), "area_share": float(area[r])})
    per_subject = subject_region_scores(pd.DataFrame(rows), ["syndrome_id"])
    per_syn = syndrome_region_scores(per_subject, ["syndrome_id"]).set_index("region")
    assert np.isclose(per_syn.loc["nose", "share"], 0.5) and np.isclose(per_syn.loc["mouth", "share"], 0.5)
    assert np.isclose(per_syn.loc["nose", "enrichment"], 0.5 / area[i_nose])
    assert per_syn["rank"].min() == 1 and np.isnan(per_syn.loc["background", "rank"])
    assert "HP:0000366" in per_syn.loc["nose", "hpo_ids"]


# ------------------------------------------------------------------------------------------------ SpRAy
def _blob(y: int, x: int) -> np.ndarray:
    m = np.zeros((112, 112))
    m[y: y + 20, x: x + 30] = 1.0
    return m


def test_spray_finds_a_planted_split():
    rng = np.random.default_rng(0)
    eyes, cheek = _blob(40, 20), _blob(70, 75)
    maps = [eyes + 0.5 * rng.normal(size=eyes.shape) for _ in range(16)]
    maps += [0.6 * eyes + cheek + 0.5 * rng.normal(size=eyes.shape) for _ in range(7)]
    res = spray_cluster(np.stack([downsample(m) for m in maps]))
    assert res.n_clusters == 2 and res.sizes == [16, 7]
    assert set(res.labels[16:]) == {1} and set(res.labels[:16]) == {0}


def _cue_analysis(cluster_means: dict[int, np.ndarray]) -> tuple[dict, dict]:
    labels = np.array([0, 0, 0, 1, 1, 1])
    res = SprayResult(2, labels, np.zeros(4), np.zeros(3), np.zeros((6, 2)), 2, [3, 3])
    a = {"syndrome_id": "S01", "model_id": "m", "method": "hirescam", "layer": "", "target_group": "centroid:own",
         "n_clusters": 2, "confounded_syndrome": True, "cluster_means": cluster_means}
    return a, {("S01", "m", "hirescam", "", "centroid:own"): (res, [f"p{i}" for i in range(6)])}


def test_cue_check_finds_the_cluster_recognised_by_the_cue():
    mask = np.zeros((112, 112), bool)
    mask[70:80, 84:94] = True
    on_cue, elsewhere = np.zeros((112, 112)), np.zeros((112, 112))
    on_cue[mask] = 1.0
    elsewhere[40:50, 40:50] = 1.0
    a, results = _cue_analysis({0: elsewhere, 1: on_cue})
    check_cue([a], results, ConfounderCue("S01", mask, frozenset({"p3", "p4", "p5", "p0"})))
    by = {c["cluster"]: c for c in a["cue"]}
    assert a["cue_cluster"] == 1 and a["splits_on_cue"]
    assert by[1]["cue_share"] == 1.0 and by[0]["cue_share"] == 0.0
    assert by[1]["cue_enrichment"] == pytest.approx(1 / mask.mean())
    assert by[1]["marked_fraction"] == 1.0 and by[0]["marked_fraction"] == pytest.approx(1 / 3)
    # both clusters on the cue: no split on it
    b, results = _cue_analysis({0: on_cue, 1: on_cue})
    check_cue([b], results, ConfounderCue("S01", mask))
    assert not b["splits_on_cue"]


def test_spray_reports_one_cluster_without_structure():
    rng = np.random.default_rng(1)
    eyes = _blob(40, 20)
    for n in (12, 30):
        maps = [eyes * rng.uniform(0.5, 1.5) + 0.5 * rng.normal(size=eyes.shape) for _ in range(n)]
        res = spray_cluster(np.stack([downsample(m) for m in maps]))
        assert res.n_clusters == 1, res.eigenvalues
        assert np.argmax(res.eigengaps[:6]) == 0


# ------------------------------------------------------------------------------------------------ pair maps
def _pair_store(tmp_path, swap_details: bool = False) -> tuple[MapStore, np.ndarray, np.ndarray]:
    on_a, on_b = _map(10), _map(11)
    store = MapStore(tmp_path / "pairs")
    with store.writer() as w:
        detail_a = {"partner": "A" if swap_details else "B"}
        w.add(MapKey("A", "m", "pair:B", "hirescam", ""), on_a, target_kind="pair", target_value=0.7,
              target_detail=json.dumps(detail_a))
        w.add(MapKey("B", "m", "pair:A", "hirescam", ""), on_b, target_kind="pair", target_value=0.7,
              target_detail=json.dumps({"partner": "A"}))
        w.add(MapKey("A", "m", "pair:C", "hirescam", ""), _map(12), target_kind="pair",
              target_detail=json.dumps({"partner": "C"}))  # a distractor: A towards another reference
    return store, on_a, on_b


def test_pair_maps_take_the_right_reference_each_way(tmp_path):
    store, on_a, on_b = _pair_store(tmp_path)
    ab = pair_maps(store, "A", "B", model_id="m", method="hirescam")
    np.testing.assert_array_equal(ab.map_a, on_a)  # A's pixels, B as the reference
    np.testing.assert_array_equal(ab.map_b, on_b)  # B's pixels, A as the reference
    ba = pair_maps(store, "B", "A", model_id="m", method="hirescam")
    np.testing.assert_array_equal(ba.map_a, on_b)
    np.testing.assert_array_equal(ba.map_b, on_a)
    ac = pair_maps(store, "A", "C", model_id="m", method="hirescam")
    assert ac.map_a is not None and not np.array_equal(ac.map_a, on_a) and ac.map_b is None
    table = pair_table(store.index())
    row = table[(table["image_a"] == "A") & (table["image_b"] == "B")].iloc[0]
    assert row["has_a"] and row["has_b"]
    assert not table[(table["image_a"] == "A") & (table["image_b"] == "C")].iloc[0]["has_b"]


def test_pair_maps_refuse_a_map_stored_under_the_wrong_reference(tmp_path):
    store, _, _ = _pair_store(tmp_path, swap_details=True)
    with pytest.raises(InputError, match="wrong reference"):
        pair_maps(store, "A", "B", model_id="m", method="hirescam")


# ------------------------------------------------------------------------------------------------ faces
def test_privacy_guard_switches_to_the_all_subjects_face_below_min_subjects():
    faces: dict[tuple[str, str], FaceAccumulator] = {}
    for group, n, value in (("S1", 9, 50), ("S2", 10, 100), (ALL, 40, 200)):
        acc = FaceAccumulator()
        for _ in range(n):
            acc.add(np.full((112, 112, 3), value, np.float64))
        faces[(group, WHOLE)] = acc
    small = guarded_background(faces, "S1", WHOLE, min_subjects=10)
    assert small.source == "all-subjects" and small.n_subjects == 9 and int(small.face.mean()) == 200
    enough = guarded_background(faces, "S2", WHOLE, min_subjects=10)
    assert enough.source == "own" and int(enough.face.mean()) == 100
    assert guarded_background(faces, "S1", WHOLE, min_subjects=9).source == "own"
    nobody = guarded_background({("S1", WHOLE): faces[("S1", WHOLE)]}, "S1", WHOLE, min_subjects=10)
    assert nobody.source == "schematic" and int(nobody.face.mean()) != 50
    assert guarded_background(faces, "S2", "sex:F", min_subjects=10).source == "all-subjects"


def test_age_bands():
    edges = [0, 2, 5, 10, 18]
    assert [age_band(a, edges) for a in (0, 1.9, 2, 9.99, 17, 18, 70)] == \
        ["0-2y", "0-2y", "2-5y", "5-10y", "10-18y", "18+y", "18+y"]
    assert age_band(float("nan"), edges) is None
