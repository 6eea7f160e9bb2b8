"""Integrated Gradients, SmoothGrad and DeepLIFT through Captum; guided backprop and deconvolution with PReLU rules.

Captum does these right for this model except at the PReLU: its ``GuidedBackprop``/``Deconvolution``
override only ``nn.ReLU`` and its DeepLIFT knows no PReLU, so on iResNet they silently degrade to the plain gradient
there. We therefore

* run Integrated Gradients (``steps``, baseline black = −1 by default, Gauss–Legendre as Captum) and SmoothGrad
  (``NoiseTunnel`` over ``Saliency`` or over IG) through Captum unchanged;
* give DeepLIFT the Rescale rule at every PReLU by registering ``nn.PReLU`` as a supported non-linearity of Captum's
  DeepLIFT for the duration of the call (:func:`_deeplift_prelu`; the multiplier
  ``(f(x) − f(x₀))/(x − x₀)`` is exactly Captum's own ``nonlinear`` rule, which is element-wise and does not care
  which element-wise function it is);
* implement guided backprop and deconvolution ourselves with forward hooks that replace every PReLU/ReLU output by
  an autograd function with the modified backward (:class:`ModifiedActivationBackward`):

  - **guided backprop** (Springenberg et al. 2015) passes only positive gradient signal through the local
    derivative: ``g_in = f'(x) · max(g_out, 0)`` with ``f'(x) = 1`` for ``x > 0`` and the learned slope ``a``
    otherwise (ReLU: ``a = 0``, which is Springenberg's rule);
  - **deconvolution** (Zeiler & Fergus 2014) applies the layer's non-linearity to the backward signal, ignoring the
    forward input: ``g_in = PReLU_a(g_out)`` (ReLU: ``max(g_out, 0)``, Zeiler & Fergus' rule).

Maps are summed over colour channels (signed) except SmoothGrad over saliency (``max_c`` of the mean ``|∇|``, as
saliency). Captum methods that need each module to run once per forward (DeepLIFT) refuse TTA/ensemble score models.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from gestalt_xai.attribution.base import AttributionMethod, MethodMaps, MethodParams, register_method
from gestalt_xai.errors import ConfigError

__all__ = [
    "BaselineParams",
    "IntegratedGradientsMethod",
    "SmoothGradMethod",
    "DeepLiftMethod",
    "GuidedBackpropMethod",
    "ModifiedActivationBackward",
    "modified_activation_backward",
]


def per_image(score_model: nn.Module, x: torch.Tensor, fn: Any) -> torch.Tensor:
    """Run ``fn(score_model_for_image_i, x[i:i+1])`` image by image and concatenate.

    Captum methods expand the batch (IG: step-major, NoiseTunnel: sample-major, DeepLIFT: input then baseline), so
    targets with one reference per image cannot follow their rows; one image at a time, a one-row target broadcasts.
    """
    if not hasattr(score_model, "select") or x.shape[0] == 1:
        return fn(score_model, x)
    return torch.cat([fn(score_model.select([i]), x[i: i + 1]) for i in range(x.shape[0])])


def _baseline(x: torch.Tensor, baseline: str | float) -> torch.Tensor | float:
    if baseline == "black":
        return -1.0  # pixel 0 after (x/255 − 0.5)/0.5
    if baseline == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).clone()
    if isinstance(baseline, int | float):
        return float(baseline)
    raise ConfigError(f"baseline must be 'black', 'mean' or a number, got {baseline!r}")


class BaselineParams(MethodParams):
    """The reference input of path and difference methods (IG, SmoothGrad over IG, DeepLIFT)."""

    baseline: Literal["black", "mean"] | float = Field(
        "black", description="black (pixel 0, i.e. -1 after normalisation), the image's mean colour, or a value in "
                             "normalised units", examples=["mean"])


@register_method()
class IntegratedGradientsMethod(AttributionMethod):
    """Integrated Gradients (Sundararajan et al. 2017) via ``captum.attr.IntegratedGradients``, summed over channels."""

    names = ("integrated_gradients",)

    class Params(BaselineParams):
        steps: int = Field(32, ge=1, description="integration steps", examples=[8])
        internal_batch_size: int | None = Field(32, ge=1, description="images per forward inside Captum "
                                                "(None: all steps at once)", examples=[8])
        method: Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"] = (
            Field("gausslegendre", description="Captum's integral approximation", examples=["riemann_trapezoid"]))

    def attribute(self, score_model: nn.Module, x: torch.Tensor, methods: Sequence[str],
                  layers: Sequence[str]) -> list[MethodMaps]:
        from captum.attr import IntegratedGradients

        p = self.params
        deltas = []

        def run(sm: nn.Module, xi: torch.Tensor) -> torch.Tensor:
            attr, delta = IntegratedGradients(sm).attribute(
                xi, baselines=_baseline(xi, p["baseline"]), n_steps=p["steps"], method=p["method"],
                internal_batch_size=p["internal_batch_size"], return_convergence_delta=True,
            )
            deltas.append(delta.detach().abs().max())
            return attr.detach()

        attr = per_image(score_model, x, run)
        params = dict(p, convergence_delta_max=float(torch.stack(deltas).max()))
        return [MethodMaps("integrated_gradients", "", attr.sum(1).float(), params)]


@register_method("smoothgrad", "smoothgrad_ig")
class SmoothGradMethod(AttributionMethod):
    """SmoothGrad (Smilkov et al. 2017): ``captum.attr.NoiseTunnel`` over Saliency (``smoothgrad``) or IG
    (``smoothgrad_ig``). ``stdev`` is in normalised units (inputs span [−1, 1]: 0.3 = 15 % of the range)."""

    names = ("smoothgrad", "smoothgrad_ig")

    class Params(BaselineParams):
        samples: int = Field(16, ge=1, description="noisy copies per image", examples=[4])
        stdev: float = Field(0.3, gt=0, description="noise standard deviation in normalised units", examples=[0.15])
        ig_steps: int = Field(16, ge=1, description="IG steps per noisy copy (smoothgrad_ig)", examples=[4])
        seed: int = Field(0, description="seed of the noise (torch's global generator)", examples=[1])

    def attribute(self, score_model: nn.Module, x: torch.Tensor, methods: Sequence[str],
                  layers: Sequence[str]) -> list[MethodMaps]:
        from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

        p = self.params
        out = []
        for name in ("smoothgrad", "smoothgrad_ig"):
            if name not in methods:
                continue
            torch.manual_seed(p["seed"])  # NoiseTunnel draws from the global generator
            if name == "smoothgrad":
                attr = per_image(score_model, x, lambda sm, xi: NoiseTunnel(Saliency(sm)).attribute(
                    xi, nt_type="smoothgrad", nt_samples=p["samples"], stdevs=p["stdev"], abs=True).detach())
                maps = attr.amax(1)
            else:
                attr = per_image(score_model, x, lambda sm, xi: NoiseTunnel(IntegratedGradients(sm)).attribute(
                    xi, nt_type="smoothgrad", nt_samples=p["samples"], stdevs=p["stdev"],
                    baselines=_baseline(xi, p["baseline"]), n_steps=p["ig_steps"]).detach())
                maps = attr.sum(1)
            out.append(MethodMaps(name, "", maps.float(), dict(p)))
        return out


@contextmanager
def _deeplift_prelu() -> Iterator[None]:
    """Register ``nn.PReLU`` with Captum's DeepLIFT Rescale rule while the block runs (module docstring)."""
    from captum.attr._core import deep_lift

    table = deep_lift.SUPPORTED_NON_LINEAR
    had = nn.PReLU in table
    table[nn.PReLU] = deep_lift.nonlinear
    try:
        yield
    finally:
        if not had:
            table.pop(nn.PReLU, None)


