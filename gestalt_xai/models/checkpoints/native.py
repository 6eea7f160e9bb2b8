"""The native iResNet layout (insightface's arcface_torch ``backbones/iresnet.py`` names: ``conv1``, ``bn1``,
``prelu``, ``layer1.0.bn1`` … ``fc``, ``features``), native or with BatchNorms folded into the convs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from gestalt_xai.models.checkpoints.registry import checkpoint_error
from gestalt_xai.models.checkpoints.state_dict import load_strict, strip_prefix
from gestalt_xai.models.iresnet import ARCH_LAYERS, IResNet, build_iresnet, canonical_arch

__all__ = ["native_arch", "native_backbone"]


def native_arch(state: Mapping[str, torch.Tensor], path: Path, fmt: str) -> tuple[str, float]:
    """``(arch, width)`` from the blocks per stage (``layer{1..4}.{i}.``) and the stem's channel count."""
    counts = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(idx))
    layers = tuple(counts)
    arch = next((a for a, spec in ARCH_LAYERS.items() if spec == layers), None)
    if arch is None:
        raise checkpoint_error(
            path,
            fmt,
            f"blocks per stage {list(layers)} match no iResNet "
            f"({', '.join(f'{a} {list(s)}' for a, s in ARCH_LAYERS.items())})",
        )
    if "conv1.weight" not in state:
        raise checkpoint_error(path, fmt, "stem weight 'conv1.weight' is missing")
    width = state["conv1.weight"].shape[0] / 64
    return arch, width


def native_backbone(state: Mapping[str, torch.Tensor], path: Path, arch: str | None) -> IResNet:
    """The :class:`IResNet` a native-layout state dict describes, loaded strictly (``arch`` only checks)."""
    fmt = "insightface"
    state = strip_prefix(state)
    found_arch, width = native_arch(state, path, fmt)
    if arch is not None and canonical_arch(arch) != found_arch:
        raise checkpoint_error(path, fmt, f"you asked for {canonical_arch(arch)} but the file holds {found_arch}")
    num_features = state["features.weight"].shape[0] if "features.weight" in state else 512
    fused = "layer1.0.bn2.weight" not in state and "layer1.0.conv1.bias" in state
    backbone = build_iresnet(found_arch, width, num_features=num_features, fused=fused)
    load_strict(backbone, state, path, fmt)
    return backbone
