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
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from gestalt_xai.assess.planted import read_truth
from gestalt_xai.assess.scoring import ExplainedBatch, check_scores, explained_batches
from gestalt_xai.config import StageConfig
from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.models.declaration import random_controls
from gestalt_xai.runs import LAYOUT, ErrorRow, Parts, Run, atomic_write_bytes, write_parquet
from gestalt_xai.stages import StageResult, stage
from gestalt_xai.store import KEY_COLUMNS, require_maps

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
    target_groups: list[str] | None = Field(
        None, description="target groups assessed (default: all): centroid:own, logit:own, pair:same-syndrome, "
                          "pair:other-syndrome, or centroid:<id> for maps towards a fixed other syndrome")
    images: Literal["test", "all"] | list[str] = Field("test", description="patients: the protocol's test "
                                                                           "images, every diagnosed image, or ids")
    max_patients: int = Field(30, ge=1, description="at most this many patients (spread over the syndromes)")
    faithfulness: FaithfulnessOptions = Field(default_factory=FaithfulnessOptions)
    localisation: bool = Field(True, description="localisation against planted features (synthetic cohorts)")
    randomisation: RandomisationOptions = Field(default_factory=RandomisationOptions)
    robustness: RobustnessOptions = Field(default_factory=RobustnessOptions)
    strata: list[Literal["sex", "age_band", "ancestry", "skin_tone"]] = Field(
        default_factory=lambda: ["sex", "age_band", "ancestry", "skin_tone"],
        description="breakdowns (when the cohort has them; skin tone: a synthetic cohort's rendered tone, by fifths "
                    "light → dark)")
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


# ------------------------------------------------------------------------------------------------ one batch
#: the per-batch families (a part per batch under ``assess/parts/<family>/``)
FAMILIES = ("faithfulness_curves", "faithfulness", "occlusion_agreement", "randomisation", "robustness")
#: curve name → (mode, unit, order) of :func:`~gestalt_xai.assess.faithfulness.perturbation_curves`
CURVES = {"deletion": ("deletion", "pixels", "morf"), "insertion": ("insertion", "pixels", "morf"),
          "morf": ("deletion", "regions", "morf"), "lerf": ("deletion", "regions", "lerf")}


