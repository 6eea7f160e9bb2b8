"""The assess stage: are the run's explanations faithful, well localised, and dependent on the model?

Reads the map store (``maps/``), the explain instances' options (manifest), the aligned crops, the cohort and, for a
synthetic cohort, its truth (planted features, change masks, the confounder) and the aggregate stage's tables (region
scores, SpRAy). One metric family per module (:mod:`gestalt_xai.assess`); this module only selects the maps, feeds
them to each family in batches and writes::

    assess/faithfulness_curves.parquet  per item × method × curve (deletion / insertion / MoRF / LeRF) × step: score
    assess/faithfulness.parquet         per item × method × curve: AUC or AOPC (the random-map baseline as "random")
    assess/occlusion_agreement.parquet  per item × method: Spearman and SSIM against the occlusion map
    assess/localisation*.parquet        per map × feature × mask kind (region, change): mass accuracy, rank accuracy,
                                        pointing game, area share (chance); per patient Δscore-rank ρ; contrastivity
    assess/planted_hits.parquet, mark_effects.parquet, confounder.parquet   the synthetic cohort's checks
    assess/randomisation.parquet        per item × method × randomisation step: Spearman (raw, |·|), SSIM
    assess/robustness.parquet           per item × method × landmark-jitter draw: Spearman, SSIM, top-10 % IoU
    assess/strata.parquet, paired_tests.parquet   every per-item number by sex / age band / skin tone with
                                        subject-level bootstrap intervals; paired Wilcoxon tests between methods
    assess/summary.md                   per method: the numbers beside their controls, ranked; flags
    assess/figures/…                    mean curves with bands, randomisation curves, localisation bars with chance

Every batch's results are written to ``assess/parts/<family>/<batch>.parquet`` and recorded in the stage's ledger
(under its options' fingerprint), so an interrupted run resumes without redoing finished batches; the tables above
are rebuilt from the parts at the end (same parts, same bytes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from gestalt_xai.assess.scoring import ExplainedBatch, check_scores, explained_batches
from gestalt_xai.config import StageConfig
from gestalt_xai.errors import InputError
from gestalt_xai.models.declaration import random_controls
from gestalt_xai.runs import LAYOUT, ErrorRow, Run, write_parquet
from gestalt_xai.stages import StageResult, stage

log = logging.getLogger(__name__)

__all__ = ["AssessConfig", "assess_stage", "GRADIENT_FAMILY"]

GRADIENT_FAMILY = ["gradcam", "hirescam", "fullgrad", "saliency", "input_x_gradient"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaithfulnessOptions(_Options):
    """Deletion / insertion curves (Petsiuk et al., BMVC 2018) and MoRF / LeRF region perturbation with AOPC
    (Samek et al., IEEE TNNLS 2017) on the explained score."""

    enabled: bool = True
    curves: list[Literal["deletion", "insertion", "morf", "lerf"]] = Field(
        default_factory=lambda: ["deletion", "insertion", "morf", "lerf"],
        description="deletion/insertion remove or insert pixels by relevance; morf/lerf remove regions most / "
                    "least relevant first (AOPC)")
    baselines: list[Literal["black", "blur", "mean"]] = Field(
        default_factory=lambda: ["black"], description="what removed pixels become: black, the blurred image, or "
                                                       "the mean face of the training crops")
    steps: int = Field(16, ge=2, le=1024, description="curve steps (each removes 1/steps of the pixels or regions)")
    region_size: int = Field(8, ge=1, le=56, description="side of the MoRF/LeRF regions in pixels")
    random_maps: int = Field(1, ge=1, description="seeded random maps per image: the random-map baseline")


class RandomisationOptions(_Options):
    """Model-parameter randomisation (cascading, independent) and data randomisation (Adebayo et al., NeurIPS 2018)."""

    enabled: bool = True
    modes: list[Literal["cascading", "independent"]] = Field(default_factory=lambda: ["cascading"])
    methods: list[str] = Field(default_factory=lambda: list(GRADIENT_FAMILY),
                               description="methods recomputed under each randomisation step (stored ones only)")
    max_patients: int = Field(10, ge=1, description="patients randomised (the first of the assessed patients)")
    permuted_model: str | None = Field(
        None, description="checkpoint of a model trained on permuted labels (train --set permute_labels=SEED; "
                          "stored under run/controls/): its maps against the real model's")


class RobustnessOptions(_Options):
    """How far each method's map moves when the five alignment landmarks are jittered."""

    enabled: bool = True
    amplitude: float = Field(2.0, ge=0, le=10, description="landmark jitter in photo pixels (uniform ±)")
    draws: int = Field(2, ge=1, le=32, description="jittered alignments per patient")
    methods: list[str] = Field(default_factory=lambda: list(GRADIENT_FAMILY))
    max_patients: int = Field(10, ge=1)