@register_method()
class DeepLiftMethod(AttributionMethod):
    """DeepLIFT Rescale (Shrikumar et al. 2017) via ``captum.attr.DeepLift``, PReLU handled; summed over channels.

    With the linearised cosine target the convergence delta is not 0: the norm ``‖f‖`` is held constant for the
    gradient but differs between input and baseline; with a logit target the attributions sum to
    ``s(x) − s(baseline)`` (tested)."""

    names = ("deeplift",)
    supports_tta = False
    Params = BaselineParams

    def attribute(self, score_model: nn.Module, x: torch.Tensor, methods: Sequence[str],
                  layers: Sequence[str]) -> list[MethodMaps]:
        from captum.attr import DeepLift

        views = getattr(score_model, "views", [None])
        if len(views) > 1:
            raise ConfigError("deeplift needs each module to run once per forward: use one model and no TTA slots")
        deltas = []

        def run(sm: nn.Module, xi: torch.Tensor) -> torch.Tensor:
            attr, delta = DeepLift(sm).attribute(
                xi, baselines=_baseline(xi, self.params["baseline"]), return_convergence_delta=True)
            deltas.append(delta.detach().abs().max())
            return attr.detach()

        with _deeplift_prelu():
            attr = per_image(score_model, x, run)
        params = dict(self.params, rule="rescale (PReLU included)",
                      convergence_delta_max=float(torch.stack(deltas).max()))
        return [MethodMaps("deeplift", "", attr.sum(1).float(), params)]


