"""What a training run trains on: the cohort's train/val images after class subset and caps, GM-Arc's class
weights (with its class pairing fixed, see :mod:`gestalt_xai.models.train`) and the class-balanced sampler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from gestalt_xai.errors import ConfigError, InputError

if TYPE_CHECKING:
    from gestalt_xai.data.cohort import Cohort
    from gestalt_xai.models.train import TrainConfig
    from gestalt_xai.runs import Run

__all__ = ["TrainData", "balanced_sampler", "class_weights", "select_training_data"]


class TrainData:
    """The training and validation tables of one training run (``image_id, subject_id, syndrome_id``)."""

    def __init__(self, train: pd.DataFrame, val: pd.DataFrame, classes: list[str], n_missing_crops: int = 0):
        self.train = train
        self.val = val
        self.classes = classes
        self.n_missing_crops = n_missing_crops


def _apply_caps(train: pd.DataFrame, cfg: TrainConfig) -> pd.DataFrame:
    """At most ``class_caps[c]`` (else ``max_per_class``) subjects or images per class, drawn with ``cfg.seed``."""
    if cfg.max_per_class is None and not cfg.class_caps:
        return train
    rng = np.random.default_rng(cfg.seed)
    parts = []
    for syn, part in train.groupby("syndrome_id", sort=True):
        cap = (cfg.class_caps or {}).get(str(syn), cfg.max_per_class)
        if cap is None:
            parts.append(part)
            continue
        if cfg.cap_unit == "subject":
            subjects = np.array(sorted(part["subject_id"].unique()), dtype=object)
            keep = set(subjects[rng.permutation(len(subjects))[:cap]])
            parts.append(part[part["subject_id"].isin(keep)])
        else:
            idx = np.sort(rng.permutation(len(part))[:cap])
            parts.append(part.iloc[idx])
    return pd.concat(parts).sort_values("image_id", kind="stable").reset_index(drop=True)


def select_training_data(cohort: Cohort, run: Run, cfg: TrainConfig) -> TrainData:
    """Train = the cohort's ``train`` set, val = its ``val`` set, after class subset and caps; classes sorted.

    Images without an aligned crop are left out (the align stage already recorded why), and so are undiagnosed
    images (:data:`~gestalt_xai.data.cohort.UNDIAGNOSED`; the cohort readers never put them in ``train``/``val``,
    and ``unknown`` is never a class even in a split table written by hand).
    """
    from gestalt_xai.data.cohort import UNDIAGNOSED

    images = cohort.images[["image_id", "subject_id", "syndrome_id"]].astype(str)
    images = images[images["syndrome_id"] != UNDIAGNOSED]
    have = images["image_id"].map(lambda i: run.crop_path(i).is_file())
    n_missing = int((~have).sum())
    images = images[have]
    train = images[images["image_id"].isin(set(cohort.image_ids("train")))]
    val = images[images["image_id"].isin(set(cohort.image_ids("val")))]
    if cfg.syndromes is not None:
        unknown = sorted(set(cfg.syndromes) - set(train["syndrome_id"]))
        if unknown:
            raise ConfigError(f"syndromes {unknown[:5]} have no training images in this cohort")
        train = train[train["syndrome_id"].isin(set(cfg.syndromes))]
    train = _apply_caps(train.sort_values("image_id", kind="stable"), cfg)
    if train.empty:
        raise InputError("no training images: the cohort's train set is empty (or none of its crops exist)")
    classes = sorted(train["syndrome_id"].unique())
    if len(classes) < 2:
        raise InputError(f"training needs at least 2 classes, the train set has {classes}")
    val = val[val["syndrome_id"].isin(set(classes))].sort_values("image_id", kind="stable")
    return TrainData(train.reset_index(drop=True), val.reset_index(drop=True), classes, n_missing)


def class_weights(
    train_labels: Sequence[str], classes: Sequence[str], gmarc_weight_order: bool = False
) -> torch.Tensor:
    """GM-Arc's cross-entropy weights ``w_c = 0.5 · min_count / count_c + 0.5`` in class-index order.

    Parameters
    ----------
    train_labels: class (syndrome id) of every training image.
    classes: class index order (sorted syndrome ids).
    gmarc_weight_order: reproduce GM-Arc's pairing — weights computed in ``value_counts()`` (frequency) order
    and
        given to class indices 0, 1, … of the sorted classes, i.e. usually to the wrong classes.

    Examples
    --------
    >>> class_weights(["a", "b", "b", "b", "b"], ["a", "b"])
    tensor([1.0000, 0.6250])
    >>> class_weights(["a", "b", "b", "b", "b"], ["a", "b"], gmarc_weight_order=True)
    tensor([0.6250, 1.0000])
    """
    counts = pd.Series([str(s) for s in train_labels]).value_counts()  # GM-Arc: frequency order
    classes = [str(c) for c in classes]
    absent = [c for c in classes if c not in counts.index]
    if absent:
        raise InputError(f"classes {absent[:5]} have no training images; cannot weight them")
    counts = counts[counts.index.isin(classes)]
    if gmarc_weight_order:
        if len(counts) != len(classes):
            raise InputError("gmarc_weight_order needs exactly the training classes")
        w = 0.5 * counts.min() / counts.to_numpy(dtype=np.float64) + 0.5
    else:
        c = counts.reindex(classes).to_numpy(dtype=np.float64)
        w = 0.5 * c.min() / c + 0.5
    return torch.tensor(w, dtype=torch.float32)


def balanced_sampler(targets: np.ndarray, generator: torch.Generator) -> torch.utils.data.Sampler[int]:
    """Draw images with probability ``1 / n_class`` (with replacement): every class equally often per epoch."""
    counts = np.bincount(targets)
    weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(
        weights, num_samples=len(targets), replacement=True, generator=generator
    )
