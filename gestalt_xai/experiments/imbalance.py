"""The class-imbalance experiment: how the number of training subjects of a syndrome changes its explanations.

GMDB is long-tailed (Hsieh et al., Nat. Genet. 2022; Hustinx et al., WACV 2023): most syndromes have a handful of
patients. This stage trains *variants* of the run's model — train-stage option overrides
(:class:`~gestalt_xai.models.train.TrainConfig`: class subsets, per-class caps, plain vs GM-Arc's weighted loss,
balanced sampling, frozen backbone) — each with several seeds, explains one fixed probe set of test patients with
every variant, and relates map stability, localisation against the synthetic truth, faithfulness and accuracy to the
training subjects of the patient's syndrome, every effect beside its seed-to-seed noise floor.

**Design, declared before any training** (``experiments/imbalance/design.parquet`` and ``probe.parquet`` are
written before the first unit runs):

* ``variants``: name → train-option overrides of the base options ``train`` (``min_train_subjects: K`` keeps the
  classes with at least K training subjects: "frequent classes only"). ``subsample`` adds one variant per size:
  one syndrome (``largest``: the most training subjects, ties by id; or an id) capped to that many training subjects
  (``class_caps``, drawn with the unit's seed). ``reference`` (default ``full``: all classes as given) is the
  full-data model every variant is compared with, trained with the same recipe and seeds. With ``init_model`` every
  variant fine-tunes from that model of ``run/models`` (a fresh classifier when its classes differ).
* ``probe``: the subsampled syndrome's test patients (all, or the first ``subsampled``) and up to ``per_syndrome``
  test patients (one image per subject, subjects in a seeded order) of every other syndrome with test images.
  Chosen from the protocol's test split and the labels only — never from a model's output — so no variant is
  chosen or tuned on them. Every variant explains the same probe items with the same methods and target kinds.
* ``seeds``: each variant is trained once per seed (≥ 2): the noise floor is the similarity of two seeds of the same
  variant, on the same patient.

**Work units** (:mod:`gestalt_xai.engine`; ``engine: local | ray``): one per (variant, seed), run by
:func:`~gestalt_xai.experiments.imbalance_unit.variant_unit` into ``experiments/imbalance/units/<variant>-s<seed>/``
(weights there only with ``keep_models``, never in ``run/models``). A finished unit is never run again; a failed
unit is an error row and the tables are made from the others.

**Measures and outputs** (:mod:`gestalt_xai.experiments.imbalance_tables`): ``similarity.parquet`` (every probe map
against the same map of other seeds of its variant — the noise floor — and of the reference, with the assess stage's
:func:`~gestalt_xai.assess.compare.compare_maps`), ``localisation.parquet``, ``rank_agreement.parquet``,
``faithfulness.parquet``, ``accuracy.parquet``, ``training.parquet`` (per unit), ``effects.parquet`` (the
pre-declared contrasts: per measure, the per-subject slope against log₂ training subjects of the subsampled syndrome
and each level's difference from the reference, with subject-bootstrap 95 % intervals), ``trend.png`` and
``summary.md`` (statements computed from these numbers). The unit map stores are deleted once the tables are made,
unless ``keep_maps``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from gestalt_xai.attribution.gradients import DEFAULT_LAYER
from gestalt_xai.config import StageConfig, validate_config
from gestalt_xai.engine import EngineConfig, WorkUnit, digest, run_units
from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.experiments.imbalance_unit import UnitSpec, variant_unit
from gestalt_xai.runs import LAYOUT, Run, sha256_file, write_parquet
from gestalt_xai.stages import StageResult, stage

log = logging.getLogger(__name__)

__all__ = ["ImbalanceConfig", "ProbeOptions", "SubsampleOptions", "FaithfulnessOptions", "Design", "build_design",
           "select_probe", "imbalance_stage"]

#: train options the experiment sets itself for every unit
RESERVED = ("seed", "init", "model_id", "threads", "device", "permute_labels", "num_workers")
#: what a variant may add besides train options
VARIANT_KEYS = ("min_train_subjects",)
#: target kinds whose maps every variant can make for a probe patient
TARGETS = ("centroid", "logit")


class SubsampleOptions(StageConfig):
    """One syndrome capped to each of ``sizes`` training subjects (a variant per size)."""

    syndrome: str = Field("largest", description="largest: the syndrome with the most training subjects; or an id")
    sizes: list[int] = Field(default_factory=lambda: [50, 25, 10, 5, 2], min_length=1)

    @model_validator(mode="after")
    def _sizes(self) -> SubsampleOptions:
        if min(self.sizes) < 1 or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"sizes must be distinct and ≥ 1, got {self.sizes}")
        return self


class ProbeOptions(StageConfig):
    """The probe patients (declared before training; module docstring)."""

    subsampled: int | None = Field(None, ge=1, description="test images of the subsampled syndrome (None: all)")
    per_syndrome: int = Field(2, ge=0, description="test images (one per subject) of every other syndrome")
    seed: int = Field(0, description="order of the other syndromes' subjects")


class FaithfulnessOptions(StageConfig):
    """Deletion curves (MoRF, pixels) of the probe maps
    (:func:`~gestalt_xai.assess.faithfulness.perturbation_curves`)."""

    enabled: bool = True
    images: Literal["all", "focus"] = Field("all", description="all probe images, or the subsampled syndrome's")
    steps: int = Field(16, ge=2)
    baseline: str = Field("black", description="black | blur | mean (the assess stage's baselines)")
    batch_size: int = Field(16, ge=1, description="items per call")


class ImbalanceConfig(EngineConfig):
    """Options of ``gestalt-xai imbalance`` (with the engine's: :class:`~gestalt_xai.engine.EngineConfig`)."""

    train: dict[str, Any] = Field(default_factory=lambda: {"preset": "demo"},
                                  description="base train options (gestalt-xai train), shared by every variant")
    init_model: str | None = Field(None, description="fine-tune every variant from run/models/<id> (None: scratch)")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"full": {}},
        description="variant name → train-option overrides (and min_train_subjects: K)")
    subsample: SubsampleOptions | None = Field(None, description="one syndrome capped to each size (a variant each)")
    reference: str = Field("full", description="the full-data variant every other is compared with")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="training seeds of every variant (≥ 2)")
    probe: ProbeOptions = Field(default_factory=ProbeOptions)
    methods: list[str] = Field(default_factory=lambda: ["gradcam", "saliency", "input_x_gradient"])
    targets: list[str] = Field(default_factory=lambda: ["centroid"], description="centroid | logit")
    layers: list[str] = Field(default_factory=lambda: [DEFAULT_LAYER])
    batch_size: int = Field(8, ge=1, description="explain batch size")
    comparisons: list[str] = Field(default_factory=lambda: ["spearman", "ssim"],
                                   description="map comparisons (gestalt_xai.assess.compare.COMPARISONS)")
    faithfulness: FaithfulnessOptions = Field(default_factory=FaithfulnessOptions)
    unit_threads: int = Field(2, ge=1, description="torch threads of every unit (CPU results depend on it)")
    unit_memory_mb: int = Field(3000, ge=0, description="peak memory of one unit, declared to Ray's scheduler")
    keep_models: bool = Field(False, description="keep the variants' weights (experiments/imbalance/models)")
    keep_maps: bool = Field(False, description="keep the variants' probe maps (units/*/maps) after the tables")
    seed: int = Field(0, description="bootstrap intervals of the summary")

    @model_validator(mode="after")
    def _check(self) -> ImbalanceConfig:
        from gestalt_xai.assess.compare import COMPARISONS
        from gestalt_xai.attribution.base import build_methods
        from gestalt_xai.models.train import TrainConfig

        if len(set(self.seeds)) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: give at least 2 distinct seeds (the noise floor is the seed-to-seed "
                             f"variation), got {self.seeds}")
        for name in self.variants:
            if not name.replace("_", "").replace("-", "").isalnum() or name.startswith("sub"):
                raise ValueError(f"variants: {name!r} is not a variant name (letters, digits, '_', '-'; 'sub…' is "
                                 "kept for the subsample variants)")
        for where, given in [("train", dict(self.train))] + [(f"variants.{name}", {**self.train, **overrides})
                                                              for name, overrides in self.variants.items()]:
            if bad := sorted(set(given) & set(RESERVED)):
                raise ValueError(f"{where}: {bad} are set by the experiment for every unit (seeds, init_model, "
                                 "unit_threads)")
            try:
                validate_config(TrainConfig, {k: v for k, v in given.items() if k not in VARIANT_KEYS}, where=where)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if self.reference not in self.variants:
            raise ValueError(f"reference: {self.reference!r} is not one of the variants {sorted(self.variants)}")
        if bad := [t for t in self.targets if t not in TARGETS] or not self.targets:
            raise ValueError(f"targets: {bad or self.targets} — choose from {list(TARGETS)}")
        if bad := [c for c in self.comparisons if c not in COMPARISONS] or not self.comparisons:
            raise ValueError(f"comparisons: {bad or self.comparisons} — choose from {sorted(COMPARISONS)}")
        try:
            build_methods(self.methods, {})
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


