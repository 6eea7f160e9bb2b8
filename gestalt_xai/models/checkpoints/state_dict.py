"""State-dict helpers shared by the readers: strict loading with a readable error, common wrappers and prefixes,
and the :class:`GestaltMatcher` around a backbone read from a foreign format."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gestalt_xai.models.checkpoints.registry import checkpoint_error
from gestalt_xai.models.gestaltmatcher import ChannelOrder, GestaltMatcher
from gestalt_xai.models.iresnet import IResNet

#: how many keys an error message lists
MAX_LISTED = 12


def shape_of(t: Any) -> str:
    """``"[64, 3, 3, 3]"`` for a tensor, the type name otherwise (for messages)."""
    return str(list(t.shape)) if hasattr(t, "shape") else type(t).__name__


def describe_keys(title: str, keys: Iterable[str], tensors: Mapping[str, Any]) -> str:
    """A message line listing up to :data:`MAX_LISTED` keys with their shapes (empty when there are none)."""
    keys = list(keys)
    if not keys:
        return ""
    shown = ", ".join(f"{k} {shape_of(tensors[k])}" if k in tensors else k for k in keys[:MAX_LISTED])
    more = f" … (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return f"\n  {title} ({len(keys)}): {shown}{more}"


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: Path,
    fmt: str,
    source_names: Mapping[str, str] | None = None,
) -> None:
    """``load_state_dict(strict=True)`` with a CheckpointError that lists missing/unexpected keys and shapes.

    ``num_batches_tracked`` counters are optional (older insightface checkpoints lack them). ``source_names`` maps
    target keys to the checkpoint's own names for messages about mapped formats.
    """
    target = module.state_dict()
    state = dict(state)
    for k in target:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = target[k].clone()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or mismatched:

        def name(k: str) -> str:
            return f"{k} (= {source_names[k]})" if source_names and k in source_names else k

        msg = "the weights do not fit the model built from it"
        msg += describe_keys("missing keys (expected shape)", missing, target)
        msg += describe_keys("unexpected keys", unexpected, state)
        if mismatched:
            shown = ", ".join(
                f"{name(k)}: file {shape_of(state[k])} vs model {shape_of(target[k])}" for k in mismatched[:MAX_LISTED]
            )
            msg += f"\n  shape mismatches ({len(mismatched)}): {shown}"
        raise checkpoint_error(path, fmt, msg)
    module.load_state_dict(state, strict=True)


def strip_prefix(state: Mapping[str, Any], prefixes: Sequence[str] = ("module.", "_orig_mod.")) -> dict[str, Any]:
    """Drop a prefix every key shares (``module.`` of DataParallel/DDP, ``_orig_mod.`` of ``torch.compile``)."""
    out = dict(state)
    for prefix in prefixes:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def unwrap_state(obj: Any) -> Any:
    """Common containers around a state dict: ``{"state_dict": …}``, ``{"model": …}``."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "backbone"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return obj


def wrap_backbone(
    backbone: IResNet,
    classifier: tuple[torch.Tensor, torch.Tensor] | None,
    path: Path,
    fmt: str,
    channel_order: ChannelOrder | None,
) -> GestaltMatcher:
    """A :class:`GestaltMatcher` of a foreign-format backbone and its classifier's ``(weight, bias)``, if any.

    The channel order defaults to RGB (see :mod:`gestalt_xai.models.checkpoints`); ``config["source_format"]``
    records ``fmt``.
    """
    num_classes = None if classifier is None else classifier[0].shape[0]
    model = GestaltMatcher(backbone, num_classes, channel_order=channel_order or "RGB", config={"source_format": fmt})
    if classifier is not None:
        assert model.classifier is not None
        load_strict(model.classifier, {"1.weight": classifier[0], "1.bias": classifier[1]}, path, fmt)
    return model
