"""Grad-CAM, HiResCAM, FullGrad, saliency and input×gradient from ONE shared forward+backward pass.

:func:`gradient_pass` runs the :class:`~gestalt_xai.attribution.score_model.ScoreModel` once with forward hooks that
record the outputs of the requested layers (and, for FullGrad, of every module with a bias), then calls
``torch.autograd.grad`` once for the input and all recorded outputs. Hooks are keyed by module object (never by list
position) and owned by :class:`ActivationRecorder`, a context manager that always removes them. Each method is then
a few tensor operations on the stored activations ``A`` (``K×h×w``) and gradients ``G = ∂s/∂A``:

.. math::

    \\text{Grad-CAM} = \\sum_k \\Big(\\tfrac{1}{hw}\\sum_{ij} G_{kij}\\Big) A_k \\qquad
    \\text{HiResCAM} = \\sum_k G_k \\odot A_k

    \\text{saliency} = \\max_c |\\partial s/\\partial x_c| \\qquad
    \\text{input×gradient} = \\sum_c x_c\\, \\partial s/\\partial x_c

    \\text{FullGrad} = \\psi(|\\nabla_x s \\odot x|)\\,\\text{summed over } c
        + \\sum_{l\\,\\in\\,\\text{conv-shaped}} \\sum_c \\psi(|G^l \\odot b^l|)_c

Grad-CAM and HiResCAM are **signed** (ReLU is a view, :mod:`~gestalt_xai.attribution.postprocess`) and upsampled
bilinearly (``align_corners=False``, as Captum's ``LayerAttribution.interpolate`` and OpenCV's resize) to 112×112.
With the linearised target and the model in eval mode everything after ``layer4`` is affine, so the HiResCAM map
at ``layer4`` (before upsampling) sums to ``s − s(A=0)`` (tests/test_attribution_gradients.py checks it).

FullGrad (Srinivas & Fleuret, NeurIPS 2019) counts **every** bias: convolution and Linear biases (including the
embedding ``fc`` and the classifier) and the effective bias of every BatchNorm in eval mode,
``b = β − γ μ / √(σ² + ε)`` (BN2d and BN1d). :meth:`GradientPass.fullgrad_terms` returns the input term and each
bias term as scalars per image; for a piecewise-linear network (PReLU, eval-mode BN) they sum to the score
(completeness). The saliency map follows the official implementation (``idiap/fullgrad-saliency``): ``ψ`` is
``|·|`` followed by a per-sample min-max rescale over the **whole layer tensor** (channels × space, not per
channel as in pytorch-grad-cam), then bilinear upsampling with ``align_corners=True``, summed over channels; only
conv-shaped (4-D) bias terms enter the map, the BN1d/Linear terms are constant over space. FullGrad maps are
therefore non-negative by construction. We sum channels before upsampling (interpolation is linear: same map up to
float rounding, C times cheaper).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gestalt_xai.attribution.base import AttributionMethod, MethodMaps, register_method
from gestalt_xai.errors import ConfigError
from gestalt_xai.faces.align import CROP_SIZE

__all__ = [
    "DEFAULT_LAYER",
    "GRADIENT_METHODS",
    "ActivationRecorder",
    "Capture",
    "GradientFamily",
    "GradientPass",
    "bias_of",
    "gradient_pass",
    "resolve_layer",
    "upsample",
]

DEFAULT_LAYER = "backbone.layer4"
GRADIENT_METHODS = ("gradcam", "hirescam", "fullgrad", "saliency", "input_x_gradient")
_LAYER_METHODS = frozenset({"gradcam", "hirescam"})


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (e.g. ``"backbone.layer4"``), with an error listing valid names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        stages = [n for n, _ in model.named_modules() if n.count(".") <= 1 and n]
        raise ConfigError(f"layer {name!r} not found in the model; valid names include {stages[:20]}") from None


def bias_of(module: nn.Module) -> torch.Tensor | None:
    """The (effective) bias a module adds per output channel, or ``None``.

    Conv/Linear: ``bias``. BatchNorm in eval mode: ``β − γ μ / √(σ² + ε)`` (``γ = 1, β = 0`` without affine).
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None or module.running_var is None:
            raise ConfigError("FullGrad needs BatchNorm in eval mode with running statistics; call model.eval()")
        inv_std = torch.rsqrt(module.running_var + module.eps)
        gamma = module.weight if module.weight is not None else torch.ones_like(module.running_mean)
        beta = module.bias if module.bias is not None else torch.zeros_like(module.running_mean)
        return (beta - gamma * module.running_mean * inv_std).detach()
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear) and module.bias is not None:
        return module.bias.detach()
    return None


