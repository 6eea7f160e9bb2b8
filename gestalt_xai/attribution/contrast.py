"""The ``contrast`` target kind: the score of syndrome X minus that of Y for the same image (``contrast:X-Y``).

Why the first suggestion rather than the second — the question a differential diagnosis asks. The target
(:class:`ContrastTarget`) is the difference of two existing targets; :class:`ContrastKind` builds it from the two
syndromes' centroid targets (linearised cosine unless ``cosine: exact``; both centroids without the patient's own
subject), per member model and TTA slot, so the ensemble and TTA mean of the difference is the difference of the
means. Attributions that are linear in the explained score — input×gradient, signed Grad-CAM and HiResCAM (linear in
the gradient), occlusion (linear in score differences) — of a contrast are exactly the difference of the two
centroid maps (``tests/test_undiagnosed.py``); saliency (``max|∂s/∂x|``) and other non-linear read-outs are not.

Pairs per image (``syndromes``):

* ``topk:K`` (K ≥ 2): the first suggestion against each of the next K − 1 (``topk:2``: the first against the
  second), ranked as every ``topk`` target ranks (:meth:`~.target_kinds.PlanContext.ranked`);
* explicit pairs ``X-Y`` (comma-separated, the same for every image);
* ``label``: the patient's diagnosis against the best-ranked other syndrome (nothing for an undiagnosed patient).

**Separator.** Within a key, ``-`` separates the two ids, and a ``-`` or ``%`` inside an id is written ``%2D`` /
``%25`` (:func:`contrast_ref`, :func:`parse_contrast_ref`), so any id round-trips and a key never has two readings.
GMDB disorder ids, OMIM numbers and the synthetic ``S01`` ids contain neither, so their keys read plainly
(``contrast:S03-S01``).

Target groups (aggregate stage): ``contrast:own`` when X is the patient's diagnosis, else ``contrast:X-Y``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gestalt_xai.attribution.target_kinds import CentroidKind, PlanContext, WorkItem, register_target_kind
from gestalt_xai.attribution.targets import CentroidTarget, Target, TargetKey, parse_syndrome_spec
from gestalt_xai.errors import ConfigError, InputError

__all__ = ["ContrastKind", "ContrastTarget", "contrast_ref", "parse_contrast_ref"]

_ESCAPES = {"%": "%25", "-": "%2D"}
_UNESCAPE = re.compile(r"%(25|2D)", re.IGNORECASE)


def contrast_ref(first: str, second: str) -> str:
    """The reference ``X-Y`` of a contrast target, with ``-`` and ``%`` inside an id escaped (module docstring).

    >>> contrast_ref("S03", "S01"), contrast_ref("22q11-del", "100%")
    ('S03-S01', '22q11%2Ddel-100%25')
    """
    def esc(s: str) -> str:
        return "".join(_ESCAPES.get(c, c) for c in str(s))

    return f"{esc(first)}-{esc(second)}"


def parse_contrast_ref(ref: str) -> tuple[str, str]:
    """``(X, Y)`` of a contrast reference ``X-Y`` (:func:`contrast_ref`); an :class:`InputError` unless it holds
    exactly one unescaped ``-`` between two non-empty ids.

    >>> parse_contrast_ref("S03-S01"), parse_contrast_ref("22q11%2Ddel-100%25")
    (('S03', 'S01'), ('22q11-del', '100%'))
    """
    parts = str(ref).split("-")
    if len(parts) != 2 or not all(parts):
        raise InputError(f"a contrast is 'X-Y' (two syndrome ids, a '-' inside an id written %2D), got {ref!r}")
    first, second = (_UNESCAPE.sub(lambda m: "%" if m[1] == "25" else "-", p) for p in parts)
    return first, second


def _difference(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None and b is None:
        return None
    if a is None:
        return -b  # type: ignore[operator]
    return a if b is None else a - b


class ContrastTarget(Target):
    """The score of one target minus another's for the same image, ``s_X − s_Y`` (e.g. two centroid targets).

    Attributions of gradient methods that are linear in the gradient (input×gradient, signed Grad-CAM, HiResCAM)
    and of occlusion are therefore exactly the difference of the two targets' maps; the LRP output relevance is the
    difference of theirs (it sums to ``s_X − s_Y``).

    >>> from gestalt_xai.attribution.targets import CentroidTarget
    >>> t = ContrastTarget(CentroidTarget([1.0, 0.0]), CentroidTarget([0.0, 1.0]))
    >>> round(float(t(None, torch.tensor([[3.0, 4.0]]))[0]), 4)  # cos = 3/5 and 4/5
    -0.2
    """

    kind = "contrast"

    def __init__(self, first: Target, second: Target) -> None:
        self.first, self.second = first, second
        self.needs_logits = first.needs_logits or second.needs_logits  # type: ignore[misc]

    def __call__(self, logits: torch.Tensor | None, embedding: torch.Tensor) -> torch.Tensor:
        return self.first(logits, embedding) - self.second(logits, embedding)

    def output_relevance(self, logits, embedding):  # type: ignore[no-untyped-def]
        (l1, e1), (l2, e2) = (t.output_relevance(logits, embedding) for t in (self.first, self.second))
        return _difference(l1, l2), _difference(e1, e2)

    def select(self, rows: Sequence[int]) -> ContrastTarget:
        return ContrastTarget(self.first.select(rows), self.second.select(rows))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "first": self.first.describe(), "second": self.second.describe()}


@register_target_kind("contrast")
class ContrastKind(CentroidKind):
    """Centroid score of syndrome X minus that of Y (``contrast:X-Y``), both without the patient's own subject, per
    member and TTA slot (module docstring)."""

    target_class = ContrastTarget
    example_options = {"syndromes": "topk:2"}

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        spec = parse_syndrome_spec(cfg.syndromes)
        if spec.mode == "topk" and spec.k < 2:
            raise ConfigError(f"target 'contrast' compares two syndromes: syndromes topk:K needs K ≥ 2, got {spec}")
        for ref in spec.ids:
            try:
                first, second = parse_contrast_ref(ref)
            except InputError as exc:
                raise ConfigError(f"syndromes: {exc}") from None
            if first == second:
                raise ConfigError(f"syndromes: contrast {ref!r} compares a syndrome with itself")

    def _pairs(self, ctx: PlanContext, image_id: str) -> list[tuple[tuple[str, int | None], tuple[str, int | None]]]:
        spec = ctx.syndromes
        if spec.mode == "ids":
            return [((a, None), (b, None)) for a, b in map(parse_contrast_ref, spec.ids)]
        if spec.mode == "topk":
            ranked = ctx.selected_syndromes(image_id)
            return [(ranked[0], other) for other in ranked[1:]]
        own = ctx.selected_syndromes(image_id)  # label: the diagnosis against the best-ranked other syndrome
        if not own:
            return []
        rival = next(((s, rank) for rank, s in enumerate(ctx.ranked(image_id), start=1) if s != own[0][0]), None)
        return [] if rival is None else [(own[0], rival)]

    def plan(self, ctx: PlanContext, image_id: str) -> list[WorkItem]:
        subject = ctx.subject(image_id)
        items = []
        for (first, rank1), (second, rank2) in self._pairs(ctx, image_id):
            item = WorkItem(image_id, TargetKey(self.name, contrast_ref(first, second)),
                            detail={"first": first, "second": second, "syndromes": str(ctx.syndromes),
                                    "excluded_subject": subject, "cosine": self.cfg.cosine})
            item.detail.update({k: r for k, r in (("first_rank", rank1), ("second_rank", rank2)) if r is not None})
            a, b = self.centroid_refs(ctx, first, subject), self.centroid_refs(ctx, second, subject)
            item.refs = {key: (a[key], b[key]) for key in a if key in b}
            if not item.refs:
                ctx.error(image_id, item.target, f"no model/slot has gallery subjects of both {first!r} and "
                                                 f"{second!r} after excluding the patient's own subject {subject!r}")
                continue
            items.append(item)
        return items

    def build_target(self, refs: Sequence[Any]) -> Target:
        exact = self.cfg.cosine == "exact"
        return ContrastTarget(CentroidTarget(np.stack([a for a, _ in refs]), exact=exact),
                              CentroidTarget(np.stack([b for _, b in refs]), exact=exact))

    @classmethod
    def group(cls, ref: str, syndrome: str, syndrome_of: Mapping[str, str]) -> str:
        """``contrast:own`` when the first syndrome is the patient's diagnosis (it against a rival), else the key."""
        return f"{cls.name}:own" if parse_contrast_ref(ref)[0] == syndrome else f"{cls.name}:{ref}"
