"""Layer-wise Relevance Propagation through zennit 0.5.1, with an iResNet canonizer.

zennit needs the network in a "canonical" form (Anders et al., zennit 2021): every linear step a module with a rule,
BatchNorms that follow a linear layer merged into it, and sums as modules with a single (stacked) input.
:class:`IResNetCanonizer` provides this for :class:`~gestalt_xai.models.iresnet.IResNet` (native or fused layout),
always undone on exit (zennit's composite context):

* **merged BatchNorms** (zennit's :class:`~zennit.canonizers.NamedMergeBatchNorm`): stem ``conv1 → bn1``, each
  block's ``conv1 → bn2`` and ``conv2 → bn3``, the shortcut ``downsample.0 → downsample.1``, and the head
  ``fc → features`` (BN1d after the Linear). In the fused layout these BNs are already identities and are skipped.
* **residual add**: each block's :class:`~gestalt_xai.models.iresnet.ResidualAdd` is swapped for
  :class:`StackedResidualSum`, which stacks ``(out, shortcut)`` and sums with :class:`zennit.layer.Sum` so the
  ``Norm`` rule splits relevance between branch and shortcut in proportion to their contributions.
* **pre-activation BatchNorms** — each block's ``bn1`` and the head ``bn2`` — cannot be merged: ``bn1`` precedes a
  convolution with zero padding (merging it into the conv would turn the padded zeros into ``β − γμ/σ`` at the
  border), and ``bn2`` follows the residual add. They stay as per-channel affine layers ``y = (γ/σ) x + b`` and get
  their own rule (``bn_rule``): ``"epsilon"`` (default; the z/ε-rule ``R_in = (γ/σ) x / (y + ε) · R_out``, the bias
  ``b = β − γμ/σ`` absorbs its share of relevance, as any bias does under the ε-rule) or ``"pass"`` (zennit's
  default for BatchNorm: relevance passes unchanged, i.e. the BN is ignored).

PReLU gets zennit's ``Pass`` rule (an activation), convolutions and Linear layers the composite's rules. Default
``epsilon_gamma_box``: the z^B rule at the stem convolution with the input bounds [−1, 1] of GM-Arc's
normalisation (pixel 0 ↦ −1, 255 ↦ +1), γ = 0.25 at the other convolutions, ε at Linear layers; with all effective
biases zero it conserves relevance exactly (tested). ``epsilon_plus_flat`` (flat rule at the stem, z⁺ elsewhere)
and ``epsilon_alpha2_beta1_flat`` are offered too; in zennit 0.5.1 their z⁺/α-β rules drop the relevance of
neurons without positive (resp. negative) contributions, so they lose a few per cent of the total here.

The explained score's last step is linear in the model output (``r̂·f/‖f‖`` or a logit), so the output relevance is
the z-rule on it (:meth:`~gestalt_xai.attribution.targets.Target.output_relevance`); TTA views (flip, gray, channel
order) are linear ops without bias that pass relevance back as their gradient (conservative; gray luma weights sum
to 1). Ensembles and TTA slots average the per-view relevance, as the score averages the targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from gestalt_xai.attribution.base import AttributionMethod, MethodMaps, MethodParams, register_method
from gestalt_xai.errors import ConfigError

__all__ = ["IResNetCanonizer", "StackedResidualSum", "LRPMethod", "iresnet_composite", "lrp"]


class StackedResidualSum(nn.Module):
    """``out + shortcut`` as :class:`zennit.layer.Sum` over a stacked last axis (zennit's rules take one input)."""

    def __init__(self) -> None:
        super().__init__()
        from zennit.layer import Sum

        self.canonizer_sum = Sum(dim=-1)

    def forward(self, out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return self.canonizer_sum(torch.stack([out, shortcut], dim=-1))


class _ResidualSwap:
    """Canonizer instance that swaps one block's ``residual`` module and restores it on ``remove``."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.original = block.residual
        block.residual = StackedResidualSum()

    def remove(self) -> None:
        self.block.residual = self.original


def _merge_pairs(model: nn.Module) -> list[tuple[tuple[str], str]]:
    from gestalt_xai.models.iresnet import IBasicBlock, IResNet

    backbone_name, backbone = next(
        ((n, m) for n, m in model.named_modules() if isinstance(m, IResNet)), (None, None)
    )
    if backbone is None:
        raise ConfigError("LRP canonizer: no IResNet backbone found in the model")
    pre = f"{backbone_name}." if backbone_name else ""
    mods = dict(model.named_modules())
    pairs: list[tuple[tuple[str], str]] = [((f"{pre}conv1",), f"{pre}bn1"), ((f"{pre}fc",), f"{pre}features")]
    for name, m in backbone.named_modules():
        if isinstance(m, IBasicBlock):
            pairs += [((f"{pre}{name}.conv1",), f"{pre}{name}.bn2"), ((f"{pre}{name}.conv2",), f"{pre}{name}.bn3")]
            if m.downsample is not None:
                pairs.append(((f"{pre}{name}.downsample.0",), f"{pre}{name}.downsample.1"))
    return [(lin, bn) for lin, bn in pairs if isinstance(mods.get(bn), nn.modules.batchnorm._BatchNorm)]


def affine_batchnorm_names(model: nn.Module) -> list[str]:
    """Names of the BatchNorms that stay after canonization (block ``bn1``s and the head ``bn2``)."""
    merged = {bn for _, bn in _merge_pairs(model)}
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in merged]


def IResNetCanonizer() -> Any:  # noqa: N802 - a factory standing in for a class built on zennit's base lazily
    """The iResNet canonizer (module docstring): BN merges by name plus the residual-sum swap."""
    from zennit.canonizers import Canonizer, NamedMergeBatchNorm

    class _IResNetCanonizer(Canonizer):
        def apply(self, root_module: nn.Module) -> list[Any]:
            from gestalt_xai.models.iresnet import IBasicBlock

            instances: list[Any] = NamedMergeBatchNorm(_merge_pairs(root_module)).apply(root_module)
            instances += [_ResidualSwap(m) for m in root_module.modules() if isinstance(m, IBasicBlock)]
            return instances

        def register(self) -> None:  # instances do the work in apply
            pass

        def remove(self) -> None:
            pass

    return _IResNetCanonizer()


def iresnet_composite(model: nn.Module, composite: str = "epsilon_gamma_box", bn_rule: str = "epsilon",
                      epsilon: float = 1e-6) -> Any:
    """A zennit composite for ``model``: ``bn_rule`` on the unmerged BNs, the named composite elsewhere."""
    from zennit.composites import (
        EpsilonAlpha2Beta1Flat,
        EpsilonGammaBox,
        EpsilonPlusFlat,
        MixedComposite,
        NameMapComposite,
    )
    from zennit.rules import Epsilon, Pass

    canonizers = [IResNetCanonizer()]
    if composite == "epsilon_plus_flat":
        base = EpsilonPlusFlat(epsilon=epsilon)
    elif composite == "epsilon_gamma_box":
        base = EpsilonGammaBox(low=-1.0, high=1.0, epsilon=epsilon)
    elif composite == "epsilon_alpha2_beta1_flat":
        base = EpsilonAlpha2Beta1Flat(epsilon=epsilon)
    else:
        raise ConfigError(f"unknown LRP composite {composite!r}; use epsilon_plus_flat, epsilon_gamma_box or "
                          "epsilon_alpha2_beta1_flat")
    if bn_rule not in ("epsilon", "pass"):
        raise ConfigError(f"bn_rule must be 'epsilon' or 'pass', got {bn_rule!r}")
    rule = Epsilon(epsilon=epsilon) if bn_rule == "epsilon" else Pass()
    names = affine_batchnorm_names(model)
    return MixedComposite([NameMapComposite([(tuple(names), rule)]), base], canonizers=canonizers)


def lrp(score_model: nn.Module, x: torch.Tensor, composite: str = "epsilon_gamma_box", bn_rule: str = "epsilon",
        epsilon: float = 1e-6) -> torch.Tensor:
    """Input relevance ``(B, 3, H, W)`` of a :class:`~gestalt_xai.attribution.score_model.ScoreModel`'s score."""
    total: torch.Tensor | None = None
    views = score_model.views  # type: ignore[attr-defined]
    for view in views:
        comp = iresnet_composite(view.model, composite, bn_rule, epsilon)
        xi = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), comp.context(view.model):
            logits, emb = score_model.view_outputs(xi, view)  # type: ignore[attr-defined]
            r_logits, r_emb = view.target.output_relevance(logits, emb)
            outs, seeds = [], []
            if r_logits is not None and logits is not None:
                outs.append(logits)
                seeds.append(r_logits)
            if r_emb is not None:
                outs.append(emb)
                seeds.append(r_emb)
            (rel,) = torch.autograd.grad(outs, xi, seeds)
        total = rel if total is None else total + rel
    assert total is not None
    return total / len(views)


@register_method()
class LRPMethod(AttributionMethod):
    """LRP (Bach et al. 2015) via zennit with :class:`IResNetCanonizer`; relevance summed over channels."""

    names = ("lrp",)

    class Params(MethodParams):
        composite: Literal["epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1_flat"] = Field(
            "epsilon_gamma_box", description="zennit composite (module docstring)", examples=["epsilon_plus_flat"])
        bn_rule: Literal["epsilon", "pass"] = Field(
            "epsilon", description="rule of the BatchNorms that cannot be merged", examples=["pass"])
        epsilon: float = Field(1e-6, gt=0, description="stabiliser of the epsilon rules", examples=[1e-4])

    def attribute(self, score_model: nn.Module, x: torch.Tensor, methods: Sequence[str],
                  layers: Sequence[str]) -> list[MethodMaps]:
        rel = lrp(score_model, x, **self.params)
        params = dict(self.params, canonizer="iresnet (merged post-conv BNs, stacked residual sum)",
                      zennit="0.5.1")
        return [MethodMaps("lrp", "", rel.detach().sum(1).float(), params)]
