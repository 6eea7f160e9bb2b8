"""Contract tests parametrised over the registries: every registered attribution method and target kind (built in or
added later) is run here with no test edit. A throwaway method and target kind, registered by a test, pass config
validation and run through the explain stage into the map store with no other edit."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from attribution_helpers import explain_maps, make_tiny_run
from model_helpers import randomise_model
from pydantic import Field
from torch import nn

from gestalt_xai.attribution import (
    AttributionMethod,
    MethodMaps,
    MethodParams,
    ScoreModel,
    Target,
    TargetKey,
    TargetKind,
    WorkItem,
    available_methods,
    available_target_kinds,
    build_methods,
    get_method,
    get_target_kind,
    register_method,
    register_target_kind,
    split_targets,
    target_group,
)
from gestalt_xai.attribution.base import METHODS
from gestalt_xai.attribution.explain import ExplainConfig
from gestalt_xai.attribution.gradients import DEFAULT_LAYER
from gestalt_xai.attribution.target_kinds import TARGET_KINDS
from gestalt_xai.attribution.targets import CentroidTarget
from gestalt_xai.config import validate_config
from gestalt_xai.errors import ConfigError
from gestalt_xai.models import build_gestaltmatcher
from gestalt_xai.runs import Run

METHOD_NAMES = available_methods()
KIND_NAMES = available_target_kinds()
#: (method, parameter) for every declared parameter of every registered method
PARAMS = [(name, key) for name in METHOD_NAMES for key in get_method(name).Params.model_fields]
#: one entry per class that serves several method names
SHARED = list({get_method(n): tuple(n2 for n2 in METHOD_NAMES if get_method(n2) is get_method(n))
               for n in METHOD_NAMES}.values())
FAST = {"batch_size": 2, "overlay": 0, "images": ["A00", "B00"]}


def _examples(name: str) -> dict[str, object]:
    return {k: f.examples[0] for k, f in get_method(name).Params.model_fields.items()}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return randomise_model(build_gestaltmatcher("r18", width=0.125, num_classes=3, syndrome_ids=["A", "B", "C"]))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Run:
    return make_tiny_run(tmp_path_factory.mktemp("contract") / "run")


def _copy(run: Run, tmp_path) -> Run:
    shutil.copytree(run.path, tmp_path / "run")
    return Run(tmp_path / "run")


# ------------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_maps_are_112_finite_and_deterministic(name, model, x):
    """At the example parameters (the defaults of the costliest methods take seconds more, to the same code)."""
    cls = get_method(name)
    sm = ScoreModel([("m", model)], CentroidTarget(torch.randn(2, 512, generator=torch.Generator().manual_seed(2))))
    runs = [cls(**_examples(name)).attribute(sm, x, [name], [DEFAULT_LAYER]) for _ in range(2)]  # fresh instances
    first, second = runs
    layers = [DEFAULT_LAYER] if name in cls.layer_methods else [""]
    assert [(mm.method, mm.layer) for mm in first] == [(name, layer) for layer in layers]
    for a, b in zip(first, second, strict=True):
        assert a.maps.shape == (2, 112, 112) and a.maps.dtype == torch.float32
        assert torch.isfinite(a.maps).all() and a.maps.abs().amax((1, 2)).min() > 0  # each image has a map
        assert torch.equal(a.maps, b.maps)


@pytest.mark.parametrize(("name", "key"), PARAMS)
def test_every_declared_parameter_is_documented_and_accepted(name, key):
    field = get_method(name).Params.model_fields[key]
    assert field.description and field.examples and field.examples[0] != field.default, (
        f"{name}.{key} must declare a description and an example value other than its default")
    for value in (field.default, field.examples[0]):
        cfg = validate_config(ExplainConfig, {"methods": [name], "method_params": {name: {key: value}}})
        [(inst, names)] = build_methods(cfg.methods, cfg.all_method_params())
        assert names == [name] and inst.params[key] == value


@pytest.mark.parametrize(("name", "key"), PARAMS)
def test_a_wrong_type_is_refused_naming_method_and_key(name, key):
    with pytest.raises(ConfigError, match=rf"{name}\.{key}: .*\(got \[1, 2\]\)"):
        validate_config(ExplainConfig, {"methods": [name], "method_params": {name: {key: [1, 2]}}})


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_an_unknown_parameter_is_refused_naming_method_and_key(name):
    without = f"{name} takes no parameters" if not get_method(name).Params.model_fields else "its parameters: "
    with pytest.raises(ConfigError, match=rf"{name} has no parameter 'bogus' \({without}"):
        validate_config(ExplainConfig, {"methods": [name], "method_params": {name: {"bogus": 1}}})


@pytest.mark.parametrize("names", [n for n in SHARED if len(n) > 1], ids="+".join)
def test_names_served_by_one_class_refuse_conflicting_values(names):
    fields = get_method(names[0]).Params.model_fields
    for key, f in fields.items():
        given = {names[0]: {key: f.default}, names[1]: {key: f.examples[0]}}
        with pytest.raises(ConfigError, match=rf"{names[0]}\.{key} = .* and {names[1]}\.{key} = .* conflict"):
            validate_config(ExplainConfig, {"methods": list(names), "method_params": given})
        # the same value twice is no conflict
        same = {n: {key: f.examples[0]} for n in names}
        cfg = validate_config(ExplainConfig, {"methods": list(names), "method_params": same})
        assert build_methods(cfg.methods, cfg.all_method_params())[0][0].params[key] == f.examples[0]


def test_occlusion_options_feed_the_declared_parameters():
    def params(**opts):
        cfg = validate_config(ExplainConfig, {"methods": ["occlusion"], **opts})
        return build_methods(cfg.methods, cfg.all_method_params())[0][0].params

    assert params()["patch"] == 10 and params(occlusion_patch=14)["patch"] == 14
    assert params(occlusion_baseline="blur", method_params={"occlusion": {"stride": 7}})["baseline"] == "blur"
    # a shorthand left at the default defers (a config written out and read back stays valid)
    assert params(occlusion_patch=10, method_params={"occlusion": {"patch": 14}})["patch"] == 14
    with pytest.raises(ConfigError, match=r"occlusion_patch = 12 and method_params.occlusion.patch = 14 conflict"):
        params(occlusion_patch=12, method_params={"occlusion": {"patch": 14}})


@pytest.fixture(scope="module")
def all_methods_store(tiny_run, tmp_path_factory):
    """Every registered method with every declared parameter at its example value, in one explain run."""
    run = _copy(tiny_run, tmp_path_factory.mktemp("all_methods"))
    cfg = ExplainConfig(methods=METHOD_NAMES, method_params={n: _examples(n) for n in METHOD_NAMES}, **FAST)
    return explain_maps(run, cfg), run


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_provenance_is_recorded_in_the_store(name, all_methods_store):
    store, run = all_methods_store
    assert run.errors().query("stage == 'explain'").empty
    rows = store.index(method=name)
    layers = [DEFAULT_LAYER] if name in get_method(name).layer_methods else [""]
    assert sorted(zip(rows["image_id"], rows["layer"], strict=True)) == sorted(
        (i, layer) for i in FAST["images"] for layer in layers)
    for raw in rows["method_params"]:
        recorded = json.loads(raw)
        assert {k: recorded.get(k) for k in _examples(name)} == _examples(name)
    assert np.isfinite(store.load_many(rows)).all()


# ------------------------------------------------------------------------------------------------ target kinds
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_target_kind_gives_a_scalar_per_image_and_gradients(kind, tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    cls = get_target_kind(kind)
    cfg = validate_config(ExplainConfig, {"methods": ["saliency", "hirescam"], "target": kind,
                                          **cls.example_options, **FAST})
    store = explain_maps(run, cfg)
    idx = store.index()
    assert run.errors().query("stage == 'explain'").empty
    assert set(FAST["images"]) <= set(idx["image_id"])
    assert all(TargetKey.parse(t).kind == kind for t in idx["target"]) and set(idx["target_kind"]) == {kind}
    # one explained value per (image, target), whatever the method; finite
    values = idx.groupby(["image_id", "target"])["target_value"]
    assert (values.nunique() == 1).all() and np.isfinite(idx["target_value"]).all()
    # the gradient of that value reaches every image (saliency = max_c |ds/dx|)
    saliency = store.load_many(idx[idx["method"] == "saliency"])
    assert (saliency.reshape(len(saliency), -1).max(1) > 0).all()
    assert issubclass(cls.target_class, Target)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_target_keys_format_and_parse_back(kind):
    for ref in ("S01", "img:7", "ü"):
        key = TargetKey(kind, ref)
        assert TargetKey.parse(str(key)) == key and str(key) == f"{kind}:{ref}"
    assert split_targets([str(TargetKey(kind, "r"))]).values.tolist() == [[kind, "r"]]


def test_topk_uses_the_match_stage_ranking(tiny_run, tmp_path):
    """``syndromes: topk:K`` ranks as gestalt_xai.matching does (its syndrome_ranks, computed here independently)."""
    from gestalt_xai.matching import EmbeddingTable, slotwise_distances, syndrome_ranks

    run = _copy(tiny_run, tmp_path)
    idx = explain_maps(run, ExplainConfig(methods=["saliency"], syndromes="topk:3", **FAST)).index()
    table = EmbeddingTable.from_frame(run.embeddings())
    gallery = [f"{s}1{i}" for s in "ABC" for i in (0, 1)]  # the train images (other subjects)
    for image_id in FAST["images"]:
        d = slotwise_distances([table.matrix(("clf", False, False), [image_id])],
                               [table.matrix(("clf", False, False), gallery)])
        mine = idx[idx["image_id"] == image_id]
        for target, detail in zip(mine["target"], mine["target_detail"], strict=True):
            syndrome = TargetKey.parse(target).ref
            expected = syndrome_ranks(d, [g[0] for g in gallery], [syndrome])[0]
            assert json.loads(detail)["rank"] == expected


def test_target_groups_dispatch_through_the_registry():
    syndrome_of = {"g1": "S01", "g2": "S02"}
    assert [target_group(t, "S01", syndrome_of) for t in ("centroid:S01", "logit:S02", "pair:g1", "pair:g2",
                                                           "pair:g3", "other:S01")] == [
        "centroid:own", "logit:S02", "pair:same-syndrome", "pair:other-syndrome", "pair:unknown", "other:own"]


# ------------------------------------------------------------------------------------------------ throwaways
class _MeanEmbedding(Target):
    """The mean embedding value."""

    kind = "embedding_mean"

    def __call__(self, logits: torch.Tensor | None, embedding: torch.Tensor) -> torch.Tensor:
        return embedding.mean(1)

    def output_relevance(self, logits, embedding):  # type: ignore[no-untyped-def]
        return None, embedding.detach() / embedding.shape[1]


class _EmbeddingMeanKind(TargetKind):
    target_class = _MeanEmbedding

    def plan(self, ctx, image_id):  # type: ignore[no-untyped-def]
        return [WorkItem(image_id, TargetKey(self.name, "all"),
                         refs={(mid, slot): 0 for mid in ctx.model_ids for slot in ctx.slots})]

    def build_target(self, refs: Sequence[object]) -> Target:
        return _MeanEmbedding()


class _GradientSum(AttributionMethod):
    names = ("gradient_sum",)

    class Params(MethodParams):
        scale: float = Field(1.0, gt=0, description="multiplies the map", examples=[2.0])

    def attribute(self, score_model, x, methods, layers):  # type: ignore[no-untyped-def]
        xi = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(score_model(xi).sum(), xi)
        return [MethodMaps("gradient_sum", "", self.params["scale"] * g.sum(1), {"reduce": "sum over channels"})]


@pytest.fixture
def throwaways():
    register_method()(_GradientSum)
    register_target_kind("embedding_mean")(_EmbeddingMeanKind)
    yield
    METHODS.remove("gradient_sum")
    TARGET_KINDS.remove("embedding_mean")


def test_a_registered_method_and_target_kind_run_with_no_other_edit(request, tiny_run, tmp_path):
    from gestalt_xai.data.aligned import load_crops
    from gestalt_xai.models.checkpoints import load_model
    from gestalt_xai.models.gestaltmatcher import preprocess

    opts = {"methods": ["gradient_sum", "saliency"], "target": "embedding_mean",
            "method_params": {"gradient_sum": {"scale": 2.0}}, **FAST}
    with pytest.raises(ConfigError, match="unknown target kind 'embedding_mean'"):
        validate_config(ExplainConfig, opts)
    with pytest.raises(ConfigError, match="unknown attribution method 'gradient_sum'"):
        validate_config(ExplainConfig, {**opts, "target": "centroid"})
    request.getfixturevalue("throwaways")
    cfg = validate_config(ExplainConfig, opts)
    # the command line lists them and `study check` accepts them, with no other edit
    from typer.testing import CliRunner

    from gestalt_xai.cli import build_app

    shown = CliRunner().invoke(build_app(), ["explain", "--help"], env={"COLUMNS": "250"}).output
    assert "gradient_sum" in shown and "embedding_mean" in shown
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: t\nstages:\n  - explain: {methods: [gradient_sum], target: embedding_mean,\n"
                        "                method_params: {gradient_sum: {scale: 3.0}}}\n")
    checked = CliRunner().invoke(build_app(), ["study", "check", str(pipeline)])
    assert checked.exit_code == 0 and "explain" in checked.output
    with pytest.raises(ConfigError, match=r"gradient_sum\.scale"):
        validate_config(ExplainConfig, {**opts, "method_params": {"gradient_sum": {"scale": "big"}}})

    run = _copy(tiny_run, tmp_path)
    store = explain_maps(run, cfg)
    idx = store.index()
    assert sorted(zip(idx["image_id"], idx["method"], strict=True)) == sorted(
        (i, m) for i in FAST["images"] for m in ("gradient_sum", "saliency"))
    assert set(idx["target"]) == {"embedding_mean:all"} and set(idx["target_kind"]) == {"embedding_mean"}
    params = json.loads(idx[idx["method"] == "gradient_sum"]["method_params"].iloc[0])
    assert params == {"scale": 2.0, "reduce": "sum over channels"}
    # the explained value is the kind's target: the mean embedding value of each image
    net = load_model(run.path / "models" / "clf.safetensors").eval()
    with torch.no_grad():
        _, emb = net(preprocess(load_crops(run, FAST["images"])))
    got = idx[idx["method"] == "saliency"].set_index("image_id")["target_value"]
    np.testing.assert_allclose(got.loc[FAST["images"]].to_numpy(), emb.mean(1).double().numpy(), rtol=1e-5)
