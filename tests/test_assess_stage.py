"""The assess stage end to end on the session's trained run: maps explained by the explain stage are scored again
through their rebuilt ScoreModels, every family writes its table, the summary ranks the methods beside the random
map, an interrupted run resumes from its parts, and wrong options fail before any work."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from gestalt_xai.assess.scoring import explained_batches
from gestalt_xai.assess.stage import AssessConfig, assess_stage, select_patients
from gestalt_xai.attribution.explain import explain_stage
from gestalt_xai.errors import ConfigError
from gestalt_xai.models.gestaltmatcher import preprocess
from gestalt_xai.runs import Run

OPTIONS = {"max_patients": 4, "faithfulness": {"steps": 4, "curves": ["deletion", "insertion", "morf"]},
           "randomisation": {"max_patients": 2, "methods": ["gradcam", "saliency"]},
           "robustness": {"max_patients": 2, "draws": 1, "methods": ["saliency"]}, "figures": False}


@pytest.fixture(scope="module")
def explained(trained_run, tmp_path_factory) -> Run:
    run = Run(shutil.copytree(trained_run.path, tmp_path_factory.mktemp("assess") / "run"))
    explain_stage(run, {"methods": ["gradcam", "saliency", "input_x_gradient"], "images": "test", "overlay": 0,
                        "threads": 2})
    return run


def test_rebuilt_score_models_explain_the_stored_scalar(explained: Run) -> None:
    store = explained.map_store()
    errors: list = []
    n = 0
    for batch in explained_batches(explained, store, store.index(), errors, batch_size=4):
        with torch.no_grad():
            scores = batch.score_model(preprocess(batch.crops, channel_order="RGB")).double().numpy()
        np.testing.assert_allclose(scores, batch.stored_scores, atol=1e-5)
        assert set(batch.maps) == {"gradcam", "saliency", "input_x_gradient"}
        assert all(m.shape == (len(batch.image_ids), 112, 112) for m in batch.maps.values())
        n += len(batch.image_ids)
    assert not errors and n == store.index()[["image_id", "target"]].drop_duplicates().shape[0]


def test_assess_writes_every_family_and_ranks_beside_the_random_map(explained: Run) -> None:
    result = assess_stage(explained, OPTIONS)
    out = explained.path / "assess"
    assert result.errors == 0
    curves = pd.read_parquet(out / "faithfulness_curves.parquet")
    assert set(curves["curve"]) == {"deletion", "insertion", "morf"}
    assert "random" in set(curves["method"])
    # deletion starts from the explained score of the unperturbed image, insertion ends there
    areas = pd.read_parquet(out / "faithfulness.parquet")
    assert areas["image_id"].nunique() == 4 and set(areas["method"]) >= {"gradcam", "saliency", "random"}
    rnd = pd.read_parquet(out / "randomisation.parquet")
    assert rnd["image_id"].nunique() == 2 and set(rnd["method"]) == {"gradcam", "saliency"}
    original = rnd[rnd["step"] == 0]
    assert (original["spearman"] > 0.999).all()  # step 0 recomputes the stored map
    jitter = pd.read_parquet(out / "robustness.parquet")
    assert set(jitter["method"]) == {"saliency"} and (jitter.loc[jitter["draw"] == 0, "spearman"] > 0.99).all()
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert {"deletion_auc", "insertion_auc", "morf_aopc", "cascading_spearman", "jitter_spearman"} <= set(
        metrics["metric"])
    summary = (out / "summary.md").read_text()
    for method in ("gradcam", "saliency", "input_x_gradient"):
        assert f"| {method} |" in summary
    assert "random" in summary and "no jitter" in summary
    strata = pd.read_parquet(out / "strata.parquet")
    assert "all" in set(strata["stratum"])


def test_an_interrupted_assessment_resumes_from_its_parts(explained: Run, tmp_path) -> None:
    run = Run(shutil.copytree(explained.path, tmp_path / "run"))
    first = assess_stage(run, OPTIONS)
    before = (run.path / "assess" / "faithfulness.parquet").read_bytes()
    again = assess_stage(run, OPTIONS)
    assert again.extra["results"]["reused_batches"] > 0
    assert again.extra["results"]["seconds"] == {}  # nothing recomputed
    assert (run.path / "assess" / "faithfulness.parquet").read_bytes() == before
    assert first.extra["results"]["batches"] == again.extra["results"]["batches"]
    # other options: the parts are recomputed, not reused
    changed = assess_stage(run, {**OPTIONS, "faithfulness": {**OPTIONS["faithfulness"], "steps": 2}})
    assert changed.extra["results"]["reused_batches"] == 0


def test_patients_cover_the_syndromes(explained: Run) -> None:
    images = explained.image_table()
    index = explained.map_store().index()
    chosen = select_patients(images, index, AssessConfig(max_patients=3))
    syndromes = images.set_index("image_id").loc[chosen, "syndrome_id"]
    assert len(chosen) == 3 and syndromes.nunique() == 3


@pytest.mark.parametrize("options, field", [({"faithfulness": {"steps": 1}}, "faithfulness.steps"),
                                            ({"faithfulness": {"curves": ["sideways"]}}, "faithfulness.curves"),
                                            ({"robustness": {"draws": 0}}, "robustness.draws")])
def test_wrong_options_name_the_field(explained: Run, options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        assess_stage(explained, options)


def test_data_randomisation_compares_with_the_permuted_label_model(explained: Run, tmp_path) -> None:
    from gestalt_xai.models.train import demo_train_config, train_stage

    run = Run(shutil.copytree(explained.path, tmp_path / "run"))
    trained = train_stage(run, demo_train_config(epochs=1, threads=2, permute_labels=0), instance="train-permuted")
    path = run.relative(trained.outputs["model"]) if "model" in trained.outputs else None
    assert path is not None and "controls/permuted_labels" in str(path)
    options = {**OPTIONS, "faithfulness": {"enabled": False}, "robustness": {"enabled": False},
               "randomisation": {**OPTIONS["randomisation"], "permuted_model": str(path)}}
    assess_stage(run, options)
    table = pd.read_parquet(run.path / "assess" / "randomisation.parquet")
    data = table[table["mode"] == "data"]
    assert set(data["references"]) == {"permuted model"} and data["image_id"].nunique() == 2
    assert (data["spearman"] < 0.95).all()  # another model's map, not the stored one
    summary = (run.path / "assess" / "summary.md").read_text()
    assert "permuted-label model" in summary
    with pytest.raises(ConfigError, match="permuted_model"):
        assess_stage(run, {**options, "randomisation": {"permuted_model": "controls/none.safetensors"}})
