"""One work unit of the class-imbalance experiment: train one variant with one seed, explain the probe set, score.

:func:`variant_unit` is an engine unit (:mod:`gestalt_xai.engine`), run for every (variant, seed) of the design
(:mod:`gestalt_xai.experiments.imbalance`). In its folder ``ctx.out`` it

1. trains the variant (the train stage's :func:`~gestalt_xai.models.train.train_model` on
   :func:`~gestalt_xai.models.train_data.select_training_data` with the variant's options; the model never enters
   ``run/models``) and records, per class, the training subjects and images it got (``training.parquet``) and the
   per-epoch history (``history.parquet``);
2. embeds every aligned image (no TTA) and measures per-class accuracy on the protocol's test images, of the
   classifier (top-1 over the classes the model has; NaN for a class it lacks) and of matching (the nearest gallery
   syndrome by the slot's cosine distance, own subject left out, as :func:`~gestalt_xai.matching.ranked_syndromes`
   ranks; ``accuracy.parquet``);
3. explains the probe patients towards each declared target kind with the explain stage's own planning and batches
   (:func:`~gestalt_xai.attribution.explain.explain_into`) into a map store ``maps/`` (the experiment compares these
   maps across units, then deletes them unless ``keep_maps``). Target kinds follow the explain stage: ``centroid``
   (the variant's own embedding of the gallery, own subject left out) exists for every patient; ``logit`` only for
   the classes the variant has (:class:`~gestalt_xai.attribution.target_kinds.LogitKind` skips the others: counted
   in the unit's record, not errors);
4. scores every probe map against the synthetic truth where it exists — relevance mass per planted feature and mask
   kind (:class:`~gestalt_xai.assess.localisation.Localiser`; ``localisation.parquet``) and, per patient map, the
   Δscore-rank agreement with the variant's own counterfactual score changes
   (:func:`~gestalt_xai.attribution.effects.measure_effects`,
   :func:`~gestalt_xai.assess.localisation.rank_correlations`; ``rank_agreement.parquet``) — and its deletion AUC
   (:func:`~gestalt_xai.assess.faithfulness.perturbation_curves`, MoRF, beside a seeded random map;
   ``faithfulness.parquet``);
5. keeps the weights (``model.safetensors``) only with ``keep_models``.

Everything is seeded by the unit's seed and runs with the unit's pinned thread count, so the same unit writes the same
bytes on any engine.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.runs import ErrorRow, Run, write_parquet

log = logging.getLogger(__name__)

__all__ = ["UnitSpec", "variant_unit", "UNIT_TABLES"]

#: the tables every finished unit folder holds (besides ``maps/`` while the experiment needs it)
UNIT_TABLES = ("training", "history", "accuracy", "localisation", "rank_agreement", "faithfulness", "errors")


@dataclass(frozen=True)
class UnitSpec:
    """One (variant, seed): the training options (seed, init and model id set) and what to explain and score."""

    variant: str
    seed: int
    train: Any  # TrainConfig
    probe: list[str]
    explain: dict[str, Any]  # ExplainConfig fields shared by every target kind (methods, batch size, layers …)
    targets: list[str]
    #: steps, baseline, batch_size, image_ids (of the probe); empty: not measured
    faithfulness: dict[str, Any] = field(default_factory=dict)
    keep_model: bool = False


def _model_hash(model: Any) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _embeddings(run: Run, model: Any, model_id: str, image_ids: list[str]) -> pd.DataFrame:
    """The embed stage's table (no TTA) of ``image_ids`` through ``model``."""
    from gestalt_xai.data.aligned import load_crops
    from gestalt_xai.models.gestaltmatcher import encode

    enc = encode(model, load_crops(run, image_ids), tta=False, batch_size=64)
    logits = list(enc.logits[0]) if enc.logits is not None else [None] * len(image_ids)
    return pd.DataFrame({"image_id": image_ids, "model_id": model_id, "flip": False, "gray": False,
                         "embedding": list(enc.embeddings[0]), "logits": logits})


