"""Training and fine-tuning a GestaltMatcher model (GM-Arc's recipe, with its class-weight pairing fixed).

GestaltMatcher-Arc (Hustinx et al., WACV 2023; ``train_gm_arc.py``) trains ``backbone → 512-d embedding →
classifier`` with

* weighted cross-entropy, ``w_c = 0.5 · min_c' n_c' / n_c + 0.5`` (``n_c`` = training *images* of class
  ``c``), so the rarest class weighs 1 and a very frequent one about 0.5;
* Adam with three parameter groups — backbone (lr 5e-4 for r50 / 1e-3 for r100, no weight decay), embedding
  ``fc`` + ``features`` BN1d (the backbone's lr; weight decay 5e-5 for r50 / 0 for r100) and classifier (lr
  1e-3, weight decay 5e-4); Adam's ``weight_decay`` is an L2 term added to the gradient, as in their code;
* ``ReduceLROnPlateau(mode="max", factor=0.5, patience=5, min_lr=1e-5, threshold=5e-4)`` stepped on the
  validation mean-per-class top-5 accuracy after every epoch;
* augmentation (shrink-zoom, flip, colour jitter, gray; :mod:`gestalt_xai.data.aligned`).

Training data, class weights and the sampler are in :mod:`gestalt_xai.models.train_data`; the validation metrics
and the history figure in :mod:`gestalt_xai.models.train_eval`.

**The class-weight bug.** GM-Arc computes the weights from ``labels.value_counts()`` — classes in *frequency*
order — while class indices follow the *sorted* labels (its lookup table), and pairs weight ``i`` with class
``i``. So the weights land on the wrong classes. :func:`class_weights` pairs each weight with its own class;
GM-Arc's pairing is reproduced only with ``gmarc_weight_order=True``, for re-creating their models.

**Frozen backbone.** GM-Arc's released script freezes the backbone's weights (only ``fc``, ``features`` and
the classifier train) but leaves the model in train mode, so the backbone's BatchNorm running statistics still
move. ``freeze_backbone=True`` offers both: ``frozen_bn="update"`` (GM-Arc's behaviour) or
``frozen_bn="fixed"`` (BatchNorms of the frozen part kept in eval mode: a truly frozen backbone).

Outputs in ``run/models/``: ``<model_id>.safetensors`` + ``<model_id>.json`` (:func:`save_model` format, with
the class list = ``syndrome_ids`` in class-index order = sorted syndrome ids), ``<model_id>_history.parquet``
(one row per epoch) and ``<model_id>_curve.png``. Training state is kept after every epoch
(``.<model_id>.state.pt``), so an interrupted run resumes at the next epoch; a finished model with the same
configuration is not retrained. Same seed → same weights on CPU.

**Data-randomisation control.** ``permute_labels: <seed>`` trains on the training set with its labels permuted
across *subjects* (:func:`permute_subject_labels`: a subject's photos keep one shared label, each class keeps its
number of subjects; validation keeps the true labels, so its accuracy shows chance level) — the model of Adebayo et
al.'s data randomisation test (NeurIPS 2018). Its files go to ``run/controls/permuted_labels/`` as
``<model_id>-permuted<seed>.*`` (``LAYOUT.permuted_labels``), never to ``run/models/``: no later stage (embed, explain,
:func:`~gestalt_xai.models.declaration.resolve_models`) picks it up, and it is not recorded among the run's models;
the stage's manifest entry records the option and the checkpoint (``extra.control``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from gestalt_xai.config import StageConfig
from gestalt_xai.data.aligned import AlignedFaces, Augmentation
from gestalt_xai.errors import ConfigError
from gestalt_xai.faces.align import CROP_SIZE
from gestalt_xai.models.train_data import TrainData, balanced_sampler, class_weights, select_training_data
from gestalt_xai.models.train_eval import evaluate_classifier, plot_history
from gestalt_xai.progress import progress_bar
from gestalt_xai.runs import LAYOUT, Run, torch_threads
from gestalt_xai.stages import StageResult, stage

log = logging.getLogger(__name__)

__all__ = [
    "AugmentOptions",
    "DEMO_PRESET",
    "TrainConfig",
    "TrainData",
    "class_weights",
    "demo_train_config",
    "evaluate_classifier",
    "parameter_groups",
    "permute_subject_labels",
    "select_training_data",
    "train_model",
    "train_small_model",
    "train_stage",
]


# ----------------------------------------------------------------------------------------------------- config
class AugmentOptions(StageConfig):
    """Training augmentation (GM-Arc's values by default; a probability of 0 switches a step off)."""

    shrink_zoom_p: float = Field(0.1, ge=0, le=1)
    shrink_min: int = Field(50, ge=8, le=CROP_SIZE)
    shrink_max: int = Field(100, ge=8, le=CROP_SIZE)
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(1.0, ge=0, le=1)
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    saturation: float = Field(0.2, ge=0, le=1)
    hue: float = Field(0.1, ge=0, le=0.5)
    gray_p: float = Field(0.1, ge=0, le=1)

    def to_augmentation(self) -> Augmentation:
        return Augmentation(**self.model_dump())


#: values of ``preset: demo`` (see :func:`demo_train_config`); explicit options win over them.
DEMO_PRESET: dict[str, Any] = {
    "model_id": "demo_r18_w0.25",
    "arch": "r18",
    "width": 0.25,
    "epochs": 20,
    "batch_size": 32,
    "lr_backbone": 2e-3,
    "lr_embedding": 2e-3,
    "lr_classifier": 2e-3,
    "wd_embedding": 5e-5,
    "classifier_dropout": 0.2,
    "plateau_patience": 3,
    "augment": {"shrink_zoom_p": 0.0, "gray_p": 0.05},
}


class TrainConfig(StageConfig):
    """Options of ``gestalt-xai train`` (GM-Arc's defaults unless noted; ``preset: demo`` for the demo model)."""

    preset: Literal["gmarc", "demo"] = Field(
        "gmarc", description="gmarc: GM-Arc's recipe; demo: small iResNet-18 from scratch (DEMO_PRESET)"
    )

    model_id: str | None = Field(None, description="output name in run/models (default: gm_<arch>[_w<width>])")
    arch: Literal["r18", "r34", "r50", "r100"] = "r50"
    width: float = Field(1.0, gt=0, description="channel width multiplier of the iResNet")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the embedding fc")
    classifier_dropout: float = Field(0.5, ge=0, lt=1)
    channel_order: Literal["RGB", "BGR"] = Field(
        "RGB", description="input channel order the model learns (GM-Arc's training read BGR; inference RGB)"
    )
    init: Path | None = Field(None, description="checkpoint to fine-tune (any format load_model reads)")
    trust_pickle: bool = Field(False, description="allow a pickled (whole-module) init checkpoint")
    new_classifier: bool = Field(False, description="replace the init checkpoint's classifier by a fresh one")

    epochs: int = Field(50, ge=1)
    batch_size: int = Field(64, ge=2)
    lr_backbone: float | None = Field(None, gt=0, description="default 5e-4 (r100: 1e-3)")
    wd_backbone: float = Field(0.0, ge=0)
    lr_embedding: float | None = Field(None, gt=0, description="default: lr_backbone")
    wd_embedding: float | None = Field(None, ge=0, description="default 5e-5 (r100: 0)")
    lr_classifier: float = Field(1e-3, gt=0)
    wd_classifier: float = Field(5e-4, ge=0)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(5, ge=0)
    plateau_threshold: float = Field(5e-4, ge=0)
    min_lr: float = Field(1e-5, ge=0)

    loss: Literal["weighted_ce", "ce"] = "weighted_ce"
    gmarc_weight_order: bool = Field(
        False,
        description="pair CE weights with classes as GM-Arc's code does (frequency order vs sorted indices; a bug)",
    )
    sampler: Literal["shuffle", "balanced"] = Field("shuffle", description="balanced: class-balanced sampling")
    freeze_backbone: bool = Field(False, description="train only fc, BN1d and classifier (GM-Arc's released run)")
    frozen_bn: Literal["update", "fixed"] = Field(
        "update", description="frozen backbone BN statistics: update (GM-Arc) or fixed (eval mode)"
    )
    augment: AugmentOptions | None = Field(default_factory=AugmentOptions, description="null: no augmentation")

    syndromes: list[str] | None = Field(None, description="train on this subset of classes only")
    max_per_class: int | None = Field(None, ge=1, description="cap every class at this many subjects/images")
    class_caps: dict[str, int] | None = Field(None, description="per-class caps (override max_per_class)")
    cap_unit: Literal["subject", "image"] = "subject"

    permute_labels: int | None = Field(None, ge=0, description="data-randomisation control: train on labels "
                                       "permuted across subjects with this seed, saved in controls/permuted_labels")
    save: Literal["last", "best"] = Field("last", description="keep the last epoch (GM-Arc) or the best val top-5")
    seed: int = 0
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    num_workers: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") == "demo":
            merged = {**DEMO_PRESET, **data}
            if isinstance(data.get("augment"), dict):
                merged["augment"] = {**DEMO_PRESET["augment"], **data["augment"]}
            return merged
        return data

    def resolved_model_id(self) -> str:
        """``model_id`` (default ``gm_<arch>[_w<width>]``); ``-permuted<seed>`` appended for a permuted-label
        control."""
        base = self.model_id or f"gm_{self.arch}" + ("" if self.width == 1.0 else f"_w{self.width:g}")
        return base if self.permute_labels is None else f"{base}-permuted{self.permute_labels}"

    def output_dir(self, run: Run) -> Path:
        """Where the model goes: ``run/models``, or ``run/controls/permuted_labels`` for a permuted-label control."""
        return run.dir(LAYOUT.models if self.permute_labels is None else LAYOUT.permuted_labels)

    def resolved_lrs(self) -> dict[str, float]:
        big = self.arch == "r100"
        lr_b = self.lr_backbone if self.lr_backbone is not None else (1e-3 if big else 5e-4)
        return {
            "lr_backbone": lr_b,
            "wd_backbone": self.wd_backbone,
            "lr_embedding": self.lr_embedding if self.lr_embedding is not None else lr_b,
            "wd_embedding": self.wd_embedding if self.wd_embedding is not None else (0.0 if big else 5e-5),
            "lr_classifier": self.lr_classifier,
            "wd_classifier": self.wd_classifier,
        }


def demo_train_config(**overrides: Any) -> TrainConfig:
    """The demo's small model (``preset: demo``): iResNet-18 at width 0.25 trained from scratch.

    Trains in about 2 minutes on 2 CPU cores on the default synthetic cohort. From-scratch training on a few
    hundred synthetic photos needs larger learning rates than GM-Arc's fine-tuning of a Glint360K-pretrained
    backbone, and no shrink-zoom (the planted phenotypes are small). ``overrides`` replace preset values.
    """
    return TrainConfig(preset="demo", **overrides)


def permute_subject_labels(train: pd.DataFrame, seed: int) -> pd.DataFrame:
    """``train`` (``image_id, subject_id, syndrome_id``) with the subjects' labels permuted (module docstring).

    The labels of the subjects, in sorted subject order, are shuffled with ``numpy.random.default_rng(seed)``; every
    image takes its subject's new label.

    >>> t = pd.DataFrame({"image_id": list("abcd"), "subject_id": ["s1", "s1", "s2", "s3"],
    ...                   "syndrome_id": ["A", "A", "B", "C"]})
    >>> p = permute_subject_labels(t, 0)
    >>> per_subject = p.groupby("subject_id")["syndrome_id"]
    >>> int(per_subject.nunique().max()), sorted(per_subject.first())
    (1, ['A', 'B', 'C'])
    """
    labels = train.groupby("subject_id", sort=True)["syndrome_id"].first()
    new = dict(zip(labels.index, np.random.default_rng(seed).permutation(labels.to_numpy()), strict=True))
    return train.assign(syndrome_id=train["subject_id"].map(new))


# ------------------------------------------------------------------------------------------------------ model
def _backbone_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone body parameters, embedding fc + BN1d parameters) of a GestaltMatcher."""
    bb = model.backbone
    emb_ids = {id(p) for m in (bb.fc, bb.features) for p in m.parameters()}
    body = [p for p in bb.parameters() if id(p) not in emb_ids]
    emb = [p for m in (bb.fc, bb.features) for p in m.parameters()]
    return body, emb


def parameter_groups(model: nn.Module, lrs: dict[str, float], freeze_backbone: bool = False) -> list[dict[str, Any]]:
    """GM-Arc's three Adam parameter groups: backbone body, embedding (fc + BN1d), classifier."""
    body, emb = _backbone_groups(model)
    groups = []
    if not freeze_backbone:
        groups.append(
            {"name": "backbone", "params": body, "lr": lrs["lr_backbone"], "weight_decay": lrs["wd_backbone"]}
        )
    groups.append({"name": "embedding", "params": emb, "lr": lrs["lr_embedding"], "weight_decay": lrs["wd_embedding"]})
    if model.classifier is None:
        raise ConfigError(
            "the model has no classifier to train (an embedding-only checkpoint); set new_classifier: true"
        )
    groups.append(
        {
            "name": "classifier",
            "params": list(model.classifier.parameters()),
            "lr": lrs["lr_classifier"],
            "weight_decay": lrs["wd_classifier"],
        }
    )
    return groups


