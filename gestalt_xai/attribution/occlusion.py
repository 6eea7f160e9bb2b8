"""Occlusion (Zeiler & Fergus 2014): score drop when a square patch is replaced by a baseline.

Window convention (identical to ``captum.attr.Occlusion``, REFERENCE §3): along each axis of length ``N`` a
``P``-pixel window with stride ``S`` takes ``ceil((N − P)/S) + 1`` positions ``0, S, 2S, …``; the last one starts
past ``N − P`` and is cropped at the border, so every pixel is covered. Each pixel's value is the mean, over the
windows covering it, of ``score(x) − score(x occluded)`` (positive = occluding it lowers the score). With the
default 10×10 patch and stride 5 on 112² that is 22×22 = 484 positions.

Baselines are defined in pixel space (REFERENCE §3): ``black`` is pixel value 0, i.e. −1 after GM-Arc's
``(x/255 − 0.5)/0.5``; ``mean`` is each image's own per-channel mean colour; ``blur`` is a Gaussian-blurred copy of
the image (``blur_sigma`` pixels). All channels are occluded together.

Speed: unlike Captum (one forward per window and batch, plus per-step bookkeeping) we score many occluded copies
per forward (``max_batch`` images), compute the unoccluded score once, accumulate with one ``einsum`` per chunk, and
skip windows that change no pixel of any image in the batch (their difference is exactly 0: e.g. the black border of
an aligned crop under the black baseline).
With ``fast=True`` (default) the forwards run on an inference copy of each member (:func:`inference_copy`): the
BatchNorms that follow a convolution are folded into it (:func:`gestalt_xai.models.iresnet.fuse_iresnet`, what an
ONNX export does) and tensors use the channels-last layout. Both are exact algebraically; scores differ from the
unfused model by float rounding only (~1e-6 relative), well inside the 1e-5 agreement with Captum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from gestalt_xai.attribution.base import AttributionMethod, MethodMaps, register_method
from gestalt_xai.errors import ConfigError

__all__ = ["Occlusion", "occlusion", "window_starts", "occlusion_baseline", "BASELINES"]

BASELINES = ("black", "mean", "blur")


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Captum's window positions along one axis: ``ceil((size − patch)/stride) + 1`` starts ``0, stride, …``.

    >>> len(window_starts(112, 10, 5)), window_starts(112, 10, 5)[-1]
    (22, 105)
    """
    if patch < 1 or stride < 1 or patch > size:
        raise ConfigError(f"occlusion: need 1 ≤ patch ≤ {size} and stride ≥ 1, got patch={patch}, stride={stride}")
    return [i * stride for i in range(math.ceil((size - patch) / stride) + 1)]


def occlusion_baseline(x: torch.Tensor, baseline: str | float | torch.Tensor, blur_sigma: float = 5.0) -> torch.Tensor:
    """The replacement image for normalised inputs ``x`` (``(B, 3, H, W)``), broadcastable to ``x``."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x.dtype).to(x.device).expand_as(x)
    if isinstance(baseline, int | float):
        return torch.full_like(x, float(baseline))
    if baseline == "black":
        return torch.full_like(x, -1.0)  # pixel 0 → (0/255 − 0.5)/0.5
    if baseline == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).clone()
    if baseline == "blur":
        from torchvision.transforms.functional import gaussian_blur

        k = 2 * math.ceil(3 * blur_sigma) + 1
        return gaussian_blur(x, [k, k], [blur_sigma, blur_sigma])
    raise ConfigError(f"occlusion baseline must be one of {BASELINES} or a number, got {baseline!r}")


def _rows_tiled(score_fn: Callable[[torch.Tensor], torch.Tensor], b: int, k: int,
                cache: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A score function for ``k`` window-major copies of the batch: per-image targets repeated ``k`` times."""
    if k not in cache:
        select = getattr(score_fn, "select", None)
        cache[k] = select(list(range(b)) * k) if select is not None else score_fn
    return cache[k]


