"""Training: class weights, parameter groups, determinism, learning, frozen backbone, caps, rerun."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from gestalt_xai.errors import ConfigError
from gestalt_xai.models.train import (
    TrainConfig,
    class_weights,
    parameter_groups,
    select_training_data,
    train_stage,
)

CLASSES = ("S1", "S2", "S3")


def make_tiny_run(root, n_subjects=(8, 8, 8), images_per_subject=2, seed=0):
    """A run whose aligned crops carry one coloured square per class at a class-specific place (+ noise)."""
    from gestalt_xai.data.cohort import Cohort, save_run_cohort
    from gestalt_xai.data.images import save_png
    from gestalt_xai.runs import Run, write_parquet

    run = Run(root)
    rng = np.random.default_rng(seed)
    rows, split_rows = [], []
    for c, (syn, n) in enumerate(zip(CLASSES, n_subjects, strict=True)):
        for s in range(n):
            subj = f"{syn}-p{s}"
            set_name = "test" if s == 0 else ("val" if s == 1 else "train")
            for k in range(images_per_subject):
                img = f"{syn}-p{s}-{k}"
                x = rng.integers(60, 120, size=(112, 112, 3)).astype(np.uint8)
                y0, x0 = 20 + 25 * c + rng.integers(-4, 5), 30 + rng.integers(-4, 5)
                x[y0 : y0 + 24, x0 : x0 + 50] = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230]][c], np.uint8)
                save_png(run.path / "aligned" / f"{img}.png", x)
                rows.append((img, subj, syn, ""))
                split_rows += [
                    (img, set_name, -1),
                    (img, "frequent_test" if set_name == "test" else "frequent_gallery", -1),
                ]
    images = pd.DataFrame(rows, columns=["image_id", "subject_id", "syndrome_id", "path"])
    write_parquet(
        pd.DataFrame({"image_id": images["image_id"], "ok": True}), run.path / "aligned" / "alignment.parquet"
    )
    save_run_cohort(
        run,
        Cohort(
            images=images,
            syndromes=pd.DataFrame({"syndrome_id": list(CLASSES), "syndrome_name": list(CLASSES)}),
            splits=pd.DataFrame(split_rows, columns=["image_id", "set", "split"]),
        ),
    )
    return run


def tiny_config(**kw) -> TrainConfig:
    base = dict(
        model_id="tiny",
        arch="r18",
        width=0.125,
        epochs=3,
        batch_size=8,
        lr_backbone=2e-3,
        lr_embedding=2e-3,
        lr_classifier=2e-3,
        classifier_dropout=0.0,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_class_weights_land_on_the_right_classes():
    labels = ["b"] * 4 + ["c"] * 2 + ["a"]
    w = class_weights(labels, ["a", "b", "c"])
    # w_c = 0.5 * min/count_c + 0.5: a (1 image) 1.0, b (4) 0.625, c (2) 0.75
    np.testing.assert_allclose(w.numpy(), [1.0, 0.625, 0.75])
    # GM-Arc's pairing: weights in value_counts order (b, c, a) given to indices 0, 1, 2 = a, b, c
    np.testing.assert_allclose(
        class_weights(labels, ["a", "b", "c"], gmarc_weight_order=True).numpy(), [0.625, 0.75, 1.0]
    )


def test_parameter_groups_follow_gmarc_defaults():
    from gestalt_xai.models.gestaltmatcher import build_gestaltmatcher

    model = build_gestaltmatcher("r18", width=0.125, num_classes=3)
    lrs50 = TrainConfig(arch="r50").resolved_lrs()
    assert lrs50 == {
        "lr_backbone": 5e-4,
        "wd_backbone": 0.0,
        "lr_embedding": 5e-4,
        "wd_embedding": 5e-5,
        "lr_classifier": 1e-3,
        "wd_classifier": 5e-4,
    }
    lrs100 = TrainConfig(arch="r100").resolved_lrs()
    assert lrs100["lr_backbone"] == 1e-3 and lrs100["wd_embedding"] == 0.0
    groups = parameter_groups(model, lrs50)
    assert [g["name"] for g in groups] == ["backbone", "embedding", "classifier"]
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    emb = {id(p) for p in groups[1]["params"]}
    assert emb == {id(p) for p in [*model.backbone.fc.parameters(), *model.backbone.features.parameters()]}
    assert [g["name"] for g in parameter_groups(model, lrs50, freeze_backbone=True)] == [
        "embedding",
        "classifier",
    ]


def test_training_learns_is_deterministic_and_skips_rerun(tmp_path):
    from safetensors.torch import load_file

    run_a = make_tiny_run(tmp_path / "a")
    path = train_stage(run_a, tiny_config()).outputs["model"]
    hist = pd.read_parquet(run_a.path / "models" / "tiny_history.parquet")
    assert len(hist) == 3 and hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert (run_a.path / "models" / "tiny_curve.png").stat().st_size > 1000
    assert not (run_a.path / "models" / ".tiny.state.pt").exists()
    assert run_a.manifest["models"]["tiny"]["sha256"]
    import json

    info = json.loads((run_a.path / "models" / "tiny.json").read_text())
    assert info["syndrome_ids"] == list(CLASSES) and info["training"]["n_train"] == 36

    # same seed, fresh run folder → identical weights; rerun in place → not retrained
    run_b = make_tiny_run(tmp_path / "b")
    path_b = train_stage(run_b, tiny_config()).outputs["model"]
    a, b = load_file(path), load_file(path_b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mtime = path.stat().st_mtime_ns
    train_stage(run_a, tiny_config())
    assert path.stat().st_mtime_ns == mtime and run_a.manifest["stages"]["train"]["skipped"] is True
    # another seed gives other weights
    path_c = train_stage(run_b, tiny_config(seed=1, model_id="tiny_s1")).outputs["model"]
    c = load_file(path_c)
    assert not torch.equal(a["classifier.1.weight"], c["classifier.1.weight"])


def test_loss_goes_down_and_beats_chance(tmp_path):
    run = make_tiny_run(tmp_path)
    train_stage(run, tiny_config(epochs=6, augment=None, model_id="tiny6"))
    hist = pd.read_parquet(run.path / "models" / "tiny6_history.parquet")
    assert hist["train_loss"].iloc[-1] < 0.5 * hist["train_loss"].iloc[0]
    assert hist["val_top1"].iloc[-1] > 1 / 3


def test_frozen_backbone_keeps_weights_and_bn_mode(tmp_path):
    from gestalt_xai.data.cohort import load_run_cohort
    from gestalt_xai.models import train as train_mod
    from gestalt_xai.models.train import TrainData

    run = make_tiny_run(tmp_path, n_subjects=(4, 4, 4))
    cfg_fixed = tiny_config(epochs=1, freeze_backbone=True, frozen_bn="fixed")
    data = select_training_data(load_run_cohort(run), run, cfg_fixed)
    torch.manual_seed(0)
    ref = train_mod._build_model(cfg_fixed, data.classes).state_dict()
    for frozen_bn, stats_move in (("fixed", False), ("update", True)):
        cfg = cfg_fixed.model_copy(update={"frozen_bn": frozen_bn, "model_id": f"frozen_{frozen_bn}"})
        model, _ = train_mod.train_model(run, TrainData(data.train, data.val, list(data.classes)), cfg)
        sd = model.state_dict()
        assert torch.equal(sd["backbone.layer1.0.conv1.weight"], ref["backbone.layer1.0.conv1.weight"])
        assert torch.equal(sd["backbone.layer1.0.bn1.weight"], ref["backbone.layer1.0.bn1.weight"])
        assert not torch.equal(sd["backbone.fc.weight"], ref["backbone.fc.weight"])
        moved = not torch.equal(sd["backbone.layer1.0.bn1.running_mean"], ref["backbone.layer1.0.bn1.running_mean"])
        assert moved is stats_move


def test_subsets_caps_and_checks(tmp_path):
    from gestalt_xai.data.cohort import load_run_cohort

    run = make_tiny_run(tmp_path, n_subjects=(6, 6, 6))
    cohort = load_run_cohort(run)
    full = select_training_data(cohort, run, tiny_config())
    assert full.classes == list(CLASSES) and len(full.train) == 3 * 4 * 2 and len(full.val) == 3 * 2
    capped = select_training_data(cohort, run, tiny_config(max_per_class=2, class_caps={"S3": 1}))
    per = capped.train.groupby("syndrome_id")["subject_id"].nunique().to_dict()
    assert per == {"S1": 2, "S2": 2, "S3": 1}
    by_image = select_training_data(cohort, run, tiny_config(max_per_class=3, cap_unit="image"))
    assert by_image.train.groupby("syndrome_id").size().tolist() == [3, 3, 3]
    sub = select_training_data(cohort, run, tiny_config(syndromes=["S1", "S3"]))
    assert sub.classes == ["S1", "S3"] and set(sub.val["syndrome_id"]) == {"S1", "S3"}
    with pytest.raises(ConfigError, match="no training images"):
        select_training_data(cohort, run, tiny_config(syndromes=["S9"]))
    # balanced sampling draws every class about equally even when the data are not
    from gestalt_xai.models.train_data import balanced_sampler

    targets = np.array([0] * 90 + [1] * 10)
    drawn = np.bincount(targets[list(balanced_sampler(targets, torch.Generator().manual_seed(0)))], minlength=2)
    assert 30 < drawn[1] < 70
    with pytest.raises(Exception, match="unknown|Input should be|extra"):
        TrainConfig(epoch=3)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from gestalt_xai.models import train as train_mod

    cfg = tiny_config(epochs=3, model_id="resume")
    clean = load_file(train_stage(make_tiny_run(tmp_path / "clean", n_subjects=(4, 4, 4)), cfg).outputs["model"])

    run = make_tiny_run(tmp_path / "killed", n_subjects=(4, 4, 4))
    real = train_mod.evaluate_classifier
    calls: list = []

    class Killed(BaseException):
        pass

    def dying(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise Killed  # killed while validating epoch 2: epoch 1's state is on disk
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "evaluate_classifier", dying)
    with pytest.raises(Killed):
        train_stage(run, cfg)
    assert (run.path / "models" / ".resume.state.pt").exists()
    monkeypatch.setattr(train_mod, "evaluate_classifier", real)
    resumed = load_file(train_stage(run, cfg).outputs["model"])
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)
    hist = pd.read_parquet(run.path / "models" / "resume_history.parquet")
    assert hist["epoch"].tolist() == [1, 2, 3]


def test_permuted_labels_control_lands_outside_models(tmp_path):
    """The data-randomisation control: labels permuted per subject with its seed, the checkpoint in
    controls/permuted_labels (never listed as a run model), the option in the manifest, same seed → same bytes."""
    from gestalt_xai.data.cohort import load_run_cohort
    from gestalt_xai.models.declaration import resolve_models
    from gestalt_xai.models.train import permute_subject_labels
    from gestalt_xai.runs import LAYOUT

    run = make_tiny_run(tmp_path / "a", n_subjects=(4, 4, 4))
    train = select_training_data(load_run_cohort(run), run, tiny_config()).train
    perm = permute_subject_labels(train, 3)
    assert perm.groupby("subject_id")["syndrome_id"].nunique().max() == 1  # a subject's photos share a label
    per_subject = perm.drop_duplicates("subject_id").set_index("subject_id")["syndrome_id"]
    truth = train.drop_duplicates("subject_id").set_index("subject_id")["syndrome_id"]
    assert sorted(per_subject) == sorted(truth)  # the same labels, other subjects
    changed = int((perm["syndrome_id"] != train["syndrome_id"]).sum())
    assert (per_subject != truth.loc[per_subject.index]).mean() > 0.3 and changed > 0
    assert perm.equals(permute_subject_labels(train, 3)) and not perm.equals(permute_subject_labels(train, 4))

    train_stage(run, tiny_config(epochs=1))
    cfg = tiny_config(epochs=1, permute_labels=3)
    result = train_stage(run, cfg, instance="train-permuted")
    out = result.outputs["model"]
    assert out == run.path / LAYOUT.permuted_labels / "tiny-permuted3.safetensors" and out.is_file()
    assert not list((run.path / LAYOUT.permuted_labels).glob(".*.state.pt"))
    assert [m.model_id for m in run.models()] == ["tiny"]
    assert [m.model_id for m in resolve_models(run, "run")] == ["tiny"]
    assert set(run.manifest["models"]) == {"tiny"}  # a control is not one of the run's models
    record = run.manifest["stages"]["train-permuted"]
    assert record["config"]["permute_labels"] == 3
    assert record["control"]["n_relabelled"] == changed and record["control"]["path"] == run.relative(out)

    # same seed in a fresh run → the same bytes
    run_b = make_tiny_run(tmp_path / "b", n_subjects=(4, 4, 4))
    out_b = train_stage(run_b, cfg, instance="train-permuted").outputs["model"]
    assert out_b.read_bytes() == out.read_bytes()
