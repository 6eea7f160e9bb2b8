"""Reading ``torch.save`` files, the container of the ``insightface``, ``gm-arc-pt`` and ``gm-arc-pickle`` formats.

A torch file is read with ``torch.load(weights_only=True)``. A whole pickled module (GM-Arc's ``…_last_model.pth``)
needs arbitrary classes to unpickle (which can execute code), so it is refused unless ``trust_pickle=True`` (a
model declaration's ``trust_pickle: true``, :mod:`gestalt_xai.models.declaration`); even then it goes through
:data:`RestrictedUnpickler` (:mod:`gestalt_xai.safe_pickle` with :data:`TENSOR_POLICY`), which rebuilds tensors only
and replaces every other class or function by an inert placeholder, so no code from the file runs; the module
tree's tensors are then gathered under ``state_dict`` names.

Which format a torch file holds is told by its keys, whatever its name suggested: onnx2torch names
(:mod:`~.onnx2torch`) are ``gm-arc-pt``, native iResNet names (:mod:`~.native`) ``insightface``, and a
:class:`GestaltMatcher` state dict (``backbone.*``, ``classifier.1.*``) keeps the format it was read as. A whole
pickled module is ``gm-arc-pickle`` whatever its layout.
"""

from __future__ import annotations

import logging
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gestalt_xai.errors import CheckpointError
from gestalt_xai.models.checkpoints.fused import build_from_fused
from gestalt_xai.models.checkpoints.native import native_backbone
from gestalt_xai.models.checkpoints.onnx2torch import is_onnx2torch_state, parts_from_onnx2torch
from gestalt_xai.models.checkpoints.registry import LoadedCheckpoint, LoadOptions, checkpoint_error
from gestalt_xai.models.checkpoints.state_dict import MAX_LISTED, strip_prefix, unwrap_state, wrap_backbone
from gestalt_xai.models.iresnet import IResNet
from gestalt_xai.safe_pickle import PicklePolicy, Placeholder, restricted_unpickler

__all__ = ["PICKLE_FORMAT", "TENSOR_POLICY", "RestrictedUnpickler", "load_torch_file"]

log = logging.getLogger(__name__)

#: the format of a whole pickled module
PICKLE_FORMAT = "gm-arc-pickle"


def _is_torch_constant(module: str, name: str) -> bool:
    """``torch.float32``, ``torch.strided``, ``torch.contiguous_format`` …: dtypes, layouts, memory formats."""
    obj = getattr(torch, name, None) if module == "torch" else None
    return isinstance(obj, torch.dtype | torch.layout | torch.memory_format)


#: Globals a checkpoint pickle may resolve: torch's tensor/parameter rebuild functions, ``collections.OrderedDict``,
#: ``torch.Size``/``torch.device``, dtypes/layouts/memory formats and plain builtin containers (storages are
#: resolved by ``torch.load`` itself). Any other global (model classes, ``torch.fx`` graph rebuilders, ``os.system``
#: …) becomes a :class:`~gestalt_xai.safe_pickle.Placeholder` that records its arguments and state.
TENSOR_POLICY = PicklePolicy(
    names=frozenset(
        {
            ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_tensor"),
            ("torch._utils", "_rebuild_parameter"),
            ("torch._utils", "_rebuild_parameter_with_state"),
            ("collections", "OrderedDict"),
            ("torch", "Size"),
            ("torch", "device"),
            *(
                ("builtins", b)
                for b in ("set", "frozenset", "slice", "complex", "bytearray", "tuple", "list", "dict", "int",
                          "float", "bool", "str")
            ),
        }
    ),
    allow=_is_torch_constant,
    unknown="placeholder",
    error=CheckpointError,
)
#: the unpickler of whole pickled modules (each instance records its placeholders in ``placeholders``)
RestrictedUnpickler = restricted_unpickler(TENSOR_POLICY)


def collect_tensors(
    obj: Any, prefix: str = "", out: dict[str, torch.Tensor] | None = None, depth: int = 0
) -> dict[str, torch.Tensor]:
    """Walk an unpickled object tree and gather tensors under ``state_dict``-style names."""
    out = {} if out is None else out
    if depth > 200:
        return out
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj.detach()
        return out
    if isinstance(obj, Placeholder):
        module_dict = obj.state if isinstance(obj.state, dict) else None
        if module_dict is None:  # fx GraphModule: reduce_graph_module(body_dict, import_block)
            module_dict = next((a for a in obj.args if isinstance(a, dict) and "_modules" in a), None)
        if module_dict is not None and ("_modules" in module_dict or "_parameters" in module_dict):
            non_persistent = module_dict.get("_non_persistent_buffers_set")
            if not isinstance(non_persistent, set | frozenset):
                non_persistent = set()
            for section in ("_parameters", "_buffers"):
                for k, v in (module_dict.get(section) or {}).items():
                    if isinstance(v, torch.Tensor) and not (section == "_buffers" and k in non_persistent):
                        out[f"{prefix}{k}"] = v.detach()
            for k, v in (module_dict.get("_modules") or {}).items():
                if v is not None:
                    collect_tensors(v, f"{prefix}{k}.", out, depth + 1)
        elif isinstance(obj.state, Mapping):
            collect_tensors(dict(obj.state), prefix, out, depth + 1)
        return out
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(k, str):
                collect_tensors(v, f"{prefix}{k}.", out, depth + 1)
    return out


