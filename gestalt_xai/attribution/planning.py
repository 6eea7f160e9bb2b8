"""What the explain stage explains, planned once and shared by every pass that scores the same targets.

:class:`ExplainSetup` gathers, for the explain stage's options, the declared models (frozen), the cohort's image
table, the embeddings, the images to explain, the gallery and the prepared target kind
(:mod:`~gestalt_xai.attribution.target_kinds`); :meth:`ExplainSetup.plans` yields each model group's work items
(:func:`~gestalt_xai.attribution.target_kinds.plan_items`). The maps (:mod:`~gestalt_xai.attribution.explain`) and the
score changes under counterfactual edits (:mod:`~gestalt_xai.attribution.effects`) both batch those items with
:func:`batches` and build each batch's targets with :func:`build_targets`, so an effect is measured through exactly
the :class:`~gestalt_xai.attribution.score_model.ScoreModel` a map explains: same members, TTA slots and references.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from gestalt_xai.attribution.target_kinds import PlanContext, TargetKind, WorkItem, get_target_kind, plan_items
from gestalt_xai.attribution.targets import Target, TTASlot
from gestalt_xai.errors import InputError
from gestalt_xai.models.declaration import ENSEMBLE_ID, load_declared, resolve_models
from gestalt_xai.runs import ErrorRow

if TYPE_CHECKING:
    from gestalt_xai.runs import Run

__all__ = ["ExplainSetup", "GroupPlan", "LoadedModel", "batches", "build_targets", "explain_slots", "gallery_ids",
           "load_models", "select_images"]

log = logging.getLogger(__name__)

#: ``(model_id, frozen model, model hash)`` of a declared model
LoadedModel = tuple[str, torch.nn.Module, str]


def select_images(cfg: Any, table: pd.DataFrame, available: set[str]) -> list[str]:
    """The patients to explain: the listed ids, the protocol's test images, the undiagnosed patients, or every
    embedded image."""
    if isinstance(cfg.images, list):
        ids = [str(i) for i in cfg.images]
        missing = [i for i in ids if i not in available]
        if missing:
            raise InputError(f"images {missing[:5]} have no aligned crop/embedding; check --images")
        return ids
    if cfg.images == "undiagnosed":
        ids = sorted(set(table.loc[table["undiagnosed"], "image_id"]) & available)
        if not ids:
            log.warning("images: undiagnosed, but no embedded image of this cohort lacks a diagnosis")
        return ids
    if cfg.images == "test" and table["test"].any():
        return sorted(set(table.loc[table["test"], "image_id"]) & available)
    return sorted(set(table["image_id"]) & available)


def gallery_ids(cfg: Any, table: pd.DataFrame) -> list[str]:
    """The images references (centroids, nearest partners) are drawn from; never an undiagnosed patient."""
    diagnosed = table[~table["undiagnosed"]]
    if cfg.gallery == "protocol" and diagnosed["gallery"].any():
        return sorted(diagnosed.loc[diagnosed["gallery"], "image_id"])
    return sorted(diagnosed["image_id"])


def load_models(run: Run, cfg: Any) -> list[LoadedModel]:
    """``(model_id, model, sha256)`` of every declared model (:mod:`gestalt_xai.models.declaration`), frozen."""
    out = []
    for declared in resolve_models(run, cfg.models):
        model = load_declared(declared, cfg.device)
        for q in model.parameters():
            q.requires_grad_(False)
        out.append((declared.model_id, model, declared.sha256()))
    return out


def explain_slots(cfg: Any) -> list[TTASlot]:
    """The TTA slots explained: the original view, or all four with ``tta``."""
    from gestalt_xai.models.gestaltmatcher import tta_slots

    return [(bool(f), bool(g)) for f, g in tta_slots(cfg.tta)]


def build_targets(batch: Sequence[WorkItem], group: Sequence[tuple[str, torch.nn.Module]],
                  slots: Sequence[TTASlot], kind: TargetKind) -> dict[tuple[str, TTASlot], Target]:
    """One target per (member, slot) with a reference per image; a (member, slot) missing for any image is left out
    for the whole batch (so every image in a batch averages the same terms)."""
    targets: dict[tuple[str, TTASlot], Target] = {}
    for mid, _ in group:
        for slot in slots:
            if all((mid, slot) in it.refs for it in batch):
                targets[(mid, slot)] = kind.build_target([it.refs[(mid, slot)] for it in batch])
    return targets


def batches(items: Sequence[WorkItem], size: int) -> list[list[WorkItem]]:
    """Batches of at most ``size`` items with references in the same (member, slot) terms, so an item's result never
    depends on its batch (:func:`build_targets` keeps only the terms every item of a batch has; an ensemble member
    that lacks one item's logit class must not drop out of the others')."""
    by_terms: dict[frozenset[tuple[str, TTASlot]], list[WorkItem]] = {}
    for it in items:
        by_terms.setdefault(frozenset(it.refs), []).append(it)
    return [group[i: i + size] for group in by_terms.values() for i in range(0, len(group), size)]


@dataclass
class GroupPlan:
    """The work items of one model group: ``group_id`` is the maps' model id (a model id, or ``ensemble``)."""

    group_id: str
    group: list[tuple[str, torch.nn.Module]]
    model_hash: str
    items: list[WorkItem]


