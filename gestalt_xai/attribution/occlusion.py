"""Occlusion (Zeiler & Fergus 2014): score drop when a square patch is replaced by a baseline.

Window convention (identical to ``captum.attr.Occlusion``, compared with it in tests/test_attribution_methods.py):
along each axis of length ``N`` a ``P``-pixel window with stride ``S`` takes ``ceil((N − P)/S) + 1`` positions
``0, S, 2S, …``; the last one starts past ``N − P`` and is cropped at the border, so every pixel is covered. Each
pixel's value is the mean, over the windows covering it, of ``score(x) − score(x occluded)`` (positive = occluding
it lowers the score). With the default 10×10 patch and stride 5 on 112² that is 22×22 = 484 positions.

Baselines are defined in pixel space: ``black`` is pixel value 0, i.e. −1 after GM-Arc's ``(x/255 − 0.5)/0.5``;
``mean`` is each image's own per-channel mean colour; ``blur`` is a Gaussian-blurred copy of the image
(``blur_sigma`` pixels). All channels are occluded together.

Speed. Unlike Captum (one forward per window and batch) we compute the unoccluded score once, score many occluded
copies per forward (``max_batch`` images), and skip windows that change no pixel of any image in the batch (their
difference is exactly 0: e.g. the black border of an aligned crop under the black baseline). For a
:class:`~gestalt_xai.attribution.score_model.ScoreModel` over iResNet members (every checkpoint format loads as
one) two exact shortcuts apply:

* ``local=True`` (default): a window changes only a small patch of the early activations, so only that patch is
  recomputed there, and the full map from the cut on (:mod:`gestalt_xai.attribution.occlusion_local`); each
  (member, TTA view) term of the score is computed this way on its own view of the image;
* ``fast=True`` (default, the registered method): the forwards run on an inference copy of each member
  (:func:`inference_copy`): the BatchNorms that follow a convolution are folded into it
  (:func:`gestalt_xai.models.iresnet.fuse_iresnet`, what an ONNX export does) and tensors use the channels-last
  layout.

Both are exact algebraically: scores differ from occluded full forwards of the original model by float rounding
only (~1e-6 relative), well inside the 1e-5 agreement with Captum that the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from pydantic import Field, model_validator
from torch import nn

from gestalt_xai.attribution.base import AttributionMethod, MethodMaps, MethodParams, register_method
from gestalt_xai.attribution.occlusion_local import Window, local_window_scores, supports_local
from gestalt_xai.attribution.score_model import MemberView, ScoreModel, apply_view
from gestalt_xai.errors import ConfigError
from gestalt_xai.faces.align import CROP_SIZE

__all__ = ["Occlusion", "OcclusionParams", "occlusion", "occluded_scores", "window_starts", "window_boxes",
           "occlusion_baseline", "BASELINES"]

BASELINES = ("black", "mean", "blur")
T = TypeVar("T")


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Captum's window positions along one axis: ``ceil((size − patch)/stride) + 1`` starts ``0, stride, …``.

    >>> len(window_starts(112, 10, 5)), window_starts(112, 10, 5)[-1]
    (22, 105)
    """
    if patch < 1 or stride < 1 or patch > size:
        raise ConfigError(f"occlusion: need 1 ≤ patch ≤ {size} and stride ≥ 1, got patch={patch}, stride={stride}")
    if stride > patch:  # pixels between windows would get no value (0/0); Captum refuses this too
        raise ConfigError(f"occlusion: stride ({stride}) must not exceed the patch ({patch}), or some pixels are "
                          "never occluded")
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


def window_boxes(h: int, w: int, patch: int, stride: int) -> list[Window]:
    """Every window ``(y0, y1, x0, x1)`` (end exclusive, cropped at the border) in reading order.

    >>> window_boxes(112, 112, 10, 5)[-1]
    (105, 112, 105, 112)
    """
    return [(y, min(y + patch, h), x0, min(x0 + patch, w))
            for y in window_starts(h, patch, stride) for x0 in window_starts(w, patch, stride)]