class ModifiedActivationBackward(torch.autograd.Function):
    """``PReLU_a(x)`` forward with the guided-backprop or deconvolution backward (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, slope: torch.Tensor, output: torch.Tensor, rule: str) -> torch.Tensor:
        ctx.save_for_backward(x, slope)
        ctx.rule = rule
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        x, slope = ctx.saved_tensors
        a = slope.view(1, -1, *([1] * (grad_out.ndim - 2))) if slope.numel() > 1 else slope
        if ctx.rule == "guided":
            local = torch.where(x > 0, torch.ones_like(x), a.expand_as(x))
            return local * grad_out.clamp_min(0), None, None, None
        # deconvolution: the non-linearity applied to the backward signal
        return torch.where(grad_out > 0, grad_out, a * grad_out), None, None, None


@contextmanager
def modified_activation_backward(model: nn.Module, rule: str) -> Iterator[int]:
    """Temporarily give every PReLU/ReLU in ``model`` the ``"guided"`` or ``"deconv"`` backward; yields the count."""
    if rule not in ("guided", "deconv"):
        raise ValueError(f"rule must be 'guided' or 'deconv', got {rule!r}")
    handles = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if isinstance(module, nn.PReLU):
            slope = module.weight.detach()
        elif isinstance(module, nn.LeakyReLU):
            slope = torch.tensor(module.negative_slope, dtype=x.dtype, device=x.device)
        else:
            slope = torch.zeros((), dtype=x.dtype, device=x.device)
        return ModifiedActivationBackward.apply(x, slope, output, rule)

    try:
        for m in model.modules():
            if isinstance(m, nn.PReLU | nn.ReLU | nn.LeakyReLU):
                handles.append(m.register_forward_hook(hook))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


@register_method("guided_backprop", "deconvolution")
class GuidedBackpropMethod(AttributionMethod):
    """Guided backprop / deconvolution with PReLU rules (module docstring), summed over channels (signed)."""

    names = ("guided_backprop", "deconvolution")

    def attribute(self, score_model: nn.Module, x: torch.Tensor, methods: Sequence[str],
                  layers: Sequence[str]) -> list[MethodMaps]:
        out = []
        for name, rule in (("guided_backprop", "guided"), ("deconvolution", "deconv")):
            if name not in methods:
                continue
            xi = x.detach().clone().requires_grad_(True)
            with torch.enable_grad(), modified_activation_backward(score_model, rule) as n_act:
                if n_act == 0:
                    raise ConfigError(f"{name}: the model has no ReLU/PReLU to modify")
                scores = score_model(xi)
                (grad,) = torch.autograd.grad(scores.sum(), xi)
            params = {"rule": "f'(x)·max(g,0)" if rule == "guided" else "PReLU_a(g)", "reduce": "sum over channels"}
            out.append(MethodMaps(name, "", grad.detach().sum(1).float(), params))
        return out
