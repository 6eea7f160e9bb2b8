"""The explained scalars of stored maps, rebuilt: every map in the store is scored again through its own ScoreModel.

The assess stage perturbs images (deletion, insertion, landmark jitter) and models (parameter randomisation) and
watches the *explained* score move, so it needs, for each stored map, the exact
:class:`~gestalt_xai.attribution.score_model.ScoreModel` the explain stage explained: same members, TTA slots,
target and reference (a centroid without the patient's own subject, a pair partner's embedding …). The map store
records the target (``centroid:S01``) but not the reference vectors; those are planned again from the explain
stage's options, which the manifest keeps for each explain instance. :func:`explained_batches` does that: for each
explain instance (in the order they ran) it rebuilds the :class:`~gestalt_xai.attribution.planning.ExplainSetup`
(models loaded once per model declaration), plans the items of the requested ``(image, model, target)`` triples,
batches and targets them as the explain stage did (:func:`~gestalt_xai.attribution.planning.batches`,
:func:`~gestalt_xai.attribution.planning.build_targets`) and yields each batch with its aligned crops and its stored
maps. A triple no explain instance plans again (the cohort or embeddings changed since) is an error row, not a
silent skip. Each batch holds items with the same stored methods, so every method has a map for every item.

:func:`check_scores` compares the rebuilt score with the ``target_value`` the map store recorded when the map was
made: a mismatch means the references moved, and the batch is refused (an error row) rather than assessed against
another scalar.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gestalt_xai.attribution.planning import ExplainSetup, LoadedModel, batches, build_targets, load_models
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.errors import ConfigError, GestaltXAIError, InputError, error_kind
from gestalt_xai.runs import ErrorRow

if TYPE_CHECKING:
    from gestalt_xai.runs import Run
    from gestalt_xai.store import MapStore

__all__ = ["ExplainedBatch", "explain_instances", "explained_batches", "check_scores", "SCORE_TOLERANCE"]

log = logging.getLogger(__name__)

#: largest |rebuilt score − stored target_value| accepted (float32 forward passes in another batch composition)
SCORE_TOLERANCE = 1e-3


@dataclass
class ExplainedBatch:
    """Stored maps of a batch of explained ``(image, target)`` items of one model group, with what they explain.

    ``maps[method]`` is ``(B, 112, 112)`` float32 as stored (raw, signed) at ``layers[method]``; ``rows`` are the
    map-store index rows (one per item and method); ``setup`` is the explain instance's setup (its options say the
    layers, method parameters and TTA slots the maps were made with)."""

    instance: str
    model_id: str
    model_hash: str
    setup: ExplainSetup
    group: list[tuple[str, Any]]
    score_model: ScoreModel
    image_ids: list[str]
    targets: list[str]
    crops: np.ndarray
    maps: dict[str, np.ndarray]
    layers: dict[str, str]
    stored_scores: np.ndarray
    rows: pd.DataFrame = field(repr=False)

    @property
    def key(self) -> str:
        """A stable id of the batch's content (model hash, items, methods): the resume key of its results."""
        text = json.dumps([self.model_id, self.model_hash, self.image_ids, self.targets,
                           sorted(f"{m}@{layer}" for m, layer in self.layers.items())])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def method_params(self, method: str) -> dict[str, Any]:
        """The parameters ``method``'s maps were made with (recorded in the store)."""
        params = self.rows.loc[self.rows["method"] == method, "method_params"]
        return json.loads(params.iloc[0]) if len(params) and isinstance(params.iloc[0], str) else {}

    def items(self) -> pd.DataFrame:
        """``item, image_id, model_id, target`` of the batch's items (the engines' ``item`` column)."""
        return pd.DataFrame({"item": np.arange(len(self.image_ids)), "image_id": self.image_ids,
                             "model_id": self.model_id, "target": self.targets})


def explain_instances(run: Run) -> list[tuple[str, dict[str, Any]]]:
    """``(instance id, options)`` of every finished explain instance in the manifest, in the order they ran."""
    stages = run.manifest.get("stages", {})
    found = [(v.get("timing", {}).get("started", ""), name, v.get("config", {})) for name, v in stages.items()
             if v.get("stage") == "explain" and v.get("status", "done") == "done"]
    return [(name, cfg) for _, name, cfg in sorted(found, key=lambda t: t[0])]


def _layer_choice(rows: pd.DataFrame) -> pd.DataFrame:
    """One layer per (image, model, target, method): the explain default layer if stored, else the first by name."""
    from gestalt_xai.attribution.gradients import DEFAULT_LAYER

    rank = (rows["layer"] != DEFAULT_LAYER).astype(int)
    return (rows.assign(_rank=rank).sort_values(["image_id", "model_id", "target", "method", "_rank", "layer"])
            .drop_duplicates(["image_id", "model_id", "target", "method"]).drop(columns="_rank"))