# --------------------------------------------------------------------------------------------------- design
class Design:
    """The resolved design: every variant's train options (without seed) and the subsampled syndrome."""

    def __init__(self, variants: dict[str, dict[str, Any]], train_subjects: dict[str, int], focus: str | None,
                 sizes: dict[str, int]) -> None:
        self.variants = variants
        #: training subjects per syndrome with the base options
        self.train_subjects = train_subjects
        #: the subsampled syndrome (None without ``subsample``)
        self.focus = focus
        #: variant → training subjects of the focus syndrome
        self.sizes = sizes

    def table(self, seeds: list[int]) -> pd.DataFrame:
        rows = [{"variant": v, "seed": s, "focus_syndrome": self.focus or "",
                 "focus_train_subjects": self.sizes.get(v, -1),
                 "overrides": json.dumps(o, sort_keys=True, default=str)}
                for v, o in self.variants.items() for s in seeds]
        return pd.DataFrame(rows)


def _init_classes(run: Run, cfg: ImbalanceConfig) -> list[str] | None:
    if cfg.init_model is None:
        return None
    meta = run.path / LAYOUT.models / f"{cfg.init_model}.json"
    if not meta.exists() or not meta.with_suffix(".safetensors").exists():
        raise InputError(f"init_model: {run.relative(meta.with_suffix('.safetensors'))} not found; train it first "
                         f"(`gestalt-xai train --run {run.path}`)")
    return list(json.loads(meta.read_text(encoding="utf-8"))["syndrome_ids"])


