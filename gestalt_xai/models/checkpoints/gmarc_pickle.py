"""The ``gm-arc-pickle`` format: GestaltMatcher-Arc's whole pickled module (``…_last_model.pth``).

Read only with ``trust_pickle=True``, and then through the restricted unpickler of :mod:`~.torch_file` (tensors
only, no code from the file runs). Detected while reading: a torch file that needs more than ``weights_only``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gestalt_xai.models.checkpoints.gmarc_pt import gmarc_wrapper_of
from gestalt_xai.models.checkpoints.registry import CheckpointFormat, LoadedCheckpoint, LoadOptions, register_format
from gestalt_xai.models.checkpoints.torch_file import PICKLE_FORMAT, load_torch_file
from gestalt_xai.models.gestaltmatcher import GestaltMatcher

__all__ = ["GM_ARC_PICKLE"]


def _detect(path: Path, head: bytes | None) -> bool:
    return False  # a pickle looks like any torch file: told apart while reading (torch_file)


def _load(path: Path, options: LoadOptions) -> LoadedCheckpoint:
    return load_torch_file(path, PICKLE_FORMAT, options)


def _write_example(model: GestaltMatcher, folder: Path) -> Path:
    path = folder / "s1_example_last_model.pth"
    torch.save(gmarc_wrapper_of(model, folder), path)
    return path


GM_ARC_PICKLE = register_format(
    CheckpointFormat(
        name=PICKLE_FORMAT,
        description="GestaltMatcher-Arc whole pickled module (…_last_model.pth)",
        detect=_detect,
        load=_load,
        write_example=_write_example,
        needs_trust_pickle=True,
    )
)
