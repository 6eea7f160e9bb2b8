"""The explained function: images → one score per image, for a model, an ensemble and TTA slots.

:class:`ScoreModel` is an ``nn.Module`` whose ``forward(x)`` takes normalised RGB images ``(B, 3, 112, 112)`` and
returns the explained scores ``(B,)``: for every member model and every TTA slot it applies the slot's view *inside*
the forward (horizontal flip, 3-channel gray, the member's channel order), runs the member, applies that
(member, slot)'s :class:`~gestalt_xai.attribution.targets.Target`, and averages. Gradients therefore flow back to the
original input, and every method (ours or Captum's) explains the mean of the members' targets: an ensemble is
explained as the mean of its members' targets, as GM-Arc's matching averages their distances.

Views are differentiable re-implementations of :func:`gestalt_xai.models.gestaltmatcher.preprocess`'s:

* flip: ``x.flip(-1)``; a layer activation recorded in a flipped view is flipped back before it enters a map;
* gray: ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` on the normalised image (the weights sum to 1, so it
  commutes with the normalisation). The embed stage rounds luma on uint8 (OpenCV fixed point); the difference is
  ≤ 0.5/255 per pixel, and the explained score is always recomputed from this differentiable view;
* channel order: a member that expects BGR gets ``x.flip(1)``.

Members without a classifier are skipped for logit targets; :attr:`ScoreModel.skipped` says which and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gestalt_xai.attribution.targets import Target, TTASlot
from gestalt_xai.errors import ConfigError

__all__ = ["ScoreModel", "MemberView", "apply_view", "LUMA_RGB"]

LUMA_RGB = (0.299, 0.587, 0.114)


def apply_view(x: torch.Tensor, flip: bool, gray: bool, channel_order: str = "RGB") -> torch.Tensor:
    """Differentiable TTA view of normalised RGB images ``(B, 3, H, W)`` in the member's channel order."""
    if gray:
        w = torch.tensor(LUMA_RGB, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    if flip:
        x = x.flip(-1)
    if channel_order == "BGR":
        x = x.flip(1)
    return x


@dataclass(frozen=True)
class MemberView:
    """One (member, slot) term of the mean."""

    index: int
    model_id: str
    model: nn.Module
    flip: bool
    gray: bool
    target: Target


class ScoreModel(nn.Module):
    """Mean target over members × TTA slots; ``forward(x) -> (B,)``.

    Parameters
    ----------
    members : ``(model_id, model)`` pairs; each model's ``forward(x)`` returns ``(logits | None, embedding)``.
    slots : TTA slots ``(flip, gray)`` to average over (default: the original view only).
    targets : a :class:`Target` per ``(model_id, slot)``, or one target used for every member and slot.

    >>> from gestalt_xai.models import build_gestaltmatcher
    >>> from gestalt_xai.attribution.targets import LogitTarget
    >>> m = build_gestaltmatcher("r18", width=0.125, num_classes=3).eval()
    >>> ScoreModel([("m", m)], targets=LogitTarget(0))(torch.zeros(2, 3, 112, 112)).shape
    torch.Size([2])
    """

    def __init__(
        self,
        members: Sequence[tuple[str, nn.Module]],
        targets: Target | Mapping[tuple[str, TTASlot], Target],
        slots: Sequence[TTASlot] = ((False, False),),
    ) -> None:
        super().__init__()
        if not members:
            raise ConfigError("ScoreModel needs at least one member model")
        self.members = nn.ModuleList([m for _, m in members])
        self.model_ids = [mid for mid, _ in members]
        self.slots = [(bool(f), bool(g)) for f, g in slots]
        self.skipped: dict[str, str] = {}
        views: list[MemberView] = []
        for i, (mid, model) in enumerate(members):
            for flip, gray in self.slots:
                target = targets if isinstance(targets, Target) else targets.get((mid, (flip, gray)))
                if target is None:
                    self.skipped.setdefault(mid, "no target for this model/slot (e.g. no centroid)")
                    continue
                if target.needs_logits and getattr(model, "classifier", True) is None:
                    self.skipped[mid] = "no classifier head: logit target skipped"
                    continue
                views.append(MemberView(i, mid, model, flip, gray, target))
        if not views:
            raise ConfigError(f"no member can evaluate this target: {self.skipped}")
        self.views = views
        self.current_view: MemberView | None = None

    def with_models(self, models: Sequence[nn.Module]) -> ScoreModel:
        """The same targets and slots over other (e.g. BN-folded) copies of the members, in the same order."""
        if len(models) != len(self.members):
            raise ValueError(f"{len(models)} models for {len(self.members)} members")
        new = ScoreModel.__new__(ScoreModel)
        nn.Module.__init__(new)
        new.members = nn.ModuleList(models)
        new.model_ids = list(self.model_ids)
        new.slots = list(self.slots)
        new.skipped = dict(self.skipped)
        new.views = [MemberView(v.index, v.model_id, models[v.index], v.flip, v.gray, v.target) for v in self.views]
        new.current_view = None
        return new

    def select(self, rows: Sequence[int]) -> ScoreModel:
        """The same members and slots with every target restricted to ``rows`` of the batch."""
        new = self.with_models(list(self.members))
        new.views = [MemberView(v.index, v.model_id, v.model, v.flip, v.gray, v.target.select(rows))
                     for v in self.views]
        return new

    @property
    def used_model_ids(self) -> list[str]:
        return sorted({v.model_id for v in self.views})

    def view_outputs(self, x: torch.Tensor, view: MemberView) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(logits, embedding)`` of one member on one view of ``x``."""
        channel_order = getattr(view.model, "channel_order", "RGB")
        return view.model(apply_view(x, view.flip, view.gray, channel_order))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for view in self.views:
            # hooks (gradients.py, captum_methods.py) read the active view to undo its flip on layer maps
            self.current_view = view
            logits, emb = self.view_outputs(x, view)
            s = view.target(logits, emb)
            total = s if total is None else total + s
        self.current_view = None
        assert total is not None
        return total / len(self.views)

    def describe(self) -> dict[str, object]:
        """Which members and slots were averaged, and the target description."""
        return {
            "members": self.used_model_ids,
            "slots": [list(s) for s in self.slots],
            "n_terms": len(self.views),
            "skipped": dict(self.skipped),
            "target": self.views[0].target.describe(),
        }