def explained_batches(run: Run, store: MapStore, rows: pd.DataFrame, errors: list[ErrorRow], *,
                      batch_size: int = 16, models: dict[str, list[LoadedModel]] | None = None
                      ) -> Iterator[ExplainedBatch]:
    """Batches of the selected map-store ``rows`` with their rebuilt ScoreModel (module docstring).

    ``models`` caches loaded models by declaration between calls (a dict the caller keeps); ``errors`` receives a row
    per triple that cannot be rebuilt."""
    from gestalt_xai.attribution.explain import ExplainConfig
    from gestalt_xai.data.aligned import load_crops

    rows = _layer_choice(rows)
    wanted: dict[tuple[str, str, str], pd.DataFrame] = {
        (str(i), str(m), str(t)): g for (i, m, t), g in rows.groupby(["image_id", "model_id", "target"], sort=True)}
    claimed: set[tuple[str, str, str]] = set()
    models = {} if models is None else models
    for instance, options in explain_instances(run):
        todo = {k for k in wanted if k not in claimed}
        if not todo:
            break
        try:
            cfg = ExplainConfig.model_validate(options)
            declaration = json.dumps(cfg.model_dump(mode="json")["models"], sort_keys=True)
            if declaration not in models:
                models[declaration] = load_models(run, cfg)
            setup = ExplainSetup.build(run, cfg, models=models[declaration])
        except (GestaltXAIError, ValueError) as exc:
            log.warning("assess: explain instance %s cannot be rebuilt (%s); its maps are scored by another "
                        "instance or reported", instance, exc)
            continue
        image_ids = sorted({i for i, _, _ in todo} & set(setup.image_ids))
        if not image_ids:
            continue
        for plan in setup.plans([], image_ids):
            items = [it for it in plan.items if (it.image_id, plan.group_id, str(it.target)) in todo]
            by_methods: dict[tuple[str, ...], list[Any]] = {}
            for it in items:
                key = (it.image_id, plan.group_id, str(it.target))
                claimed.add(key)
                by_methods.setdefault(tuple(sorted(wanted[key]["method"])), []).append(it)
            for methods, group_items in by_methods.items():
                for batch in batches(group_items, batch_size):
                    out = _batch(run, store, instance, setup, plan, batch, wanted, methods, load_crops, errors)
                    if out is not None:
                        yield out
    for key in sorted(set(wanted) - claimed):
        errors.append(ErrorRow(key[0], "input", "no explain instance in the manifest plans this map's target again "
                               "(cohort, embeddings or models changed since explain?); not assessed",
                               {"model_id": key[1], "target": key[2]}))


def _batch(run: Run, store: MapStore, instance: str, setup: ExplainSetup, plan: Any, batch: Sequence[Any],
           wanted: dict[tuple[str, str, str], pd.DataFrame], methods: Sequence[str], load_crops: Any,
           errors: list[ErrorRow]) -> ExplainedBatch | None:
    keys = [(it.image_id, plan.group_id, str(it.target)) for it in batch]
    try:
        score_model = ScoreModel(list(plan.group), build_targets(batch, plan.group, setup.slots, setup.kind),
                                 setup.slots)
        crops = load_crops(run, [it.image_id for it in batch])
    except (ConfigError, InputError) as exc:
        errors.extend(ErrorRow(k[0], error_kind(exc), str(exc), {"model_id": k[1], "target": k[2]}) for k in keys)
        return None
    rows = pd.concat([wanted[k] for k in keys], ignore_index=True)
    maps: dict[str, np.ndarray] = {}
    layers: dict[str, str] = {}
    for method in methods:
        part = pd.concat([wanted[k][wanted[k]["method"] == method] for k in keys], ignore_index=True)
        maps[method] = store.load_many(part).astype(np.float32, copy=False)
        layers[method] = str(part["layer"].iloc[0])
    stored = np.array([float(wanted[k]["target_value"].iloc[0]) for k in keys], np.float64)
    return ExplainedBatch(instance, plan.group_id, plan.model_hash, setup, list(plan.group), score_model,
                          [k[0] for k in keys], [k[2] for k in keys], crops, maps, layers, stored, rows)


def check_scores(batch: ExplainedBatch, scores: np.ndarray, errors: list[ErrorRow],
                 tolerance: float = SCORE_TOLERANCE) -> np.ndarray:
    """Items whose rebuilt score (``scores``, e.g. a curve's step 0) matches the stored ``target_value``; the others
    become error rows (their references moved since the maps were made)."""
    scores = np.asarray(scores, np.float64)
    ok = np.abs(scores - batch.stored_scores) <= tolerance * np.maximum(1.0, np.abs(batch.stored_scores))
    for i in np.flatnonzero(~ok):
        errors.append(ErrorRow(batch.image_ids[i], "input",
                               f"rebuilt score {scores[i]:.6f} differs from the stored target value "
                               f"{batch.stored_scores[i]:.6f}: the map explains another scalar; not assessed",
                               {"model_id": batch.model_id, "target": batch.targets[i]}))
    return ok
