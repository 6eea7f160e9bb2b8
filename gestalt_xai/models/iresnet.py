"""Native iResNet backbones in the insightface ``arcface_torch`` layout.

The module and parameter names follow insightface's ``recognition/arcface_torch/backbones/iresnet.py`` exactly
(``conv1``, ``bn1``, ``prelu``, ``layer1.0.bn1`` … ``layer4.2.bn3``, ``layerN.0.downsample.0/1``, ``bn2``, ``fc``,
``features``), so an arcface_torch state dict loads with ``strict=True``.

Architecture (insightface ``recognition/arcface_torch/backbones/iresnet.py``; Duta et al., "Improved Residual
Networks", ICPR 2020)::

    stem    conv3x3(3→C1) → BN → PReLU                                  112×112
    layer1  IBasicBlock × n1 (first block stride 2)                      56×56, C1
    layer2  IBasicBlock × n2                                             28×28, C2
    layer3  IBasicBlock × n3                                             14×14, C3
    layer4  IBasicBlock × n4                                              7×7,  C4
    head    BN2d(C4) → flatten (C4·7·7) → dropout → Linear(→512) ``fc`` → BN1d ``features``

    IBasicBlock: bn1 → conv3x3 → bn2 → PReLU → conv3x3(stride) → bn3  (+ downsample = conv1x1(stride) + BN)
                 and ``residual`` (a :class:`ResidualAdd` module) adds the shortcut.

Depths: r18 [2,2,2,2], r34 [3,4,6,3], r50 [3,4,14,3], r100 [3,13,30,3]; widths 64/128/256/512 times ``width``.

**Fused layout.** ONNX exports in eval mode (insightface's ``torch2onnx``; ``torch.onnx.export(dynamo=False)``)
fold every BatchNorm that directly follows a convolution into that convolution's weight and bias: the stem BN,
each block's ``bn2`` and ``bn3`` and the downsample BN. Only each block's pre-activation ``bn1`` (it precedes a
conv), the head ``bn2`` (it follows the residual add) and ``features`` (it follows the Linear) survive. With
``fused=True`` the folded BNs are :class:`torch.nn.Identity` placeholders (same module names, no parameters) and the
convolutions that absorbed them carry a bias. :func:`fuse_iresnet` turns a native model into the numerically
equivalent fused one.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ARCH_LAYERS",
    "IBasicBlock",
    "IResNet",
    "IResNetConfig",
    "ResidualAdd",
    "build_iresnet",
    "canonical_arch",
    "fold_batchnorm",
    "fuse_iresnet",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
]

#: blocks per stage for each supported depth (insightface arcface_torch).
ARCH_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
}
_BASE_WIDTHS = (64, 128, 256, 512)
#: insightface uses eps=1e-5 for every BatchNorm.
BN_EPS = 1e-5
#: spatial size after the four stride-2 stages for a 112×112 input (insightface's ``fc_scale = 7 * 7``).
FEATURE_MAP_SIZE = 7


def canonical_arch(arch: str) -> str:
    """Normalise an architecture name: ``"iresnet50"``, ``"r50"``, ``"IR50"``, ``"resnet50"`` → ``"r50"``.

    >>> canonical_arch("iresnet100")
    'r100'
    """
    m = re.fullmatch(r"(?:i?r(?:es(?:net)?)?|ir)[_-]?(\d+)", arch.strip().lower())
    if m is None or f"r{m.group(1)}" not in ARCH_LAYERS:
        raise ValueError(f"unknown iResNet architecture {arch!r}; expected one of {sorted(ARCH_LAYERS)}")
    return f"r{m.group(1)}"


def stage_widths(width: float = 1.0) -> tuple[int, int, int, int]:
    """Channel counts of the four stages for a width multiplier (``0.25`` → ``(16, 32, 64, 128)``)."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return tuple(max(1, int(round(c * width))) for c in _BASE_WIDTHS)  # type: ignore[return-value]


def _conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


def _conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=bias)


def _bn_or_identity(channels: int, fused: bool) -> nn.Module:
    return nn.Identity() if fused else nn.BatchNorm2d(channels, eps=BN_EPS)