def _accuracy(table: pd.DataFrame, emb: pd.DataFrame, classes: list[str], gallery: list[str]) -> pd.DataFrame:
    """Per syndrome of the test images: classifier top-1 (NaN for a class the model lacks) and matching top-1."""
    from gestalt_xai.matching import ranked_syndromes, slotwise_distances

    meta = table.set_index("image_id")
    test = sorted(set(table.loc[table["test"], "image_id"]) & set(emb["image_id"]))
    vectors = np.stack(emb.set_index("image_id").loc[test + gallery, "embedding"].to_numpy())
    query, bank = vectors[: len(test)], vectors[len(test):]
    dist = slotwise_distances([query], [bank])
    rows = []
    for i, image_id in enumerate(test):
        syndrome, subject = str(meta.loc[image_id, "syndrome_id"]), str(meta.loc[image_id, "subject_id"])
        keep = np.array([str(meta.loc[g, "subject_id"]) != subject for g in gallery])
        ranked = ranked_syndromes(dist[i: i + 1, keep], [str(meta.loc[g, "syndrome_id"]) for g, k
                                                          in zip(gallery, keep, strict=True) if k], 1)[0][0]
        logits = emb.set_index("image_id").loc[image_id, "logits"]
        clf = np.nan
        if syndrome in classes and logits is not None:
            clf = float(classes[int(np.argmax(np.asarray(logits)))] == syndrome)
        rows.append({"image_id": image_id, "syndrome_id": syndrome, "subject_id": subject,
                     "classifier_top1": clf, "matching_top1": float(bool(ranked) and ranked[0] == syndrome)})
    frame = pd.DataFrame(rows, columns=["image_id", "syndrome_id", "subject_id", "classifier_top1", "matching_top1"])
    return frame.groupby("syndrome_id", sort=True).agg(
        n_test=("image_id", "size"), classifier_top1=("classifier_top1", "mean"),
        matching_top1=("matching_top1", "mean")).reset_index()