@dataclass
class ExplainSetup:
    """Everything the explain stage's options select, loaded once (module docstring)."""

    cfg: Any  # ExplainConfig
    kind: TargetKind
    slots: list[TTASlot]
    models: list[LoadedModel]
    table: pd.DataFrame  # run.image_table()
    embeddings: pd.DataFrame
    image_ids: list[str]
    gallery_ids: list[str]

    @classmethod
    def build(cls, run: Run, cfg: Any, models: list[LoadedModel] | None = None,
              embeddings: pd.DataFrame | None = None) -> ExplainSetup:
        """Load the declared models (unless given), the tables (the run's embeddings unless ``embeddings`` are given,
        e.g. those of a model trained outside ``run/models``), select the images and prepare the target kind."""
        table = run.image_table()
        embeddings = run.embeddings() if embeddings is None else embeddings
        models = load_models(run, cfg) if models is None else models
        image_ids = select_images(cfg, table, set(embeddings["image_id"]))
        setup = cls(cfg, get_target_kind(cfg.target)(cfg), explain_slots(cfg), models, table, embeddings, image_ids,
                    gallery_ids(cfg, table))
        setup.kind.prepare(run, models, setup.images, embeddings, setup.gallery_ids)
        return setup

    def retarget(self, run: Run, cfg: Any) -> ExplainSetup:
        """The same models and tables under other options (another target kind, syndromes or images); the models
        must be the same declaration."""
        kind = get_target_kind(cfg.target)(cfg)
        setup = replace(self, cfg=cfg, kind=kind, slots=explain_slots(cfg),
                        image_ids=select_images(cfg, self.table, set(self.embeddings["image_id"])),
                        gallery_ids=gallery_ids(cfg, self.table))
        kind.prepare(run, self.models, setup.images, self.embeddings, setup.gallery_ids)
        return setup

    @property
    def images(self) -> pd.DataFrame:
        """``image_id, subject_id, syndrome_id`` of every cohort image."""
        return self.table[["image_id", "subject_id", "syndrome_id"]]

    def groups(self) -> list[tuple[str, list[tuple[str, torch.nn.Module]], str]]:
        """``(group_id, members, model_hash)``: each model alone, or one ensemble of all with ``ensemble``."""
        hashes = {mid: h for mid, _, h in self.models}
        if self.cfg.ensemble:
            groups = [(ENSEMBLE_ID, [(mid, m) for mid, m, _ in self.models])]
        else:
            groups = [(mid, [(mid, m)]) for mid, m, _ in self.models]
        return [(gid, members, "+".join(hashes[mid] for mid, _ in members)) for gid, members in groups]

    def plans(self, errors: list[ErrorRow], image_ids: Sequence[str] | None = None) -> Iterator[GroupPlan]:
        """Each model group's work items for ``image_ids`` (default: the selected images); items that cannot be
        planned become ``errors``."""
        ids = self.image_ids if image_ids is None else list(image_ids)
        for group_id, group, model_hash in self.groups():
            ctx = PlanContext.build(self.cfg, group_id, group, self.slots, self.embeddings, self.images,
                                    self.gallery_ids, errors)
            yield GroupPlan(group_id, group, model_hash, plan_items(self.kind, ctx, ids))
