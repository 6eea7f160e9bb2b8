"""Undiagnosed patients (no syndrome): read as such, ranked against the unified gallery, explained towards their
suggestions (centroid, contrast, pair), and never part of a gallery, a centroid, a composite or a training set."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from attribution_helpers import explain_maps, make_tiny_run

from gestalt_xai.attribution.contrast import contrast_ref, parse_contrast_ref
from gestalt_xai.attribution.explain import ExplainConfig
from gestalt_xai.attribution.targets import TargetKey
from gestalt_xai.config import validate_config
from gestalt_xai.data.cohort import (
    GMDB_SETS,
    UNDIAGNOSED,
    UNDIAGNOSED_SET,
    Cohort,
    gmdb_splits,
    load_cohort,
    load_gmdb,
    save_run_cohort,
    undiagnosed_splits,
    write_gmdb,
)
from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.matching import (
    CentroidBank,
    EmbeddingTable,
    MatchConfig,
    cohort_protocols,
    match_stage,
    ranked_syndromes,
    slotwise_distances,
    syndrome_centroids,
    unified_gallery,
)
from gestalt_xai.runs import Run

#: the tiny run's gallery (its train images: subjects sA1, sB1, sC1) and the undiagnosed patient's photos
GALLERY = [f"{s}1{i}" for s in "ABC" for i in (0, 1)]
PATIENT = ["C00", "C01"]  # subject sC0, a test subject of C before it lost its label
SLOT = ("clf", False, False)


def _undiagnose(run: Run, subjects: set[str]) -> None:
    """Remove the diagnosis of ``subjects`` in a run's stored cohort (label unknown, split set undiagnosed)."""
    cohort = run.cohort()
    images = cohort.images.copy()
    images.loc[images["subject_id"].isin(subjects), "syndrome_id"] = UNDIAGNOSED
    save_run_cohort(run, dataclasses.replace(cohort, images=images,
                                             splits=undiagnosed_splits(images, cohort.splits)))


@pytest.fixture(scope="module")
def undiagnosed_run(tmp_path_factory) -> Run:
    run = make_tiny_run(tmp_path_factory.mktemp("undiagnosed") / "run")
    _undiagnose(run, {"sC0"})
    match_stage(run, MatchConfig(tta=False))
    return run


def _copy(run: Run, tmp_path) -> Run:
    return Run(shutil.copytree(run.path, tmp_path / "run"))


def _distances(run: Run, query: list[str], gallery: list[str]) -> np.ndarray:
    table = EmbeddingTable.from_frame(run.embeddings())
    return slotwise_distances([table.matrix(SLOT, query)], [table.matrix(SLOT, gallery)])


# ------------------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("label", ["", " ", "NaN", "nan", "unknown", "Unknown", "UNKNOWN"])
def test_csv_labels_without_a_syndrome_are_undiagnosed(tmp_path, label):
    rows = [{"image_id": f"{s}{k}", "path": f"{s}{k}.jpg", "subject_id": f"{s}{k}", "syndrome_id": s}
            for s in ("S1", "S2") for k in range(8)]
    rows.append({"image_id": "new", "path": "new.jpg", "subject_id": "p", "syndrome_id": label})
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    cohort = load_cohort(tmp_path / "cohort.csv")
    assert cohort.images.set_index("image_id").loc["new", "syndrome_id"] == UNDIAGNOSED
    assert cohort.splits.loc[cohort.splits["image_id"] == "new", "set"].tolist() == [UNDIAGNOSED_SET]
    assert UNDIAGNOSED not in set(cohort.syndromes["syndrome_id"]) | set(cohort.lookup or [])
    assert cohort.syndrome_ids == ["S1", "S2"]