def _localisation(run: Run, store: Any, errors: list[ErrorRow], effects: pd.DataFrame
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Localiser rows of every stored map and their Δscore-rank agreement (empty on a real cohort)."""
    from gestalt_xai.aggregate.annotate import annotate_index
    from gestalt_xai.assess import planted
    from gestalt_xai.assess.localisation import Localiser, rank_correlations
    from gestalt_xai.assess.localisation_run import run_change_source

    truth = planted._truth(run, None, errors)
    index = store.index()
    annotated, _ = annotate_index(index, run.image_table())
    sources = {}
    if truth is not None:
        sources["region"] = planted.region_mask_source(run, truth)
    change = run_change_source(run, set(annotated["image_id"]), errors)
    if change is not None:
        sources["change"] = change
    if not sources or not len(annotated):
        return Localiser({}, None, errors).table(), pd.DataFrame()
    localiser = Localiser(sources, planted.confounded_syndrome(truth), errors)
    for row, m in store.iter_maps(annotated):
        localiser.add(row, m)
    features = localiser.table()
    return features, rank_correlations(features, effects) if len(effects) else pd.DataFrame()


def _faithfulness(run: Run, setup: Any, store: Any, opts: dict[str, Any], seed: int) -> pd.DataFrame:
    """Deletion AUC (MoRF) of every stored map of ``setup``'s items, beside a random map, per item and method."""
    from gestalt_xai.assess.faithfulness import perturbation_curves
    from gestalt_xai.attribution.planning import batches, build_targets
    from gestalt_xai.attribution.score_model import ScoreModel
    from gestalt_xai.data.aligned import load_crops

    frames = []
    index = store.index()
    wanted = set(opts.get("image_ids", setup.image_ids))
    for plan in setup.plans([], [i for i in setup.image_ids if i in wanted]):
        for batch in batches(plan.items, opts.get("batch_size", 16)):
            keys = [(it.image_id, str(it.target)) for it in batch]
            rows = index[index["model_id"] == plan.group_id].set_index(["image_id", "target"])
            methods = sorted(set(rows["method"]))
            maps = {}
            for method in methods:
                sel = rows[rows["method"] == method]
                if all(k in sel.index for k in keys):
                    maps[method] = store.load_many(sel.loc[keys].reset_index())
            if not maps:
                continue
            score_model = ScoreModel(list(plan.group), build_targets(batch, plan.group, setup.slots, setup.kind),
                                     setup.slots)
            curves = perturbation_curves(score_model, load_crops(run, [k[0] for k in keys]), maps,
                                         steps=opts.get("steps", 16), baseline=opts.get("baseline", "black"),
                                         seed=seed, batch_size=64)
            aucs = curves.aucs()
            aucs["image_id"] = [keys[i][0] for i in aucs["item"]]
            aucs["target"] = [keys[i][1] for i in aucs["item"]]
            frames.append(aucs.drop(columns=["item"]))
    cols = ["image_id", "target", "method", "auc"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def variant_unit(spec: UnitSpec, ctx: Any) -> dict[str, Any]:
    """Engine unit: train, explain and score one (variant, seed) into ``ctx.out`` (module docstring)."""
    from gestalt_xai.attribution.base import build_methods
    from gestalt_xai.attribution.effects import measure_effects
    from gestalt_xai.attribution.explain import ExplainConfig, explain_into
    from gestalt_xai.attribution.planning import ExplainSetup, gallery_ids
    from gestalt_xai.models.checkpoints import save_model
    from gestalt_xai.models.train import train_model
    from gestalt_xai.models.train_data import select_training_data
    from gestalt_xai.store import MapStore

    out = Path(ctx.out)
    run = Run(ctx.run_path)
    cfg = spec.train
    data = select_training_data(run.cohort(), run, cfg)
    training = data.train.groupby("syndrome_id", sort=True).agg(
        n_train_subjects=("subject_id", "nunique"), n_train_images=("image_id", "size")).reset_index()
    write_parquet(training, out / "training.parquet")
    model, history = train_model(run, data, cfg, state_dir=out)
    (out / f".{cfg.resolved_model_id()}.state.pt").unlink(missing_ok=True)
    write_parquet(history.drop(columns=["seconds"], errors="ignore"), out / "history.parquet")
    if spec.keep_model:
        save_model(model, out / "model.safetensors", extra={"training": cfg.model_dump(mode="json")})
    for p in model.parameters():
        p.requires_grad_(False)

    model_id = f"{spec.variant}-s{spec.seed}"
    table = run.image_table()
    aligned = sorted(set(run.aligned_ids()) & set(table["image_id"]))
    emb = _embeddings(run, model, model_id, aligned)
    loaded = [(model_id, model, _model_hash(model))]
    errors: list[ErrorRow] = []
    store = MapStore(out / "maps")
    effects, faith = [], []
    skipped = 0
    for target in spec.targets:
        ecfg = ExplainConfig(**spec.explain, target=target, syndromes="label", images=list(spec.probe), overlay=0,
                             threads=ctx.threads)
        setup = ExplainSetup.build(run, ecfg, models=loaded, embeddings=emb)
        plan_errors: list[ErrorRow] = []
        explain_into(run, ecfg, setup, build_methods(ecfg.methods, ecfg.all_method_params()), store, plan_errors)
        skipped += sum(e.error_kind == "skipped" for e in plan_errors)
        errors += [e for e in plan_errors if e.error_kind != "skipped"]
        effects.append(measure_effects(run, ecfg, setup=setup))
        if spec.faithfulness:
            faith.append(_faithfulness(run, setup, store, spec.faithfulness, spec.seed))
    store.compact()
    classes = list(model.syndrome_ids)
    gallery = [g for g in gallery_ids(ExplainConfig(), table) if g in set(aligned)]
    write_parquet(_accuracy(table, emb, classes, gallery), out / "accuracy.parquet")
    effects_table = pd.concat(effects, ignore_index=True) if effects else pd.DataFrame()
    features, agreement = _localisation(run, store, errors, effects_table)
    write_parquet(features, out / "localisation.parquet")
    write_parquet(agreement, out / "rank_agreement.parquet")
    write_parquet(pd.concat(faith, ignore_index=True) if faith else pd.DataFrame(columns=["image_id", "target",
                                                                                          "method", "auc"]),
                  out / "faithfulness.parquet")
    write_parquet(pd.DataFrame([r.as_record() for r in errors], columns=["item_id", "error_kind", "message", "key"]),
                  out / "errors.parquet")
    return {"maps": len(store), "skipped_targets": skipped, "errors": len(errors)}
