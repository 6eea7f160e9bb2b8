"""Score changes under counterfactual edits (attribution/effects.py) and the random-model control (randomise: true)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from attribution_helpers import make_tiny_run
from model_helpers import randomise_model

from gestalt_xai.attribution.effects import EFFECT_COLUMNS, effect_scores, load_effects, upsert_effects
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.attribution.targets import CentroidTarget, LogitTarget
from gestalt_xai.models.declaration import DeclaredModel, ModelSpec, load_declared, resolve_models
from gestalt_xai.models.gestaltmatcher import build_gestaltmatcher, preprocess


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("effects") / "run")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return randomise_model(build_gestaltmatcher("r18", width=0.125, num_classes=3), seed)


def _alone(score_model: ScoreModel, crop: np.ndarray, row: int) -> float:
    """One crop's score under one row's target, in a forward pass of its own."""
    with torch.no_grad():
        return float(score_model.select([row])(preprocess(crop[None])).double()[0])


def test_effect_is_the_exact_score_difference_under_the_rows_target():
    rng = np.random.default_rng(0)
    factual = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    refs = rng.normal(size=(3, 512)).astype(np.float32)  # a different reference per factual row
    sm = ScoreModel([("m", _model())], CentroidTarget(refs))
    edited = factual.copy()
    edited[:, 40:70, 30:80] = 0  # an edited region in every photo
    # counterfactuals of rows 2, 0, 0 (out of order, one row twice: the other a different edit)
    other = factual[0].copy()
    other[80:100, 20:90] = 255
    cf = np.stack([edited[2], edited[0], other])
    rows = [2, 0, 0]
    scores, cf_scores = effect_scores(sm, factual, cf, rows, batch_size=2)  # chunks straddle the rows
    for i in range(3):
        assert scores[i] == pytest.approx(_alone(sm, factual[i], i), abs=1e-6)
    for j, r in enumerate(rows):
        assert cf_scores[j] == pytest.approx(_alone(sm, cf[j], r), abs=1e-6)
        assert scores[r] - cf_scores[j] == pytest.approx(_alone(sm, factual[r], r) - _alone(sm, cf[j], r), abs=1e-6)
    # the edits change the score (a wrong row → target pairing would also show here)
    assert np.all(np.abs(scores[rows] - cf_scores) > 1e-4)
    assert not np.isclose(cf_scores[0], _alone(sm, cf[0], 0), atol=1e-6)


def test_identical_counterfactual_gives_exactly_zero_and_logit_targets_work():
    rng = np.random.default_rng(1)
    factual = rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    sm = ScoreModel([("m", _model(1))], LogitTarget([0, 2]))
    changed = factual[1].copy()
    changed[50:60, 50:60] ^= 0xFF
    scores, cf_scores = effect_scores(sm, factual, np.stack([factual[1], factual[0], changed]), [1, 0, 1])
    deltas = scores[[1, 0, 1]] - cf_scores
    assert deltas[0] == 0.0 and deltas[1] == 0.0
    assert deltas[2] != 0.0
    with torch.no_grad():
        logits, _ = sm.members[0](preprocess(factual))
    assert scores == pytest.approx([float(logits[0, 0]), float(logits[1, 2])], abs=1e-5)


def test_effects_table_upsert_replaces_keys_and_sorts(tmp_path):
    from gestalt_xai.runs import Run

    run = Run(tmp_path / "run")
    assert load_effects(run).columns.tolist() == EFFECT_COLUMNS and not len(load_effects(run))

    def rows(image_ids, delta):
        return pd.DataFrame([{"image_id": i, "model_id": "m", "target": "centroid:S", "variant": v, "feature": "f",
                              "change": "remove", "score": 0.5, "counterfactual_score": 0.5 - delta, "delta": delta,
                              "model_hash": "h"} for i in image_ids for v in ("without_f", "without_all_features")])

    upsert_effects(run, rows(["b", "a"], 0.1))
    upsert_effects(run, rows(["c", "b"], 0.2))
    table = load_effects(run)
    assert table["image_id"].tolist() == ["a", "a", "b", "b", "c", "c"]
    assert table.groupby("image_id")["delta"].first().to_dict() == {"a": 0.1, "b": 0.2, "c": 0.2}
    first = (run.path / "maps" / "effects.parquet").read_bytes()
    upsert_effects(run, rows(["c"], 0.2))
    assert (run.path / "maps" / "effects.parquet").read_bytes() == first


# ------------------------------------------------------------------------------------------ random-model control
def _declared(run, **spec) -> DeclaredModel:
    return resolve_models(run, [ModelSpec(path="{run}/models/clf.safetensors", **spec)])[0]


def test_randomised_model_keeps_the_architecture_with_fresh_seeded_weights(tiny_run):
    # the tiny run's model is itself build_gestaltmatcher under seed 0 (untrained): seeds 7 and 8 differ from it
    trained = load_declared(_declared(tiny_run))
    declared = _declared(tiny_run, id="random_init", randomise=True, randomise_seed=7)
    control = load_declared(declared)
    again = load_declared(_declared(tiny_run, id="random_init", randomise=True, randomise_seed=7))
    other_seed = load_declared(_declared(tiny_run, id="r1", randomise=True, randomise_seed=8))
    sd_t, sd_c, sd_a, sd_o = (m.state_dict() for m in (trained, control, again, other_seed))
    assert sd_t.keys() == sd_c.keys() and all(sd_t[k].shape == sd_c[k].shape for k in sd_t)
    weights = [k for k in sd_t if k.endswith("weight") and sd_t[k].ndim > 1]
    assert all(not torch.equal(sd_t[k], sd_c[k]) for k in weights)  # every weight replaced
    assert all(torch.equal(sd_c[k], sd_a[k]) for k in sd_c)  # deterministic for a seed
    assert any(not torch.equal(sd_c[k], sd_o[k]) for k in weights)  # another seed, other weights
    bns = [m for m in control.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(float(b.running_mean.abs().max()) == 0 and torch.all(b.running_var == 1) for b in bns)
    assert (control.arch, control.num_classes, control.syndrome_ids, control.channel_order) == (
        trained.arch, trained.num_classes, trained.syndrome_ids, trained.channel_order)
    x = preprocess(np.zeros((2, 112, 112, 3), np.uint8))
    with torch.no_grad():
        (lt, et), (lc, ec) = trained(x), control(x)
    assert lt.shape == lc.shape and et.shape == ec.shape and torch.isfinite(ec).all()
    # the weights training from scratch starts from with the same seed (train._build_model)
    from gestalt_xai.models.train import TrainConfig, _build_model

    start = _build_model(TrainConfig(arch="r18", width=0.125, seed=7), ["A", "B", "C"]).state_dict()
    assert all(torch.equal(start[k], sd_c[k]) for k in sd_c)
    # its hash is not the checkpoint's, and differs per seed
    file_sha = _declared(tiny_run).sha256()
    assert declared.sha256() != file_sha and len(declared.sha256()) == 64
    assert declared.sha256() != _declared(tiny_run, id="r1", randomise=True, randomise_seed=8).sha256()
    assert declared.info() == {"randomise": True, "randomise_seed": 7, "source_sha256": file_sha}


def test_randomise_options_are_checked_and_ids_never_collide():
    from pydantic import ValidationError

    from gestalt_xai.attribution.explain import ExplainConfig
    from gestalt_xai.models.declaration import model_id

    assert model_id(ModelSpec(path="{run}/models/clf.safetensors", randomise=True)) == "clf-random0"
    with pytest.raises(ValidationError, match="randomise_seed is set but randomise is not"):
        ModelSpec(path="{run}/models/clf.safetensors", randomise_seed=3)
    with pytest.raises(ValidationError, match="occur twice"):
        ExplainConfig(models=[{"path": "{run}/m.safetensors", "id": "a"},
                              {"path": "{run}/m.safetensors", "id": "a", "randomise": True}])


def test_embed_match_and_explain_take_a_random_control(tiny_run, tmp_path):
    from gestalt_xai.attribution.explain import ExplainConfig, explain_stage
    from gestalt_xai.matching.stage import match_stage
    from gestalt_xai.models.declaration import random_controls
    from gestalt_xai.models.embed import EmbedConfig, embed_stage
    from gestalt_xai.runs import Run

    run = Run(shutil.copytree(tiny_run.path, tmp_path / "run"))
    models = [{"path": "{run}/models/clf.safetensors"},
              {"path": "{run}/models/clf.safetensors", "id": "random_init", "randomise": True, "randomise_seed": 5}]
    embed_stage(run, EmbedConfig(models=models, threads=1, tta=True))
    emb = run.embeddings()
    assert set(emb["model_id"]) == {"clf", "random_init"}
    trained_rows = emb[emb["model_id"] == "clf"].reset_index(drop=True)
    control_rows = emb[emb["model_id"] == "random_init"].reset_index(drop=True)
    assert not np.allclose(np.stack(trained_rows["embedding"]), np.stack(control_rows["embedding"]))
    recorded = run.manifest["models"]
    assert recorded["random_init"]["randomise"] and recorded["random_init"]["sha256"] != recorded["clf"]["sha256"]
    assert random_controls(run) == {"random_init": "clf"}
    # match's default ensemble leaves the control out; named, it is matched
    match_stage(run)
    assert set(pd.read_parquet(run.path / "matching" / "summary.parquet")["models"]) == {"clf"}
    match_stage(run, {"models": ["random_init"], "protocols": ["frequent"]})
    assert set(pd.read_parquet(run.path / "matching" / "summary.parquet")["models"]) == {"random_init"}
    # explain: "run" explains the stored (trained) model; the control is declared like any model
    explain_stage(run, ExplainConfig(methods=["saliency"], overlay=0))
    explain_stage(run, ExplainConfig(methods=["saliency"], overlay=0, models=models[1:]), instance="explain#2")
    idx = run.map_store().index()
    assert set(idx["model_id"]) == {"clf", "random_init"}
    hashes = idx.groupby("model_id")["model_hash"].first()
    assert hashes["random_init"] == recorded["random_init"]["sha256"] != hashes["clf"]
    a = idx[idx.model_id == "clf"].set_index("image_id")["target_value"]
    b = idx[idx.model_id == "random_init"].set_index("image_id")["target_value"]
    assert not np.allclose(a.sort_index(), b.sort_index())


# ------------------------------------------------------------------------------------------ end to end
def test_explain_measures_effects_of_its_counterfactual_images_and_assess_localises(trained_run, tmp_path):
    from gestalt_xai.assess.localisation_run import localisation_tables
    from gestalt_xai.assess.planted import confounded_syndrome, read_truth
    from gestalt_xai.attribution.effects import EFFECT_KEY
    from gestalt_xai.attribution.explain import ExplainConfig, explain_stage
    from gestalt_xai.runs import Run

    run = Run(shutil.copytree(trained_run.path, tmp_path / "run"))
    cf = run.counterfactuals()
    assert len(cf), "the synthetic fixture renders counterfactuals of its test photos"
    result = explain_stage(run, ExplainConfig(methods=["hirescam", "saliency"], overlay=0))
    seconds = result.extra["effects"]["seconds"]
    effects = load_effects(run)
    idx = run.map_store().index()
    explained = set(idx["image_id"])
    images = run.image_table().set_index("image_id")
    # every explained image with counterfactual crops has a row per variant, under its explained target
    own = effects[effects["target"] == "centroid:" + effects["image_id"].map(images["syndrome_id"])]
    for image_id, variants in cf[cf["image_id"].isin(explained)].groupby("image_id"):
        got = own[own["image_id"] == image_id]
        assert sorted(got["variant"]) == sorted(variants["variant"]), image_id
    assert set(own["image_id"]) <= explained and len(own)
    # the factual score is the one the maps explain; Δ = factual − counterfactual
    value = idx[idx["method"] == "saliency"].set_index(["image_id", "target"])["target_value"]
    assert np.allclose(own["score"], [value[(i, t)] for i, t in zip(own["image_id"], own["target"], strict=True)],
                       atol=1e-5)
    assert np.array_equal(effects["delta"], effects["score"] - effects["counterfactual_score"])
    assert effects.equals(effects.sort_values(EFFECT_KEY).reset_index(drop=True))
    # the mark's effect on the confounded syndrome's centroid score, for every photo with a mark variant
    confounded = confounded_syndrome(read_truth(run)[0])
    with_mark = set(cf.loc[cf["variant"].isin(["without_mark", "with_mark"]), "image_id"])
    if confounded is not None and with_mark:
        marks = effects[(effects["target"] == f"centroid:{confounded}") & (effects["feature"] == "mark")]
        assert set(marks["image_id"]) == with_mark
    # a rerun measures nothing again and leaves the table's bytes as they were
    before = (run.path / "maps" / "effects.parquet").read_bytes()
    again = explain_stage(run, ExplainConfig(methods=["hirescam", "saliency"], overlay=0))
    assert again.extra["effects"]["n_new"] == 0
    assert (run.path / "maps" / "effects.parquet").read_bytes() == before
    # the random-model control, embedded and explained like any model, measured too
    from gestalt_xai.models.embed import EmbedConfig, embed_stage

    trained = run.models()[0]
    control = {"path": str(trained.path), "id": "random_init", "randomise": True}
    embed_stage(run, EmbedConfig(models=[{"path": str(trained.path)}, control], tta=False, threads=2))
    explain_stage(run, ExplainConfig(methods=["hirescam", "saliency"], overlay=0, models=[control]),
                  instance="explain#2")
    effects = load_effects(run)
    assert set(effects["model_id"]) == {trained.model_id, "random_init"}
    # the assess side reads the maps against the region and change masks and the effects; a lost crop is an error
    lost = cf.iloc[0]
    Path(lost["crop_path"]).unlink()
    errors: list = []
    t0 = time.perf_counter()
    store = run.map_store()
    tables, lines = localisation_tables(run, store, store.index(), errors=errors)
    local_seconds = time.perf_counter() - t0
    assert any(e.item_id == lost["image_id"] and e.key.get("variant") == lost["variant"] for e in errors)
    loc = tables["localisation"]
    assert set(loc["method"]) == {"hirescam", "saliency"} and (loc["area_share"] > 0).all()
    assert set(loc["mask_kind"]) == {"region", "change"} and (loc["target_group"] == "centroid:own").all()
    assert set(loc.loc[loc["mask_kind"] == "change", "image_id"]) <= set(cf["image_id"])
    assert set(loc["model_id"]) == {trained.model_id, "random_init"}
    # a change mask lies inside its feature's region mask: never the larger of the two
    px = loc.pivot_table(index=["image_id", "model_id", "method", "feature"], columns="mask_kind", values="mask_px")
    assert (px.dropna()["change"] <= px.dropna()["region"]).all() and len(px.dropna())
    assert len(tables["localisation_patients"]) and set(tables["localisation_patients"]["mask_kind"]) <= {"region",
                                                                                                        "change"}
    summary = tables["localisation_summary"]
    assert summary.groupby("model_id")["random_control"].first().to_dict() == {trained.model_id: False,
                                                                                "random_init": True}
    lines = [line for line in lines if line.startswith("assess: localisation")]
    assert lines and all("beside it the random control random_init" in line for line in lines)
    print(f"effects pass {seconds:.2f} s, localisation {local_seconds:.2f} s, {len(effects)} effect rows, "
          f"{len(loc)} localisation rows")


@pytest.fixture(scope="module")
def confounded_run(tmp_path_factory):
    """A small synthetic cohort with the cheek mark on S01, counterfactuals of its test photos and the mark variants of
    its train photos (``mark_sets``), aligned with
    true landmarks, and an untrained model (the effects are measured through any model) with its embeddings."""
    from conftest import _truth_landmark_table

    from gestalt_xai.data.synthetic.cohort import SynthConfig, synth_stage
    from gestalt_xai.faces.stage import AlignConfig, align_stage
    from gestalt_xai.models.checkpoints import save_model
    from gestalt_xai.models.embed import EmbedConfig, embed_stage
    from gestalt_xai.runs import Run

    run = Run(tmp_path_factory.mktemp("confounded") / "run")
    synth_stage(run, SynthConfig(seed=1, n_syndromes=3, n_frequent=2, frequent_subjects=(8, 9), n_controls=6,
                                 images_per_subject=(1, 2), workers=1, confounder={"syndrome": "S01", "rate": 0.8},
                                 counterfactuals={"sets": ["test"], "mark_sets": ["train"]}))
    table = _truth_landmark_table(run.path, run.path / "face_coords.csv")
    align_stage(run, AlignConfig(cohort=str(run.path / "cohort"), landmarks=str(table)))
    torch.manual_seed(3)
    save_model(randomise_model(build_gestaltmatcher("r18", width=0.125), 3), run.path / "models" / "m.safetensors")
    embed_stage(run, EmbedConfig(tta=False, threads=2))
    return run


def test_mark_effect_on_the_confounded_syndrome_per_set(confounded_run, tmp_path):
    from gestalt_xai.assess.localisation import wilson_interval
    from gestalt_xai.assess.localisation_run import localisation_tables
    from gestalt_xai.assess.planted import confounder_check
    from gestalt_xai.attribution.explain import ExplainConfig, explain_stage
    from gestalt_xai.runs import Run

    run = Run(shutil.copytree(confounded_run.path, tmp_path / "run"))
    cf = run.counterfactuals()
    explain_stage(run, ExplainConfig(methods=["saliency"], overlay=0))
    effects = load_effects(run)
    images = run.image_table().set_index("image_id")
    marks = effects[(effects["target"] == "centroid:S01") & (effects["feature"] == "mark")]
    marked = set(cf.loc[cf["variant"] == "without_mark", "image_id"])
    unmarked = set(cf.loc[cf["variant"] == "with_mark", "image_id"])
    assert marked and unmarked and set(marks["image_id"]) == marked | unmarked  # train photos too, not only explained
    # mark_sets: a training photo (in no test set) has its mark variant only, a test photo every variant
    in_sets = images["sets"].str.split(",")
    train_only = {i for i in cf["image_id"] if "train" in in_sets[i] and not any("test" in s for s in in_sets[i])}
    test_photos = set(cf["image_id"]) - train_only
    assert train_only and cf.loc[cf["image_id"].isin(train_only), "feature"].eq("mark").all()
    assert cf.loc[cf["image_id"].isin(test_photos), "feature"].ne("mark").any()
    assert (marks.loc[marks["change"] == "remove", "image_id"].map(images["syndrome_id"]) == "S01").all()
    store = run.map_store()
    local, _ = localisation_tables(run, store, store.index())
    checks, lines = confounder_check(run, local["localisation"])
    table = checks["mark_effects"]
    removal = marks[(marks["change"] == "remove")
                    & marks["image_id"].map(images["sets"]).str.split(",").map(lambda s: "train" in s)]
    row = table[(table["set"] == "train") & (table["change"] == "remove")].iloc[0]
    assert (row["n"], row["n_expected"]) == (len(removal), int((removal["delta"] > 0).sum()))
    assert row["mean_delta"] == pytest.approx(removal["delta"].mean())
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(row["n_expected"], row["n"]))
    assert any(line.startswith("assess: Clever Hans (m, train set)") for line in lines)
    print("\n".join(lines))
    # the mark's own localisation rows: marked S01 photos only, against its region and its change mask
    loc = local["localisation"]
    on_mark = loc[loc["feature"] == "mark"]
    assert len(on_mark) and set(on_mark["image_id"]) <= marked and (on_mark["syndrome_id"] == "S01").all()
    assert set(on_mark["mask_kind"]) == {"region", "change"} and (on_mark["variant"] == "without_mark").all()
    # the confounder table: the mark's mass per mask kind (no SpRAy without the aggregate stage)
    conf = checks["confounder"].set_index("method").loc["saliency"]
    assert conf["n_mark_change"] == (on_mark["mask_kind"] == "change").sum()
    assert conf["mark_rma_region"] == pytest.approx(on_mark.loc[on_mark["mask_kind"] == "region", "rma"].mean())
    assert any(line.startswith("assess: confounder saliency (m, centroid:own) on S01") and "no SpRAy" in line
               for line in lines)