def _with_items(batch: ExplainedBatch, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (an engine's table with an ``item`` column) with the batch's image ids, model and target."""
    if not len(frame):
        return frame
    items = batch.items()
    merged = items.merge(frame, on="item", how="right", validate="one_to_many")
    return merged.drop(columns="item")


def _faithfulness(cfg: AssessConfig, batch: ExplainedBatch, face: np.ndarray | None,
                  errors: list[ErrorRow]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every configured curve of every stored map of the batch (the random map beside): tidy curves and per-item
    AUC / AOPC. Items whose rebuilt score differs from the stored one are dropped (an error row each)."""
    from gestalt_xai.assess.faithfulness import perturbation_curves

    opts = cfg.faithfulness
    curves, areas, ok = [], [], None
    for baseline in opts.baselines:
        for name in opts.curves:
            mode, unit, order = CURVES[name]
            c = perturbation_curves(batch.score_model, batch.crops, batch.maps, mode=mode, unit=unit, order=order,
                                    baseline=baseline, mean_face=face, steps=opts.steps,
                                    region_size=opts.region_size, seed=cfg.seed, random_maps=opts.random_maps,
                                    device=cfg.device)
            if ok is None:
                start = c.scores[0, :, 0] if mode == "deletion" else c.scores[0, :, -1]
                ok = check_scores(batch, start, errors)
            curves.append(c.table().assign(curve=name))
            areas.append(c.aucs().assign(curve=name))
    keep = set(np.flatnonzero(ok)) if ok is not None else set()
    curves_t = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    areas_t = pd.concat(areas, ignore_index=True) if areas else pd.DataFrame()
    if len(curves_t):
        curves_t = curves_t[curves_t["item"].isin(keep)]
        areas_t = areas_t[areas_t["item"].isin(keep)]
    return _with_items(batch, curves_t), _with_items(batch, areas_t)


def _permuted_model(run: Run, cfg: AssessConfig) -> dict[str, Any] | None:
    """The permuted-label control (``randomisation.permuted_model``, ``{run}`` expanded; a path relative to the run
    folder), loaded once, with a cache of its per-instance setups."""
    if not cfg.randomisation.enabled or cfg.randomisation.permuted_model is None:
        return None
    from gestalt_xai.models.checkpoints import load_model

    given = cfg.randomisation.permuted_model.replace("{run}", str(run.path))
    path = Path(given) if Path(given).is_absolute() else run.path / given
    if not path.exists():
        raise ConfigError(f"randomisation.permuted_model: {path} not found (train one with `gestalt-xai train --set "
                          "permute_labels=0`; it is written under controls/permuted_labels/)")
    return {"model": load_model(path), "setups": {}}


def _subset(batch: ExplainedBatch, ids: set[str], methods: list[str]
            ) -> tuple[np.ndarray, Any, np.ndarray, dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """The batch rows of images ``ids``: ``(rows, score model, crops, maps of methods, their parameters)``."""
    rows = np.array([i for i, image_id in enumerate(batch.image_ids) if image_id in ids], np.int64)
    params_all = batch.setup.cfg.all_method_params()
    params = {m: params_all[m] for m in methods if m in params_all}
    return (rows, batch.score_model.select(rows.tolist()), batch.crops[rows],
            {m: batch.maps[m][rows] for m in methods}, params)


def _renumber(frame: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """An engine table on a subset: its ``item`` back to the batch's numbering."""
    return frame.assign(item=rows[frame["item"].to_numpy(np.int64)]) if len(frame) else frame


def _randomisation(run: Run, cfg: AssessConfig, batch: ExplainedBatch, patients: set[str],
                   permuted: dict[str, Any] | None) -> pd.DataFrame:
    """Model-parameter randomisation (:func:`gestalt_xai.assess.randomisation.randomisation_maps`) of the batch's
    patients among ``patients``, for the configured methods the batch has maps of; references kept. With a
    ``permuted`` model (``randomisation.permuted_model``), the data-randomisation rows too (mode ``data``)."""
    from gestalt_xai.assess.randomisation import randomisation_maps

    methods = [m for m in cfg.randomisation.methods if m in batch.maps]
    if not methods:
        return pd.DataFrame()
    rows, score_model, crops, maps, params = _subset(batch, patients, methods)
    frames = [randomisation_maps(score_model, crops, maps, methods=methods, method_params=params,
                                 layers=batch.setup.cfg.layers, mode=mode, seed=cfg.seed)
              for mode in cfg.randomisation.modes]
    if permuted is not None:
        frames.append(_data_randomisation(run, batch, permuted, rows, crops, maps, methods, params))
    return _with_items(batch, _renumber(pd.concat(frames, ignore_index=True), rows))


def _data_randomisation(run: Run, batch: ExplainedBatch, permuted: dict[str, Any], rows: np.ndarray,
                        crops: np.ndarray, maps: dict[str, np.ndarray], methods: list[str],
                        params: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The permuted-label model's maps of the same (image, target) items against the trained model's stored maps
    (:func:`gestalt_xai.assess.randomisation.data_randomisation_maps`), its references its own (centroids of the
    gallery embedded through it: :func:`~gestalt_xai.assess.randomisation.control_setup`)."""
    from gestalt_xai.assess.randomisation import control_setup, data_randomisation_maps
    from gestalt_xai.attribution.planning import build_targets
    from gestalt_xai.attribution.score_model import ScoreModel

    key = (batch.instance, batch.model_id)
    if key not in permuted["setups"]:
        permuted["setups"][key] = control_setup(run, batch.setup, batch.model_id, permuted["model"])
    setup = permuted["setups"][key]
    wanted = [(batch.image_ids[i], batch.targets[i]) for i in rows]
    items = {(it.image_id, str(it.target)): it for plan in setup.plans([], sorted({i for i, _ in wanted}))
             for it in plan.items if plan.group_id == batch.model_id}
    found = [items.get(w) for w in wanted]
    keep = [i for i, it in enumerate(found) if it is not None]
    if not keep:
        return pd.DataFrame()
    group = [(mid, m) for mid, m, _ in setup.models if mid == batch.model_id]
    batch_items = [found[i] for i in keep]
    score_model = ScoreModel(group, build_targets(batch_items, group, setup.slots, setup.kind), setup.slots)
    table = data_randomisation_maps(score_model, crops[keep], {m: v[keep] for m, v in maps.items()},
                                    methods=methods, method_params=params, layers=batch.setup.cfg.layers)
    return table.assign(item=np.asarray(keep, np.int64)[table["item"].to_numpy(np.int64)])


def _robustness(run: Run, cfg: AssessConfig, batch: ExplainedBatch, patients: set[str]) -> pd.DataFrame:
    """Landmark jitter (:func:`gestalt_xai.assess.robustness.landmark_jitter`) of the batch's patients among
    ``patients`` for the configured methods the batch has maps of."""
    from gestalt_xai.assess.robustness import landmark_jitter, load_jitter_inputs

    methods = [m for m in cfg.robustness.methods if m in batch.maps]
    if not methods:
        return pd.DataFrame()
    rows, score_model, _, maps, params = _subset(batch, patients, methods)
    ids = [batch.image_ids[i] for i in rows]
    photos, landmarks, matrices = load_jitter_inputs(run, ids)
    table = landmark_jitter(score_model, photos, landmarks, matrices, maps, methods=methods, method_params=params,
                            layers=batch.setup.cfg.layers, image_ids=ids, amplitude=cfg.robustness.amplitude,
                            draws=cfg.robustness.draws, seed=cfg.seed, device=cfg.device)
    return _with_items(batch, _renumber(table.drop(columns=["image_id"], errors="ignore"), rows))


def _assess_batch(run: Run, cfg: AssessConfig, batch: ExplainedBatch, parts: Parts, errors: list[ErrorRow],
                  face: np.ndarray | None, randomised: set[str], jittered: set[str],
                  permuted: dict[str, Any] | None) -> None:
    """The per-batch families of one batch, each stored as a resumable part."""
    from gestalt_xai.assess.faithfulness import occlusion_agreement

    if cfg.faithfulness.enabled:
        result: dict[str, pd.DataFrame] = {}

        def curves(name: str) -> pd.DataFrame:
            if not result:
                result["faithfulness_curves"], result["faithfulness"] = _faithfulness(cfg, batch, face, errors)
            return result[name]

        parts.get("faithfulness_curves", batch.key, lambda: curves("faithfulness_curves"))
        parts.get("faithfulness", batch.key, lambda: curves("faithfulness"))
    if "occlusion" in batch.maps and len(batch.maps) > 1:
        parts.get("occlusion_agreement", batch.key,
                  lambda: _with_items(batch, occlusion_agreement(batch.maps, batch.maps["occlusion"])))
    if cfg.randomisation.enabled and set(batch.image_ids) & randomised:
        parts.get("randomisation", batch.key, lambda: _randomisation(run, cfg, batch, randomised, permuted))
    if cfg.robustness.enabled and set(batch.image_ids) & jittered:
        parts.get("robustness", batch.key, lambda: _robustness(run, cfg, batch, jittered))


def _local_rows(index: pd.DataFrame, images: pd.DataFrame, cfg: AssessConfig, rows: pd.DataFrame) -> pd.DataFrame:
    """Maps the localisation scores: it is cheap (no forward pass), so every test image's (not only the
    ``max_patients`` perturbed ones) and the undiagnosed patients' (their maps towards several syndromes give the
    contrastivity pairs), under the models / methods filters; the listed ids when ``images`` is a list."""
    if isinstance(cfg.images, list):
        return rows
    wanted = images["undiagnosed"] | (images["test"] if cfg.images == "test" else ~images["undiagnosed"])
    out = index[index["image_id"].astype(str).isin(set(images.loc[wanted, "image_id"].astype(str)))]
    if cfg.models is not None:
        out = out[out["model_id"].isin(cfg.models)]
    if cfg.methods is not None:
        out = out[out["method"].isin(cfg.methods)]
    return out.reset_index(drop=True)


def _localisation(run: Run, store: Any, rows: pd.DataFrame, truth: Any, errors: list[ErrorRow]
                  ) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Localisation against the planted features' region and change masks, contrastivity, the planted-region table
    and the confounder check (:mod:`gestalt_xai.assess.localisation_run`, :mod:`gestalt_xai.assess.planted`);
    nothing for a real cohort."""
    from gestalt_xai.assess.localisation_run import localisation_tables
    from gestalt_xai.assess.planted import confounder_check, planted_region_table

    if truth is None:
        return {}, []
    tables, lines = localisation_tables(run, store, rows, truth=truth, errors=errors)
    hits, hit_lines = planted_region_table(run, truth=truth, errors=errors)
    confounder, confounder_lines = confounder_check(run, tables.get("localisation"), truth=truth, errors=errors)
    return {**tables, **hits, **confounder}, lines + hit_lines + confounder_lines


# ------------------------------------------------------------------------------------------------ the stage
@stage("assess", options=AssessConfig, order=90,
       summary="faithfulness curves, localisation against the truth, randomisation sanity checks, robustness",
       reads=(LAYOUT.maps, LAYOUT.aligned, LAYOUT.cohort, LAYOUT.aggregate), writes=(LAYOUT.assess,),
       example="gestalt-xai assess --run runs/demo --set max_patients=10",
       tiny_options={"max_patients": 4, "faithfulness": {"steps": 4, "curves": ["deletion", "morf"]},
                     "randomisation": {"max_patients": 2, "methods": ["gradcam", "saliency"]},
                     "robustness": {"max_patients": 2, "draws": 1, "methods": ["saliency"]}})
def assess_stage(run: Run, cfg: AssessConfig) -> StageResult:
    """Run the assess stage on ``run``; see the module docstring for what it writes."""
    out = run.dir(LAYOUT.assess)
    store, index = require_maps(run)
    errors: list[ErrorRow] = []
    images = run.image_table()
    controls = random_controls(run)
    patients = select_patients(images, index, cfg)
    rows = _rows(index, patients, cfg, controls)
    if cfg.target_groups is not None:
        from gestalt_xai.aggregate.annotate import annotate_index

        groups = annotate_index(rows[KEY_COLUMNS], images)[0]
        keep = set(map(tuple, groups.loc[groups["target_group"].isin(cfg.target_groups), KEY_COLUMNS].to_numpy()))
        rows = rows[[tuple(k) in keep for k in rows[KEY_COLUMNS].astype(str).to_numpy()]].reset_index(drop=True)
        if not len(rows):
            raise InputError(f"assess: no maps of the target groups {cfg.target_groups}")
    parts = Parts(run, cfg, run.path / LAYOUT.assess / "parts", ignore=_PRESENTATION)
    timings: dict[str, float] = {}

    # ---- perturbation families: one pass over batches of stored maps with their rebuilt ScoreModels
    t0 = time.perf_counter()
    perturbed = rows[rows["target_kind"].isin(cfg.targets) & ~rows["model_id"].isin(controls)]
    keys: list[str] = []
    if len(perturbed) and (cfg.faithfulness.enabled or cfg.randomisation.enabled or cfg.robustness.enabled):
        face = mean_face(run, images) if "mean" in cfg.faithfulness.baselines else None
        randomised = set(patients[: cfg.randomisation.max_patients])
        permuted = _permuted_model(run, cfg)
        jittered = set(patients[: cfg.robustness.max_patients])
        for batch in explained_batches(run, store, perturbed, errors, batch_size=cfg.batch_size):
            keys.append(batch.key)
            _assess_batch(run, cfg, batch, parts, errors, face, randomised, jittered, permuted)
    timings["perturbation"] = time.perf_counter() - t0

    tables = {family: parts.table(family, keys) for family in FAMILIES}
    results: dict[str, Any] = {"patients": len(patients), "batches": len(keys), "reused_batches": parts.reused,
                               "seconds": {k: round(v, 2) for k, v in parts.seconds.items()}}

    # ---- localisation and the synthetic cohort's checks (every selected map, controls included)
    t0 = time.perf_counter()
    truth, truth_errors = read_truth(run)
    if cfg.localisation:
        errors += truth_errors
        local, local_lines = _localisation(run, store, _local_rows(index, images, cfg, rows), truth, errors)
        tables.update(local)
    else:
        local_lines = []
    timings["localisation"] = time.perf_counter() - t0

    # ---- tidy per-item metrics, breakdowns, paired tests, summary and figures
    from gestalt_xai.assess import report

    metrics = report.item_metrics(tables, images)
    strata_table = _strata_table(images, truth, cfg)
    strata_kinds = [k for k in cfg.strata if k in strata_table.columns]
    written = {}
    for name, frame in tables.items():
        if len(frame):
            write_parquet(frame, out / f"{name}.parquet")
            written[name] = out / f"{name}.parquet"
    if len(metrics):
        from gestalt_xai.assess.stats import breakdown, paired_tests

        write_parquet(metrics, out / "metrics.parquet")
        strata = breakdown(metrics, "value", ["model_id", "target_kind", "metric", "method"], strata_table,
                           strata=strata_kinds, seed=cfg.seed)
        write_parquet(strata, out / "strata.parquet")
        tests = paired_tests(metrics[~metrics["method"].eq("random")], "value",
                             keys=["model_id", "target_kind", "metric"])
        write_parquet(tests, out / "paired_tests.parquet")
    else:
        strata = tests = pd.DataFrame()
    summary, lines = report.summarise(metrics, strata, tests, controls, results, _notes(cfg, tables))
    atomic_write_bytes(out / "summary.md", summary.encode("utf-8"))
    if cfg.figures:
        report.draw_figures(tables, metrics, sorted(controls), out / "figures", tuple(cfg.figure_formats))
    timings = {k: round(v, 2) for k, v in timings.items()}
    run.write_errors(errors)
    results["timings"] = timings
    return StageResult(items=int(len(rows)), outputs={"assess": out, "summary": out / "summary.md"},
                       summary=lines + local_lines, extra={"results": results})


def _strata_table(images: pd.DataFrame, truth: Any, cfg: AssessConfig) -> pd.DataFrame:
    """Per subject: sex, age band, ancestry (:func:`gestalt_xai.aggregate.faces.strata_of`, when the cohort has
    them) and, for a synthetic cohort, the rendered skin tone's fifth (``0.0-0.2`` light … ``0.8-1.0`` dark)."""
    from gestalt_xai.aggregate.faces import strata_of

    table = strata_of(images, cfg.age_bands)
    tones = getattr(truth, "images", None)
    if tones is not None and "skin_tone" in tones.columns:
        first = (tones.sort_values("image_id").groupby(tones["subject_id"].astype(str))["skin_tone"].first())
        edges = np.linspace(0, 1, 6)
        band = np.clip(np.searchsorted(edges, first.to_numpy(float), side="right") - 1, 0, 4)
        labels = {s: f"{edges[b]:.1f}-{edges[b + 1]:.1f}" for s, b in zip(first.index, band, strict=True)}
        table["skin_tone"] = table["subject_id"].astype(str).map(labels)
    return table


def _notes(cfg: AssessConfig, tables: dict[str, pd.DataFrame]) -> list[str]:
    """What a reader of the summary must know about how the numbers were made."""
    f = cfg.faithfulness
    notes = [f"Faithfulness: {', '.join(f.curves)} curves, {f.steps} steps, baseline(s) {', '.join(f.baselines)}, "
             f"regions {f.region_size}×{f.region_size} px for MoRF/LeRF, on the explained score (no softmax), "
             f"beside {f.random_maps} seeded random map(s) per image."]
    if len(tables.get("randomisation", ())):
        notes.append("Randomisation: the centroid and pair references are kept from the trained model, so the same "
                     "scalar is explained under each randomised copy (Adebayo et al., NeurIPS 2018); the column is "
                     "ρ at the last cascading step (stem), lower = more dependent on the model.")
    if len(tables.get("robustness", ())):
        notes.append(f"Robustness: the five alignment landmarks jittered by ±{cfg.robustness.amplitude:g} px "
                     f"({cfg.robustness.draws} draws per patient), maps warped back into the original crop.")
    return notes