def _window_masks(h: int, w: int, patch: int, stride: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    ys, xs = window_starts(h, patch, stride), window_starts(w, patch, stride)
    masks = torch.zeros(len(ys) * len(xs), h, w, dtype=dtype, device=device)
    k = 0
    for y in ys:  # order is irrelevant to the result; rows outer as in a reading order
        for x0 in xs:
            masks[k, y : y + patch, x0 : x0 + patch] = 1
            k += 1
    return masks


@torch.no_grad()
def occlusion(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    patch: int = 10,
    stride: int = 5,
    baseline: str | float | torch.Tensor = "black",
    max_batch: int = 16,
    blur_sigma: float = 5.0,
    reference_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Occlusion maps ``(B, H, W)`` (float32, signed) for normalised images ``x`` ``(B, 3, H, W)``.

    Parameters
    ----------
    score_fn : images → ``(B,)`` scores (a :class:`~gestalt_xai.attribution.score_model.ScoreModel`).
    patch, stride : square window side and step in pixels (Captum's convention, module docstring).
    baseline : ``"black"`` | ``"mean"`` | ``"blur"`` | a value in normalised units | a tensor like ``x``.
    max_batch : occluded images per forward (several windows of the whole batch).
    reference_scores : ``score_fn(x)`` if already known (saves one forward).

    >>> f = lambda t: t.sum((1, 2, 3))
    >>> occlusion(f, torch.zeros(1, 3, 4, 4), patch=2, stride=2, baseline=-1.0)[0, 0, 0].item()
    12.0
    """
    b, _, h, w = x.shape
    base = occlusion_baseline(x, baseline, blur_sigma)
    s0 = score_fn(x) if reference_scores is None else reference_scores
    s0 = s0.detach().to(x.dtype)
    masks = _window_masks(h, w, patch, stride, x.device, x.dtype)
    n_win = masks.shape[0]
    per_fwd = max(1, max_batch // b)
    total = torch.zeros(b, h, w, dtype=x.dtype, device=x.device)
    cache: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
    # A window whose occluded copy equals the original for every image (e.g. the black border of an aligned crop
    # under a black baseline) changes nothing: its score difference is exactly 0, so it needs no forward pass.
    differs = (x != base).any(1)  # (B, H, W)
    live = [k for k in range(n_win) if bool((differs & (masks[k] > 0)).any())]
    for start in range(0, len(live), per_fwd):
        m = masks[live[start : start + per_fwd]]  # (k, H, W)
        mm = m[:, None, None]  # (k, 1, 1, H, W): same arithmetic as Captum, x·(1 − m) + baseline·m
        occluded = (x[None] * (1 - mm) + base[None] * mm).reshape(-1, *x.shape[1:])
        s = _rows_tiled(score_fn, b, m.shape[0], cache)(occluded).detach().reshape(m.shape[0], b)
        total += torch.einsum("kb,khw->bhw", s0[None] - s, m)
    return (total / masks.sum(0)).float()


def inference_copy(model: nn.Module) -> nn.Module:
    """A forward-only copy of a GestaltMatcher-like model: BN folded into convolutions, channels-last layout."""
    import copy

    from gestalt_xai.models.iresnet import IResNet, fuse_iresnet

    fast = copy.deepcopy(model).eval()
    backbone = getattr(fast, "backbone", None)
    if isinstance(backbone, IResNet) and not backbone.fused:
        fast.backbone = fuse_iresnet(backbone).eval()
    elif isinstance(fast, IResNet) and not fast.fused:
        fast = fuse_iresnet(fast).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast.to(memory_format=torch.channels_last)


@register_method()
class Occlusion(AttributionMethod):
    """Registered ``occlusion`` method (parameters: ``patch``, ``stride``, ``baseline``, ``max_batch``,
    ``blur_sigma``)."""

    names = ("occlusion",)
    needs_grad = False

    def __init__(self, patch: int = 10, stride: int = 5, baseline: str | float = "black", max_batch: int = 16,
                 blur_sigma: float = 5.0, fast: bool = True) -> None:
        super().__init__(patch=patch, stride=stride, baseline=baseline, max_batch=max_batch, blur_sigma=blur_sigma,
                         fast=fast)
        self._copies: dict[int, tuple[nn.Module, nn.Module]] = {}
        window_starts(112, patch, stride)  # validate early
        if isinstance(baseline, str) and baseline not in BASELINES:
            raise ConfigError(f"occlusion baseline must be one of {BASELINES} or a number, got {baseline!r}")

    def attribute(
        self, score_model: nn.Module, x: torch.Tensor, methods: Sequence[str], layers: Sequence[str]
    ) -> list[MethodMaps]:
        p = self.params
        scorer = score_model
        if p["fast"] and hasattr(score_model, "with_models"):
            copies = []
            for member in score_model.members:  # type: ignore[union-attr]
                cached = self._copies.get(id(member))
                if cached is None or cached[0] is not member:
                    cached = (member, inference_copy(member))
                    self._copies[id(member)] = cached
                copies.append(cached[1])
            scorer = score_model.with_models(copies)  # type: ignore[operator]
        with torch.no_grad():
            s0 = scorer(x)
        maps = occlusion(scorer, x, p["patch"], p["stride"], p["baseline"], p["max_batch"], p["blur_sigma"],
                         reference_scores=s0)
        self.last_scores = s0.detach()
        params = dict(p, convention="captum: ceil((N-P)/S)+1 windows, mean over covering windows")
        return [MethodMaps("occlusion", "", maps, params)]
