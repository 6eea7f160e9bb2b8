"""The ``gestalt-xai`` format: ``<id>.safetensors`` (weights) + ``<id>.json`` (config), written by :func:`save_model`.

The JSON records the architecture, width, layout (native or fused), classes, channel order and preprocessing, so
the model is rebuilt exactly; the weights are read with ``safetensors`` (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gestalt_xai.errors import ConfigError
from gestalt_xai.models.checkpoints.registry import (
    CheckpointFormat,
    LoadedCheckpoint,
    LoadOptions,
    checkpoint_error,
    register_format,
)
from gestalt_xai.models.checkpoints.state_dict import load_strict
from gestalt_xai.models.gestaltmatcher import ChannelOrder, GestaltMatcher
from gestalt_xai.models.iresnet import build_iresnet
from gestalt_xai.runs import atomic_write_bytes

__all__ = ["FORMAT_VERSION", "GESTALT_XAI", "own_paths", "save_model"]

NAME = "gestalt-xai"
FORMAT_VERSION = 1


def own_paths(path: Path) -> tuple[Path, Path]:
    """``(<stem>.safetensors, <stem>.json)`` for the weights, the config or their common stem."""
    base = path.with_suffix("") if path.suffix in {".safetensors", ".json"} else path
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def save_model(model: GestaltMatcher, path: str | os.PathLike[str], *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as ``<path>.safetensors`` (weights) + ``<path>.json`` (config); returns the weights path.

    The JSON holds ``arch``, ``width``, ``fused``, ``num_classes``, ``syndrome_ids`` (class index order),
    ``channel_order``, ``preprocessing`` and whatever ``extra`` adds (e.g. training provenance). Both files are
    written atomically (temporary name, then rename).
    """
    from safetensors.torch import save as st_save

    weights, cfg_path = own_paths(Path(path))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # one metadata key only: safetensors writes several in an unstable order, and the same model must give the
    # same bytes (and hash) every time
    data = st_save(state, metadata={"format": f"gestalt-xai/{FORMAT_VERSION}"})
    cfg = dict(model.config)
    cfg.update(
        format=NAME,
        format_version=FORMAT_VERSION,
        arch=model.arch,
        syndrome_ids=model.syndrome_ids,
        num_classes=model.num_classes,
        channel_order=model.channel_order,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    if "source" in cfg:  # provenance of a converted checkpoint (e.g. a GM-Arc .pt saved in our format)
        cfg["converted_from"] = cfg.pop("source")
    if extra:
        cfg.update(extra)
    atomic_write_bytes(weights, data)
    atomic_write_bytes(cfg_path, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
    return weights


def _load_own(path: Path, channel_order: ChannelOrder | None) -> GestaltMatcher:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, cfg_path = own_paths(path)
    fmt = NAME
    if not cfg_path.exists():
        raise checkpoint_error(path, fmt, f"its config {cfg_path.name} is missing beside the weights")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise checkpoint_error(cfg_path, fmt, f"config is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise checkpoint_error(cfg_path, fmt, f"config is a JSON {type(cfg).__name__}, not an object")
    missing_fields = [k for k in ("arch", "width", "num_classes", "channel_order") if k not in cfg]
    if missing_fields:
        raise checkpoint_error(cfg_path, fmt, f"config lacks fields {missing_fields}")
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise checkpoint_error(weights, fmt, f"weights unreadable or truncated ({exc})") from exc
    try:  # the config's values build the model; values no model has (a damaged file) fail here
        backbone = build_iresnet(
            cfg["arch"],
            cfg["width"],
            num_features=cfg.get("num_features", 512),
            dropout=cfg.get("dropout", 0.0),
            fused=cfg.get("fused", False),
        )
        model = GestaltMatcher(
            backbone,
            cfg["num_classes"],
            syndrome_ids=cfg.get("syndrome_ids"),
            channel_order=channel_order or cfg["channel_order"],
            classifier_dropout=cfg.get("classifier_dropout", 0.5),
            config={k: v for k, v in cfg.items() if k not in ("sha256",)},
        )
    except (ValueError, TypeError, KeyError, RuntimeError, ConfigError) as exc:
        raise checkpoint_error(cfg_path, fmt, f"config values describe no model ({type(exc).__name__}: {exc})") from exc
    load_strict(model, state, weights, fmt)
    return model


def _detect(path: Path, head: bytes | None) -> bool:
    return path.suffix in {".safetensors", ".json"} or (
        head is None and path.with_name(path.name + ".safetensors").exists()
    )


def _load(path: Path, options: LoadOptions) -> LoadedCheckpoint:
    return LoadedCheckpoint(_load_own(path, options.channel_order), NAME, own_paths(path)[0])


def _write_example(model: GestaltMatcher, folder: Path) -> Path:
    return save_model(model, folder / "example")


GESTALT_XAI = register_format(
    CheckpointFormat(
        name=NAME,
        description="gestalt-xai checkpoint (<id>.safetensors + <id>.json, written by save_model)",
        detect=_detect,
        load=_load,
        write_example=_write_example,
    )
)