class AssessConfig(StageConfig):
    """Options of ``gestalt-xai assess``."""

    models: list[str] | None = Field(None, description="model ids (default: every model in the store; random "
                                                        "controls get the localisation checks only)")
    methods: list[str] | None = Field(None, description="methods (default: every method in the store)")
    targets: list[str] = Field(default_factory=lambda: ["centroid", "logit", "pair"],
                               description="target kinds assessed for faithfulness, randomisation and robustness")
    images: Literal["test", "all"] | list[str] = Field("test", description="patients: the protocol's test "
                                                                           "images, every diagnosed image, or ids")
    max_patients: int = Field(30, ge=1, description="at most this many patients (spread over the syndromes)")
    faithfulness: FaithfulnessOptions = Field(default_factory=FaithfulnessOptions)
    localisation: bool = Field(True, description="localisation against planted features (synthetic cohorts)")
    randomisation: RandomisationOptions = Field(default_factory=RandomisationOptions)
    robustness: RobustnessOptions = Field(default_factory=RobustnessOptions)
    strata: list[Literal["sex", "age_band", "ancestry"]] = Field(
        default_factory=lambda: ["sex", "age_band", "ancestry"], description="breakdowns (when the cohort has them)")
    age_bands: list[float] = Field(default_factory=lambda: [0.0, 2.0, 5.0, 10.0, 18.0])
    batch_size: int = Field(16, ge=1, description="explained items per batch")
    figures: bool = True
    figure_formats: list[Literal["png", "svg", "pdf"]] = Field(default_factory=lambda: ["png"], min_length=1)
    seed: int = 0
    device: str = "cpu"


#: options that do not change any number (so a rerun with another value reuses the finished parts)
_PRESENTATION = ("figures", "figure_formats", "batch_size")


# ------------------------------------------------------------------------------------------------ selection
def select_patients(images: pd.DataFrame, index: pd.DataFrame, cfg: AssessConfig) -> list[str]:
    """The assessed patients: diagnosed images with maps (the test images, all, or the listed ids), at most
    ``max_patients``, taken round-robin over the syndromes (each syndrome's images in a seeded order) so that a
    small assessment still covers every syndrome."""
    with_maps = set(index["image_id"].astype(str))
    diagnosed = images[~images["undiagnosed"]]
    if isinstance(cfg.images, list):
        ids = [str(i) for i in cfg.images]
        missing = sorted(set(ids) - with_maps)
        if missing:
            raise InputError(f"assess: images {missing[:5]} have no maps in the store; check images")
        return ids[: cfg.max_patients]
    pool = diagnosed[diagnosed["test"]] if cfg.images == "test" and diagnosed["test"].any() else diagnosed
    pool = pool[pool["image_id"].astype(str).isin(with_maps)]
    rng = np.random.default_rng(cfg.seed)
    queues = []
    for _, group in pool.groupby(pool["syndrome_id"].astype(str), sort=True):
        ids = sorted(group["image_id"].astype(str))
        queues.append([ids[i] for i in rng.permutation(len(ids))])
    out: list[str] = []
    while len(out) < cfg.max_patients and any(queues):
        for q in queues:
            if q and len(out) < cfg.max_patients:
                out.append(q.pop(0))
    return sorted(out)


def _rows(index: pd.DataFrame, patients: list[str], cfg: AssessConfig, controls: dict[str, Any]) -> pd.DataFrame:
    """Map-store rows of the assessed patients under the models / methods filters (controls kept: they are the
    localisation's reference)."""
    rows = index[index["image_id"].astype(str).isin(set(patients))]
    if cfg.models is not None:
        unknown = sorted(set(cfg.models) - set(index["model_id"]))
        if unknown:
            raise InputError(f"assess: models {unknown} have no maps; stored: {sorted(set(index['model_id']))}")
        rows = rows[rows["model_id"].isin(cfg.models)]
    if cfg.methods is not None:
        unknown = sorted(set(cfg.methods) - set(index["method"]))
        if unknown:
            raise InputError(f"assess: methods {unknown} have no maps; stored: {sorted(set(index['method']))}")
        rows = rows[rows["method"].isin(cfg.methods)]
    if not len(rows):
        raise InputError("assess: no maps left after the images/models/methods filters")
    return rows.reset_index(drop=True)


def mean_face(run: Run, images: pd.DataFrame, limit: int = 256) -> np.ndarray:
    """The mean aligned crop of the training images (at most ``limit``, evenly spaced in id order) as float32
    ``(112, 112, 3)`` in 0–255: the ``mean`` perturbation baseline."""
    from gestalt_xai.data.aligned import load_crops

    train = images[images["sets"].map(lambda s: "train" in set(s) if s is not None else False)]
    ids = sorted(train["image_id"].astype(str)) or sorted(images["image_id"].astype(str))
    ids = [ids[i] for i in np.unique(np.linspace(0, len(ids) - 1, min(limit, len(ids))).round().astype(int))]
    return load_crops(run, ids).astype(np.float64).mean(0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ resumable parts
class Parts:
    """Per-batch result tables under ``assess/parts/<family>/``, recorded in the stage's ledger (module docstring)."""

    def __init__(self, run: Run, cfg: AssessConfig) -> None:
        self.root = run.path / LAYOUT.assess / "parts"
        self.ledger = run.ledger(cfg, ignore=_PRESENTATION)
        self.done = set(self.ledger.done())
        self.reused = 0
        self.seconds: dict[str, float] = {}

    def get(self, family: str, key: str, compute: Callable[[], pd.DataFrame]) -> None:
        """Compute and store the family's table for batch ``key`` unless a finished one is recorded."""
        item = f"{family}/{key}"
        path = self.root / family / f"{key}.parquet"
        if item in self.done and path.exists():
            self.reused += 1
            return
        t0 = time.perf_counter()
        table = compute()
        self.seconds[family] = self.seconds.get(family, 0.0) + time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(table, path)
        self.ledger.add(item, {"rows": int(len(table))})

    def table(self, family: str, keys: list[str]) -> pd.DataFrame:
        """The family's parts of the batches ``keys`` (this run's batches only), concatenated in key order."""
        frames = [pd.read_parquet(p) for k in sorted(set(keys))
                  if (p := self.root / family / f"{k}.parquet").exists()]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
