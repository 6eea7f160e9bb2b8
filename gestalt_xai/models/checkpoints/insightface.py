"""The ``insightface`` format: an arcface_torch iResNet backbone ``state_dict`` (``.pth``), native names.

arcface_torch saves ``backbone.module.state_dict()`` (``conv1``, ``bn1``, ``prelu``, ``layer1.0.bn1`` … ``fc``,
``features``; the DDP prefix ``module.`` is dropped when present); the layout is read by :mod:`~.native`. Its
backbones were trained on RGB input, the default ``channel_order``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gestalt_xai.models.checkpoints.detect import is_torch_file
from gestalt_xai.models.checkpoints.registry import CheckpointFormat, LoadedCheckpoint, LoadOptions, register_format
from gestalt_xai.models.checkpoints.torch_file import load_torch_file
from gestalt_xai.models.gestaltmatcher import GestaltMatcher

__all__ = ["INSIGHTFACE"]

NAME = "insightface"


def _detect(path: Path, head: bytes | None) -> bool:
    return head is not None and path.suffix != ".pt" and is_torch_file(path, head)


def _load(path: Path, options: LoadOptions) -> LoadedCheckpoint:
    return load_torch_file(path, NAME, options)


def _write_example(model: GestaltMatcher, folder: Path) -> Path:
    path = folder / "backbone.pth"
    torch.save(model.backbone.state_dict(), path)
    return path


INSIGHTFACE = register_format(
    CheckpointFormat(
        name=NAME,
        description="insightface arcface_torch iResNet state_dict "
        "(.pth: conv1, bn1, prelu, layer1.0.bn1 … fc, features)",
        detect=_detect,
        load=_load,
        write_example=_write_example,
        stores_classifier=False,
    )
)
