"""Target kinds: how the explain stage builds each kind of target, one registered class per kind.

Every map is stored under a :class:`~gestalt_xai.attribution.targets.TargetKey` ``kind:ref``. The kind's class (a
:class:`TargetKind` registered by name) holds everything that differs between kinds:

* which references an image is explained against (:meth:`TargetKind.plan`): the syndromes selected by the
  ``syndromes`` option (``centroid``, ``logit``), or the partners chosen by ``pairs`` (``pair``);
* the reference of each work item per (member model, TTA slot): the syndrome centroid without the patient's own
  subject, the syndrome's class index, or the partner's embedding;
* the :class:`~gestalt_xai.attribution.targets.Target` callable the
  :class:`~gestalt_xai.attribution.score_model.ScoreModel` applies (:meth:`TargetKind.build_target`);
* the options it needs, checked with the configuration (:meth:`TargetKind.check_config`), and its stage-wide state
  (:meth:`TargetKind.prepare`);
* how its maps are grouped across patients when aggregated (:meth:`TargetKind.group`).

Adding a kind is one decorated class (``MeanEmbedding`` a :class:`~gestalt_xai.attribution.targets.Target`)::

    @register_target_kind("embedding_mean")
    class EmbeddingMeanKind(TargetKind):
        target_class = MeanEmbedding

        def plan(self, ctx, image_id):
            return [WorkItem(image_id, TargetKey(self.name, "all"),
                             refs={(mid, slot): 0 for mid in ctx.model_ids for slot in ctx.slots})]

        def build_target(self, refs):
            return MeanEmbedding()

``ExplainConfig(target="embedding_mean")`` then validates and the explain stage runs it;
``tests/test_attribution_contract.py`` runs every registered kind with no test edit.

Syndromes (``syndromes``): ``label`` (the patient's diagnosis), explicit ids, or ``topk:K``: the K syndromes ranked
first by :func:`gestalt_xai.matching.ranked_syndromes` (GM-Arc's ranking: nearest gallery image per syndrome) over
the slot-averaged cosine distances (:func:`gestalt_xai.matching.slotwise_distances`) of the explained model group
to the gallery, the patient's own subject excluded.

**Undiagnosed patients** (label :data:`~gestalt_xai.data.cohort.UNDIAGNOSED`) have no label to explain towards:
``topk:K`` and explicit ids work for them as for anyone (their own subject is in no gallery, so nothing but
themselves is excluded); ``label`` selects nothing for them (counted in the log), except for ``pair`` targets with
``nearest:K``, where it means the K nearest gallery faces over every syndrome — the "most similar diagnosed
patients" a clinician looks at first. With ``topk`` a pair target gives the K nearest faces of each suggestion.

Built-in kinds: ``centroid``, ``logit``, ``pair`` here; ``contrast`` (score of X minus score of Y) in
:mod:`gestalt_xai.attribution.contrast`, imported when the registry is first listed or asked for a missing name.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
from torch import nn

from gestalt_xai.attribution.targets import (
    CentroidBank,
    CentroidTarget,
    LogitTarget,
    PairSpec,
    PairTarget,
    SyndromeSpec,
    Target,
    TargetKey,
    TTASlot,
    parse_pair_spec,
    parse_syndrome_spec,
    read_pairs_table,
)
from gestalt_xai.data.cohort import UNDIAGNOSED
from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.registry import Registry
from gestalt_xai.runs import ErrorRow

if TYPE_CHECKING:
    from gestalt_xai.matching import EmbeddingTable
    from gestalt_xai.runs import Run

__all__ = ["TargetKind", "WorkItem", "PlanContext", "plan_items", "register_target_kind", "get_target_kind",
           "available_target_kinds", "target_group", "TARGET_KINDS", "CentroidKind", "LogitKind", "PairKind"]

log = logging.getLogger(__name__)


def _load_builtin_kinds() -> None:
    # importing the module registers its kind (this module's own kinds register as it is imported)
    from gestalt_xai.attribution import contrast  # noqa: F401


#: the target kinds, by name
TARGET_KINDS: Registry[type[TargetKind]] = Registry("target kind", _load_builtin_kinds)


@dataclass
class WorkItem:
    """One (image, target) pair with its reference per ``(model_id, TTA slot)`` and provenance ``detail``.

    A (member, slot) without a reference (no key in ``refs``) is left out of the explained mean for the item's batch.
    """

    image_id: str
    target: TargetKey
    refs: dict[tuple[str, TTASlot], Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.target.kind


@dataclass
class PlanContext:
    """What a target kind reads to plan the work items of one model group (built by the explain stage)."""

    group_id: str  # the maps' model_id: a model id, or "ensemble"
    group: Sequence[tuple[str, nn.Module]]
    slots: Sequence[TTASlot]
    meta: pd.DataFrame  # cohort images indexed by image_id: subject_id, syndrome_id
    table: EmbeddingTable  # embeddings per (model_id, flip, gray)
    gallery: list[str]  # gallery images with an embedding in every (member, slot) of the group
    syndromes: SyndromeSpec
    errors: list[ErrorRow] = field(default_factory=list)
    #: undiagnosed images for which ``syndromes: label`` selected nothing (logged by :func:`plan_items`)
    unlabelled: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, cfg: Any, group_id: str, group: Sequence[tuple[str, nn.Module]], slots: Sequence[TTASlot],
              embeddings: pd.DataFrame, images: pd.DataFrame, gallery_ids: Sequence[str],
              errors: list[ErrorRow]) -> PlanContext:
        """The context of one model group; an :class:`InputError` if a (member, slot) has no embeddings."""
        from gestalt_xai.matching import EmbeddingTable

        meta = images.set_index("image_id")
        table = EmbeddingTable.from_frame(embeddings)
        emb_slots = [(mid, f, g) for mid, _ in group for f, g in slots]
        for s in emb_slots:
            if s not in table.slots:
                raise InputError(f"no embeddings for slot {s}; run `gestalt-xai embed` (with --tta for tta=True)")
        gallery = [g for g in gallery_ids if g in meta.index]
        gallery = [g for g, ok in zip(gallery, table.has(gallery, emb_slots), strict=True) if ok]
        return cls(group_id, list(group), list(slots), meta, table, gallery, parse_syndrome_spec(cfg.syndromes),
                   errors)

    @property
    def model_ids(self) -> list[str]:
        return [mid for mid, _ in self.group]

    def subject(self, image_id: str) -> str:
        return str(self.meta.loc[image_id, "subject_id"])

    def embedding(self, model_id: str, slot: TTASlot, image_id: str) -> np.ndarray:
        """One image's embedding by one member in one TTA slot (:class:`InputError` if it has none)."""
        return self.table.matrix((model_id, *slot), [image_id])[0]

    def distances(self, image_id: str) -> tuple[np.ndarray, list[str]]:
        """Slot-averaged cosine distances of ``image_id`` to the gallery images of other subjects, and those ids."""
        from gestalt_xai.matching import slotwise_distances

        subject = self.meta.loc[image_id, "subject_id"]
        keep = [g for g in self.gallery if self.meta.loc[g, "subject_id"] != subject]
        slots = [(mid, *slot) for mid in self.model_ids for slot in self.slots]
        query = [self.table.matrix(s, [image_id]) for s in slots]
        gallery = [self.table.matrix(s, keep) for s in slots]
        return slotwise_distances(query, gallery)[0], keep

    def syndrome_of(self, image_ids: Sequence[str]) -> list[str]:
        return [str(self.meta.loc[i, "syndrome_id"]) for i in image_ids]

    def undiagnosed(self, image_id: str) -> bool:
        """Whether ``image_id`` is an undiagnosed patient (no label; module docstring)."""
        return self.syndrome_of([image_id])[0] == UNDIAGNOSED

    def ranked(self, image_id: str, n: int | None = None) -> list[str]:
        """The gallery's syndromes ranked for ``image_id`` (nearest first, the first ``n``), as the match stage ranks:
        :func:`gestalt_xai.matching.ranked_syndromes` over :meth:`distances`."""
        from gestalt_xai.matching import ranked_syndromes

        d, keep = self.distances(image_id)
        return ranked_syndromes(d[None], self.syndrome_of(keep), n)[0][0]

    def selected_syndromes(self, image_id: str) -> list[tuple[str, int | None]]:
        """The syndromes ``image_id`` is explained towards, with their rank under ``topk`` (module docstring); none
        for an undiagnosed patient under ``label``."""
        if self.syndromes.mode == "label":
            if self.undiagnosed(image_id):
                self.unlabelled.add(image_id)
                return []
            return [(self.syndrome_of([image_id])[0], None)]
        if self.syndromes.mode == "ids":
            return [(s, None) for s in self.syndromes.ids]
        return [(s, rank) for rank, s in enumerate(self.ranked(image_id, self.syndromes.k), start=1)]

    def error(self, image_id: str, target: TargetKey | None, message: str, kind: str = "target") -> None:
        """Record a work item that cannot be planned (an ``errors.parquet`` row of the explain stage)."""
        key = {"model_id": self.group_id} | ({"target": str(target)} if target is not None else {})
        self.errors.append(ErrorRow(image_id, kind, message, key))


