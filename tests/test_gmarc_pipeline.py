"""GM-Arc checkpoints through every stage: one pipeline file whose top-level ``models:`` declares GM-Arc's ensemble
(an onnx2torch ``.pt``, a whole-module ``.pth`` pickle, both with GM-Arc lookup tables, and the ``.onnx`` backbone)
runs embed → match → explain → aggregate with no gestalt-xai checkpoint in the run, and gives the maps of the same
weights loaded natively (``run/models/*.safetensors``) in a second run.

The GM-Arc files are written as GM-Arc's tools make them (the checkpoint format registry's ``write_example``: ONNX
export, the real ``onnx2torch``, GM-Arc's ``MyArcFace`` wrapper), as in ``tests/test_checkpoints.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from attribution_helpers import make_tiny_run
from model_helpers import randomise_model
from typer.testing import CliRunner

from gestalt_xai.errors import ConfigError
from gestalt_xai.runs import Run

pytest.importorskip("onnx")
pytest.importorskip("onnx2torch")

#: member id → the syndrome ids of its classifier (class index order); None = embedding only (GM-Arc's .onnx).
#: s2 knows two of the cohort's three syndromes, in another order than the cohort's lookup.
CLASSES: dict[str, list[str] | None] = {"s1": ["A", "B", "C"], "s2": ["C", "A"], "glint360k_r18": None}
METHODS = ["gradcam", "saliency"]
STAGES = [
    {"embed": {"tta": False, "threads": 1}},
    {"match": {}},
    {"explain": {"methods": METHODS, "target": "centroid", "overlay": 0, "threads": 1}},
    {"explain": {"id": "logit", "methods": METHODS, "target": "logit", "overlay": 0, "threads": 1}},
    {"aggregate": {"min_subjects": 1, "figures": False}},
]
KEYS = ["image_id", "model_id", "target", "method", "layer"]


def _members() -> dict[str, object]:
    from gestalt_xai.models.gestaltmatcher import build_gestaltmatcher

    members = {}
    for i, (mid, ids) in enumerate(CLASSES.items()):
        torch.manual_seed(10 + i)
        model = build_gestaltmatcher("r18", width=0.125, num_classes=len(ids) if ids else None, syndrome_ids=ids)
        members[mid] = randomise_model(model, seed=20 + i)  # BN statistics matter: folding them must be right
    return members


def _write_gmarc(members: dict, folder: Path) -> list[dict[str, object]]:
    """GM-Arc's files for ``members`` and the pipeline's ``models:`` declaring them."""
    from gestalt_xai.models.checkpoints import CHECKPOINT_FORMATS
    from gestalt_xai.models.checkpoints.onnx_graph import export_onnx

    declared: list[dict[str, object]] = []
    for mid, fmt in (("s1", "gm-arc-pt"), ("s2", "gm-arc-pickle")):
        (folder / mid).mkdir(parents=True)
        path = CHECKPOINT_FORMATS[fmt].write_example(members[mid], folder / mid)
        table = folder / mid / "lookup_table_gmdb_v1.1.0.txt"
        table.write_text("syndrome ids by class index\n" + json.dumps(CLASSES[mid]) + "\n")
        declared.append({"path": str(path), "id": mid, "lookup_table": str(table),
                         **({"trust_pickle": True} if fmt == "gm-arc-pickle" else {})})
    declared.append(str(export_onnx(members["glint360k_r18"].backbone, folder / "glint360k_r18.onnx")))
    return declared


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory) -> tuple[Run, Run, list]:
    """The same cohort and weights: GM-Arc files declared in the pipeline, and gestalt-xai models in run/models."""
    from gestalt_xai.models.checkpoints import save_model
    from gestalt_xai.study import run_study

    root = tmp_path_factory.mktemp("gmarc")
    members = _members()
    declared = _write_gmarc(members, root / "weights")
    gmarc, native = make_tiny_run(root / "gmarc", model=False), make_tiny_run(root / "native", model=False)
    for mid, model in members.items():
        save_model(model, native.path / "models" / mid)
    (root / "gmarc.yaml").write_text(yaml.safe_dump({"name": "gmarc", "models": declared, "stages": STAGES}))
    (root / "native.yaml").write_text(yaml.safe_dump({"name": "native", "stages": STAGES}))
    return run_study(root / "gmarc.yaml", gmarc.path), run_study(root / "native.yaml", native.path), declared


def test_gmarc_ensemble_runs_every_stage_with_the_maps_of_native_weights(twin_runs) -> None:
    gmarc, native, _ = twin_runs
    assert not list(gmarc.path.rglob("*.safetensors")), "the GM-Arc run holds no gestalt-xai checkpoint"
    assert {n: gmarc.manifest["stages"][n]["status"] for n in ("embed", "match", "explain", "logit", "aggregate")} \
        == dict.fromkeys(("embed", "match", "explain", "logit", "aggregate"), "done")
    assert {m: Path(gmarc.manifest["models"][m]["path"]).suffix for m in CLASSES} == {
        "s1": ".pt", "s2": ".pth", "glint360k_r18": ".onnx"}
    # embeddings and maps carry the declared ids; the stored model hash is the GM-Arc file's
    from gestalt_xai.models.checkpoints import model_sha256

    emb_a, emb_b = gmarc.embeddings(), native.embeddings()
    assert sorted(set(emb_a["model_id"])) == sorted(CLASSES)
    e_a, e_b = np.stack(emb_a["embedding"]), np.stack(emb_b["embedding"])
    assert (np.abs(e_a - e_b).max(1) <= 1e-5 * np.abs(e_b).max(1)).all()  # BN folded into the convs: rounding
    idx_a = gmarc.map_store().index().sort_values(KEYS).reset_index(drop=True)
    idx_b = native.map_store().index().sort_values(KEYS).reset_index(drop=True)
    assert idx_a[KEYS].equals(idx_b[KEYS]) and set(idx_a["model_id"]) == set(CLASSES)
    assert {"centroid:A", "logit:A", "logit:B", "logit:C"} <= set(idx_a["target"])
    s1_path = gmarc.resolve(gmarc.manifest["models"]["s1"]["path"])
    assert (idx_a.loc[idx_a["model_id"] == "s1", "model_hash"] == model_sha256(s1_path)).all()
    maps_a, maps_b = gmarc.map_store().load_many(idx_a), native.map_store().load_many(idx_b)
    err = np.abs(maps_a - maps_b).reshape(len(idx_a), -1).max(1)
    scale = np.abs(maps_b).reshape(len(idx_b), -1).max(1)
    assert (err <= 1e-5 * scale).all() and err.max() <= 1e-5, f"worst map differs by {err.max():.3g}"
    # the lookup table gives the class index: s2's logit:A is its class 1 (table [C, A])
    row = idx_a[(idx_a["model_id"] == "s2") & (idx_a["target"] == "logit:A") & (idx_a["image_id"] == "A00")].iloc[0]
    logits = emb_a[(emb_a["model_id"] == "s2") & (emb_a["image_id"] == "A00")]["logits"].iloc[0]
    assert row["target_value"] == pytest.approx(float(logits[1]), rel=1e-4)
    # classes a member does not have are skipped, not refused: the .onnx has no classifier, s2 has no class B
    errors = gmarc.errors()
    logit_errors = errors[errors["stage"] == "logit"]
    assert set(logit_errors["error_kind"]) == {"skipped"}
    assert logit_errors["key"].str.contains('"model_id": "glint360k_r18"').sum() == 6  # every test image
    s2 = logit_errors[logit_errors["key"].str.contains('"model_id": "s2"')]
    assert sorted(s2["item_id"]) == ["B00", "B01"] and s2["message"].str.contains("class 'B'").all()
    assert len(errors) == len(native.errors())
    # match and aggregate read the same ids
    ranks_a, ranks_b = gmarc.ranks(), native.ranks()
    assert ranks_a.drop(columns=[c for c in ranks_a if "dist" in c]).equals(
        ranks_b.drop(columns=[c for c in ranks_b if "dist" in c]))
    assert (gmarc.path / "aggregate").is_dir() and any((gmarc.path / "aggregate").iterdir())


def test_pipeline_models_are_inherited_and_checked_before_any_work(twin_runs, tmp_path) -> None:
    from gestalt_xai.cli import build_app
    from gestalt_xai.config import load_pipeline
    from gestalt_xai.models.declaration import ModelSpec
    from gestalt_xai.study import plan_study

    _, _, declared = twin_runs
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"name": "g", "models": declared, "stages": [
        {"embed": {}}, {"match": {}}, {"explain": {"models": [declared[0]]}}, {"aggregate": {}}]}))
    plan = {step.id: step.options for step in plan_study(load_pipeline(good))}
    assert [m.id or Path(m.path).stem for m in plan["embed"].models] == ["s1", "s2", "glint360k_r18"]
    assert [m.id for m in plan["explain"].models] == ["s1"]  # a stage's own models win
    assert isinstance(plan["embed"].models[1], ModelSpec) and plan["embed"].models[1].trust_pickle
    assert plan["match"].models is None and plan["aggregate"].models is None  # they select by model id
    bad = tmp_path / "bad.yaml"
    missing = [declared[0], {**declared[1], "lookup_table": str(tmp_path / "lookup_table_gmdb_v0.txt")}]
    bad.write_text(yaml.safe_dump({"name": "b", "models": missing, "stages": [{"embed": {}}]}))
    result = CliRunner().invoke(build_app(), ["study", "check", str(bad)])
    assert isinstance(result.exception, ConfigError)
    assert "models.list.1.lookup_table: Value error, no such file" in str(result.exception)
    bad.write_text(yaml.safe_dump({"name": "b", "models": [str(tmp_path / "s9.pt")], "stages": [{"embed": {}}]}))
    with pytest.raises(ConfigError, match=r"bad\.yaml\.models\.list\.0\.path: .*no such file: .*s9\.pt"):
        plan_study(load_pipeline(bad))
    # the CLI's repeatable --model flag gives the same declaration
    from gestalt_xai.cli import _option_parameters
    from gestalt_xai.stages import get_stage

    for name in ("embed", "explain"):
        _, shapes = _option_parameters(get_stage(name))
        assert shapes["models"] == ("list", ["run"]) and get_stage(name).aliases["models"] == "--model"
