"""The aggregate stage end to end on a constructed run: cohort tables, aligned crops and a map store whose maps
have known answers (each syndrome's evidence planted in one facial region; a confounded syndrome whose maps split
between its feature and a cue), with a minimal synthetic-cohort truth. No trained model involved. The planted-region
check the assess stage runs on the stage's region scores (assess/planted.py) is checked here too."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from gestalt_xai.aggregate.stage import AggregateConfig, aggregate_stage, composite_array, load_composites
from gestalt_xai.assess.planted import planted_region_table
from gestalt_xai.data.cohort import Cohort, save_run_cohort
from gestalt_xai.data.images import save_png
from gestalt_xai.faces.regions import LABEL, template_atlas
from gestalt_xai.runs import Run, write_parquet
from gestalt_xai.store import MapKey, MapStore

#: syndrome → (planted atlas region, its toolkit region group, subjects)
PLAN = {"S00": (None, None, 12), "S01": ("nose", "nose", 12), "S02": ("mouth", "mouth_lips", 6),
        "S03": ("periorbital_left", "periorbital_eyes_brows", 5)}
CUE = (slice(70, 80), slice(84, 94))  # the confounder mark on the image-right cheek (template space)


def region_blob(region: str | None, rng: np.random.Generator) -> np.ndarray:
    m = 0.05 * rng.normal(size=(112, 112))
    if region is not None:
        m[template_atlas() == LABEL[region]] += 1.0
    return m.astype(np.float32)


def build_run(path, rng_seed: int = 0, with_pairs: bool = True) -> Run:
    """A small run: 4 classes (S00 controls), 1–3 photos per subject, sex/age, crops, maps, minimal truth."""
    rng = np.random.default_rng(rng_seed)
    run = Run(path)
    rows, feats, truth_images = [], [], []
    for syn, (_region, group, n_subj) in PLAN.items():
        for s in range(n_subj):
            sid = f"{syn}_p{s:02d}"
            for i in range(1 + (s % 3)):
                iid = f"{sid}_i{i}"
                # the confounded syndrome S01: half its subjects carry the cue
                rows.append({"image_id": iid, "subject_id": sid, "syndrome_id": syn, "path": f"{iid}.jpg",
                             "sex": "F" if s % 2 else "M", "age": float(1 + 3 * s)})
                truth_images.append({"image_id": iid, "subject_id": sid, "syndrome_id": syn,
                                     "confounder": syn == "S01" and s < 6})
                if group:
                    feats.append({"image_id": iid, "subject_id": sid, "syndrome_id": syn, "feature": f"f_{group}",
                                  "hpo_id": "HP:0000001", "hpo_name": "x", "region": group, "effect": 1.0,
                                  "visible_in_crop": True, "mask_bit": 0, "mask_px": 1, "crop_fraction": 1.0})
    images = pd.DataFrame(rows)
    syndromes = pd.DataFrame({"syndrome_id": list(PLAN), "syndrome_name": [f"syndrome {k}" for k in PLAN]})
    save_run_cohort(run, Cohort(images=images, syndromes=syndromes))
    truth = run.dir("cohort") / "truth"
    write_parquet(pd.DataFrame(truth_images), truth / "images.parquet")
    write_parquet(pd.DataFrame(feats), truth / "features.parquet")
    write_parquet(pd.DataFrame({"feature": ["f"], "hpo_id": ["HP:0000001"]}), truth / "catalogue.parquet")
    (truth / "syndromes.json").write_text(json.dumps({"control_id": "S00", "config": {}}), encoding="utf-8")
    # aligned crops: a face-like gradient per subject, so composite faces are well defined
    yy, xx = np.mgrid[0:112, 0:112]
    base = np.clip(200 - 0.02 * ((xx - 56) ** 2 + (yy - 60) ** 2 * 0.6), 20, 230)
    for r in rows:
        crop = np.clip(base[..., None] + rng.normal(0, 8, (112, 112, 3)), 0, 255).astype(np.uint8)
        save_png(run.dir("aligned") / f"{r['image_id']}.png", crop)
    store = MapStore(run.dir("maps"))
    with store.writer(chunk_maps=64) as w:
        for r in rows:
            region = PLAN[r["syndrome_id"]][0]
            for method in ("hirescam", "saliency"):
                m = region_blob(region, rng)
                if method == "saliency":
                    m = np.abs(m)
                subj_idx = int(r["subject_id"].split("_p")[1])
                if r["syndrome_id"] == "S01" and subj_idx < 6 and method == "hirescam":
                    m = 0.05 * rng.normal(size=(112, 112)).astype(np.float32)
                    m[CUE] += 1.5  # these patients are recognised by the cue, not the nose
                w.add(MapKey(r["image_id"], "m0", f"centroid:{r['syndrome_id']}", method, ""), m,
                      target_kind="centroid", target_value=0.5,
                      target_detail=json.dumps({"syndrome_id": r["syndrome_id"]}))
        if with_pairs:
            a, b = "S01_p00_i0", "S01_p01_i0"
            for x, y, sign in ((a, b, 1.0), (b, a, -1.0)):
                w.add(MapKey(x, "m0", f"pair:{y}", "hirescam", ""), sign * region_blob("nose", rng),
                      target_kind="pair", target_value=0.8,
                      target_detail=json.dumps({"partner": y, "syndrome_id": "S01", "distance": 0.2}))
    store.compact()
    return run


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory):
    run = build_run(tmp_path_factory.mktemp("agg") / "run")
    # figures kept few (one stratum kind, one pair, one patient): drawing dominates the stage's run time
    result = aggregate_stage(run, AggregateConfig(normalisations=["max-abs", "none"], strata=["sex"],
                                                   spray_min_subjects=8, pair_figures=1, patient_figures=1))
    return run, result


def _copy_before_aggregate(run: Run, folder) -> Run:
    copy = Run(shutil.copytree(run.path, folder))
    shutil.rmtree(copy.path / "aggregate")
    return copy


def test_stage_writes_tables_and_figures(aggregated):
    run, result = aggregated
    out = run.path / "aggregate"
    for name in ("composites", "region_maps", "region_subjects", "region_syndromes", "faces", "spray",
                 "spray_members", "pairs"):
        assert (out / f"{name}.parquet").exists(), name
    # the checks against the truth are the assess stage's
    assert not [p.name for p in out.glob("*.parquet") if p.name.startswith(("planted", "localisation", "mark"))]
    assert not {"planted_hits", "localisation"} & set(result.extra["results"])
    figs = {p.name for p in (out / "figures").rglob("*.png")}
    assert any(n.startswith("composites__m0__centroid-own") for n in figs)
    assert any(n.startswith("regions__") for n in figs) and any(n.startswith("composite_faces__") for n in figs)
    assert any(n.startswith("pair__") for n in figs) and any(n.startswith("patient__") for n in figs)
    assert {p.suffix for p in (out / "figures").glob("composites__*")} == {".png", ".svg"}
    assert run.manifest["stages"]["aggregate"]["results"]["min_subjects"] == 10


def test_stage_composites_count_subjects_not_images(aggregated):
    run, _ = aggregated
    comp = load_composites(run)
    row = comp[(comp["group"] == "S02") & (comp["stratum"] == "all") & (comp["method"] == "hirescam")
               & (comp["normalisation"] == "none")].iloc[0]
    assert row["n_subjects"] == 6 and row["n_images"] == 12
    mean = composite_array(row)
    assert mean[template_atlas() == LABEL["mouth"]].mean() > 0.9  # evidence where it was planted
    # strata for the primary normalisation only, with the difference from the all-subjects composite
    assert {"sex:F", "sex:M"} <= set(comp.loc[comp["normalisation"] == "max-abs", "stratum"])
    assert comp.loc[comp["group"] != "ALL", "minus_all"].notna().all()


def test_stage_region_scores_find_planted_regions(aggregated):
    run, result = aggregated
    tables, lines = planted_region_table(run)
    hits = tables["planted_hits"]
    sal = hits[hits["method"] == "saliency"].set_index("syndrome_id")
    assert sal["hit"].all(), sal
    assert sorted(sal.index) == ["S01", "S02", "S03"]  # the control syndrome S00 has nothing to hit
    reported = tables["planted_hits_summary"].set_index("method")
    assert reported.loc["saliency", "share"] == 1.0 and reported.loc["saliency", "n_syndromes"] == 3
    assert any("saliency" in line and "3/3 syndromes (100%" in line for line in lines), lines
    per_syn = pd.read_parquet(run.path / "aggregate" / "region_syndromes.parquet")
    keys = ["syndrome_id", "method", "target_group", "atlas"]
    sums = per_syn[per_syn["syndrome_id"] != "ALL"].groupby(keys)["share"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-9)
    assert per_syn["hpo_ids"].str.contains("HP:0000366").any()  # the nose's HPO anchor travels with the scores


def test_stage_privacy_guard_and_faces(aggregated):
    run, _ = aggregated
    faces = pd.read_parquet(run.path / "aggregate" / "faces.parquet")
    small = faces[(faces["group"] == "S02") & (faces["stratum"] == "all")].iloc[0]
    big = faces[(faces["group"] == "S01") & (faces["stratum"] == "all")].iloc[0]
    assert not small["rendered"] and big["rendered"] and (faces["min_subjects"] == 10).all()
    written = {p.name for p in (run.path / "aggregate" / "faces").glob("*.png")}
    assert "S01__all.png" in written and "S02__all.png" not in written
    assert not any(n.startswith("S03__") for n in written)


def test_stage_spray_splits_confounded_syndrome_on_the_cue(aggregated):
    run, result = aggregated
    spray = pd.read_parquet(run.path / "aggregate" / "spray.parquet")
    s01 = spray[(spray["syndrome_id"] == "S01") & (spray["method"] == "hirescam")].iloc[0]
    assert s01["n_clusters"] == 2
    members = pd.read_parquet(run.path / "aggregate" / "spray_members.parquet")
    m = members[(members["syndrome_id"] == "S01") & (members["method"] == "hirescam")]
    cue_subjects = {f"S01_p{s:02d}" for s in range(6)}
    clusters = m.groupby("cluster")["subject_id"].agg(set)
    assert cue_subjects in list(clusters)


def test_figure_formats_option(aggregated, tmp_path):
    copy = _copy_before_aggregate(aggregated[0], tmp_path / "run")
    aggregate_stage(copy, AggregateConfig(normalisations=["max-abs"], strata=[], pair_figures=0, patient_figures=0,
                                          figure_formats=["png"]))
    suffixes = {p.suffix for p in (copy.path / "aggregate" / "figures").rglob("*") if p.is_file()}
    assert suffixes == {".png"}


def test_stage_returns_its_summary_lines(aggregated):
    run, result = aggregated
    lines = result.summary
    assert run.manifest["stages"]["aggregate"].get("summary", []) == lines  # only SpRAy lines: none here
    assert not any("syndromes (" in line or "localisation" in line for line in lines), lines


@pytest.mark.parametrize("broken", ["features.parquet", "syndromes.json"])
def test_unreadable_truth_is_reported_not_taken_for_a_real_cohort(aggregated, tmp_path, caplog, broken):
    copy = _copy_before_aggregate(aggregated[0], tmp_path / "run")
    path = copy.path / "cohort" / "truth" / broken
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    with caplog.at_level("WARNING"):
        result = aggregate_stage(copy, AggregateConfig(normalisations=["max-abs"], strata=[], figures=False))
    errors = copy.errors()
    rows = errors[errors["stage"] == "aggregate"]
    assert list(rows["item_id"]) == [f"cohort/truth/{broken}"] and list(rows["error_kind"]) == ["input"]
    assert any(f"cohort/truth/{broken}" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # the run goes on, without what needs the truth
    assert (copy.path / "aggregate" / "composites.parquet").exists()
    assert result.extra["results"]["spray"] == [] and result.extra["results"]["control_id"] is None
    # and so does the assess side's planted-region check, reporting the same file
    assess_errors: list = []
    assert planted_region_table(copy, errors=assess_errors) == ({}, [])
    assert [e.item_id for e in assess_errors] == [f"cohort/truth/{broken}"]


def test_real_cohort_without_truth_has_no_truth_errors(aggregated, tmp_path, caplog):
    copy = _copy_before_aggregate(aggregated[0], tmp_path / "run")
    shutil.rmtree(copy.path / "cohort" / "truth")
    with caplog.at_level("WARNING"):
        result = aggregate_stage(copy, AggregateConfig(normalisations=["max-abs"], strata=[], figures=False))
    errors = copy.errors()
    assert not len(errors[errors["stage"] == "aggregate"])
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "truth" in r.getMessage()]
    assert result.extra["results"]["spray"] == []
    assessed: list = []
    assert planted_region_table(copy, errors=assessed) == ({}, []) and not assessed


def test_confounder_without_a_mask_is_reported_and_still_flagged(aggregated, tmp_path):
    copy = _copy_before_aggregate(aggregated[0], tmp_path / "run")
    (copy.path / "cohort" / "truth" / "syndromes.json").write_text(
        json.dumps({"control_id": "S00", "config": {"confounder": {"syndrome": "S01"}}}), encoding="utf-8")
    result = aggregate_stage(copy, AggregateConfig(normalisations=["max-abs"], strata=[], figures=False))
    errors = copy.errors()
    rows = errors[errors["stage"] == "aggregate"]
    assert list(rows["item_id"]) == ["cohort/truth/masks"] and "alignment" in rows["message"].iloc[0]
    assert result.extra["results"]["confounded_syndrome"] == "S01"
    assert {s["method"] for s in result.extra["results"]["spray"]} == {"hirescam", "saliency"}
    assert all(s["cue"] is None for s in result.extra["results"]["spray"])
    members = pd.read_parquet(copy.path / "aggregate" / "spray_members.parquet")
    assert members.loc[members["syndrome_id"] == "S01", "confounded"].eq(False).all()
    assert any("no cue mask" in line for line in result.summary)


def test_target_groups_select_what_is_aggregated(tmp_path) -> None:
    from gestalt_xai.errors import InputError

    run = build_run(tmp_path / "run")
    aggregate_stage(run, {"min_subjects": 5, "normalisations": ["max-abs"], "figures": False,
                          "target_groups": ["pair:same-syndrome"]})
    comp = pd.read_parquet(run.path / "aggregate" / "composites.parquet", columns=["target_group"])
    assert set(comp["target_group"]) == {"pair:same-syndrome"}
    with pytest.raises(InputError, match="target_groups"):
        aggregate_stage(run, {"min_subjects": 5, "figures": False, "target_groups": ["centroid:S99"]})
