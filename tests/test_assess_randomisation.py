"""Sanity checks (Adebayo et al., NeurIPS 2018): layer groups, randomised copies, the model- and data-randomisation
engines on the shared trained model (``trained_run``), and the cross-check against Quantus 0.6's MPRT."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from model_helpers import randomise_model
from torch import nn

from gestalt_xai.assess.randomisation import (
    COLUMNS,
    control_setup,
    data_randomisation_maps,
    layer_groups,
    layout_similarity,
    randomisation_drops,
    randomisation_maps,
    randomisation_summary,
    randomised_models,
)
from gestalt_xai.errors import ConfigError

LAYER = "backbone.layer4"
DECORRELATED = ("gradcam", "hirescam", "saliency", "integrated_gradients")
METHODS = [*DECORRELATED, "guided_backprop"]
PARAMS = {"integrated_gradients": {"steps": 4}}
N_ITEMS = 6
#: the cascading steps the engine tests run (each still randomises every group above it; the full curve is
#: measured in the report)
STEPS = ["head", "layer3", "stem"]


def test_groups_cover_the_model_and_the_full_cascade_is_the_random_control():
    from gestalt_xai.models.gestaltmatcher import build_gestaltmatcher, reinitialised

    model = randomise_model(build_gestaltmatcher("r18", width=0.125, num_classes=3), seed=1)
    for q in model.parameters():
        q.requires_grad_(False)  # frozen, as the explain stage loads its models: must still be randomised
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    for granularity in ("stage", "block"):
        keys = [k for g in layer_groups(model, granularity) for k in g.keys(trained)]
        assert sorted(keys) == sorted(trained) and len(keys) == len(set(keys))  # every entry in exactly one group
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["head", "layer4", "layer3", "layer2", "layer1", "stem"]
    assert "classifier.1.weight" in groups[0].keys(trained)

    control = reinitialised(model, 3).state_dict()  # the declaration's randomise: true, randomise_seed: 3
    for mode in ("cascading", "independent"):
        steps = list(randomised_models([model], mode=mode, seed=3))
        assert [name for name, _ in steps] == [g.name for g in groups]
        for i, (_, (copy,)) in enumerate(steps):
            chosen = {k for g in (groups[: i + 1] if mode == "cascading" else [groups[i]]) for k in g.keys(trained)}
            state = copy.state_dict()
            for k in trained:  # the step's groups hold the fresh initialisation, the rest the trained weights
                assert torch.equal(state[k], control[k] if k in chosen else trained[k]), (mode, i, k)
            assert not copy.training and not any(q.requires_grad for q in copy.parameters())
        if mode == "cascading":
            last = steps[-1][1][0]
            assert torch.equal(last.backbone.layer2[0].bn1.running_var, torch.ones_like(trained[
                "backbone.layer2.0.bn1.running_var"]))  # BN statistics reset with their layer
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # the input is never modified
    (_, (a,)), (_, (b,)) = next(randomised_models([model], seed=3)), next(randomised_models([model], seed=4))
    assert not torch.equal(a.classifier[1].weight, b.classifier[1].weight)
    assert [n for n, _ in randomised_models([model], groups=["stem", "head"])] == ["head", "stem"]
    with pytest.raises(ConfigError, match="unknown layer groups"):
        next(randomised_models([model], groups=["layer9"]))
    with pytest.raises(ConfigError, match="mode"):
        next(randomised_models([model], mode="bottom_up"))  # type: ignore[arg-type]
    # an ensemble: every member randomised in the same step, each from its own fresh initialisation
    other = build_gestaltmatcher("r18", width=0.125, fused=True).eval()  # BN-folded, no classifier
    name, (c1, c2) = next(randomised_models([model, other], mode="independent", groups=["stem"]))
    assert torch.equal(c2.backbone.conv1.weight, reinitialised(other, 0).backbone.conv1.weight)
    assert torch.equal(c1.backbone.conv1.weight, reinitialised(model, 0).backbone.conv1.weight)
    with pytest.raises(ConfigError, match="different layer groups"):
        next(randomised_models([model, nn.Sequential(nn.Linear(2, 2))]))

    # any other module: parameterised children in reverse order, reset_parameters() under the seed; global RNG kept
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 8, 8))
    assert [g.name for g in layer_groups(net)] == ["4", "1", "0"]
    rng = torch.get_rng_state()
    first = [c[0].state_dict() for _, c in randomised_models([net], seed=5)]
    again = [c[0].state_dict() for _, c in randomised_models([net], seed=5)]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(x[k], y[k]) for x, y in zip(first, again, strict=True) for k in x)
    assert not torch.equal(first[0]["4.weight"], net.state_dict()["4.weight"])
    assert torch.equal(first[0]["0.weight"], net.state_dict()["0.weight"])


@pytest.fixture(scope="module")
def explained(trained_run):
    """The first test items of the shared trained model with their centroid targets, crops and maps."""
    from gestalt_xai.attribution.base import build_methods
    from gestalt_xai.attribution.explain import ExplainConfig
    from gestalt_xai.attribution.planning import ExplainSetup, build_targets
    from gestalt_xai.attribution.score_model import ScoreModel
    from gestalt_xai.models.gestaltmatcher import preprocess

    cfg = ExplainConfig(methods=METHODS, method_params=PARAMS, images="test", threads=2)
    setup = ExplainSetup.build(trained_run, cfg)
    plan = next(setup.plans([]))
    items = plan.items[:N_ITEMS]
    score_model = ScoreModel(plan.group, build_targets(items, plan.group, setup.slots, setup.kind), setup.slots)
    crops = trained_run.crops([it.image_id for it in items])
    x = preprocess(crops)
    maps = {}
    for inst, names in build_methods(METHODS, PARAMS):
        maps |= {mm.method: mm.maps.numpy() for mm in inst.attribute(score_model, x, names, [LAYER])}
    return setup, plan, items, score_model, crops, maps


def test_cascading_randomisation_decorrelates_maps_and_guided_backprop_survives(explained):
    _, _, items, score_model, crops, maps = explained
    table = randomisation_maps(score_model, crops, maps, methods=METHODS, method_params=PARAMS, seed=0,
                               groups=STEPS)
    assert list(table.columns) == COLUMNS and (table["references"] == "trained model").all()
    assert len(table) == N_ITEMS * len(METHODS) * 4 and sorted(set(table["step"])) == [0, 1, 3, 6]
    summary = randomisation_summary(table)
    rho = summary.pivot_table(index="step", columns="method", values="spearman")
    print("mean Spearman per cascading step:\n", rho.round(3).to_string())  # the numbers behind the assertions
    print("layout similarity:\n", layout_similarity(maps).round(3).to_string())
    assert (rho.loc[0] > 0.999).all()  # step 0: the trained model recomputes the stored maps
    last = rho.loc[rho.index.max()]
    # by the stem the maps keep less than half their rank structure: below 0.5 and below the similarity of the
    # trained maps of *different* faces (aligned crops share a layout: layout_similarity, 0.3-0.6 here)
    layout = layout_similarity(maps).set_index("method")["spearman"]
    for m in DECORRELATED:
        assert last[m] < min(0.5, layout[m] + 0.1), (m, last[m], layout[m])
        assert rho[m].iloc[1:].max() < 0.9, m  # randomising the head alone already changes the map
    # Adebayo et al.'s finding: guided backprop barely depends on the upper layers and stays the most similar map
    assert rho.loc[1, "guided_backprop"] > 0.8
    assert last["guided_backprop"] > 0.4 and last["guided_backprop"] > last[list(DECORRELATED)].max() + 0.1
    drops = randomisation_drops(table).set_index("method")
    assert (drops["last_group"] == "stem").all()
    assert drops.loc["guided_backprop", "drop"] < drops.loc[list(DECORRELATED), "drop"].min()
    # the explained scalar changes: the randomised model scores the same centroid target differently
    scores = table[table["method"] == "saliency"].pivot_table(index="item", columns="step", values="score")
    with torch.no_grad():
        np.testing.assert_allclose(scores[0], score_model(torch.as_tensor(_x(crops))).numpy(), atol=1e-5)
    assert (scores[6] - scores[0]).abs().min() > 1e-3


def _x(crops: np.ndarray) -> torch.Tensor:
    from gestalt_xai.models.gestaltmatcher import preprocess

    return preprocess(crops)


def test_independent_head_randomisation_changes_head_sensitive_maps(explained):
    _, _, _, score_model, crops, maps = explained
    names = ["gradcam", "hirescam", "saliency"]
    table = randomisation_maps(score_model, crops, maps, methods=names, mode="independent", groups=["head"],
                               check_original=False, batch_size=4)
    assert set(table["step"]) == {1} and set(table["group"]) == {"head"} and set(table["mode"]) == {"independent"}
    rho = table.groupby("method")["spearman"].mean()
    print("independent head randomisation, mean Spearman:", rho.round(3).to_dict())
    assert (rho < 0.8).all(), rho


def test_quantus_mprt_agrees_on_the_same_randomised_copies(explained, monkeypatch):
    """Quantus 0.6 MPRT fed our randomised copies (its layer generator patched to yield them), softmax=False, an
    explain_func returning our maps: the same Spearman per item and step, raw (abs=False) and of |map| (abs=True)."""
    quantus = pytest.importorskip("quantus")
    from quantus.helpers.model.pytorch_model import PyTorchModel

    from gestalt_xai.attribution.base import get_method

    _, _, _, trained, crops, maps = explained
    rows, groups = [0, 1, 2], ["head", "stem"]
    score_model, crops, stored = trained.select(rows), crops[rows], maps["gradcam"][rows]
    ours = randomisation_maps(score_model, crops, {"gradcam": stored}, methods=["gradcam"], groups=groups)
    steps = [(name, score_model.with_models(c)) for name, c in randomised_models(list(score_model.members),
                                                                                 groups=groups)]
    monkeypatch.setattr(PyTorchModel, "get_random_layer_generator", lambda self, order, seed: iter(steps))
    monkeypatch.setattr(PyTorchModel, "random_layer_generator_length", property(lambda self: len(steps)))
    method = get_method("gradcam")()

    def explain(model, inputs, targets, **kwargs):  # targets: the rows of our ScoreModel
        sub = model.select([int(t) for t in targets])
        return method.attribute(sub, torch.as_tensor(inputs), ["gradcam"], [LAYER])[0].maps.numpy()[:, None]

    x = _x(crops).numpy()
    for use_abs, column in ((False, "spearman"), (True, "spearman_abs")):
        mprt = quantus.MPRT(layer_order="top_down", abs=use_abs, normalise=True, disable_warnings=True)
        scores = mprt(model=score_model, x_batch=x, y_batch=np.arange(len(x)), a_batch=stored[:, None],
                      explain_func=explain, softmax=False, device="cpu", channel_first=True, batch_size=len(x))
        assert list(scores) == ["original", *groups]
        got = ours.pivot_table(index="group", columns="item", values=column)
        for name, values in scores.items():
            np.testing.assert_allclose(values, got.loc[name].to_numpy(), atol=1e-6, err_msg=f"{column} {name}")


def test_data_randomisation_uses_the_permuted_model_and_its_own_references(trained_run, explained, tmp_path):
    from gestalt_xai.attribution.planning import build_targets
    from gestalt_xai.attribution.score_model import ScoreModel
    from gestalt_xai.matching.centroids import CentroidBank
    from gestalt_xai.models.checkpoints import load_model
    from gestalt_xai.models.declaration import resolve_models
    from gestalt_xai.models.gestaltmatcher import encode
    from gestalt_xai.models.train import demo_train_config, train_stage
    from gestalt_xai.runs import LAYOUT, Run

    setup, plan, items, _, crops, maps = explained
    run = Run(shutil.copytree(trained_run.path, tmp_path / "run"))
    result = train_stage(run, demo_train_config(epochs=1, threads=2, permute_labels=0), instance="train-permuted")
    path = result.outputs["model"]
    assert path.parent == run.path / LAYOUT.permuted_labels and path.is_file()
    assert [m.model_id for m in run.models()] == [m.model_id for m in resolve_models(run, "run")] == [plan.group_id]
    assert run.manifest["stages"]["train-permuted"]["config"]["permute_labels"] == 0
    assert run.manifest["stages"]["train-permuted"]["control"]["n_relabelled"] > 0

    permuted = load_model(path)
    control = control_setup(run, setup, plan.group_id, permuted)
    cplan = next(control.plans([]))
    citems = [it for it in cplan.items if (it.image_id, str(it.target)) in {(i.image_id, str(i.target))
                                                                              for i in items}]
    assert [(i.image_id, str(i.target)) for i in citems] == [(i.image_id, str(i.target)) for i in items]
    # the control's centroids are its own: the gallery embedded through the permuted model, own subject left out
    gallery = list(control.gallery_ids)
    own = encode(permuted, run.crops(gallery), tta=False).embeddings[0]
    table = pd.DataFrame({"image_id": gallery, "model_id": plan.group_id, "flip": False, "gray": False,
                          "embedding": list(own)})
    bank = CentroidBank(table, control.images, gallery)
    meta = control.images.set_index("image_id")
    for it, trained_item in zip(citems, items, strict=True):
        ref = bank.reference(plan.group_id, (False, False), it.target.ref, meta.loc[it.image_id, "subject_id"])
        np.testing.assert_allclose(it.refs[(plan.group_id, (False, False))], ref, rtol=1e-5, atol=1e-6)
        assert not np.allclose(ref, trained_item.refs[(plan.group_id, (False, False))])

    score_model = ScoreModel(cplan.group, build_targets(citems, cplan.group, control.slots, control.kind),
                             control.slots)
    assert score_model.members[0] is permuted
    names = ["gradcam", "hirescam", "saliency"]
    frame = data_randomisation_maps(score_model, crops, {m: maps[m] for m in names}, methods=names)
    assert list(frame.columns) == COLUMNS and len(frame) == len(names) * N_ITEMS
    assert set(frame["mode"]) == {"data"} and set(frame["references"]) == {"permuted model"}
    rho = frame.groupby("method")["spearman"].mean()
    print("data randomisation (1 epoch on permuted labels), mean Spearman:", rho.round(3).to_dict())
    assert (rho < 0.9).all(), rho