@dataclass
class Capture:
    """One recorded module output (one member × view call) and, after the backward pass, its gradient."""

    key: str  # layer name (CAM layers) or qualified module name (FullGrad bias modules)
    member: int
    flip: bool
    output: torch.Tensor
    bias: torch.Tensor | None = None
    grad: torch.Tensor | None = None

    def unflip(self, m: torch.Tensor) -> torch.Tensor:
        """Bring a map computed in this capture's view back to the input's orientation."""
        return m.flip(-1) if self.flip else m


class ActivationRecorder(AbstractContextManager["ActivationRecorder"]):
    """Forward hooks on named layers (and optionally every biased module) of each member of a ScoreModel.

    Hooks are keyed by module object and removed on exit, whatever happens inside the ``with`` block.
    """

    def __init__(self, score_model: nn.Module, layers: Sequence[str] = (), bias_modules: bool = False) -> None:
        self.score_model = score_model
        self.layers = list(layers)
        self.bias_modules = bias_modules
        self.captures: list[Capture] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _members(self) -> Iterator[tuple[int, nn.Module]]:
        members = getattr(self.score_model, "members", None)
        if members is None:
            yield 0, self.score_model
        else:
            yield from enumerate(members)

    def __enter__(self) -> ActivationRecorder:
        try:
            for i, model in self._members():
                roles: dict[nn.Module, list[tuple[str, bool]]] = {}
                for name in self.layers:
                    roles.setdefault(resolve_layer(model, name), []).append((name, False))
                if self.bias_modules:
                    for qname, module in model.named_modules():
                        if bias_of(module) is not None:
                            roles.setdefault(module, []).append((qname, True))
                for module, keys in roles.items():
                    self._handles.append(module.register_forward_hook(self._hook(i, keys)))
        except BaseException:
            self._remove()
            raise
        return self

    def _hook(self, member: int, keys: list[tuple[str, bool]]):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            view = getattr(self.score_model, "current_view", None)
            flip = bool(view.flip) if view is not None else False
            for key, is_bias in keys:
                self.captures.append(Capture(key, member, flip, output, bias_of(module) if is_bias else None))

        return hook

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._remove()


def upsample(maps: torch.Tensor, size: int = CROP_SIZE, align_corners: bool = False) -> torch.Tensor:
    """Bilinear upsampling of ``(B, h, w)`` (or ``(B, C, h, w)``) maps to ``size × size``."""
    squeeze = maps.ndim == 3
    t = maps[:, None] if squeeze else maps
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=align_corners)
    return t[:, 0] if squeeze else t


