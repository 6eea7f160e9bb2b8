"""Named views of raw maps, applied when drawing or aggregating — never baked into storage.

Stored maps are raw and signed (:mod:`gestalt_xai.store`). A *view* is a pure function ``(…, H, W) → (…, H, W)`` on
NumPy arrays or torch tensors, applied per map (statistics over the last two axes):

=================  ===========================================================================
``raw``            unchanged (signed)
``relu``           ``max(m, 0)`` — Grad-CAM's usual display
``neg``            ``max(−m, 0)`` — evidence against the target
``abs``            ``|m|``
``max-abs``        ``m / max|m|`` ∈ [−1, 1], sign kept (diverging colour maps centred at 0)
``min-max``        ``(m − min)/(max − min)`` ∈ [0, 1] (pytorch-grad-cam's display)
``clip:P``         ``m / percentile(|m|, P)`` clipped to [−1, 1] (default P = 99), robust to a few extreme pixels
``sum-norm``       ``m / Σ|m|`` (comparing relevance mass across maps)
=================  ===========================================================================

Views compose with ``+``: ``"relu+min-max"``.

>>> import numpy as np
>>> apply_view(np.array([[-2.0, 1.0]]), "relu+min-max").round(6).tolist()
[[0.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["VIEWS", "apply_view", "is_signed_view"]

Array = np.ndarray | torch.Tensor
_EPS = 1e-12


def _amax(m: Array) -> Array:
    if isinstance(m, torch.Tensor):
        return m.abs().amax(dim=(-2, -1), keepdim=True)
    return np.abs(m).max(axis=(-2, -1), keepdims=True)


def _min(m: Array) -> Array:
    return m.amin(dim=(-2, -1), keepdim=True) if isinstance(m, torch.Tensor) else m.min(axis=(-2, -1), keepdims=True)


def _max(m: Array) -> Array:
    return m.amax(dim=(-2, -1), keepdim=True) if isinstance(m, torch.Tensor) else m.max(axis=(-2, -1), keepdims=True)


def _clip(m: Array, p: float) -> Array:
    if isinstance(m, torch.Tensor):
        flat = m.abs().flatten(-2)
        q = torch.quantile(flat.float(), p / 100.0, dim=-1, keepdim=True)[..., None].to(m.dtype)
        return (m / (q + _EPS)).clamp(-1, 1)
    q = np.percentile(np.abs(m), p, axis=(-2, -1), keepdims=True)
    return np.clip(m / (q + _EPS), -1, 1)


def _zscore(m: Array) -> Array:
    if isinstance(m, torch.Tensor):
        mu = m.mean(dim=(-2, -1), keepdim=True)
        sd = m.std(dim=(-2, -1), keepdim=True, unbiased=False)
    else:
        mu = m.mean(axis=(-2, -1), keepdims=True)
        sd = m.std(axis=(-2, -1), keepdims=True)
    return (m - mu) / (sd + _EPS)


def _relu(m: Array) -> Array:
    return m.clamp_min(0) if isinstance(m, torch.Tensor) else np.maximum(m, 0)


VIEWS: dict[str, Callable[[Array], Array]] = {
    "raw": lambda m: m,
    "relu": _relu,
    "neg": lambda m: _relu(-m),
    "abs": lambda m: abs(m),
    "max-abs": lambda m: m / (_amax(m) + _EPS),
    "zscore": _zscore,
    "min-max": lambda m: (m - _min(m)) / (_max(m) - _min(m) + _EPS),
    "sum-norm": lambda m: m / (abs(m).sum(axis=(-2, -1), keepdims=True) + _EPS)
    if not isinstance(m, torch.Tensor)
    else m / (m.abs().sum(dim=(-2, -1), keepdim=True) + _EPS),
}
#: views whose output can be negative (drawn with a diverging colour map centred at 0)
_SIGNED = {"raw", "max-abs", "zscore", "clip", "sum-norm"}


def apply_view(maps: Array, view: str = "raw") -> Array:
    """Apply a named view (or ``"a+b"`` chain) to maps with spatial axes last."""
    out = maps
    for part in view.split("+"):
        part = part.strip()
        if part.startswith("clip"):
            p = float(part.split(":", 1)[1]) if ":" in part else 99.0
            out = _clip(out, p)
        elif part in VIEWS:
            out = VIEWS[part](out)
        else:
            known = sorted(VIEWS) + ["clip:P"]
            raise ValueError(f"unknown map view {part!r}; known views: {', '.join(known)}")
    return out


def is_signed_view(view: str, method_signed: bool = True) -> bool:
    """Whether the view of a (signed or unsigned) method's maps can be negative."""
    if not method_signed:
        return False
    return all(p.strip().split(":")[0] in _SIGNED for p in view.split("+"))