def _box_masks(boxes: Sequence[Window], h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    masks = torch.zeros(len(boxes), h, w, dtype=dtype, device=device)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = 1
    return masks


def _occluded_copies(x: torch.Tensor, base: torch.Tensor, boxes: Sequence[Window]) -> torch.Tensor:
    """``len(boxes)`` window-major copies of the batch, each with one window replaced by the baseline."""
    mm = _box_masks(boxes, x.shape[2], x.shape[3], x.device, x.dtype)[:, None, None]  # (k, 1, 1, H, W)
    # the same arithmetic as Captum: x·(1 − m) + baseline·m
    return (x[None] * (1 - mm) + base[None] * mm).reshape(-1, *x.shape[1:])


def _plain_scores(score_copies: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, base: torch.Tensor,
                  boxes: Sequence[Window], max_batch: int) -> torch.Tensor:
    """Scores ``(K, B)`` from full forwards of occluded copies, ``max_batch`` images per forward."""
    b = x.shape[0]
    per = max(1, max_batch // b)
    out = torch.empty(len(boxes), b, dtype=x.dtype, device=x.device)
    for start in range(0, len(boxes), per):
        chunk = boxes[start : start + per]
        out[start : start + len(chunk)] = score_copies(_occluded_copies(x, base, chunk), len(chunk)).reshape(-1, b)
    return out


def _for_copies(obj: T, b: int) -> Callable[[int], T]:
    """``k -> obj`` for ``k`` window-major copies of a batch of ``b`` images: an object with ``select`` (a target,
    a score function with per-image targets) follows its rows repeated ``k`` times; cached per ``k``."""
    cache: dict[int, T] = {}
    select = getattr(obj, "select", None)

    def get(k: int) -> T:
        if k not in cache:
            cache[k] = select(list(range(b)) * k) if select is not None else obj
        return cache[k]

    return get


def _view_scores(view: MemberView, x: torch.Tensor, base: torch.Tensor, boxes: Sequence[Window], max_batch: int,
                 local: bool) -> torch.Tensor:
    """One (member, TTA view) term of a :class:`ScoreModel` for every window: ``(K, B)``."""
    b, _, _, w = x.shape
    order = getattr(view.model, "channel_order", "RGB")
    xv, bv = apply_view(x, view.flip, view.gray, order), apply_view(base, view.flip, view.gray, order)
    if view.flip:  # the view mirrors the image: so are the windows
        boxes = [(y0, y1, w - x1, w - x0) for y0, y1, x0, x1 in boxes]
    target_for = _for_copies(view.target, b)

    def rows(logits: torch.Tensor | None, emb: torch.Tensor, k: int) -> torch.Tensor:
        return target_for(k)(logits, emb)

    if local and supports_local(view.model):
        return local_window_scores(view.model, xv, bv, boxes, rows, max_batch=max_batch)
    return _plain_scores(lambda t, k: rows(*view.model(t), k), xv, bv, boxes, max_batch)


def occluded_scores(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, base: torch.Tensor,
                    boxes: Sequence[Window], max_batch: int = 16, local: bool = True) -> torch.Tensor:
    """``score_fn`` of ``x`` with each window replaced by ``base``: ``(K, B)`` for ``K`` windows.

    A :class:`ScoreModel` is scored term by term (member × TTA view, averaged in its order); with ``local`` the
    terms of iResNet members recompute only what a window can change
    (:func:`~gestalt_xai.attribution.occlusion_local.local_window_scores`). Any other callable gets plain batched
    forwards of occluded copies.
    """
    if isinstance(score_fn, ScoreModel):
        total: torch.Tensor | None = None
        for view in score_fn.views:
            s = _view_scores(view, x, base, boxes, max_batch, local)
            total = s if total is None else total + s
        assert total is not None
        return total / len(score_fn.views)
    score_for = _for_copies(score_fn, x.shape[0])
    return _plain_scores(lambda t, k: score_for(k)(t), x, base, boxes, max_batch)


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
    local: bool = True,
) -> torch.Tensor:
    """Occlusion maps ``(B, H, W)`` (float32, signed) for normalised images ``x`` ``(B, 3, H, W)``.

    Parameters
    ----------
    score_fn : images → ``(B,)`` scores (a :class:`~gestalt_xai.attribution.score_model.ScoreModel`, or any
        callable).
    patch, stride : square window side and step in pixels (Captum's convention, module docstring).
    baseline : ``"black"`` | ``"mean"`` | ``"blur"`` | a value in normalised units | a tensor like ``x``.
    max_batch : occluded images per forward (several windows of the whole batch).
    reference_scores : ``score_fn(x)`` if already known (saves one forward).
    local : for a ScoreModel over iResNet members, recompute only the activations a window can change (same
        maps up to float rounding; module docstring).

    >>> f = lambda t: t.sum((1, 2, 3))
    >>> occlusion(f, torch.zeros(1, 3, 4, 4), patch=2, stride=2, baseline=-1.0)[0, 0, 0].item()
    12.0
    """
    b, _, h, w = x.shape
    base = occlusion_baseline(x, baseline, blur_sigma)
    s0 = score_fn(x) if reference_scores is None else reference_scores
    s0 = s0.detach().to(x.dtype)
    boxes = window_boxes(h, w, patch, stride)
    # A window whose occluded copy equals the original for every image (e.g. the black border of an aligned crop
    # under a black baseline) changes nothing: its score difference is exactly 0, so it needs no forward pass.
    differs = (x != base).any(1).any(0)  # (H, W)
    live = [box for box in boxes if bool(differs[box[0] : box[1], box[2] : box[3]].any())]
    total = torch.zeros(b, h, w, dtype=x.dtype, device=x.device)
    if live:
        drop = s0[None] - occluded_scores(score_fn, x, base, live, max_batch, local)  # (K, B)
        for start in range(0, len(live), 256):  # bounded memory for fine strides
            masks = _box_masks(live[start : start + 256], h, w, x.device, x.dtype)
            total += torch.einsum("kb,khw->bhw", drop[start : start + 256], masks)
    # windows covering each pixel: the grid is the product of two 1-d window sets, so is the count
    cover = [torch.zeros(n, dtype=x.dtype, device=x.device) for n in (h, w)]
    for axis, n in enumerate((h, w)):
        for start in window_starts(n, patch, stride):
            cover[axis][start : start + patch] += 1
    return (total / (cover[0][:, None] * cover[1][None, :])).float()


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


class OcclusionParams(MethodParams):
    """Parameters of the registered ``occlusion`` method (module docstring)."""

    patch: int = Field(10, ge=1, le=CROP_SIZE, description="square window side (pixels)", examples=[14])
    stride: int = Field(5, ge=1, description="window step (pixels); at most the patch", examples=[10])
    baseline: Literal["black", "mean", "blur"] | float = Field(
        "black", description="fill: black (pixel 0), the image's mean colour, a blurred copy, or a value in "
                             "normalised units", examples=["mean"])
    max_batch: int = Field(16, ge=1, description="occluded images per forward", examples=[32])
    blur_sigma: float = Field(5.0, gt=0, description="Gaussian sigma (pixels) of the blur baseline", examples=[2.0])
    fast: bool = Field(True, description="run on BN-folded channels-last inference copies of the members",
                       examples=[False])
    local: bool = Field(True, description="recompute only the activations a window changes", examples=[False])

    @model_validator(mode="after")
    def _grid_covers_every_pixel(self) -> OcclusionParams:
        try:
            window_starts(CROP_SIZE, self.patch, self.stride)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("occlusion: ")) from None
        return self


@register_method()
class Occlusion(AttributionMethod):
    """Registered ``occlusion`` method (parameters: :class:`OcclusionParams`; module docstring)."""

    names = ("occlusion",)
    needs_grad = False
    Params = OcclusionParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._copies: dict[int, tuple[nn.Module, nn.Module]] = {}

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
                         reference_scores=s0, local=p["local"])
        self.last_scores = s0.detach()
        params = dict(p, convention="captum: ceil((N-P)/S)+1 windows, mean over covering windows")
        return [MethodMaps("occlusion", "", maps, params)]