class TargetKind(ABC):
    """One kind of target (module docstring); the explain stage makes one instance per run, with its options."""

    #: the kind's name, the ``kind`` of its :class:`TargetKey` (set by :func:`register_target_kind`)
    name: ClassVar[str] = ""
    #: the :class:`Target` callable this kind's ScoreModels apply
    target_class: ClassVar[type[Target]] = Target
    #: options a minimal explain configuration of this kind needs (documentation and the contract tests)
    example_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg  # the explain stage's options (ExplainConfig)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse options this kind cannot work with (:class:`ConfigError`); runs when the config is built."""
        return None

    def prepare(self, run: Run, models: Sequence[tuple[str, nn.Module, str]], images: pd.DataFrame,
                embeddings: pd.DataFrame, gallery_ids: Sequence[str]) -> None:
        """Stage-wide state before any work (``models``: ``(model_id, model, sha256)``); nothing by default."""
        return None

    @abstractmethod
    def plan(self, ctx: PlanContext, image_id: str) -> list[WorkItem]:
        """The work items of one image, with their references; items that cannot be built go to ``ctx.error``."""

    @abstractmethod
    def build_target(self, refs: Sequence[Any]) -> Target:
        """The target of one (member, slot) for a batch, from the batch's references in that (member, slot)."""

    @classmethod
    def group(cls, ref: str, syndrome: str, syndrome_of: Mapping[str, str]) -> str:
        """The target group of a map of a patient with diagnosis ``syndrome`` (the same for every patient of a
        syndrome): ``<kind>:own`` for a reference that is the patient's syndrome, else ``<kind>:<ref>``."""
        return _own_or_key(TargetKey(cls.name, ref), syndrome)