def build_design(run: Run, cfg: ImbalanceConfig) -> Design:
    """Resolve the variants against the run's cohort (module docstring); the subsample sizes at or above the focus
    syndrome's training subjects are dropped (they equal the reference), with a warning."""
    from gestalt_xai.models.train import TrainConfig
    from gestalt_xai.models.train_data import select_training_data

    base = select_training_data(run.cohort(), run, TrainConfig(**cfg.train))
    counts = base.train.groupby("syndrome_id")["subject_id"].nunique().sort_index()
    train_subjects = {str(k): int(v) for k, v in counts.items()}
    variants: dict[str, dict[str, Any]] = {}
    for name, overrides in cfg.variants.items():
        o = dict(overrides)
        if "min_train_subjects" in o:
            k = int(o.pop("min_train_subjects"))
            keep = sorted(s for s, n in train_subjects.items() if n >= k)
            if len(keep) < 2:
                raise InputError(f"variants.{name}: only {keep} have ≥ {k} training subjects; a classifier needs 2")
            o["syndromes"] = keep
        variants[name] = o
    focus, sizes = None, {}
    if cfg.subsample is not None:
        focus = cfg.subsample.syndrome
        if focus == "largest":
            focus = sorted(train_subjects, key=lambda s: (-train_subjects[s], s))[0]
        if focus not in train_subjects:
            raise InputError(f"subsample.syndrome: {focus!r} has no training subjects here ({sorted(train_subjects)})")
        for size in sorted(cfg.subsample.sizes, reverse=True):
            if size >= train_subjects[focus]:
                log.warning("imbalance: %s has %d training subjects; subsample size %d dropped", focus,
                            train_subjects[focus], size)
                continue
            caps = {**(cfg.train.get("class_caps") or {}), focus: size}
            variants[f"sub{size}"] = {"cap_unit": "subject", "class_caps": caps}
        sizes = {v: (train_subjects[focus] if not v.startswith("sub") else int(v[3:])) for v in variants}
    return Design(variants, train_subjects, focus, sizes)


