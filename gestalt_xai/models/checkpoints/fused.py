"""The fused (ONNX-graph) layout: an iResNet as lists of Conv, BatchNorm and PReLU tensors in graph order.

ONNX exports (``.onnx``) and onnx2torch conversions of them (GM-Arc's ``.pt``/``.pth``) hold an iResNet whose every
BatchNorm that follows a conv is folded into it (insightface's eval-mode export). Both readers collect the tensors
per op type in graph order (:class:`FusedParts`); :func:`build_from_fused` maps them positionally onto a fused
:class:`~gestalt_xai.models.iresnet.IResNet`. The graph order per op type is

* ``Conv``: stem ``conv1``, then per block ``conv1``, ``conv2``, ``downsample.0`` (the shortcut conv is traced after
  ``conv2`` because insightface's ``forward`` computes it after ``bn3``);
* ``BatchNormalization``: each block's pre-activation ``bn1``, the head ``bn2``, then ``features`` (BN1d) —
  so the features BN is number 25 for iResNet-50 (24 blocks) and 50 for iResNet-100 (49 blocks), as in GM-Arc's
  ``features.BatchNormalization_25|50``;
* ``PRelu`` slopes: stem, then one per block; ``Gemm_0`` is ``fc``.

The mapping is positional within each op type and every tensor's shape is checked, so a checkpoint of a different
architecture fails with a message instead of loading garbage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gestalt_xai.models.checkpoints.registry import checkpoint_error
from gestalt_xai.models.checkpoints.state_dict import load_strict
from gestalt_xai.models.iresnet import ARCH_LAYERS, IResNet, build_iresnet, canonical_arch

__all__ = ["BN", "FusedParts", "build_from_fused"]


@dataclass
class BN:
    """One BatchNorm's tensors (``eps`` when the file records it) and its name in the file."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float | None = None
    name: str = ""


@dataclass
class FusedParts:
    """A fused iResNet as ordered lists per op type (graph order), with the source names for messages."""

    convs: list[tuple[str, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    bns: list[BN] = field(default_factory=list)  # blocks' bn1, head bn2 (and features when not split off)
    prelus: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    fc: tuple[str, torch.Tensor, torch.Tensor] | None = None
    features: BN | None = None
    classifier: tuple[torch.Tensor, torch.Tensor] | None = None


def _fused_target_names(backbone: IResNet) -> tuple[list[str], list[str], list[str]]:
    """Native names of the fused model's convs, surviving 2-d BNs and PReLUs in ONNX graph order."""
    convs, bns, prelus = ["conv1"], [], ["prelu"]
    for name, block in backbone.blocks():
        bns.append(f"{name}.bn1")
        convs += [f"{name}.conv1", f"{name}.conv2"]
        if block.downsample is not None:
            convs.append(f"{name}.downsample.0")
        prelus.append(f"{name}.prelu")
    bns.append("bn2")
    return convs, bns, prelus


def build_from_fused(parts: FusedParts, path: Path, fmt: str, arch: str | None) -> IResNet:
    """The fused :class:`IResNet` that ``parts`` describe (architecture and width inferred; ``arch`` only checks)."""
    if parts.features is None and parts.bns:
        parts.features = parts.bns.pop()  # not split off (plain onnx2torch graph / ONNX): the last BN is BN1d
    if parts.fc is None or parts.features is None or not parts.convs:
        raise checkpoint_error(
            path,
            fmt,
            "no Gemm/fc and final BatchNormalization found: this is not an iResNet graph "
            f"(found {len(parts.convs)} Conv, {len(parts.bns)} BatchNormalization, "
            f"{len(parts.prelus)} PRelu)",
        )
    n_blocks = len(parts.bns) - 1
    found = next((a for a, spec in ARCH_LAYERS.items() if sum(spec) == n_blocks), None)
    if found is None:
        raise checkpoint_error(
            path,
            fmt,
            f"{len(parts.bns)} surviving 2-d BatchNorms = {n_blocks} blocks + head, which "
            f"matches no iResNet (blocks: {', '.join(f'{a} {sum(s)}' for a, s in ARCH_LAYERS.items())})",
        )
    if arch is not None and canonical_arch(arch) != found:
        raise checkpoint_error(path, fmt, f"you asked for {canonical_arch(arch)} but the file holds {found}")
    width = parts.convs[0][1].shape[0] / 64
    num_features = parts.fc[1].shape[0]
    backbone = build_iresnet(found, width, num_features=num_features, fused=True)
    conv_names, bn_names, prelu_names = _fused_target_names(backbone)
    problems = []
    for kind, have, want in (
        ("Conv", len(parts.convs), len(conv_names)),
        ("PRelu slope", len(parts.prelus), len(prelu_names)),
    ):
        if have != want:
            problems.append(f"{have} {kind} tensors where {found} (width {width:g}) has {want}")
    if problems:
        raise checkpoint_error(path, fmt, "; ".join(problems))
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for tgt, (src, w, b) in zip(conv_names, parts.convs, strict=True):
        state[f"{tgt}.weight"], source[f"{tgt}.weight"] = w, f"{src} weight"
        if b is None:
            b = torch.zeros(w.shape[0], dtype=w.dtype)
        state[f"{tgt}.bias"], source[f"{tgt}.bias"] = b, f"{src} bias"

    def put_bn(tgt: str, bn: BN) -> None:
        for attr in ("weight", "bias", "running_mean", "running_var"):
            state[f"{tgt}.{attr}"], source[f"{tgt}.{attr}"] = getattr(bn, attr), f"{bn.name} {attr}"
        if bn.eps is not None:
            backbone.get_submodule(tgt).eps = bn.eps  # type: ignore[union-attr]

    for tgt, bn in zip(bn_names, parts.bns, strict=True):
        put_bn(tgt, bn)
    put_bn("features", parts.features)
    for tgt, (src, slope) in zip(prelu_names, parts.prelus, strict=True):
        state[f"{tgt}.weight"], source[f"{tgt}.weight"] = slope.reshape(-1), src
    fc_src, fc_w, fc_b = parts.fc
    state["fc.weight"], state["fc.bias"] = fc_w, fc_b
    source["fc.weight"], source["fc.bias"] = f"{fc_src} weight", f"{fc_src} bias"
    load_strict(backbone, state, path, fmt, source_names=source)
    return backbone