class ResidualAdd(nn.Module):
    """``out + shortcut`` as a module, so forward hooks and LRP canonizers can see the residual sum."""

    def forward(self, out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return out + shortcut


class IBasicBlock(nn.Module):
    """insightface's pre-activation residual block.

    ``bn1 → conv1 → bn2 → prelu → conv2(stride) → bn3``, plus ``downsample`` (conv1x1(stride) + BN) on the shortcut
    when the shape changes; ``residual`` adds the two. In the fused layout ``bn2``/``bn3`` and ``downsample.1`` are
    identities and the convolutions carry the folded biases.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes, bias=fused)
        self.bn2 = _bn_or_identity(planes, fused)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride, bias=fused)
        self.bn3 = _bn_or_identity(planes, fused)
        self.downsample = downsample
        self.residual = ResidualAdd()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Execution order matters: an ONNX trace lists nodes in this order (the downsample conv after conv2), and
        # the onnx2torch key mapping in checkpoints.py walks convolutions in that order.
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        shortcut = self.downsample(x) if self.downsample is not None else x
        return self.residual(out, shortcut)


@dataclass(frozen=True)
class IResNetConfig:
    """What is needed to rebuild an :class:`IResNet` (stored in our checkpoint JSON)."""

    arch: str = "r50"
    width: float = 1.0
    num_features: int = 512
    dropout: float = 0.0
    fused: bool = False


class IResNet(nn.Module):
    """iResNet backbone: ``forward(x)`` maps ``(N, 3, 112, 112)`` to the ``(N, num_features)`` embedding.

    Named, hookable parts: ``conv1``/``bn1``/``prelu`` (stem), ``layer1`` … ``layer4`` (stages of
    :class:`IBasicBlock`; ``layer4`` is the last conv stage, 7×7), ``bn2`` (head BN2d), ``flatten``, ``dropout``,
    ``fc`` (Linear to 512) and ``features`` (BN1d; its output is the embedding).
    """

    fc_scale = FEATURE_MAP_SIZE * FEATURE_MAP_SIZE

    def __init__(
        self,
        layers: tuple[int, int, int, int] | list[int],
        *,
        width: float = 1.0,
        num_features: int = 512,
        dropout: float = 0.0,
        fused: bool = False,
        arch: str | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 stage depths, got {layers}")
        widths = stage_widths(width)
        self.config = IResNetConfig(
            arch=arch or _arch_from_layers(tuple(layers)),
            width=float(width),
            num_features=num_features,
            dropout=float(dropout),
            fused=fused,
        )
        self.inplanes = widths[0]
        self.conv1 = _conv3x3(3, self.inplanes, bias=fused)
        self.bn1 = _bn_or_identity(self.inplanes, fused)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(widths[0], layers[0], stride=2, fused=fused)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2, fused=fused)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2, fused=fused)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2, fused=fused)
        self.bn2 = nn.BatchNorm2d(widths[3], eps=BN_EPS)
        self.flatten = nn.Flatten(1)
        # not inplace (insightface uses inplace=True): an in-place op on the flattened view breaks
        # backward hooks on ``bn2`` that attribution methods register.
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[3] * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        self._init_weights()

    @property
    def fused(self) -> bool:
        return self.config.fused

    @property
    def num_features(self) -> int:
        return self.config.num_features

    @property
    def stages(self) -> list[nn.Sequential]:
        """The four residual stages, ``[layer1, layer2, layer3, layer4]``."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def blocks(self) -> Iterator[tuple[str, IBasicBlock]]:
        """``(qualified_name, block)`` for every residual block in execution order."""
        for name, module in self.named_modules():
            if isinstance(module, IBasicBlock):
                yield name, module

    def _make_layer(self, planes: int, blocks: int, stride: int, fused: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes, stride, bias=fused), _bn_or_identity(planes, fused)
            )
        modules = [IBasicBlock(self.inplanes, planes, stride, downsample, fused=fused)]
        self.inplanes = planes
        modules += [IBasicBlock(planes, planes, fused=fused) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def _init_weights(self) -> None:
        # insightface: kaiming-normal convs (fan_out), BN weight 1 / bias 0, ``features.weight`` = 1.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv3x3 → BN → PReLU: the ``(N, C1, 112, 112)`` input of ``layer1``."""
        return self.prelu(self.bn1(self.conv1(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem + the four stages: the ``(N, C4, 7, 7)`` last conv-stage activation."""
        x = self.forward_stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """BN2d → flatten → dropout → fc → BN1d: the embedding from the last stage's activation."""
        x = self.bn2(x)
        x = self.flatten(x)
        x = self.dropout(x)
        x = self.fc(x)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _arch_from_layers(layers: tuple[int, ...]) -> str:
    for name, spec in ARCH_LAYERS.items():
        if spec == layers:
            return name
    return "custom-" + "-".join(map(str, layers))


def build_iresnet(
    arch: str,
    width: float = 1.0,
    *,
    num_features: int = 512,
    dropout: float = 0.0,
    fused: bool = False,
) -> IResNet:
    """Build an iResNet by name.

    Parameters
    ----------
    arch : ``"r18" | "r34" | "r50" | "r100"`` (also ``"iresnet50"``, ``"ir50"`` …).
    width : channel multiplier (``0.25`` → stages of 16/32/64/128 channels, the fast demo model).
    num_features : embedding size (512 in GM-Arc).
    dropout : dropout before ``fc`` (training only).
    fused : build the BN-folded layout of ONNX/onnx2torch checkpoints.

    >>> build_iresnet("r18", width=0.25)(torch.zeros(2, 3, 112, 112)).shape
    torch.Size([2, 512])
    """
    name = canonical_arch(arch)
    return IResNet(ARCH_LAYERS[name], width=width, num_features=num_features, dropout=dropout, fused=fused, arch=name)


def iresnet18(**kw: object) -> IResNet:
    """iResNet-18 ([2, 2, 2, 2]); keyword arguments as :func:`build_iresnet`."""
    return build_iresnet("r18", **kw)  # type: ignore[arg-type]


def iresnet34(**kw: object) -> IResNet:
    """iResNet-34 ([3, 4, 6, 3]); keyword arguments as :func:`build_iresnet`."""
    return build_iresnet("r34", **kw)  # type: ignore[arg-type]


def iresnet50(**kw: object) -> IResNet:
    """iResNet-50 ([3, 4, 14, 3]); keyword arguments as :func:`build_iresnet`."""
    return build_iresnet("r50", **kw)  # type: ignore[arg-type]


def iresnet100(**kw: object) -> IResNet:
    """iResNet-100 ([3, 13, 30, 3]); keyword arguments as :func:`build_iresnet`."""
    return build_iresnet("r100", **kw)  # type: ignore[arg-type]


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (eval-mode BN statistics).

    ``w' = w · γ/√(σ²+ε)`` per output channel, ``b' = (b − μ) · γ/√(σ²+ε) + β``.
    """
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    weight = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)
    return weight, (bias - bn.running_mean) * scale + bn.bias.detach()


def fuse_iresnet(model: IResNet) -> IResNet:
    """Return the fused (BN-folded) copy of a native model, numerically equal in eval mode.

    Folds exactly what an eval-mode ONNX export folds: the stem BN, each block's ``bn2``/``bn3`` and the downsample
    BN. The input model is left unchanged.
    """
    if model.fused:
        return copy.deepcopy(model)
    cfg = model.config
    fused = IResNet(
        ARCH_LAYERS.get(cfg.arch, tuple(len(s) for s in model.stages)),  # type: ignore[arg-type]
        width=cfg.width,
        num_features=cfg.num_features,
        dropout=cfg.dropout,
        fused=True,
        arch=cfg.arch,
    )
    src = model.state_dict()
    dst: dict[str, torch.Tensor] = {}

    def put_folded(conv_name: str, bn_name: str) -> None:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        w, b = fold_batchnorm(conv, bn)  # type: ignore[arg-type]
        dst[f"{conv_name}.weight"], dst[f"{conv_name}.bias"] = w, b

    put_folded("conv1", "bn1")
    for name, block in model.blocks():
        put_folded(f"{name}.conv1", f"{name}.bn2")
        put_folded(f"{name}.conv2", f"{name}.bn3")
        if block.downsample is not None:
            put_folded(f"{name}.downsample.0", f"{name}.downsample.1")
    target_keys = fused.state_dict().keys()
    for key in target_keys:
        if key not in dst:
            dst[key] = src[key]
    fused.load_state_dict(dst, strict=True)
    fused.train(model.training)
    return fused