def _own_or_key(key: TargetKey, syndrome: str) -> str:
    return f"{key.kind}:own" if key.ref == syndrome else str(key)


def register_target_kind(name: str) -> Any:
    """Class decorator registering a :class:`TargetKind` as ``name`` (sets ``cls.name``)."""
    TargetKey(name, "-")  # the kind's spelling is checked once, here

    def deco(cls: type[TargetKind]) -> type[TargetKind]:
        if cls.__dict__.get("name") and cls.name != name:  # a subclass of a registered kind is a new kind
            raise ValueError(f"{cls.__name__} is already the target kind {cls.name!r}")
        cls.name = name
        TARGET_KINDS.add(name, cls)
        return cls

    return deco


def get_target_kind(name: str) -> type[TargetKind]:
    """The class of target kind ``name`` (:class:`ConfigError` listing the kinds otherwise).

    >>> get_target_kind("centroid").target_class.__name__
    'CentroidTarget'
    """
    return TARGET_KINDS.get(name)


def available_target_kinds() -> list[str]:
    """Names of every registered target kind.

    >>> {"centroid", "logit", "pair"} <= set(available_target_kinds())
    True
    """
    return TARGET_KINDS.names()


def target_group(target: str | TargetKey, syndrome: str, syndrome_of: Mapping[str, str]) -> str:
    """The target group of one stored map (:meth:`TargetKind.group`); ``syndrome_of`` maps image ids to syndromes
    (pair partners). A kind not registered here is grouped by the default rule.

    >>> syn = {"i9": "S01"}
    >>> [target_group(t, "S01", syn) for t in ("centroid:S01", "centroid:S02", "pair:i9", "pair:x")]
    ['centroid:own', 'centroid:S02', 'pair:same-syndrome', 'pair:unknown']
    """
    key = TargetKey.parse(target)
    if key.kind not in available_target_kinds():
        return _own_or_key(key, str(syndrome))
    return get_target_kind(key.kind).group(key.ref, str(syndrome), syndrome_of)


def plan_items(kind: TargetKind, ctx: PlanContext, image_ids: Sequence[str]) -> list[WorkItem]:
    """The work items of one model group: each image's items, deduplicated, sorted by (image, target string)."""
    unique: dict[tuple[str, str], WorkItem] = {}
    for image_id in image_ids:
        if image_id not in ctx.meta.index:
            ctx.error(image_id, None, "image not in the cohort table", "input")
            continue
        for item in kind.plan(ctx, image_id):
            # the reverse direction of a pair can repeat another image's item: keep the first
            unique.setdefault((item.image_id, str(item.target)), item)
    if ctx.unlabelled:
        log.info("%s: %d undiagnosed image(s) have no label to explain towards (syndromes: label); explain them "
                 "with syndromes: topk:K", ctx.group_id, len(ctx.unlabelled))
    return [unique[k] for k in sorted(unique)]


