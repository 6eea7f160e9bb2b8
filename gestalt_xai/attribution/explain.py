"""The explain stage: per-patient maps for every requested method, target and layer → ``run/maps/``.

Reads ``run/aligned/`` (crops), the declared models (``models``: every model in ``run/models/``, or checkpoints of
any format, :mod:`gestalt_xai.models.declaration` — the same declaration and model ids as the embed stage),
``run/embeddings.parquet`` (references for centroid and pair targets, rankings for ``topk``) and ``run/cohort/``
(subjects, syndromes, splits); writes the map store (:mod:`gestalt_xai.store`) and, for chosen patients, overlay
figures in ``run/maps/figures/``.

Work items are ``(image, target)`` pairs, e.g. ``(img7, centroid:SYN3)``; each gives one map per method × layer.
Items are batched (``batch_size``), each image in a batch with its own target reference, and every batch goes
through one :class:`~gestalt_xai.attribution.score_model.ScoreModel` per model group (each model alone, or the
ensemble of all with ``ensemble=True``; TTA slots with ``tta=True``). Method families share computation (the
gradient family: one forward+backward pass for Grad-CAM, HiResCAM, FullGrad, saliency and input×gradient).

On a synthetic cohort with counterfactual renderings the stage ends with a forward-only pass measuring each
item's score change under the counterfactual edits (:mod:`~gestalt_xai.attribution.effects`, ``maps/effects.parquet``).

Resumable: a batch's maps are flushed to the store together; a rerun skips every item whose maps are all stored,
so a killed run continues without recomputing stored maps. Per-item failures (no centroid left after excluding the
patient's own subject, no classifier for a logit target, non-finite maps, …) become rows of ``errors.parquet``.

Targets: ``target`` names a registered kind (:mod:`~gestalt_xai.attribution.target_kinds`), which plans the work
items and builds the targets; the stage itself knows no kind:

* ``centroid`` — linearised cosine to the syndrome centroid (leave-own-subject-out), per model and TTA slot;
* ``logit`` — the syndrome's class logit (members without a classifier are skipped and recorded);
* ``pair`` — linearised cosine to a partner image's embedding; partners from a table (both directions) or
  ``nearest:K`` gallery images of each selected syndrome (and the reverse direction: the partner explained against
  the patient);
* ``contrast`` — the centroid score of X minus that of Y (``contrast:X-Y``): why the first suggestion rather than
  the second.

Images: the protocol's ``test`` images (default), ``all``, the ``undiagnosed`` patients (no syndrome; explained
towards their ``topk:K`` suggestions, by ``contrast`` between them, or by ``pair`` similarity to their nearest gallery
faces), or a list of ids. Undiagnosed patients are never part of the gallery.

Syndromes: ``label`` (the patient's known diagnosis), ``topk:K`` (the K best-ranked syndromes by
:func:`gestalt_xai.matching.ranked_syndromes`, over the distances of the explained model group and TTA slots to the
explain gallery, own subject excluded), or explicit ids. ``matching/ranks.parquet`` is not read: it ranks with the
match stage's models, slots and per-protocol galleries, which need not be the ones explained here.

Methods and their parameters (``method_params``, and the top-level ``occlusion_*`` shorthands) are validated when
the options are built (:func:`~gestalt_xai.attribution.base.build_methods`), so ``study check`` refuses them before
any work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator

from gestalt_xai.attribution.base import UNSIGNED_METHODS, AttributionMethod, available_methods, build_methods
from gestalt_xai.attribution.effects import explain_effects
from gestalt_xai.attribution.gradients import DEFAULT_LAYER
from gestalt_xai.attribution.occlusion import OcclusionParams
from gestalt_xai.attribution.planning import ExplainSetup, batches, build_targets
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.attribution.target_kinds import (
    TargetKind,
    WorkItem,
    available_target_kinds,
    get_target_kind,
    plan_items,
)
from gestalt_xai.attribution.targets import TTASlot, parse_syndrome_spec
from gestalt_xai.engine import EngineConfig
from gestalt_xai.errors import ConfigError, InputError, error_kind
from gestalt_xai.models.declaration import ModelDeclarations, models_field
from gestalt_xai.runs import LAYOUT, ErrorRow, Run, write_parquet
from gestalt_xai.stages import StageResult, stage
from gestalt_xai.store import MapKey, MapStore

log = logging.getLogger(__name__)

__all__ = ["ExplainConfig", "explain_stage", "explain_into", "explain_shard", "explain_sharded", "DEFAULT_METHODS",
           "WorkItem", "plan_items", "PARAM_SHORTHANDS"]

DEFAULT_METHODS = ["gradcam", "hirescam", "fullgrad", "saliency", "input_x_gradient", "occlusion"]
#: top-level options that set a method's parameter: ``option -> (method, parameter)``
PARAM_SHORTHANDS = {"occlusion_patch": ("occlusion", "patch"), "occlusion_stride": ("occlusion", "stride"),
                    "occlusion_baseline": ("occlusion", "baseline")}
_OCCLUSION = OcclusionParams.model_fields


class ExplainConfig(EngineConfig):
    """Options of ``gestalt-xai explain`` (with the engine's: :class:`~gestalt_xai.engine.EngineConfig`)."""

    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS),
                               description="attribution methods (see gestalt_xai.attribution.available_methods())")
    target: str = Field("centroid", description="what scalar is explained: a registered target kind, centroid | "
                                                "logit | pair | contrast | … "
                                                "(gestalt_xai.attribution.available_target_kinds())")
    syndromes: str | list[str] = Field("label", description="label | topk:K | syndrome ids (comma-separated; "
                                                            "contrast: X-Y pairs)")
    pairs: str | None = Field(None, description="pair partners: nearest:K or a CSV/Parquet table image_id,partner_id")
    layers: list[str] = Field(default_factory=lambda: [DEFAULT_LAYER],
                              description="layers for Grad-CAM/HiResCAM (names inside each model)")
    images: Literal["test", "all", "undiagnosed"] | list[str] = Field(
        "test", description="which images to explain: the protocol's test images, every image, the undiagnosed "
                            "patients (no syndrome), or a list of ids")
    gallery: Literal["protocol", "all"] = Field(
        "protocol", description="centroid/pair gallery: train/val/gallery sets of the cohort, or every image")
    models: ModelDeclarations = models_field()
    ensemble: bool = Field(False, description="explain the mean over all models (model_id 'ensemble')")
    tta: bool = Field(False, description="average over the 4 TTA slots (flip x gray) as GM-Arc's matching does")
    cosine: Literal["linearised", "exact"] = Field("linearised", description="similarity targets' cosine")
    batch_size: int = Field(8, ge=1, description="images per batch (8-16 is fastest per image on a 2-core CPU)")
    method_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method parameters, e.g. {integrated_gradients: {steps: 64}}; each "
                                          "method declares its own (get_method(name).Params)")
    occlusion_patch: int = Field(_OCCLUSION["patch"].default, ge=1, description="occlusion window side (pixels); "
                                 "shorthand of method_params.occlusion.patch")
    occlusion_stride: int = Field(_OCCLUSION["stride"].default, ge=1, description="occlusion stride (pixels); "
                                  "shorthand of method_params.occlusion.stride")
    occlusion_baseline: Literal["black", "mean", "blur"] = Field(
        _OCCLUSION["baseline"].default, description="occlusion fill; shorthand of method_params.occlusion.baseline")
    overlay: list[str] | int = Field(4, description="image ids to draw overlay figures for, or the first N")
    effects: bool = Field(True, description="measure each explained score's change under the run's counterfactual "
                                            "edits (maps/effects.parquet; only where the run has counterfactuals)")
    overlay_on_photo: bool = Field(False, description="also draw the maps onto the original photo")
    overlay_view: str = Field("max-abs", description="named view for figures (postprocess.apply_view)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    shard_batches: int = Field(0, ge=0, description="batches per work unit run through the engine (0: none, "
                                                    "unless engine is ray or workers > 1: then 4)")

    @field_validator("target")
    @classmethod
    def _target_kind_is_registered(cls, value: str) -> str:
        try:
            get_target_kind(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _methods_and_targets_can_be_built(self) -> ExplainConfig:
        """Method names, their parameters, the occlusion grid and the target options are checked before any work."""
        if self.occlusion_stride > self.occlusion_patch:
            raise ValueError(f"occlusion_stride ({self.occlusion_stride}) must not exceed occlusion_patch "
                             f"({self.occlusion_patch}): pixels between windows would never be occluded")
        try:
            build_methods(self.methods, self.all_method_params())
            parse_syndrome_spec(self.syndromes)
            get_target_kind(self.target).check_config(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def all_method_params(self) -> dict[str, dict[str, Any]]:
        """``method_params`` with the shorthands (:data:`PARAM_SHORTHANDS`) of requested methods folded in.

        A shorthand left at the method's default defers to ``method_params``; one set to another value and a
        different value in ``method_params`` for the same parameter are a :class:`ConfigError`.
        """
        out = {name: dict(params) for name, params in self.method_params.items()}
        for option, (method, key) in PARAM_SHORTHANDS.items():
            value = getattr(self, option)
            if method not in self.methods or value == _param_default(method, key):
                continue
            given = out.setdefault(method, {})
            if key in given and given[key] != value:
                raise ConfigError(f"{option} = {value!r} and method_params.{method}.{key} = {given[key]!r} conflict: "
                                  f"give {method}'s {key} once")
            given[key] = value
        return out


def _param_default(method: str, key: str) -> Any:
    from gestalt_xai.attribution.base import get_method

    return get_method(method).Params.model_fields[key].default


# ------------------------------------------------------------------------------------------------ planning
def _expected_keys(item: WorkItem, model_id: str, methods: list[tuple[AttributionMethod, list[str]]],
                   layers: Sequence[str]) -> list[MapKey]:
    keys = []
    for inst, names in methods:
        for n in names:
            for layer in (layers if n in inst.layer_methods else [""]):
                keys.append(MapKey(item.image_id, model_id, str(item.target), n, layer))
    return keys


# ------------------------------------------------------------------------------------------------ the stage
@stage("explain", options=ExplainConfig, order=70, summary="per-patient attribution maps into the map store",
       reads=(LAYOUT.alignments, LAYOUT.models, LAYOUT.embeddings, LAYOUT.cohort), writes=(LAYOUT.maps,),
       aliases={"layers": "--layer", "models": "--model"},
       choices={"methods": available_methods, "target": available_target_kinds},
       example="gestalt-xai explain --run runs/demo --methods gradcam,hirescam,fullgrad,occlusion --target centroid",
       tiny_options={"methods": ["gradcam", "hirescam", "saliency"], "images": "test", "overlay": 1,
                     "batch_size": 4})
def explain_stage(run: Run, cfg: ExplainConfig) -> StageResult:
    """Run the explain stage on ``run``: maps for every (image, target) item into ``maps/`` (see the module
    docstring); per-item failures become error rows keyed by model, target and method."""
    from gestalt_xai.runs import torch_threads

    if not cfg.methods:
        raise ConfigError("methods: give at least one attribution method")
    methods = build_methods(cfg.methods, cfg.all_method_params())
    store = MapStore(run.dir(LAYOUT.maps))
    errors: list[ErrorRow] = []
    with torch_threads(cfg.threads):
        setup = ExplainSetup.build(run, cfg)
        if _sharded(cfg):
            n_items, figure_jobs = explain_sharded(run, cfg, setup, store, errors)
        else:
            n_items, figure_jobs = explain_into(run, cfg, setup, methods, store, errors)
        effects = explain_effects(run, setup, errors) if cfg.effects else StageResult()
    store.compact()
    rows = errors + [ErrorRow(str(r["image_id"]), str(r["error_kind"]), str(r["message"]),
                              {c: str(r[c]) for c in ("model_id", "target", "method", "layer")})
                     for r in store.errors().to_dict("records")]
    run.write_errors(rows)
    _draw_overlays(run, cfg, store, figure_jobs)
    summary = [f"{n_items} (image, target) items, {len(store)} maps in {run.relative(store.root)}", *effects.summary]
    return StageResult(items=n_items, extra={"n_maps": len(store), **effects.extra}, summary=summary,
                       outputs={"maps": store.root, **effects.outputs})


def _sharded(cfg: ExplainConfig) -> bool:
    return bool(cfg.shard_batches) or cfg.engine != "local" or cfg.workers > 1


def explain_into(run: Run, cfg: ExplainConfig, setup: ExplainSetup,
                        methods: list[tuple[AttributionMethod, list[str]]], store: MapStore,
                        errors: list[ErrorRow]) -> tuple[int, list[tuple[str, str, str]]]:
    """Explain every item ``setup`` plans into ``store``, in this process, through one writer flushed after each batch
    (items whose maps are all stored already are skipped); ``(items, figure jobs)``. Also used by experiments that
    explain models of their own (:mod:`gestalt_xai.experiments.imbalance_unit`)."""
    from gestalt_xai.data.aligned import load_crops
    from gestalt_xai.models.gestaltmatcher import preprocess
    from gestalt_xai.progress import progress

    n_items = 0
    figure_jobs: list[tuple[str, str, str]] = []
    with store.writer() as writer:
        for plan in setup.plans(errors):
            group_id, items = plan.group_id, plan.items
            todo = [it for it in items
                    if not all(writer.done(k) for k in _expected_keys(it, group_id, methods, cfg.layers))]
            log.info("explain %s: %d items, %d already stored", group_id, len(items), len(items) - len(todo))
            n_items += len(items)
            figure_jobs += [(group_id, it.image_id, str(it.target)) for it in items]
            for batch in progress(batches(todo, cfg.batch_size), f"explain {group_id}"):
                _explain_batch(run, cfg, batch, setup.kind, group_id, plan.group, setup.slots, methods,
                               plan.model_hash, writer, errors, load_crops, preprocess)
                writer.flush()
    return n_items, figure_jobs


@dataclass
class ShardPayload:
    """What one explain shard needs in a worker: the options, one model group and its batches (already planned and
    batched by the driver, so every batch is the one an in-process run would explain)."""

    cfg: ExplainConfig
    group_id: str
    group: list[tuple[str, torch.nn.Module]]
    model_hash: str
    kind: TargetKind
    slots: list[TTASlot]
    batches: list[list[WorkItem]]


def explain_shard(payload: ShardPayload, ctx: Any) -> dict[str, Any]:
    """Engine unit (:mod:`gestalt_xai.engine`): explain the payload's batches into a map store in ``ctx.out`` (one
    flush per batch, as :func:`explain_stage` flushes) and its error rows into ``ctx.out/errors.parquet``."""
    from gestalt_xai.data.aligned import load_crops
    from gestalt_xai.models.gestaltmatcher import preprocess

    cfg = payload.cfg
    run = Run(ctx.run_path)
    methods = build_methods(cfg.methods, cfg.all_method_params())
    errors: list[ErrorRow] = []
    store = MapStore(Path(ctx.out) / "maps")
    with store.writer() as writer:
        for batch in payload.batches:
            _explain_batch(run, cfg, batch, payload.kind, payload.group_id, payload.group, payload.slots, methods,
                           payload.model_hash, writer, errors, load_crops, preprocess)
            writer.flush()
    table = pd.DataFrame([r.as_record() for r in errors], columns=["item_id", "error_kind", "message", "key"])
    write_parquet(table, Path(ctx.out) / "errors.parquet")
    return {"maps": len(store), "errors": len(errors)}


def explain_sharded(run: Run, cfg: ExplainConfig, setup: ExplainSetup, store: MapStore,
                    errors: list[ErrorRow]) -> tuple[int, list[tuple[str, str, str]]]:
    """The batches of every model group as engine units of ``shard_batches`` batches each (module docstring of
    :mod:`gestalt_xai.engine`), absorbed into ``store`` in plan order: the same map store, byte for byte, as
    explaining them in this process. Shards are cut from *all* items' batches, so a resumed run finds the units a
    killed run finished (and absorbs them) instead of re-cutting what is left; ``(items, figure jobs)``."""
    import shutil

    from gestalt_xai.engine import ENGINE_FIELDS, WorkUnit, digest, run_units

    methods = build_methods(cfg.methods, cfg.all_method_params())
    size = cfg.shard_batches or 4
    threads = cfg.threads or torch.get_num_threads()
    shards_root = run.dir(LAYOUT.maps) / ".shards"
    fingerprint = cfg.model_dump(mode="json", exclude=set(ENGINE_FIELDS) | {"overlay", "shard_batches"})
    units: list[WorkUnit] = []
    n_items = 0
    figure_jobs: list[tuple[str, str, str]] = []
    stored = store.keys()
    for plan in setup.plans(errors):
        n_items += len(plan.items)
        figure_jobs += [(plan.group_id, it.image_id, str(it.target)) for it in plan.items]
        all_batches = batches(plan.items, cfg.batch_size)
        for n, start in enumerate(range(0, len(all_batches), size)):
            shard = [[it for it in b if not all(k in stored for k in _expected_keys(it, plan.group_id, methods,
                                                                                     cfg.layers))]
                     for b in all_batches[start: start + size]]
            shard = [b for b in shard if b]
            if not shard:
                continue
            unit_id = f"{plan.group_id}/shard{n:04d}"
            keys = [[(it.image_id, str(it.target)) for it in b] for b in shard]
            units.append(WorkUnit(unit_id, explain_shard,
                                  ShardPayload(cfg, plan.group_id, list(plan.group), plan.model_hash, setup.kind,
                                               list(setup.slots), shard),
                                  out=shards_root / plan.group_id / f"shard{n:04d}",
                                  digest=digest(fingerprint, plan.model_hash, keys), threads=threads,
                                  key={"model_id": plan.group_id, "shard": n}))
    ledger = run.ledger(cfg, ignore=(*ENGINE_FIELDS, "overlay", "shard_batches", "effects"))
    outcomes = run_units(run, units, cfg, ledger=ledger)
    for unit in units:  # plan order, whatever order they finished in
        outcome = outcomes[unit.unit_id]
        if outcome.error is not None:
            errors.append(outcome.error)
            continue
        store.absorb(MapStore(unit.out / "maps"))
        for r in pd.read_parquet(unit.out / "errors.parquet").to_dict("records"):
            errors.append(ErrorRow(r["item_id"], r["error_kind"], r["message"], json.loads(r["key"] or "{}")))
    shutil.rmtree(shards_root, ignore_errors=True)
    log.info("explain: %d shards (%d run now, %d failed)", len(units),
             sum(o.status == "done" for o in outcomes.values()), sum(o.error is not None for o in outcomes.values()))
    return n_items, figure_jobs


def _explain_batch(run: Run, cfg: ExplainConfig, batch: list[WorkItem], kind: TargetKind, group_id: str,
                   group: Sequence[tuple[str, torch.nn.Module]], slots: Sequence[TTASlot],
                   methods: list[tuple[AttributionMethod, list[str]]], model_hash: str, writer: Any,
                   errors: list[ErrorRow], load_crops: Any, preprocess: Any) -> None:
    def error(it: WorkItem, kind_of_error: str, message: str, method: str | None = None) -> ErrorRow:
        key = {"model_id": group_id, "target": str(it.target)} | ({"method": method} if method else {})
        return ErrorRow(it.image_id, kind_of_error, message, key)

    ids = [it.image_id for it in batch]
    try:
        crops = load_crops(run, ids)
    except InputError as exc:
        errors += [error(it, "input", str(exc)) for it in batch]
        return
    x = preprocess(crops, channel_order="RGB", device=cfg.device)
    targets = build_targets(batch, group, slots, kind)
    try:
        score_model = ScoreModel(list(group), targets, slots)
    except ConfigError as exc:
        errors += [error(it, "target", str(exc)) for it in batch]
        return
    with torch.no_grad():
        scores = score_model(x).double().cpu().numpy()
    describe = [score_model.select([i]).describe() for i in range(len(batch))]  # per-row target provenance
    for inst, names in methods:
        if len(score_model.views) > 1 and not inst.supports_tta:
            errors += [error(it, "config", f"{n} supports one model without TTA only", n)
                       for it in batch for n in names]
            continue
        # only the images whose maps of this method are not all stored yet (a resumed run, or one method that
        # failed on an earlier run, recomputes nothing else)
        rows = [i for i, it in enumerate(batch)
                if not all(writer.done(k) for k in _expected_keys(it, group_id, [(inst, names)], cfg.layers))]
        if not rows:
            continue
        sub_model = score_model if len(rows) == len(batch) else score_model.select(rows)
        try:
            maps = inst.attribute(sub_model, x[rows], names, cfg.layers)
        except Exception as exc:  # one method failing must not stop the others
            log.warning("method %s failed on a batch: %s", names, exc)
            errors += [error(batch[i], error_kind(exc), str(exc), "+".join(names)) for i in rows]
            continue
        for mm in maps:
            arr = mm.maps.detach().cpu().float().numpy()
            for j, i in enumerate(rows):
                it = batch[i]
                detail = {**it.detail, **describe[i]}
                # every declared parameter, and what the method adds (e.g. a convergence delta)
                params = {**inst.params, **mm.params}
                writer.add(MapKey(it.image_id, group_id, str(it.target), mm.method, mm.layer), arr[j],
                           model_hash=model_hash, target_value=float(scores[i]),
                           target_detail=json.dumps(detail, sort_keys=True, default=str),
                           method_params=json.dumps(params, sort_keys=True, default=str))


def _draw_overlays(run: Run, cfg: ExplainConfig, store: MapStore, jobs: list[tuple[str, str, str]]) -> None:
    from gestalt_xai.data.aligned import load_crops
    from gestalt_xai.viz import overlay_figure

    if isinstance(cfg.overlay, int):
        chosen = sorted({img for _, img, _ in jobs})[: cfg.overlay]
    else:
        chosen = [str(i) for i in cfg.overlay]
    if not chosen:
        return
    fig_dir = run.dir("maps") / "figures"
    seen: set[tuple[str, str]] = set()
    alignment, photos = None, {}
    if cfg.overlay_on_photo:
        try:  # the photo→crop matrices, and the photos themselves from the run's cohort (absolute paths)
            alignment = run.alignments(aligned_only=True).set_index("image_id")
            images = run.cohort().images
            photos = dict(zip(images["image_id"].astype(str), images["path"], strict=True))
        except Exception as exc:  # figures are optional: say why and go on
            log.warning("overlay_on_photo: %s", exc)
    for group_id, image_id, target in jobs:
        if image_id not in chosen or (image_id, target + group_id) in seen:
            continue
        seen.add((image_id, target + group_id))
        rows = store.index(image_id=image_id, model_id=group_id, target=target)
        if not len(rows):
            continue
        maps = {}
        signed = {}
        for row, m in store.iter_maps(rows.sort_values(["method", "layer"])):
            label = row["method"] + (f"\n{row['layer'].split('.')[-1]}" if row["layer"] else "")
            maps[label] = m
            signed[label] = row["method"] not in UNSIGNED_METHODS
        face = load_crops(run, [image_id])[0]
        score = float(rows["target_value"].iloc[0])
        title = f"{image_id} · {group_id} · {target} (score {score:.3f})"
        safe = f"{image_id}__{group_id}__{target}".replace(":", "-").replace("/", "_")
        overlay_figure(face, maps, signed=signed, view=cfg.overlay_view, title=title, path=fig_dir / f"{safe}.png")
        if alignment is not None and image_id in alignment.index:
            _photo_overlay(photos.get(image_id), alignment.loc[image_id], face, maps, signed, cfg, title,
                           fig_dir / f"{safe}__photo.png")


def _photo_overlay(photo_path: str | None, row: Any, face: np.ndarray, maps: dict[str, np.ndarray],
                   signed: dict[str, bool], cfg: ExplainConfig, title: str, path: Path) -> None:
    """Draw the maps onto the original photo (``photo_path``, from the run's cohort) through the alignment
    ``row``'s photo→crop matrix; a photo that is gone (real data kept outside the run) is logged and skipped."""
    from gestalt_xai.data.images import load_image
    from gestalt_xai.faces.align import row_matrix
    from gestalt_xai.viz import overlay_figure

    if not photo_path:
        log.warning("photo overlay for %s skipped: the image is not in the run's cohort", path.name)
        return
    try:
        photo = load_image(photo_path)
        aligned_hw = (row.get("photo_height"), row.get("photo_width"))
        if not pd.isna(aligned_hw[0]) and tuple(photo.shape[:2]) != tuple(int(v) for v in aligned_hw):
            raise InputError(f"{photo_path} is {photo.shape[1]}×{photo.shape[0]} pixels now but was "
                             f"{aligned_hw[1]}×{aligned_hw[0]} when aligned: the alignment no longer fits it")
        overlay_figure(face, maps, signed=signed, view=cfg.overlay_view, title=title, photo=photo,
                       matrix=row_matrix(row), path=path)
    except InputError as exc:  # the photo may be gone or changed since alignment
        log.warning("photo overlay for %s skipped: %s", path.name, exc)
