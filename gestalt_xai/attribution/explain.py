"""The explain stage: per-patient maps for every requested method, target and layer → ``run/maps/``.

Reads ``run/aligned/`` (crops), ``run/models/`` (checkpoints), ``run/embeddings.parquet`` (references for centroid and
pair targets, rankings for ``topk``) and ``run/cohort/`` (subjects, syndromes, splits); writes the map store
(:mod:`gestalt_xai.store`) and, for chosen patients, overlay figures in ``run/maps/figures/``.

Work items are ``(image, target)`` pairs, e.g. ``(img7, centroid:SYN3)``; each gives one map per method × layer.
Items are batched (``batch_size``), each image in a batch with its own target reference, and every batch goes
through one :class:`~gestalt_xai.attribution.score_model.ScoreModel` per model group (each model alone, or the
ensemble of all with ``ensemble=True``; TTA slots with ``tta=True``). Method families share computation (the
gradient family: one forward+backward pass for Grad-CAM, HiResCAM, FullGrad, saliency and input×gradient).

Resumable: a batch's maps are flushed to the store together; a rerun skips every item whose maps are all stored,
so a killed run continues without recomputing stored maps. Per-item failures (no centroid left after excluding the
patient's own subject, no classifier for a logit target, non-finite maps, …) become rows of ``errors.parquet``.

Targets (:mod:`~gestalt_xai.attribution.targets`):

* ``centroid`` — linearised cosine to the syndrome centroid (leave-own-subject-out), per model and TTA slot;
* ``logit`` — the syndrome's class logit (members without a classifier are skipped and recorded);
* ``pair`` — linearised cosine to a partner image's embedding; partners from a table (both directions) or
  ``nearest:K`` gallery images of each selected syndrome (and the reverse direction: the partner explained against
  the patient).

Syndromes: ``label`` (the patient's known diagnosis), ``topk:K`` (the K best-ranked syndromes by GM-Arc's ranking:
nearest gallery image per syndrome, slot-averaged cosine distance over the group's models, own subject excluded), or
explicit ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator

from gestalt_xai.attribution.base import UNSIGNED_METHODS, AttributionMethod, get_method
from gestalt_xai.attribution.gradients import DEFAULT_LAYER
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.attribution.targets import (
    CentroidBank,
    CentroidTarget,
    LogitTarget,
    PairTarget,
    Slot,
    Target,
    parse_pair_spec,
    parse_syndrome_spec,
    read_pairs_table,
)
from gestalt_xai.config import StageConfig
from gestalt_xai.errors import ConfigError, InputError, error_kind
from gestalt_xai.store import MapKey, MapStore

log = logging.getLogger(__name__)

__all__ = ["ExplainConfig", "explain_stage", "DEFAULT_METHODS", "WorkItem", "plan_items"]

DEFAULT_METHODS = ["gradcam", "hirescam", "fullgrad", "saliency", "input_x_gradient", "occlusion"]
TEST_SETS = ("test", "frequent_test", "rare_test")
GALLERY_SETS = ("train", "val", "frequent_gallery", "rare_gallery")


class ExplainConfig(StageConfig):
    """Options of ``gestalt-xai explain``."""

    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS),
                               description="attribution methods (see gestalt_xai.attribution.available_methods())")
    target: Literal["centroid", "logit", "pair"] = Field("centroid", description="what scalar is explained")
    syndromes: str | list[str] = Field("label", description="label | topk:K | syndrome ids (comma-separated)")
    pairs: str | None = Field(None, description="pair partners: nearest:K or a CSV/Parquet table image_id,partner_id")
    layers: list[str] = Field(default_factory=lambda: [DEFAULT_LAYER],
                              description="layers for Grad-CAM/HiResCAM (names inside each model)")
    images: Literal["test", "all"] | list[str] = Field("test", description="which images to explain")
    gallery: Literal["protocol", "all"] = Field(
        "protocol", description="centroid/pair gallery: train/val/gallery sets of the cohort, or every image")
    models: list[str] | Literal["run"] = Field("run", description='model ids in run/models, or "run" = all')
    ensemble: bool = Field(False, description="explain the mean over all models (model_id 'ensemble')")
    tta: bool = Field(False, description="average over the 4 TTA slots (flip x gray) as GM-Arc's matching does")
    cosine: Literal["linearised", "exact"] = Field("linearised", description="similarity targets' cosine")
    batch_size: int = Field(8, ge=1, description="images per batch (8-16 is fastest per image on a 2-core CPU)")
    method_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method options, e.g. {integrated_gradients: {steps: 64}}")
    occlusion_patch: int = Field(10, ge=1, description="occlusion window side (pixels)")
    occlusion_stride: int = Field(5, ge=1, description="occlusion stride (pixels)")
    occlusion_baseline: Literal["black", "mean", "blur"] = Field("black", description="occlusion fill")
    overlay: list[str] | int = Field(4, description="image ids to draw overlay figures for, or the first N")
    overlay_on_photo: bool = Field(False, description="also draw the maps onto the original photo")
    overlay_view: str = Field("max-abs", description="named view for figures (postprocess.apply_view)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    quiet: bool = False

    @model_validator(mode="after")
    def _methods_can_be_built(self) -> ExplainConfig:
        """Method names, their parameters and the occlusion grid are checked here, before any work."""
        if self.occlusion_stride > self.occlusion_patch:
            raise ValueError(f"occlusion_stride ({self.occlusion_stride}) must not exceed occlusion_patch "
                             f"({self.occlusion_patch}): pixels between windows would never be occluded")
        try:
            _method_instances(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


@dataclass
class WorkItem:
    """One (image, target) pair with its references per (model_id, slot)."""

    image_id: str
    target: str  # e.g. "centroid:SYN3"
    kind: str
    refs: dict[tuple[str, Slot], Any] = field(default_factory=dict)  # vector (similarity) or class index (logit)
    detail: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ loading
def _cohort_tables(run: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    from gestalt_xai.data.cohort import load_run_cohort

    cohort = load_run_cohort(run)
    images = cohort.images[["image_id", "subject_id", "syndrome_id"]].astype(str)
    splits = cohort.splits.copy()
    if len(splits):
        splits["image_id"] = splits["image_id"].astype(str)
    return images, splits


def _select_images(cfg: ExplainConfig, images: pd.DataFrame, splits: pd.DataFrame, available: set[str]) -> list[str]:
    if isinstance(cfg.images, list):
        ids = [str(i) for i in cfg.images]
        missing = [i for i in ids if i not in available]
        if missing:
            raise InputError(f"images {missing[:5]} have no aligned crop/embedding; check --images")
        return ids
    if cfg.images == "test" and len(splits):
        ids = set(splits.loc[splits["set"].isin(TEST_SETS), "image_id"])
        if ids:
            return sorted(ids & available)
    return sorted(set(images["image_id"]) & available)


def _gallery_ids(cfg: ExplainConfig, images: pd.DataFrame, splits: pd.DataFrame) -> list[str]:
    if cfg.gallery == "protocol" and len(splits):
        ids = set(splits.loc[splits["set"].isin(GALLERY_SETS), "image_id"])
        if ids:
            return sorted(ids)
    return sorted(images["image_id"])


def _load_models(run: Any, cfg: ExplainConfig) -> list[tuple[str, torch.nn.Module, str]]:
    from gestalt_xai.models.checkpoints import load_model, model_sha256

    root = Path(run.path) / "models"
    paths = sorted(root.glob("*.safetensors"))
    if cfg.models != "run":
        want = set(cfg.models)
        paths = [p for p in paths if p.name[: -len(".safetensors")] in want]
        found = {p.name[: -len(".safetensors")] for p in paths}
        if want - found:
            raise InputError(f"models {sorted(want - found)} not found in {root}")
    if not paths:
        raise InputError(f"no models in {root}: run `gestalt-xai train` first")
    out = []
    for p in paths:
        model = load_model(p, device=cfg.device).eval()
        for q in model.parameters():
            q.requires_grad_(False)
        out.append((p.name[: -len(".safetensors")], model, model_sha256(p)))
    return out


# ------------------------------------------------------------------------------------------------ planning
def _slots(cfg: ExplainConfig) -> list[Slot]:
    from gestalt_xai.models.gestaltmatcher import tta_slots

    return [(bool(f), bool(g)) for f, g in tta_slots(cfg.tta)]


def plan_items(
    cfg: ExplainConfig,
    image_ids: Sequence[str],
    group: Sequence[tuple[str, torch.nn.Module]],
    embeddings: pd.DataFrame,
    images: pd.DataFrame,
    gallery_ids: Sequence[str],
    bank: CentroidBank | None,
    errors: list[dict[str, str]],
) -> list[WorkItem]:
    """The (image, target) work items of one model group, with references; failures go to ``errors``."""
    from gestalt_xai.matching import EmbeddingTable, ranked_syndromes, slotwise_distances

    slots = _slots(cfg)
    model_ids = [mid for mid, _ in group]
    meta = images.set_index("image_id")
    table = EmbeddingTable.from_frame(embeddings)
    emb_slots = [(mid, f, g) for mid in model_ids for f, g in slots]
    for s in emb_slots:
        if s not in table.slots:
            raise InputError(f"no embeddings for slot {s}; run `gestalt-xai embed` (with --tta for tta=True)")
    syn_spec = parse_syndrome_spec(cfg.syndromes)
    pair_spec = parse_pair_spec(cfg.pairs) if cfg.pairs else None
    if cfg.target == "pair" and pair_spec is None:
        raise ConfigError("target 'pair' needs --pairs nearest:K or a pairs table")
    gal = [g for g in gallery_ids if g in meta.index]
    gal_meta = meta.loc[gal]
    has_emb = table.has(gal, emb_slots)
    gal = [g for g, ok in zip(gal, has_emb, strict=True) if ok]
    gal_meta = meta.loc[gal]

    def distances(query: str) -> tuple[np.ndarray, list[str]]:
        subj = meta.loc[query, "subject_id"]
        keep = [g for g in gal if gal_meta.loc[g, "subject_id"] != subj]
        t = [table.matrix(s, [query]) for s in emb_slots]
        g = [table.matrix(s, keep) for s in emb_slots]
        return slotwise_distances(t, g)[0], keep

    def err(image_id: str, target: str, msg: str, kind: str = "target") -> None:
        errors.append({"item_id": f"{image_id}|{'+'.join(model_ids)}|{target}", "error_kind": kind, "message": msg})

    items: list[WorkItem] = []
    explicit_pairs = read_pairs_table(pair_spec.table) if pair_spec and pair_spec.mode == "table" else None
    for image_id in image_ids:
        if image_id not in meta.index:
            err(image_id, "-", "image not in the cohort table", "input")
            continue
        subj = str(meta.loc[image_id, "subject_id"])
        # which syndromes
        if syn_spec.mode == "label":
            syndromes = [str(meta.loc[image_id, "syndrome_id"])]
        elif syn_spec.mode == "ids":
            syndromes = list(syn_spec.ids)
        else:
            d, keep = distances(image_id)
            ranked, _ = ranked_syndromes(d[None], [gal_meta.loc[k, "syndrome_id"] for k in keep], syn_spec.k)
            syndromes = ranked[0]
        if cfg.target in ("centroid", "logit"):
            for rank, syn in enumerate(syndromes, start=1):
                key = f"{cfg.target}:{syn}"
                item = WorkItem(image_id, key, cfg.target, detail={"syndrome_id": syn, "syndromes": str(syn_spec)})
                if syn_spec.mode == "topk":
                    item.detail["rank"] = rank
                if cfg.target == "centroid":
                    assert bank is not None
                    for mid in model_ids:
                        for slot in slots:
                            r = bank.reference(mid, slot, syn, exclude_subject=subj)
                            if r is not None:
                                item.refs[(mid, slot)] = r
                    if not item.refs:
                        err(image_id, key, f"no gallery subject of syndrome {syn!r} left after excluding the "
                                           f"patient's own subject {subj!r}")
                        continue
                    n_subj = bank.n_subjects(model_ids[0], slots[0], syn)
                    n_subj -= int(subj in _subjects_of(bank, model_ids[0], slots[0], syn))
                    item.detail.update(excluded_subject=subj, cosine=cfg.cosine, n_gallery_subjects=n_subj)
                else:
                    for mid, model in group:
                        ids = getattr(model, "syndrome_ids", None)
                        if getattr(model, "classifier", None) is None:
                            continue  # recorded by ScoreModel.skipped
                        if not ids or syn not in ids:
                            continue
                        for slot in slots:
                            item.refs[(mid, slot)] = ids.index(syn)
                    if not item.refs:
                        err(image_id, key, f"no model of {model_ids} has a classifier with class {syn!r}")
                        continue
                items.append(item)
        else:  # pair
            assert pair_spec is not None
            partners: list[tuple[str, dict[str, Any]]] = []
            if explicit_pairs is not None:
                partners = [(p, {"source": str(pair_spec.table)})
                            for p in explicit_pairs.loc[explicit_pairs["image_id"] == image_id, "partner_id"]]
            else:
                d, keep = distances(image_id)
                keep_syn = np.array([gal_meta.loc[k, "syndrome_id"] for k in keep], dtype=object)
                for syn in syndromes:
                    idx = np.flatnonzero(keep_syn == syn)
                    order = idx[np.lexsort((np.array(keep, dtype=object)[idx].astype(str), d[idx]))][: pair_spec.k]
                    partners += [(keep[j], {"syndrome_id": syn, "distance": float(d[j]), "source": str(pair_spec)})
                                 for j in order]
            for partner, info in partners:
                for a, b in ((image_id, partner), (partner, image_id)):
                    if explicit_pairs is not None and a != image_id:
                        continue  # the table already lists both directions
                    key = f"pair:{b}"
                    item = WorkItem(a, key, "pair", detail={**info, "partner": b, "cosine": cfg.cosine})
                    try:
                        for mid in model_ids:
                            for slot in slots:
                                item.refs[(mid, slot)] = table.matrix((mid, *slot), [b])[0]
                    except InputError as exc:
                        err(a, key, str(exc), "input")
                        continue
                    items.append(item)
    # dedupe (reverse pair directions can repeat), deterministic order
    unique: dict[tuple[str, str], WorkItem] = {}
    for it in items:
        unique.setdefault((it.image_id, it.target), it)
    return [unique[k] for k in sorted(unique)]


def _subjects_of(bank: CentroidBank, model_id: str, slot: Slot, syn: str) -> set[str]:
    sums = bank._sums.get((model_id, slot, syn))
    return set(sums.per_subject) if sums else set()


def _build_targets(batch: Sequence[WorkItem], group: Sequence[tuple[str, torch.nn.Module]], slots: Sequence[Slot],
                   exact: bool) -> dict[tuple[str, Slot], Target]:
    """One target per (member, slot) with a reference per image; a (member, slot) missing for any image is left out
    for the whole batch (so every image in a batch averages the same terms)."""
    targets: dict[tuple[str, Slot], Target] = {}
    for mid, _ in group:
        for slot in slots:
            refs = [it.refs.get((mid, slot)) for it in batch]
            if any(r is None for r in refs):
                continue
            kind = batch[0].kind
            if kind == "logit":
                targets[(mid, slot)] = LogitTarget([int(r) for r in refs])
            elif kind == "centroid":
                targets[(mid, slot)] = CentroidTarget(np.stack(refs), exact=exact)
            else:
                targets[(mid, slot)] = PairTarget(np.stack(refs), exact=exact)
    return targets


def _method_instances(cfg: ExplainConfig) -> list[tuple[AttributionMethod, list[str]]]:
    """Instantiate each method class once, with its parameters, and the method names it will produce."""
    groups: dict[type[AttributionMethod], list[str]] = {}
    for name in cfg.methods:
        groups.setdefault(get_method(name), []).append(name)
    out = []
    for cls, names in groups.items():
        params: dict[str, Any] = {}
        for n in names:
            params.update(cfg.method_params.get(n, {}))
        if "occlusion" in names:
            params = {"patch": cfg.occlusion_patch, "stride": cfg.occlusion_stride,
                      "baseline": cfg.occlusion_baseline, **params}
        try:
            out.append((cls(**params), names))
        except TypeError as exc:
            raise ConfigError(f"method_params for {names}: {exc}") from None
    unknown = set(cfg.method_params) - set(cfg.methods)
    if unknown:
        raise ConfigError(f"method_params given for methods not requested: {sorted(unknown)}")
    return out


def _expected_keys(item: WorkItem, model_id: str, methods: list[tuple[AttributionMethod, list[str]]],
                   layers: Sequence[str]) -> list[MapKey]:
    keys = []
    for inst, names in methods:
        for n in names:
            for layer in (layers if n in inst.layer_methods else [""]):
                keys.append(MapKey(item.image_id, model_id, item.target, n, layer))
    return keys


# ------------------------------------------------------------------------------------------------ the stage
def _check_logit_classes(run: Any, cfg: ExplainConfig, models: list[tuple[str, torch.nn.Module, str]]) -> None:
    """Before any work: a classifier whose class list does not fit the cohort is a configuration error.

    The syndromes that must be classes are the explicit ids (``--syndromes ID,…``), otherwise the cohort's class
    lookup (its training syndromes). Members without a classifier are skipped later (with a note), as documented.
    """
    from gestalt_xai.data.cohort import load_run_cohort
    from gestalt_xai.models.checkpoints import check_classes

    spec = parse_syndrome_spec(cfg.syndromes)
    wanted = list(spec.ids) if spec.mode == "ids" else (load_run_cohort(run).lookup or [])
    with_classifier = [(mid, m) for mid, m, _ in models if getattr(m, "classifier", None) is not None]
    if not with_classifier:
        raise ConfigError("target: logit needs a model with a classifier; every model here is embedding-only")
    for mid, model in with_classifier:
        try:
            check_classes(model, wanted)
        except ConfigError as exc:
            raise ConfigError(f"model {mid!r}: {exc}") from None


def explain_stage(run: Any, cfg: ExplainConfig | None = None) -> MapStore:
    """Run the explain stage on ``run`` (a :class:`~gestalt_xai.runs.Run` or folder); returns the map store."""
    from gestalt_xai.data.aligned import load_crops
    from gestalt_xai.matching import load_embeddings
    from gestalt_xai.models.gestaltmatcher import preprocess
    from gestalt_xai.runs import ErrorRow, Run, torch_threads
    from gestalt_xai.progress import progress

    cfg = cfg or ExplainConfig()
    run = run if isinstance(run, Run) else Run(run)
    if not cfg.methods:
        raise ConfigError("methods: give at least one attribution method")
    methods = _method_instances(cfg)
    slots = _slots(cfg)
    store = MapStore(run.dir("maps"))
    errors: list[dict[str, str]] = []
    with run.stage("explain", cfg) as record, torch_threads(cfg.threads):
        images, splits = _cohort_tables(run)
        embeddings = load_embeddings(run)
        embeddings = embeddings.assign(image_id=embeddings["image_id"].astype(str))
        models = _load_models(run, cfg)
        if cfg.target == "logit":
            _check_logit_classes(run, cfg, models)
        hashes = {mid: h for mid, _, h in models}
        available = set(embeddings["image_id"])
        image_ids = _select_images(cfg, images, splits, available)
        gallery_ids = _gallery_ids(cfg, images, splits)
        bank = CentroidBank(embeddings, images, gallery_ids) if cfg.target == "centroid" else None
        groups: list[tuple[str, list[tuple[str, torch.nn.Module]]]]
        if cfg.ensemble:
            groups = [("ensemble", [(mid, m) for mid, m, _ in models])]
        else:
            groups = [(mid, [(mid, m)]) for mid, m, _ in models]
        n_items = 0
        figure_jobs: list[tuple[str, str, str]] = []
        with store.writer() as writer:
            for group_id, group in groups:
                model_hash = "+".join(hashes[mid] for mid, _ in group)
                items = plan_items(cfg, image_ids, group, embeddings, images, gallery_ids, bank, errors)
                todo = [it for it in items
                        if not all(writer.done(k) for k in _expected_keys(it, group_id, methods, cfg.layers))]
                log.info("explain %s: %d items, %d already stored", group_id, len(items), len(items) - len(todo))
                n_items += len(items)
                figure_jobs += [(group_id, it.image_id, it.target) for it in items]
                # items of one kind only per batch (targets of a batch share a type)
                batches = [todo[i: i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
                for batch in progress(batches, f"explain {group_id}") if not cfg.quiet else batches:
                    _explain_batch(run, cfg, batch, group_id, group, slots, methods, model_hash, writer, errors,
                                   load_crops, preprocess)
                    writer.flush()
        store.compact()
        refused = store.errors()
        rows = [ErrorRow("explain", e["item_id"], e["error_kind"], e["message"]) for e in errors]
        rows += [ErrorRow("explain", "|".join(str(r[c]) for c in ("image_id", "model_id", "target", "method",
                                                                  "layer")), str(r["error_kind"]), str(r["message"]))
                 for r in refused.to_dict("records")]
        run.write_errors("explain", rows)
        record.n_items = n_items
        record.n_errors = len(rows)
        record.extra["n_maps"] = len(store)
        _draw_overlays(run, cfg, store, figure_jobs)
    return store


def _explain_batch(run: Any, cfg: ExplainConfig, batch: list[WorkItem], group_id: str,
                   group: Sequence[tuple[str, torch.nn.Module]], slots: Sequence[Slot],
                   methods: list[tuple[AttributionMethod, list[str]]], model_hash: str, writer: Any,
                   errors: list[dict[str, str]], load_crops: Any, preprocess: Any) -> None:
    ids = [it.image_id for it in batch]
    try:
        crops = load_crops(run, ids)
    except InputError as exc:
        errors += [{"item_id": f"{it.image_id}|{group_id}|{it.target}", "error_kind": "input", "message": str(exc)}
                   for it in batch]
        return
    x = preprocess(crops, channel_order="RGB", device=cfg.device)
    targets = _build_targets(batch, group, slots, cfg.cosine == "exact")
    try:
        score_model = ScoreModel(list(group), targets, slots)
    except ConfigError as exc:
        errors += [{"item_id": f"{it.image_id}|{group_id}|{it.target}", "error_kind": "target", "message": str(exc)}
                   for it in batch]
        return
    with torch.no_grad():
        scores = score_model(x).double().cpu().numpy()
    describe = [score_model.select([i]).describe() for i in range(len(batch))]  # per-row target provenance
    for inst, names in methods:
        if len(score_model.views) > 1 and not inst.supports_tta:
            errors += [{"item_id": f"{it.image_id}|{group_id}|{it.target}|{n}", "error_kind": "config",
                        "message": f"{n} supports one model without TTA only"} for it in batch for n in names]
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
            errors += [{"item_id": f"{batch[i].image_id}|{group_id}|{batch[i].target}|{'+'.join(names)}",
                        "error_kind": error_kind(exc), "message": str(exc)} for i in rows]
            continue
        for mm in maps:
            arr = mm.maps.detach().cpu().float().numpy()
            for j, i in enumerate(rows):
                it = batch[i]
                detail = {**it.detail, **describe[i]}
                writer.add(MapKey(it.image_id, group_id, it.target, mm.method, mm.layer), arr[j],
                           model_hash=model_hash, target_kind=it.kind, target_value=float(scores[i]),
                           target_detail=json.dumps(detail, sort_keys=True, default=str),
                           method_params=json.dumps(mm.params, sort_keys=True, default=str))


def _draw_overlays(run: Any, cfg: ExplainConfig, store: MapStore, jobs: list[tuple[str, str, str]]) -> None:
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
    alignment = None
    if cfg.overlay_on_photo:
        try:
            from gestalt_xai.faces.align import load_alignments

            alignment = load_alignments(run).set_index("image_id")
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
            _photo_overlay(run, alignment.loc[image_id], face, maps, signed, cfg, title, fig_dir / f"{safe}__photo.png")


def _photo_overlay(run: Any, row: Any, face: np.ndarray, maps: dict[str, np.ndarray], signed: dict[str, bool],
                   cfg: ExplainConfig, title: str, path: Path) -> None:
    from gestalt_xai.data.images import load_image
    from gestalt_xai.faces.align import row_matrix
    from gestalt_xai.viz import overlay_figure

    try:
        photo_path = row.get("path") if hasattr(row, "get") else None
        if not photo_path:
            return
        photo = load_image(photo_path)
        overlay_figure(face, maps, signed=signed, view=cfg.overlay_view, title=title, photo=photo,
                       matrix=row_matrix(row), path=path)
    except Exception as exc:  # the photo may be gone (real data kept outside the run)
        log.warning("photo overlay for %s skipped: %s", path.name, exc)
