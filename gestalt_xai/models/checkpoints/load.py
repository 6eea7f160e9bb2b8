"""``load_model``: read any registered checkpoint format into a :class:`GestaltMatcher` with its provenance."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from gestalt_xai.errors import CheckpointError
from gestalt_xai.models.checkpoints.classes import set_syndrome_ids
from gestalt_xai.models.checkpoints.detect import detect_format
from gestalt_xai.models.checkpoints.registry import CHECKPOINT_FORMATS, FormatId, LoadOptions
from gestalt_xai.models.gestaltmatcher import ChannelOrder, GestaltMatcher

__all__ = ["load_model", "model_sha256"]


def model_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a checkpoint file (for our own format: of the ``.safetensors`` weights)."""
    p = Path(path)
    if p.suffix == ".json" or (not p.exists() and p.with_suffix(".safetensors").exists()):
        p = p.with_suffix(".safetensors")
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    format: FormatId | None = None,  # noqa: A002 - mirrors the CLI option name
    channel_order: ChannelOrder | None = None,
    syndrome_ids: Sequence[str] | str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
) -> GestaltMatcher:
    """Load a GestaltMatcher model from any registered checkpoint format (see :mod:`gestalt_xai.models.checkpoints`).

    Parameters
    ----------
    path : the checkpoint (for our own format the ``.safetensors``, the ``.json`` or the common stem).
    trust_pickle : allow GM-Arc whole-module pickles (``_last_model.pth``). Unpickling arbitrary classes can run
        code, so this is off by default; when on, the file still goes through the restricted unpickler, which
        extracts tensors only.
    arch : expected architecture (``"r50"``, ``"r100"`` …); inferred from the weights, so only a check.
    format : force a format id instead of detecting it.
    channel_order : override the channel order the model is fed (default: per format, see the format modules).
    syndrome_ids : the class-index → syndrome-id list (GM-Arc's lookup table, or a path to
        ``lookup_table_gmdb_<version>.txt``) for formats that do not store it. Checked against the classifier size.
    device : where to put the model.

    Returns the model in eval mode; ``model.config["source"]`` records format, path and SHA-256 (and, for a pickle,
    the globals replaced by placeholders).

    Raises
    ------
    CheckpointError : unreadable/truncated file, unrecognised layout, missing/unexpected keys (listed with shapes),
        or a pickle without ``trust_pickle``.
    """
    p = Path(path)
    name = format or detect_format(p)
    if name not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{p}: unknown format {name!r}; choose one of {sorted(CHECKPOINT_FORMATS)}")
    options = LoadOptions(arch=arch, channel_order=channel_order, trust_pickle=trust_pickle)
    loaded = CHECKPOINT_FORMATS[name].load(p, options)
    model = loaded.model
    if syndrome_ids is not None:
        set_syndrome_ids(model, syndrome_ids, p)
    model.config["source"] = {"format": loaded.format, "path": str(p), "sha256": model_sha256(loaded.weights)}
    if loaded.placeholders:
        model.config["source"]["pickle_placeholders"] = sorted(loaded.placeholders)
    return model.to(device).eval()