def test_undiagnosed_images_change_no_one_elses_split():
    diagnosed = pd.DataFrame([{"image_id": f"{s}{k}", "subject_id": f"{s}{k}", "syndrome_id": s}
                              for s, n in (("S1", 9), ("S2", 4)) for k in range(n)])
    new = pd.DataFrame({"image_id": ["u1", "u2"], "subject_id": ["p1", "p2"], "syndrome_id": [UNDIAGNOSED] * 2})
    with_new = gmdb_splits(pd.concat([diagnosed, new], ignore_index=True), seed=3)
    assert with_new[with_new["set"] == UNDIAGNOSED_SET]["image_id"].tolist() == ["u1", "u2"]
    rest = with_new[with_new["set"] != UNDIAGNOSED_SET].reset_index(drop=True)
    pd.testing.assert_frame_equal(rest, gmdb_splits(diagnosed, seed=3))


def test_gmdb_files_round_trip_and_unlabelled_rows_move_to_their_set(tmp_path):
    images = pd.DataFrame([{"image_id": f"{s}{k}", "subject_id": f"{s}{k}", "syndrome_id": s}
                           for s in ("10", "20") for k in range(8)])
    images.loc[images["image_id"] == "107", "syndrome_id"] = ""  # no diagnosis
    syndromes = pd.DataFrame({"syndrome_id": ["10", "20"], "syndrome_name": ["ten", "twenty"]})
    written = write_gmdb(tmp_path, images, syndromes, "v1")
    assert (tmp_path / "gmdb_undiagnosed_images_v1.csv").is_file()
    assert written.image_ids(UNDIAGNOSED_SET) == ["107"]
    assert "107" not in set(written.splits.loc[written.splits["set"] != UNDIAGNOSED_SET, "image_id"])
    # a GMDB folder written elsewhere lists an unlabelled photo in its test files: it is read as undiagnosed
    moved = pd.read_csv(tmp_path / "gmdb_test_images_v1.csv", dtype=str).loc[0, "image_id"]
    for name in ("test", "frequent_test"):
        table = pd.read_csv(tmp_path / f"gmdb_{name}_images_v1.csv", dtype=str)
        table.loc[table["image_id"] == moved, "label"] = "" if name == "test" else "unknown"
        table.to_csv(tmp_path / f"gmdb_{name}_images_v1.csv", index=False)
    again = load_gmdb(tmp_path)
    assert again.images.set_index("image_id").loc[moved, "syndrome_id"] == UNDIAGNOSED
    assert again.splits.loc[again.splits["image_id"] == moved, "set"].tolist() == [UNDIAGNOSED_SET]
    assert set(GMDB_SETS) >= set(again.splits["set"]) - {UNDIAGNOSED_SET}


def test_a_cohort_built_in_code_is_stored_with_the_readers_rule(tmp_path):
    run = Run(tmp_path / "run")
    images = pd.DataFrame({"image_id": ["a", "b", "c"], "subject_id": ["s1", "s2", "s3"],
                           "syndrome_id": ["S1", "", None], "path": ["a.jpg", "b.jpg", "c.jpg"]})
    splits = pd.DataFrame({"image_id": ["a", "b", "c"], "set": "train", "split": -1})
    syndromes = pd.DataFrame({"syndrome_id": ["S1", "unknown"], "syndrome_name": ["one", "?"]})
    save_run_cohort(run, Cohort(images=images, syndromes=syndromes, splits=splits))
    stored = run.cohort()
    assert stored.images["syndrome_id"].tolist() == ["S1", UNDIAGNOSED, UNDIAGNOSED]
    assert stored.image_ids("train") == ["a"] and stored.image_ids(UNDIAGNOSED_SET) == ["b", "c"]
    assert stored.syndromes["syndrome_id"].tolist() == ["S1"]


def test_image_table_marks_undiagnosed_neither_test_nor_gallery(undiagnosed_run):
    table = undiagnosed_run.image_table().set_index("image_id")
    assert table.loc[PATIENT, "undiagnosed"].all() and not table.loc[PATIENT, ["test", "gallery"]].any().any()
    assert table.loc[PATIENT, "sets"].eq(UNDIAGNOSED_SET).all()
    assert table["undiagnosed"].sum() == 2 and table.loc[GALLERY, "gallery"].all()


