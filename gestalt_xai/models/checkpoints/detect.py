"""Which format a checkpoint file is, from its name and first bytes (nothing is unpickled)."""

from __future__ import annotations

import os
from pathlib import Path

from gestalt_xai.errors import CheckpointError
from gestalt_xai.models.checkpoints.registry import CHECKPOINT_FORMATS, FormatId

__all__ = ["FALLBACK_FORMAT", "TORCH_SUFFIXES", "detect_format", "is_torch_file"]

#: suffixes of files written by ``torch.save``
TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})
#: the format of a file no registered format recognises (an ONNX protobuf has no magic number)
FALLBACK_FORMAT: FormatId = "onnx"
_HEAD_BYTES = 8


def is_torch_file(path: Path, head: bytes) -> bool:
    """A ``torch.save`` file: a zip archive (``PK``), a legacy pickle (``0x80``), or a torch suffix."""
    return head[:2] == b"PK" or head[:1] == b"\x80" or path.suffix in TORCH_SUFFIXES


def detect_format(path: str | os.PathLike[str]) -> FormatId:
    """Guess a checkpoint's format from its name and first bytes (does not unpickle anything).

    The registered formats are asked in registration order; the first whose ``detect`` accepts the file wins, and a
    file none accepts is taken for :data:`FALLBACK_FORMAT`. A missing or unreadable file that no format recognises
    by name alone raises :class:`~gestalt_xai.errors.CheckpointError` naming it.
    """
    p = Path(path)
    head = None
    if p.is_file():
        try:
            with open(p, "rb") as fh:
                head = fh.read(_HEAD_BYTES)
        except OSError as exc:  # unreadable (permissions, a file that vanished)
            raise CheckpointError(f"{p}: cannot read the checkpoint file: {exc}") from None
    for fmt in CHECKPOINT_FORMATS.values():
        if fmt.detect(p, head):
            return fmt.name  # type: ignore[return-value]
    if head is None:
        raise CheckpointError(f"{p}: {'a folder, not' if p.is_dir() else 'no such'} checkpoint file")
    return FALLBACK_FORMAT