def _set_train_mode(model: nn.Module, freeze_backbone: bool, frozen_bn: str) -> None:
    model.train()
    if freeze_backbone and frozen_bn == "fixed":
        bb = model.backbone
        for name, m in bb.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith(("fc", "features")):
                m.eval()


def _build_model(cfg: TrainConfig, classes: list[str]) -> nn.Module:
    from gestalt_xai.models.gestaltmatcher import GestaltMatcher, build_gestaltmatcher

    if cfg.init is None:
        torch.manual_seed(cfg.seed)
        model = build_gestaltmatcher(
            cfg.arch,
            width=cfg.width,
            num_classes=len(classes),
            syndrome_ids=classes,
            channel_order=cfg.channel_order,
            dropout=cfg.dropout,
        )
        if cfg.classifier_dropout != 0.5:
            model.classifier[0].p = cfg.classifier_dropout
            model.config["classifier_dropout"] = cfg.classifier_dropout
        return model
    from gestalt_xai.models.checkpoints import load_model

    model = load_model(cfg.init, trust_pickle=cfg.trust_pickle)
    if not isinstance(model, GestaltMatcher):
        raise ConfigError(f"{cfg.init}: expected a GestaltMatcher checkpoint")
    if cfg.new_classifier or model.classifier is None:
        torch.manual_seed(cfg.seed)
        dim = model.embedding_dim
        model.classifier = nn.Sequential(nn.Dropout(cfg.classifier_dropout), nn.Linear(dim, len(classes)))
        model.syndrome_ids = list(classes)
        model.config.update(
            {
                "num_classes": len(classes),
                "syndrome_ids": list(classes),
                "classifier_dropout": cfg.classifier_dropout,
            }
        )
    else:
        from gestalt_xai.models.checkpoints import check_classes

        try:
            check_classes(model, classes, exact=True)  # same set; the checkpoint's class order is kept
        except ConfigError as exc:
            raise ConfigError(f"{cfg.init}: {exc}; or set new_classifier: true to train a fresh classifier") from None
    return model