def select_probe(run: Run, cfg: ImbalanceConfig, design: Design) -> pd.DataFrame:
    """The probe patients (module docstring): ``image_id, subject_id, syndrome_id, why``, sorted by image id."""
    table = run.image_table()
    test = table[table["test"] & table["aligned"]].sort_values("image_id", kind="stable")
    rng = np.random.default_rng(cfg.probe.seed)
    rows = []
    for syndrome, group in test.groupby("syndrome_id", sort=True):
        if syndrome == design.focus:
            chosen = group.head(cfg.probe.subsampled) if cfg.probe.subsampled else group
            rows += [{**r, "why": "subsampled syndrome"} for r in chosen[["image_id", "subject_id",
                                                                          "syndrome_id"]].to_dict("records")]
            continue
        subjects = np.array(sorted(group["subject_id"].unique()), dtype=object)
        for subject in subjects[rng.permutation(len(subjects))][: cfg.probe.per_syndrome]:
            first = group[group["subject_id"] == subject].iloc[0]
            rows.append({"image_id": first["image_id"], "subject_id": subject, "syndrome_id": syndrome,
                         "why": "per-syndrome draw"})
    probe = pd.DataFrame(rows, columns=["image_id", "subject_id", "syndrome_id", "why"]).astype(str)
    if not len(probe):
        raise InputError("no aligned test image to probe: the cohort's protocol has no test set")
    return probe.sort_values("image_id", kind="stable").reset_index(drop=True)


def _train_options(run: Run, cfg: ImbalanceConfig, overrides: dict[str, Any], variant: str, seed: int,
                   init_classes: list[str] | None) -> Any:
    from gestalt_xai.models.train import TrainConfig

    opts = {**cfg.train, **overrides, "seed": seed, "model_id": f"{variant}-s{seed}", "threads": cfg.unit_threads}
    if cfg.init_model is not None:
        opts["init"] = run.path / LAYOUT.models / f"{cfg.init_model}.safetensors"
        if "syndromes" in overrides and sorted(overrides["syndromes"]) != sorted(init_classes or []):
            opts["new_classifier"] = True
    return TrainConfig(**opts)


# ----------------------------------------------------------------------------------------------------- stage
@stage("imbalance", options=ImbalanceConfig, order=95,
       summary="class-imbalance experiment: train variants × seeds, explain a fixed probe set, relate map "
               "stability, localisation and faithfulness to training-set size beside the seed noise floor",
       reads=(LAYOUT.cohort, LAYOUT.alignments, LAYOUT.models), writes=(LAYOUT.imbalance,),
       example="gestalt-xai imbalance --run runs/demo --engine ray",
       tiny_options={"train": {"preset": "demo", "epochs": 1}, "seeds": [0, 1], "subsample": {"sizes": [2]},
                     "probe": {"per_syndrome": 1, "subsampled": 2}, "methods": ["gradcam", "saliency"],
                     "comparisons": ["spearman"], "faithfulness": {"steps": 4}, "unit_threads": 2})