# ------------------------------------------------------------------------------------------------ ranked
def test_match_ranks_undiagnosed_against_the_unified_gallery(undiagnosed_run):
    run = undiagnosed_run
    suggestions = pd.read_parquet(run.path / "matching" / "suggestions.parquet")
    assert list(suggestions.columns) == ["image_id", "rank", "syndrome_id", "distance"]
    assert sorted(set(suggestions["image_id"])) == PATIENT
    assert not set(pd.read_parquet(run.path / "matching" / "ranks.parquet")["image_id"]) & set(PATIENT)
    # the one ranking (matching.ranked_syndromes) over the unified gallery, computed here independently
    d = _distances(run, PATIENT, GALLERY)
    expected_s, expected_d = ranked_syndromes(d, [g[0] for g in GALLERY])
    for image_id, syns, dists in zip(PATIENT, expected_s, expected_d, strict=True):
        mine = suggestions[suggestions["image_id"] == image_id].sort_values("rank")
        assert mine["rank"].tolist() == list(range(1, 4)) and mine["syndrome_id"].tolist() == syns
        np.testing.assert_allclose(mine["distance"], dists, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ explained
def test_undiagnosed_patient_gets_top3_maps_a_contrast_and_nearest_faces(undiagnosed_run, tmp_path):
    run = _copy(undiagnosed_run, tmp_path)
    base = {"methods": ["saliency", "hirescam"], "images": "undiagnosed", "overlay": 0}
    explain_maps(run, ExplainConfig(**base, target="centroid", syndromes="topk:3"))
    explain_maps(run, ExplainConfig(**base, target="contrast", syndromes="topk:2"))
    store = explain_maps(run, ExplainConfig(**base, target="pair", pairs="nearest:2"))
    assert run.errors().query("stage == 'explain'").empty
    idx = store.index()
    suggestions = pd.read_parquet(run.path / "matching" / "suggestions.parquet")
    d = _distances(run, PATIENT, GALLERY)
    for row, image_id in enumerate(PATIENT):
        top = suggestions[suggestions["image_id"] == image_id].sort_values("rank")["syndrome_id"].tolist()
        mine = idx[(idx["image_id"] == image_id) & (idx["method"] == "saliency")]
        centroid = mine[mine["target_kind"] == "centroid"]
        # maps for its top-3 suggestions, with their ranks as the match stage ranks them
        assert sorted(centroid["target"]) == sorted(f"centroid:{s}" for s in top[:3])
        ranks = {TargetKey.parse(t).ref: json.loads(x)["rank"] for t, x in
                 zip(centroid["target"], centroid["target_detail"], strict=True)}
        assert ranks == {s: r for r, s in enumerate(top[:3], start=1)}
        # a contrastive map for the first two
        assert mine.loc[mine["target_kind"] == "contrast", "target"].tolist() == [f"contrast:{top[0]}-{top[1]}"]
        # similarity maps to its 2 nearest gallery faces of any syndrome (it has no label), and back
        nearest = [GALLERY[j] for j in np.lexsort((GALLERY, d[row]))[:2]]
        assert sorted(mine.loc[mine["target_kind"] == "pair", "target"]) == sorted(f"pair:{g}" for g in nearest)
        for g in nearest:
            assert len(idx[(idx["image_id"] == g) & (idx["target"] == f"pair:{image_id}")]) == 2
    # only the undiagnosed patients were selected
    assert set(idx.loc[idx["target_kind"] != "pair", "image_id"]) == set(PATIENT)


def test_label_selects_nothing_for_undiagnosed_patients(undiagnosed_run, tmp_path, caplog):
    run = _copy(undiagnosed_run, tmp_path)
    with caplog.at_level("INFO"):
        store = explain_maps(run, ExplainConfig(methods=["saliency"], images="all", syndromes="label", overlay=0))
    # the diagnosed test patients are explained; the gallery ones have no other subject of their syndrome left
    # (error rows); the undiagnosed ones are neither explained nor errors, and the log says why
    assert sorted(store.index()["image_id"]) == ["A00", "A01", "B00", "B01"]
    errors = run.errors().query("stage == 'explain'")
    assert sorted(errors["item_id"]) == sorted(GALLERY) and "2 undiagnosed image(s)" in caplog.text


@pytest.mark.parametrize(("tta", "methods"), [(False, ["input_x_gradient", "gradcam", "hirescam", "occlusion"]),
                                               (True, ["input_x_gradient", "gradcam", "hirescam"])])
def test_contrast_map_is_the_difference_of_the_two_centroid_maps(undiagnosed_run, tmp_path, tta, methods):
    """Input×gradient, signed Grad-CAM and HiResCAM are linear in the gradient of the explained score, occlusion in
    score differences; ∂(s_X − s_Y) = ∂s_X − ∂s_Y for any network and either cosine, and every (member, slot) term of
    the TTA mean is a difference of the same two references. So the contrast map equals the centroid:X map minus the
    centroid:Y map up to float32 rounding: a wrong sign, a swapped or wrongly excluded reference breaks it."""
    run = _copy(undiagnosed_run, tmp_path)
    base = {"methods": methods, "images": ["C00", "A00"],
            "overlay": 0, "tta": tta,
            "method_params": {"occlusion": {"patch": 28, "stride": 28}} if "occlusion" in methods else {}}
    explain_maps(run, ExplainConfig(**base, target="centroid", syndromes="A,B"))
    store = explain_maps(run, ExplainConfig(**base, target="contrast", syndromes="A-B"))
    assert run.errors().query("stage == 'explain'").empty
    idx = store.index()
    for (image_id, method, layer), part in idx.groupby(["image_id", "method", "layer"]):
        by = part.set_index("target")
        assert set(by.index) == {"centroid:A", "centroid:B", "contrast:A-B"}
        mx, my, mc = (store.load_many(by.loc[[t]])[0] for t in ("centroid:A", "centroid:B", "contrast:A-B"))
        scale = np.abs(mx).max() + np.abs(my).max()
        np.testing.assert_allclose(mc, mx - my, atol=2e-5 * scale, err_msg=f"{image_id} {method} {layer}")
        assert by.loc["contrast:A-B", "target_value"] == pytest.approx(
            by.loc["centroid:A", "target_value"] - by.loc["centroid:B", "target_value"], abs=1e-6)
        detail = json.loads(by.loc["contrast:A-B", "target_detail"])
        assert (detail["first"], detail["second"], detail["target"]["kind"]) == ("A", "B", "contrast")


def test_contrast_keys_escape_any_id_and_bad_specs_fail_before_work():
    for first, second in [("S01", "S02"), ("605130", "OMIM:1"), ("22q11-del", "a--b"), ("100%", "%2D"),
                          ("-x", "y-"), ("ü", "S 1")]:
        ref = contrast_ref(first, second)
        assert ref.count("-") == 1 and parse_contrast_ref(ref) == (first, second)
        assert TargetKey.parse(str(TargetKey("contrast", ref))).ref == ref
    assert contrast_ref("S03", "S01") == "S03-S01"
    for bad in ("S01", "S01-S02-S03", "-S01", "S01-"):
        with pytest.raises(InputError, match="a contrast is 'X-Y'"):
            parse_contrast_ref(bad)
    opts = {"methods": ["saliency"], "target": "contrast"}
    with pytest.raises(ConfigError, match="topk:K needs K ≥ 2"):
        validate_config(ExplainConfig, {**opts, "syndromes": "topk:1"})
    with pytest.raises(ConfigError, match="syndromes: a contrast is 'X-Y'"):
        validate_config(ExplainConfig, {**opts, "syndromes": "S01,S02"})
    with pytest.raises(ConfigError, match="with itself"):
        validate_config(ExplainConfig, {**opts, "syndromes": "S01-S01"})
    assert validate_config(ExplainConfig, {**opts, "syndromes": "S01-S02,22q11%2Ddel-S01"}).target == "contrast"


# ------------------------------------------------------------------------------------------------ never a reference
def test_undiagnosed_in_no_protocol_gallery_or_centroid(undiagnosed_run, tmp_path):
    run = undiagnosed_run
    cohort = run.cohort()
    for p in cohort_protocols(cohort).values():
        for sp in p.splits:
            assert not set(PATIENT) & (set(sp.test_image_ids) | set(sp.gallery_image_ids)), p.name
    assert sorted(unified_gallery(cohort)) == sorted(GALLERY)
    emb, images = run.embeddings(), run.image_table()
    # every image offered as gallery: the patient still enters no centroid, and "unknown" is no syndrome
    bank = CentroidBank(emb, images, gallery_ids=None)
    assert bank.syndromes == ["A", "B", "C"] and bank.n_subjects("clf", (False, False), "C") == 1
    np.testing.assert_allclose(bank.reference("clf", (False, False), "C"),
                               CentroidBank(emb, images, GALLERY).reference("clf", (False, False), "C"))
    assert syndrome_centroids(emb, images, list(images["image_id"])).syndromes == ["A", "B", "C"]
    # the explain stage's gallery, even with gallery: all, ranks no "unknown" syndrome
    copy = _copy(run, tmp_path)
    idx = explain_maps(copy, ExplainConfig(methods=["saliency"], images=["A00"], syndromes="topk:5", gallery="all",
                                           overlay=0)).index()
    assert sorted(idx["target"]) == ["centroid:A", "centroid:B", "centroid:C"]


def test_undiagnosed_never_trains_even_if_listed_in_train(undiagnosed_run, tmp_path):
    from gestalt_xai.models.train import TrainConfig
    from gestalt_xai.models.train_data import select_training_data

    run = _copy(undiagnosed_run, tmp_path)
    cfg = TrainConfig(model_id="t", arch="r18", width=0.125, epochs=1, threads=1)
    data = select_training_data(run.cohort(), run, cfg)
    assert not set(PATIENT) & (set(data.train["image_id"]) | set(data.val["image_id"]))
    assert data.classes == ["A", "B", "C"]
    # a split table written by hand that puts the patient in train: still left out, and no class "unknown"
    cohort = run.cohort()
    forced = pd.concat([cohort.splits, pd.DataFrame({"image_id": PATIENT, "set": "train", "split": 0})])
    data = select_training_data(dataclasses.replace(cohort, splits=forced), run, cfg)
    assert not set(PATIENT) & set(data.train["image_id"]) and UNDIAGNOSED not in data.classes


def test_undiagnosed_maps_enter_no_composite(tmp_path):
    """The aggregate stage's tables are the same with and without undiagnosed patients' maps in the store (theirs,
    and gallery faces explained against them, carry a strong signal that would show in any composite)."""
    from test_aggregate_stage import build_run

    from gestalt_xai.aggregate.stage import AggregateConfig, aggregate_stage
    from gestalt_xai.data.images import save_png
    from gestalt_xai.runs import write_parquet
    from gestalt_xai.store import MapKey

    plain = build_run(tmp_path / "plain")
    mixed = Run(shutil.copytree(plain.path, tmp_path / "mixed"))
    cohort = mixed.cohort()
    new = pd.DataFrame([{"image_id": f"U{k}", "subject_id": f"U{k}", "syndrome_id": UNDIAGNOSED,
                         "path": str(mixed.path / f"U{k}.jpg"), "sex": "F", "age": 3.0} for k in range(3)])
    images = pd.concat([cohort.images, new], ignore_index=True)
    save_run_cohort(mixed, dataclasses.replace(cohort, images=images, splits=undiagnosed_splits(images,
                                                                                                cohort.splits)))
    truth = mixed.path / "cohort" / "truth" / "images.parquet"
    write_parquet(pd.concat([pd.read_parquet(truth), pd.DataFrame(
        {"image_id": new["image_id"], "subject_id": new["subject_id"], "syndrome_id": "S01", "confounder": False})],
        ignore_index=True), truth)
    store = mixed.map_store()
    with store.writer("undiagnosed") as w:
        for k in range(3):
            save_png(mixed.path / "aligned" / f"U{k}.png", np.full((112, 112, 3), 255 * (k % 2), np.uint8))
            for target in ("centroid:S01", "centroid:S02"):
                for method in ("hirescam", "saliency"):
                    w.add(MapKey(f"U{k}", "m0", target, method, ""), np.full((112, 112), 50.0, np.float32),
                          target_kind="centroid", target_value=0.9)
            # a gallery face of S01 explained against the patient (the reverse direction of a pair)
            w.add(MapKey("S01_p00_i0", "m0", f"pair:U{k}", "hirescam", ""), np.full((112, 112), -50.0, np.float32),
                  target_kind="pair", target_value=0.7, target_detail=json.dumps({"partner": f"U{k}"}))
    store.compact()
    cfg = AggregateConfig(normalisations=["max-abs", "none"], strata=["sex"], figures=False)
    results = [aggregate_stage(run, cfg) for run in (plain, mixed)]
    assert results[1].extra["results"]["n_undiagnosed_maps"] == 15
    assert results[0].extra["results"]["n_undiagnosed_maps"] == 0
    for name in ("composites", "faces", "region_syndromes", "pairs", "spray"):
        a, b = (pd.read_parquet(run.path / "aggregate" / f"{name}.parquet") for run in (plain, mixed))
        pd.testing.assert_frame_equal(a, b, obj=name)
    comp = pd.read_parquet(mixed.path / "aggregate" / "composites.parquet")
    assert UNDIAGNOSED not in set(comp["group"]) and len(comp)


# ------------------------------------------------------------------------------------------------ synthetic cohort
def test_synthetic_cohort_leaves_frequent_test_subjects_undiagnosed(tmp_path):
    from gestalt_xai.data.synthetic.cohort import SynthConfig, synth_stage
    from gestalt_xai.data.synthetic.truth import load_truth

    opts = {"seed": 0, "n_syndromes": 3, "n_frequent": 2, "frequent_subjects": (7, 8), "rare_subjects": (2, 2),
            "images_per_subject": (1, 1), "n_controls": 0, "canvas": (200, 220), "workers": 1}
    with pytest.raises(ConfigError, match="undiagnosed"):
        validate_config(SynthConfig, {**opts, "undiagnosed": 3})
    run = Run(tmp_path / "run")
    result = synth_stage(run, SynthConfig(**opts, undiagnosed=2))
    truth = load_truth(run.path).images
    cohort = load_gmdb(run.path / "cohort")
    hidden = truth[truth["undiagnosed"]]
    # one test subject of each of the first two frequent syndromes; the truth keeps their syndrome
    assert hidden.groupby("syndrome_id")["subject_id"].nunique().to_dict() == {"S01": 1, "S02": 1}
    true_splits = gmdb_splits(truth[["image_id", "subject_id", "syndrome_id"]], seed=0)
    assert set(hidden["image_id"]) <= set(true_splits.loc[true_splits["set"] == "frequent_test", "image_id"])
    # the cohort tables give them no syndrome and their own set; everyone else keeps the split of the true labels
    assert cohort.images.set_index("image_id").loc[hidden["image_id"], "syndrome_id"].eq(UNDIAGNOSED).all()
    assert cohort.image_ids(UNDIAGNOSED_SET) == sorted(hidden["image_id"])
    rest = true_splits[~true_splits["image_id"].isin(hidden["image_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(cohort.splits[cohort.splits["set"] != UNDIAGNOSED_SET].reset_index(drop=True),
                                  rest, check_dtype=False)
    assert UNDIAGNOSED not in set(cohort.syndromes["syndrome_id"]) | set(cohort.lookup or [])
    assert result.extra["n_undiagnosed"] == 2 and "2 left undiagnosed" in result.summary[0]
    assert "2 test subjects left undiagnosed" in (run.path / "cohort" / "data_card.md").read_text()