# --------------------------------------------------------------------------------------------------- training
def _config_hash(cfg: TrainConfig, data: TrainData) -> str:
    payload = {
        "cfg": cfg.model_dump(mode="json", exclude={"num_workers", "threads", "device"}),
        "train": data.train["image_id"].tolist(),
        "val": data.val["image_id"].tolist(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_model(run: Run, data: TrainData, cfg: TrainConfig,
                state_dir: Path | None = None) -> tuple[nn.Module, pd.DataFrame]:
    """Train (or resume training) on ``data``; returns the model to save and the per-epoch history.

    Epoch state is written to ``.<model_id>.state.pt`` beside the model (:meth:`TrainConfig.output_dir`; or in
    ``state_dir``, for models kept outside ``run/models``) after each epoch (see the module docstring). ``data`` is
    trained on as given (the stage permutes its labels).
    """
    with torch_threads(cfg.threads):
        return _train_model(run, data, cfg, state_dir)


def _train_model(run: Run, data: TrainData, cfg: TrainConfig,
                 state_dir: Path | None = None) -> tuple[nn.Module, pd.DataFrame]:
    from gestalt_xai.runs import atomic_write_bytes

    device = _resolve_device(cfg.device)
    model_id = cfg.resolved_model_id()
    model = _build_model(cfg, data.classes).to(device)
    data.classes = list(model.syndrome_ids)  # a fine-tuned checkpoint keeps its own class order
    if cfg.freeze_backbone:
        for p in _backbone_groups(model)[0]:
            p.requires_grad_(False)
    lrs = cfg.resolved_lrs()
    optimizer = torch.optim.Adam(parameter_groups(model, lrs, cfg.freeze_backbone), lr=lrs["lr_backbone"])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max",
        factor=cfg.plateau_factor,
        patience=cfg.plateau_patience,
        threshold=cfg.plateau_threshold,
        min_lr=cfg.min_lr,
    )

    aug = cfg.augment.to_augmentation() if cfg.augment is not None else None
    train_ds = AlignedFaces(
        run,
        data.train["image_id"].tolist(),
        data.train["syndrome_id"].tolist(),
        classes=data.classes,
        augment=aug,
        seed=cfg.seed,
    )
    val_ds = AlignedFaces(
        run,
        data.val["image_id"].tolist(),
        data.val["syndrome_id"].tolist(),
        classes=data.classes,
        augment=None,
    )
    val_crops = val_ds._cache if val_ds._cache is not None else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    weights = (
        class_weights(data.train["syndrome_id"].tolist(), data.classes, cfg.gmarc_weight_order)
        if cfg.loss == "weighted_ce"
        else None
    )
    w_dev = weights.to(device) if weights is not None else None

    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = balanced_sampler(train_ds.targets, gen) if cfg.sampler == "balanced" else None
    drop_last = len(train_ds) > cfg.batch_size  # BatchNorm cannot train on a last batch of one image
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen,
        drop_last=drop_last,
        num_workers=cfg.num_workers,
    )

    state_path = (state_dir if state_dir is not None else cfg.output_dir(run)) / f".{model_id}.state.pt"
    chash = _config_hash(cfg, data)
    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    start_epoch = 1
    if state_path.exists():
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=True)  # RNG states must stay on CPU
        except Exception as exc:  # a torn file of a killed run: start over
            log.warning("ignoring unreadable training state %s (%s)", state_path, exc)
            st = None
        if st is not None and st.get("config_hash") == chash:
            model.load_state_dict(st["model"])
            optimizer.load_state_dict(st["optimizer"])
            scheduler.load_state_dict(st["scheduler"])
            gen.set_state(st["generator"])
            torch.set_rng_state(st["torch_rng"])
            history = [dict(zip(st["history_columns"], row, strict=True)) for row in st["history_rows"]]
            if st.get("best_model") is not None:
                best = (float(st["best_score"]), st["best_model"])
            start_epoch = int(st["epoch"]) + 1
            log.info("resuming %s at epoch %d", model_id, start_epoch)
    if start_epoch == 1:
        torch.manual_seed(cfg.seed)  # dropout draws
    steps_per_epoch = len(loader)
    with progress_bar("train", steps_per_epoch * cfg.epochs) as bar:
        bar.advance(steps_per_epoch * (start_epoch - 1))
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            train_ds.set_epoch(epoch)
            _set_train_mode(model, cfg.freeze_backbone, cfg.frozen_bn)
            total, correct, loss_sum = 0, 0, 0.0
            for x_u8, y in loader:
                x = model.preprocess(x_u8, device=device)
                y = y.to(device)
                logits, _ = model(x)
                loss = F.cross_entropy(logits, y, weight=w_dev)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = len(y)
                total += n
                loss_sum += float(loss.item()) * n
                correct += int((logits.argmax(1) == y).sum())
                bar.advance(1, status=f"epoch {epoch}/{cfg.epochs} loss {loss_sum / total:.3f} "
                                      f"acc {correct / total:.2f}")
            metrics = evaluate_classifier(model, val_crops, val_ds.targets, weights, cfg.batch_size, device)
            score = metrics["val_mean_top5"]
            if not np.isnan(score):
                scheduler.step(score)
            lrs_now = {f"lr_{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / max(total, 1),
                "train_top1": correct / max(total, 1),
                **metrics,
                **lrs_now,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            history.append(row)
            bar.advance(0, status=f"epoch {epoch}/{cfg.epochs} loss {row['train_loss']:.3f} "
                                  f"val top1 {metrics['val_top1']:.2f} mean top5 {metrics['val_mean_top5']:.2f}")
            log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            if cfg.save == "best" and not np.isnan(score) and (best is None or score > best[0]):
                best = (score, {k: v.detach().clone() for k, v in model.state_dict().items()})
            cols = list(history[0].keys())
            state = {
                "config_hash": chash,
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history_columns": cols,
                "history_rows": [[h[c] for c in cols] for h in history],
                "best_score": best[0] if best else None,
                "best_model": best[1] if best else None,
            }
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(state_path, buf.getvalue())
    if cfg.save == "best" and best is not None:
        model.load_state_dict(best[1])
    model.eval()
    return model.cpu(), pd.DataFrame(history)


@stage("train", options=TrainConfig, order=40, summary="train or fine-tune a GestaltMatcher-style model",
       reads=(LAYOUT.cohort, LAYOUT.alignments), writes=(LAYOUT.models,),
       example="gestalt-xai train --run runs/demo --preset demo",
       tiny_options={"preset": "demo", "epochs": 2, "threads": 2})
def train_stage(run: Run, cfg: TrainConfig) -> StageResult:
    """Train on the run's cohort (``train`` set; validation on ``val``); save in ``run/models/`` (a permuted-label
    control in ``run/controls/permuted_labels/``, module docstring).

    The result's outputs name ``<model_id>.safetensors``. A finished model with the same configuration and data is
    kept (not retrained); an interrupted training resumes at its next epoch.
    """
    from gestalt_xai.models.checkpoints import save_model
    from gestalt_xai.runs import sha256_file, write_parquet

    model_id = cfg.resolved_model_id()
    cohort = run.cohort()
    data = select_training_data(cohort, run, cfg)
    n_relabelled = 0
    if cfg.permute_labels is not None:
        true_labels = data.train["syndrome_id"].to_numpy()
        data.train = permute_subject_labels(data.train, cfg.permute_labels)
        n_relabelled = int((data.train["syndrome_id"].to_numpy() != true_labels).sum())
    chash = _config_hash(cfg, data)
    models_dir = cfg.output_dir(run)
    out = models_dir / f"{model_id}.safetensors"
    meta = models_dir / f"{model_id}.json"
    result = StageResult(items=len(data.train), outputs={"model": out, "description": meta},
                         extra={"model_id": model_id, "n_train": len(data.train), "n_val": len(data.val),
                                "n_classes": len(data.classes), "n_missing_crops": data.n_missing_crops})
    if cfg.permute_labels is not None:
        result.extra["control"] = {"kind": "permuted_labels", "permute_labels": cfg.permute_labels,
                                   "path": run.relative(out), "n_relabelled": n_relabelled}
    if out.exists() and meta.exists():
        info = json.loads(meta.read_text(encoding="utf-8"))
        if info.get("training", {}).get("config_hash") == chash:
            result.extra["skipped"] = True
            result.summary.append(f"{run.relative(out)} already trained with this configuration; kept")
            return result
    model, history = train_model(run, data, cfg)
    # epoch timings belong to the manifest: the model's files stay byte-identical across identical runs
    result.extra["epoch_seconds"] = [float(s) for s in history.pop("seconds")] if "seconds" in history else []
    training = {
        "config_hash": chash,
        "config": cfg.model_dump(mode="json"),
        "n_train": len(data.train),
        "n_val": len(data.val),
        "epochs": int(cfg.epochs),
        "seed": cfg.seed,
        "final": json.loads(history.iloc[[-1]].to_json(orient="records"))[0] if len(history) else {},
    }
    save_model(model, out, extra={"training": training})
    write_parquet(history, models_dir / f"{model_id}_history.parquet")
    plot_history(history, models_dir / f"{model_id}_curve.png", f"{model_id} ({cfg.arch}, width {cfg.width:g})")
    if cfg.permute_labels is not None:  # a control is no model of the run (module docstring)
        result.extra["control"]["sha256"] = sha256_file(out)
    else:
        run.record_model(model_id, sha256_file(out), {
            "path": str(out.relative_to(run.path)), "source": "trained", "arch": cfg.arch, "width": cfg.width,
            "n_classes": len(data.classes), "epochs": cfg.epochs, "seed": cfg.seed})
    state = models_dir / f".{model_id}.state.pt"
    if state.exists():
        state.unlink()
    if len(history):
        result.extra["final"] = {k: float(v) for k, v in history.iloc[-1].items() if isinstance(v, float | int)}
        final = {k: round(v, 3) for k, v in result.extra["final"].items()}
        result.summary.append(f"trained {model_id} for {cfg.epochs} epochs on {len(data.train)} images; last "
                              f"epoch {final}")
    result.outputs["history"] = models_dir / f"{model_id}_history.parquet"
    return result


def train_small_model(run: Run, **overrides: Any) -> Path:
    """Train the demo's small model on ``run`` (its cohort must be aligned); the shared test fixture's body.

    ``overrides`` change :func:`demo_train_config` fields (e.g. ``epochs=4`` for a faster fixture).
    """
    return train_stage(run, demo_train_config(**overrides)).outputs["model"]