def imbalance_stage(run: Run, cfg: ImbalanceConfig) -> StageResult:
    """Run the experiment (module docstring) into ``experiments/imbalance/``."""
    from gestalt_xai.experiments.imbalance_tables import make_tables

    root = run.dir(LAYOUT.imbalance)
    design = build_design(run, cfg)
    probe = select_probe(run, cfg, design)
    write_parquet(design.table(cfg.seeds), root / "design.parquet")  # declared before any unit trains
    write_parquet(probe, root / "probe.parquet")
    init_classes = _init_classes(run, cfg)
    explain = {"methods": list(cfg.methods), "layers": list(cfg.layers), "batch_size": cfg.batch_size}
    faith = cfg.faithfulness.model_dump(exclude={"enabled", "images"}) if cfg.faithfulness.enabled else {}
    if faith:
        chosen = probe if cfg.faithfulness.images == "all" else probe[probe["syndrome_id"] == design.focus]
        faith["image_ids"] = chosen["image_id"].tolist()
    specs = [UnitSpec(v, s, _train_options(run, cfg, o, v, s, init_classes), probe["image_id"].tolist(), explain,
                      list(cfg.targets), faith, cfg.keep_models)
             for v, o in design.variants.items() for s in cfg.seeds]
    # what a unit computes: its options, with the init checkpoint by content (a moved run folder reuses its units)
    init_sha = sha256_file(specs[0].train.init) if cfg.init_model is not None else ""
    digests = [digest(s.variant, s.seed, s.train.model_dump(mode="json", exclude={"init"}), init_sha, s.probe,
                      s.explain, s.targets, s.faithfulness, s.keep_model) for s in specs]
    ledger = run.ledger()
    tables_digest = digest(digests, cfg.comparisons, cfg.reference, cfg.seed)
    outputs = {name: root / f"{name}.parquet" for name in ("similarity", "effects")} | {
        "summary": root / "summary.md", "figure": root / "trend.png"}
    tables_done = (ledger.done().get("tables", {}).get("digest") == tables_digest
                   and all(p.exists() for p in outputs.values()))
    units = [WorkUnit(f"{s.variant}/s{s.seed}", variant_unit, s, out=root / "units" / f"{s.variant}-s{s.seed}",
                      digest=d, threads=cfg.unit_threads, memory_mb=cfg.unit_memory_mb,
                      key={"variant": s.variant, "seed": s.seed}, needs=() if tables_done else ("maps",))
             for s, d in zip(specs, digests, strict=True)]
    outcomes = run_units(run, units, cfg, ledger)
    errors = [o.error for o in outcomes.values() if o.error is not None]
    finished = [u for u in units if outcomes[u.unit_id].error is None]
    for u in finished:
        rows = pd.read_parquet(u.out / "errors.parquet")
        errors += [_error_row(r) for r in rows.to_dict("records")]
    run.write_errors(errors)
    complete = len(finished) == len(units)
    if not tables_done:
        summary = make_tables(run, cfg, design, probe, {u.unit_id: u for u in finished}, root)
        if complete:  # tables of some units only are made for a look, and remade once every unit has finished
            ledger.add("tables", {"digest": tables_digest})
    else:
        summary = (root / "summary.md").read_text(encoding="utf-8").splitlines()
    if complete:  # the finished units' maps stay until the tables have every unit
        _tidy(root, finished, cfg)
    count = {k: sum(o.status == k for o in outcomes.values()) for k in ("done", "reused", "failed")}
    lines = [f"{len(units)} units ({len(design.variants)} variants × {len(cfg.seeds)} seeds): {count['done']} run "
             f"now, {count['reused']} reused, {count['failed']} failed; probe: {len(probe)} test images of "
             f"{probe['subject_id'].nunique()} subjects"]
    lines += [s[2:] for s in summary if s.startswith("- ")]
    return StageResult(items=len(units), outputs=outputs, summary=lines,
                       extra={"focus_syndrome": design.focus, "variants": sorted(design.variants),
                              "probe_sha": digest(probe["image_id"].tolist()),
                              "unit_seconds": {u: round(o.seconds, 2) for u, o in outcomes.items() if o.seconds}})


def _error_row(record: dict[str, Any]) -> Any:
    from gestalt_xai.runs import ErrorRow

    return ErrorRow(record["item_id"], record["error_kind"], record["message"], json.loads(record["key"] or "{}"))


def _tidy(root: Path, finished: list[WorkUnit], cfg: ImbalanceConfig) -> None:
    """Delete the units' maps unless ``keep_maps``; move kept weights to ``experiments/imbalance/models``."""
    for u in finished:
        if not cfg.keep_maps:
            shutil.rmtree(u.out / "maps", ignore_errors=True)
        weights = u.out / "model.safetensors"
        if weights.exists():
            target = root / "models" / f"{u.out.name}.safetensors"
            target.parent.mkdir(parents=True, exist_ok=True)
            for suffix in (".safetensors", ".json"):
                os.replace(weights.with_suffix(suffix), target.with_suffix(suffix))