def _minmax_per_sample(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Official FullGrad ``_postProcess``: ``|t|``, then min-max over all non-batch dims per sample."""
    t = t.abs()
    flat = t.flatten(1)
    lo = flat.min(1).values.view(-1, *([1] * (t.ndim - 1)))
    t = t - lo
    hi = t.flatten(1).max(1).values.view(-1, *([1] * (t.ndim - 1)))
    return t / (hi + eps)


@dataclass
class GradientPass:
    """Everything one forward+backward pass recorded; methods combine it into maps."""

    x: torch.Tensor
    scores: torch.Tensor
    input_grad: torch.Tensor
    layer_captures: dict[str, list[Capture]] = field(default_factory=dict)
    bias_captures: list[Capture] = field(default_factory=list)

    # ---- CAMs at layer resolution -------------------------------------------------------------------------
    def _combine(self, layer: str, fn: Any) -> torch.Tensor:
        caps = self.layer_captures.get(layer)
        if not caps:
            raise ConfigError(f"layer {layer!r} was not recorded in this pass")
        maps = [c.unflip(fn(c.output.detach(), c.grad)) for c in caps]
        if len({m.shape for m in maps}) > 1:  # members of different resolution: combine at input resolution
            maps = [upsample(m) for m in maps]
        return torch.stack(maps).sum(0)

    def gradcam_lowres(self, layer: str = DEFAULT_LAYER) -> torch.Tensor:
        """Signed Grad-CAM ``Σ_k mean_ij(G_k) A_k`` at layer resolution, ``(B, h, w)``."""
        return self._combine(layer, lambda a, g: (g.mean((2, 3), keepdim=True) * a).sum(1))

    def hirescam_lowres(self, layer: str = DEFAULT_LAYER) -> torch.Tensor:
        """HiResCAM ``Σ_k G_k ⊙ A_k`` at layer resolution, ``(B, h, w)``."""
        return self._combine(layer, lambda a, g: (g * a).sum(1))

    def gradcam(self, layer: str = DEFAULT_LAYER) -> torch.Tensor:
        return upsample(self.gradcam_lowres(layer))

    def hirescam(self, layer: str = DEFAULT_LAYER) -> torch.Tensor:
        return upsample(self.hirescam_lowres(layer))

    # ---- input-space maps ---------------------------------------------------------------------------------
    def saliency(self) -> torch.Tensor:
        """``max_c |∂s/∂x_c|`` (Simonyan et al. 2014)."""
        return self.input_grad.abs().amax(1)

    def input_x_gradient(self) -> torch.Tensor:
        """``Σ_c x_c ∂s/∂x_c`` (signed)."""
        return (self.input_grad * self.x.detach()).sum(1)

    # ---- FullGrad -----------------------------------------------------------------------------------------
    def _bias_tensors(self) -> Iterator[tuple[Capture, torch.Tensor]]:
        for c in self.bias_captures:
            if c.grad is None or c.bias is None:
                continue
            shape = (1, -1) + (1,) * (c.grad.ndim - 2)
            yield c, c.grad * c.bias.view(shape)

    def fullgrad_terms(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Input term ``Σ ∇_x s ⊙ x`` and each bias module's term ``Σ G ⊙ b`` per image (before any rescaling).

        For a piecewise-linear network they sum to the score (FullGrad completeness).
        """
        if not self.bias_captures:
            raise ConfigError("this pass did not record bias modules; run gradient_pass(..., fullgrad=True)")
        input_term = (self.input_grad * self.x.detach()).flatten(1).sum(1)
        terms: dict[str, torch.Tensor] = {}
        for c, t in self._bias_tensors():
            key = f"{c.member}:{c.key}"
            terms[key] = terms.get(key, 0) + t.flatten(1).sum(1)  # type: ignore[operator]
        return input_term, terms

    def fullgrad(self) -> torch.Tensor:
        """FullGrad saliency (official per-layer-tensor normalisation; see module docstring), ``(B, 112, 112)``."""
        if not self.bias_captures:
            raise ConfigError("this pass did not record bias modules; run gradient_pass(..., fullgrad=True)")
        cam = _minmax_per_sample(self.input_grad * self.x.detach()).sum(1)
        for c, t in self._bias_tensors():
            if t.ndim != 4:
                continue
            # sum over channels *before* upsampling: bilinear interpolation is linear, so this equals the official
            # upsample-then-sum up to float rounding, at 1/C of the cost (it dominated the pass on iResNet-50)
            m = upsample(_minmax_per_sample(t).sum(1), align_corners=True)
            cam = cam + c.unflip(m)
        return cam


def gradient_pass(
    score_model: nn.Module, x: torch.Tensor, layers: Sequence[str] = (DEFAULT_LAYER,), fullgrad: bool = False
) -> GradientPass:
    """One forward and one backward pass recording what Grad-CAM/HiResCAM/FullGrad/saliency/IxG need.

    Parameters
    ----------
    score_model : maps ``(B, 3, H, W)`` to ``(B,)`` scores (a :class:`ScoreModel`, or any module whose ``members``
        are the models to hook; a plain module is hooked itself).
    x : normalised input batch.
    layers : layer names relative to each member (``"backbone.layer4"``); several at once.
    fullgrad : also record every biased module (needed for :meth:`GradientPass.fullgrad`).

    >>> from gestalt_xai.models import build_gestaltmatcher
    >>> from gestalt_xai.attribution.targets import LogitTarget
    >>> from gestalt_xai.attribution.score_model import ScoreModel
    >>> m = build_gestaltmatcher("r18", width=0.125, num_classes=2).eval()
    >>> gp = gradient_pass(ScoreModel([("m", m)], LogitTarget(0)), torch.randn(2, 3, 112, 112))
    >>> tuple(gp.hirescam().shape)
    (2, 112, 112)
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), ActivationRecorder(score_model, layers, bias_modules=fullgrad) as rec:
        scores = score_model(x)
    if scores.ndim != 1:
        raise ValueError(f"the score model must return one scalar per image, got shape {tuple(scores.shape)}")
    caps = rec.captures
    grads = torch.autograd.grad(scores.sum(), [x, *[c.output for c in caps]], allow_unused=True)
    input_grad = grads[0] if grads[0] is not None else torch.zeros_like(x)
    out = GradientPass(x=x.detach(), scores=scores.detach(), input_grad=input_grad.detach())
    for c, g in zip(caps, grads[1:], strict=True):
        c.grad = None if g is None else g.detach()
        c.output = c.output.detach()
        if c.bias is not None:
            out.bias_captures.append(c)
        elif c.grad is not None:
            out.layer_captures.setdefault(c.key, []).append(c)
    return out


@register_method()
class GradientFamily(AttributionMethod):
    """Grad-CAM, HiResCAM, FullGrad, saliency and input×gradient from one shared pass (module docstring)."""

    names = GRADIENT_METHODS
    layer_methods = _LAYER_METHODS

    def attribute(
        self, score_model: nn.Module, x: torch.Tensor, methods: Sequence[str], layers: Sequence[str]
    ) -> list[MethodMaps]:
        wanted = [m for m in GRADIENT_METHODS if m in methods]
        cam_layers = list(layers) if any(m in _LAYER_METHODS for m in wanted) else []
        gp = gradient_pass(score_model, x, cam_layers, fullgrad="fullgrad" in wanted)
        out: list[MethodMaps] = []
        for m in wanted:
            if m in _LAYER_METHODS:
                for layer in cam_layers:
                    fn = gp.gradcam if m == "gradcam" else gp.hirescam
                    out.append(MethodMaps(m, layer, fn(layer), {"upsample": "bilinear", "signed": True}))
            elif m == "fullgrad":
                out.append(MethodMaps(m, "", gp.fullgrad(), {"normalisation": "per-layer-tensor min-max (official)",
                                                             "biases": "conv, linear, batchnorm effective"}))
            elif m == "saliency":
                out.append(MethodMaps(m, "", gp.saliency(), {"reduce": "max |grad| over channels"}))
            else:
                out.append(MethodMaps(m, "", gp.input_x_gradient(), {"reduce": "sum over channels"}))
        for mm in out:
            mm.maps = mm.maps.float()
        self.last_scores = gp.scores
        return out