# ------------------------------------------------------------------------------------------------ built-in kinds
def _syndrome_item(kind: str, ctx: PlanContext, image_id: str, syndrome: str, rank: int | None) -> WorkItem:
    item = WorkItem(image_id, TargetKey(kind, syndrome),
                    detail={"syndrome_id": syndrome, "syndromes": str(ctx.syndromes)})
    if rank is not None:
        item.detail["rank"] = rank
    return item


class _SimilarityKind(TargetKind):
    """Kinds whose target is the cosine to a reference embedding (linearised unless ``cosine: exact``)."""

    def build_target(self, refs: Sequence[Any]) -> Target:
        return self.target_class(np.stack(refs), exact=self.cfg.cosine == "exact")  # type: ignore[call-arg]


@register_target_kind("centroid")
class CentroidKind(_SimilarityKind):
    """Cosine to the centroid of each selected syndrome's gallery subjects, the patient's own subject left out."""

    target_class = CentroidTarget

    def prepare(self, run: Run, models: Sequence[tuple[str, nn.Module, str]], images: pd.DataFrame,
                embeddings: pd.DataFrame, gallery_ids: Sequence[str]) -> None:
        self.bank = CentroidBank(embeddings, images, gallery_ids)

    def centroid_refs(self, ctx: PlanContext, syndrome: str, subject: str) -> dict[tuple[str, TTASlot], np.ndarray]:
        """The centroid of ``syndrome`` without ``subject`` per (member, slot) of the group (those that have one)."""
        refs = {}
        for mid in ctx.model_ids:
            for slot in ctx.slots:
                r = self.bank.reference(mid, slot, syndrome, exclude_subject=subject)
                if r is not None:
                    refs[(mid, slot)] = r
        return refs

    def plan(self, ctx: PlanContext, image_id: str) -> list[WorkItem]:
        subject = ctx.subject(image_id)
        items = []
        for syndrome, rank in ctx.selected_syndromes(image_id):
            item = _syndrome_item(self.name, ctx, image_id, syndrome, rank)
            item.refs = self.centroid_refs(ctx, syndrome, subject)
            if not item.refs:
                ctx.error(image_id, item.target, f"no gallery subject of syndrome {syndrome!r} left after excluding "
                                                 f"the patient's own subject {subject!r}")
                continue
            first = (ctx.model_ids[0], ctx.slots[0], syndrome)
            n_subjects = self.bank.n_subjects(*first) - int(subject in _subjects_of(self.bank, *first))
            item.detail.update(excluded_subject=subject, cosine=self.cfg.cosine, n_gallery_subjects=n_subjects)
            items.append(item)
        return items


def _subjects_of(bank: CentroidBank, model_id: str, slot: TTASlot, syndrome: str) -> set[str]:
    sums = bank._sums.get((model_id, slot, syndrome))
    return set(sums.per_subject) if sums else set()