def _read_restricted_pickle(path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    placeholders: set[str] = set()
    unpickler = restricted_unpickler(TENSOR_POLICY, placeholders=placeholders)

    def restricted_load(file: Any, **kwargs: Any) -> Any:
        # torch's legacy (non-zip) reader calls ``pickle_module.load`` directly: it must be restricted too
        return unpickler(file, **kwargs).load()

    pickle_module = types.SimpleNamespace(Unpickler=unpickler, load=restricted_load, __name__="restricted_pickle")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)  # noqa: S614
    except Exception as exc:
        raise checkpoint_error(
            path,
            PICKLE_FORMAT,
            f"cannot be read even with the restricted unpickler ({type(exc).__name__}: {exc})",
        ) from exc
    return collect_tensors(obj), placeholders


class _PickleNeeded(Exception):
    pass


def _torch_weights_only(path: Path, expected: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _PickleNeeded(str(exc)) from exc
    except Exception as exc:  # zip/EOF errors on truncated files
        raise checkpoint_error(
            path,
            expected,
            f"cannot be read as a torch file, perhaps truncated "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
        ) from exc


def _read_state(path: Path, fmt: str, trust_pickle: bool) -> tuple[dict[str, torch.Tensor], str, set[str]]:
    """The file's tensors by name, the format it was read as (``fmt``, or :data:`PICKLE_FORMAT` for a whole pickled
    module) and the placeholder globals of a pickle."""
    placeholders: set[str] = set()
    try:
        obj = _torch_weights_only(path, fmt)
    except _PickleNeeded as exc:
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: this is a whole pickled module (like GM-Arc's '…_last_model.pth'), not a state "
                "dict. Unpickling it would import and run classes named inside the file, i.e. execute "
                "code from it, so it is refused by default. If you trust where the file comes from, pass "
                "trust_pickle=True (a model declaration's 'trust_pickle: true'; train: --trust-pickle): it is then "
                "read with a restricted unpickler that extracts tensors only. Better: load it once and save it "
                f"as a state dict or with 'save_model'. (torch: {str(exc).splitlines()[0]})"
            ) from exc
        fmt = PICKLE_FORMAT
        obj, placeholders = _read_restricted_pickle(path)
        log.info("%s: read with the restricted unpickler; placeholders for %s", path, sorted(placeholders))
    state = unwrap_state(obj)
    if not isinstance(state, Mapping) or not state:
        raise checkpoint_error(path, fmt, f"the file holds {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise checkpoint_error(path, fmt, f"entries that are not tensors: {bad[:MAX_LISTED]}")
    return strip_prefix(state), fmt, placeholders


def _backbone_from_state(
    state: Mapping[str, torch.Tensor], path: Path, fmt: str, arch: str | None
) -> tuple[IResNet, tuple[torch.Tensor, torch.Tensor] | None, str]:
    """Backbone, classifier ``(weight, bias)`` and the format the keys show (see the module docstring)."""
    if any(k.startswith("backbone.") for k in state):  # our GestaltMatcher state dict via torch.save
        inner = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        backbone = native_backbone(inner, path, arch)
        head = ("classifier.1.weight", "classifier.1.bias")
        classifier = (state[head[0]], state[head[1]]) if head[0] in state else None
        return backbone, classifier, fmt
    if is_onnx2torch_state(state):
        fmt = "gm-arc-pt" if fmt == "insightface" else fmt
        parts = parts_from_onnx2torch(state, path, fmt)
        return build_from_fused(parts, path, fmt, arch), parts.classifier, fmt
    fmt = "insightface" if fmt == "gm-arc-pt" else fmt
    return native_backbone(state, path, arch), None, fmt


def load_torch_file(path: Path, fmt: str, options: LoadOptions) -> LoadedCheckpoint:
    """Read a torch file as format ``fmt``; the result records the format its contents show."""
    state, fmt, placeholders = _read_state(path, fmt, options.trust_pickle)
    backbone, classifier, fmt = _backbone_from_state(state, path, fmt, options.arch)
    model = wrap_backbone(backbone, classifier, path, fmt, options.channel_order)
    return LoadedCheckpoint(model, fmt, path, frozenset(placeholders))