@register_target_kind("logit")
class LogitKind(TargetKind):
    """The class logit of each selected syndrome. A model that knows only some of the syndromes explains those it
    knows; the others become ``skipped`` error rows naming the class and the model (so do members without a
    classifier). A class list sharing no syndrome with the cohort is a configuration error before any work."""

    target_class = LogitTarget

    def prepare(self, run: Run, models: Sequence[tuple[str, nn.Module, str]], images: pd.DataFrame,
                embeddings: pd.DataFrame, gallery_ids: Sequence[str]) -> None:
        """Before any work: a classifier without syndrome ids, or whose class list shares no syndrome with the
        wanted ones, is a configuration error (a lookup table that does not fit the classifier's size was already
        refused when the model was loaded).

        The wanted syndromes are the explicit ids (``--syndromes ID,…``), otherwise the cohort's class lookup (its
        training syndromes). Members without a classifier are skipped later (with a note).
        """
        from gestalt_xai.data.cohort import load_run_cohort
        from gestalt_xai.models.checkpoints import check_classes

        spec = parse_syndrome_spec(self.cfg.syndromes)
        wanted = list(spec.ids) if spec.mode == "ids" else (load_run_cohort(run).lookup or [])
        with_classifier = [(mid, m) for mid, m, _ in models if getattr(m, "classifier", None) is not None]
        if not with_classifier:
            raise ConfigError("target: logit needs a model with a classifier; every model here is embedding-only")
        for mid, model in with_classifier:
            try:
                check_classes(model, wanted, partial=True)
            except ConfigError as exc:
                raise ConfigError(f"model {mid!r}: {exc}") from None

    def plan(self, ctx: PlanContext, image_id: str) -> list[WorkItem]:
        items = []
        for syndrome, rank in ctx.selected_syndromes(image_id):
            item = _syndrome_item(self.name, ctx, image_id, syndrome, rank)
            lacking = []
            for mid, model in ctx.group:
                ids = getattr(model, "syndrome_ids", None)
                if getattr(model, "classifier", None) is None or not ids or syndrome not in ids:
                    lacking.append(mid)  # a member without the class is left out of the mean (ScoreModel.skipped)
                    continue
                for slot in ctx.slots:
                    item.refs[(mid, slot)] = ids.index(syndrome)
            if not item.refs:
                ctx.error(image_id, item.target, f"class {syndrome!r} is not a class of model(s) {lacking} "
                                                 "(no classifier, or not in its lookup table): skipped", "skipped")
                continue
            if lacking:
                item.detail["members_without_class"] = lacking
            items.append(item)
        return items

    def build_target(self, refs: Sequence[Any]) -> Target:
        return LogitTarget([int(r) for r in refs])


@register_target_kind("pair")
class PairKind(_SimilarityKind):
    """Cosine to a partner image's embedding, both directions: partners from a table, or the ``nearest:K`` gallery
    images of each selected syndrome (and each partner explained against the patient)."""

    target_class = PairTarget
    example_options = {"pairs": "nearest:1"}

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if not cfg.pairs:
            raise ConfigError("target 'pair' needs pairs: nearest:K or a pairs table (--pairs)")
        parse_pair_spec(cfg.pairs)

    def prepare(self, run: Run, models: Sequence[tuple[str, nn.Module, str]], images: pd.DataFrame,
                embeddings: pd.DataFrame, gallery_ids: Sequence[str]) -> None:
        self.spec: PairSpec = parse_pair_spec(self.cfg.pairs)
        self.table = read_pairs_table(self.spec.table) if self.spec.table is not None else None

    def _partners(self, ctx: PlanContext, image_id: str) -> list[tuple[str, dict[str, Any]]]:
        if self.table is not None:
            return [(p, {"source": str(self.spec.table)})
                    for p in self.table.loc[self.table["image_id"] == image_id, "partner_id"]]
        d, keep = ctx.distances(image_id)
        keep_syn = np.array(ctx.syndrome_of(keep), dtype=object)
        keep_ids = np.array(keep, dtype=object).astype(str)
        if ctx.syndromes.mode == "label" and ctx.undiagnosed(image_id):
            groups = [np.arange(len(keep))]  # no label: the nearest gallery faces of any syndrome (module docstring)
        else:
            groups = [np.flatnonzero(keep_syn == syndrome) for syndrome, _ in ctx.selected_syndromes(image_id)]
        partners = []
        for idx in groups:
            order = idx[np.lexsort((keep_ids[idx], d[idx]))][: self.spec.k]
            partners += [(keep[j], {"syndrome_id": str(keep_syn[j]), "distance": float(d[j]),
                                    "source": str(self.spec)}) for j in order]
        return partners

    def plan(self, ctx: PlanContext, image_id: str) -> list[WorkItem]:
        items = []
        for partner, info in self._partners(ctx, image_id):
            for a, b in ((image_id, partner), (partner, image_id)):
                if self.table is not None and a != image_id:
                    continue  # the table already lists both directions
                item = WorkItem(a, TargetKey(self.name, b), detail={**info, "partner": b, "cosine": self.cfg.cosine})
                try:
                    item.refs = {(mid, slot): ctx.embedding(mid, slot, b) for mid in ctx.model_ids
                                 for slot in ctx.slots}
                except InputError as exc:
                    ctx.error(a, item.target, str(exc), "input")
                    continue
                items.append(item)
        return items

    @classmethod
    def group(cls, ref: str, syndrome: str, syndrome_of: Mapping[str, str]) -> str:
        """``pair:same-syndrome`` / ``pair:other-syndrome`` by the partner's syndrome (``pair:unknown`` if it is
        not in ``syndrome_of``)."""
        partner = syndrome_of.get(ref)
        if partner is None:
            return "pair:unknown"
        return "pair:same-syndrome" if str(partner) == str(syndrome) else "pair:other-syndrome"
