"""The onnx2torch layout of GM-Arc's ``.pt``/``.pth`` checkpoints → :class:`~.fused.FusedParts`.

GM-Arc's wrapper (``lib/models/my_arcface.py``) converts the insightface ONNX with onnx2torch, moves the ``Gemm``
and the last ``BatchNormalization`` into ``features`` and adds ``classifier = Sequential(Dropout, Linear(512, C))``.
onnx2torch 1.4.1 (GM-Arc's pin) names modules ``{OpType}_{k}``, ``k`` counting nodes of that op type in graph order
from 0; onnx2torch ≥ 1.5 uses the ONNX node name and, for unnamed nodes (as in insightface's exports),
``{OpType}``, ``{OpType}_1``, … — both are accepted (``Conv`` ≡ ``Conv_0``). PReLU slopes are not module parameters
there but buffers ``initializers.onnx_initializer_{k}`` (shape ``(C, 1, 1)``), numbered in graph order too. The
graph order per op type is in :mod:`gestalt_xai.models.checkpoints.fused`. These counters were checked against real
onnx2torch output (1.5.15, and 1.4.1's naming code) for r18/r50 in ``tests/test_checkpoints.py``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gestalt_xai.models.checkpoints.fused import BN, FusedParts
from gestalt_xai.models.checkpoints.registry import checkpoint_error
from gestalt_xai.models.checkpoints.state_dict import describe_keys, shape_of, strip_prefix

__all__ = ["is_onnx2torch_state", "parts_from_onnx2torch"]

_ONNX2TORCH_MODULE = re.compile(
    r"^(?P<module>.+?)\.(?P<param>weight|bias|running_mean|running_var|num_batches_tracked)$"
)
_INITIALIZER = re.compile(r"^(?:.*\.)?initializers\.onnx_initializer_(\d+)$")


def _op_and_counter(module_name: str) -> tuple[str, int | None]:
    """``"Conv_12"`` → ``("Conv", 12)``, ``"Conv"`` → ``("Conv", 0)``; scoped names keep file order (None)."""
    last = module_name.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    m = re.fullmatch(r"([A-Za-z]+)(?:_(\d+))?", last)
    if m is None:
        return last, None
    if "/" in module_name:
        return m.group(1), None
    return m.group(1), int(m.group(2) or 0)


def is_onnx2torch_state(state: Mapping[str, Any]) -> bool:
    """Does the state dict use onnx2torch names (``Conv_3.weight``, ``initializers.onnx_initializer_0``)?"""
    return any(_INITIALIZER.match(k) for k in state) or any(
        re.match(r"^(?:base\.|features\.)?(?:[\w/]*/)?(?:Conv|Gemm|BatchNormalization)(?:_\d+)?\.weight$", k)
        for k in state
    )


def parts_from_onnx2torch(state: Mapping[str, torch.Tensor], path: Path, fmt: str) -> FusedParts:
    """Group onnx2torch keys by op type and order them (counter, else file order)."""
    state = strip_prefix(state)
    modules: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    initializers: list[tuple[int, str, torch.Tensor]] = []
    classifier: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if (m := _INITIALIZER.match(key)) is not None:
            initializers.append((int(m.group(1)), key, value))
            continue
        if key.startswith("classifier."):
            classifier[key[len("classifier.") :]] = value
            continue
        m = _ONNX2TORCH_MODULE.match(key)
        if m is None:
            unknown.append(key)
            continue
        modules.setdefault(m.group("module"), {})[m.group("param")] = value
    by_op: dict[str, list[tuple[int, int, str, dict[str, torch.Tensor]]]] = {}
    for pos, (mod, params) in enumerate(modules.items()):
        group = mod.split(".", 1)[0] if "." in mod else ""
        op, counter = _op_and_counter(mod)
        # the features group (GM-Arc's split) comes after base in graph order
        order = counter if counter is not None else pos
        by_op.setdefault(op, []).append((1 if group == "features" else 0, order, mod, params))
    for items in by_op.values():
        items.sort(key=lambda t: (t[0], t[1]))
    unexpected_ops = sorted(set(by_op) - {"Conv", "BatchNormalization", "Gemm"})
    if unknown or unexpected_ops:
        bad = unknown + [f"{mod}.*" for op in unexpected_ops for _, _, mod, _ in by_op[op]]
        raise checkpoint_error(
            path,
            fmt,
            "keys that belong to no Conv/BatchNormalization/Gemm/PRelu-slope/classifier"
            + describe_keys("unexpected keys", bad, state),
        )

    parts = FusedParts()
    for _, _, mod, p in by_op.get("Conv", []):
        if "weight" not in p or p["weight"].ndim != 4:
            raise checkpoint_error(path, fmt, f"{mod}.weight is not a 4-d conv kernel ({shape_of(p.get('weight'))})")
        parts.convs.append((mod, p["weight"], p.get("bias")))
    for grp, _, mod, p in by_op.get("BatchNormalization", []):
        missing = [a for a in ("weight", "bias", "running_mean", "running_var") if a not in p]
        if missing:
            raise checkpoint_error(path, fmt, f"BatchNorm {mod} lacks {', '.join(f'{mod}.{a}' for a in missing)}")
        bn = BN(p["weight"], p["bias"], p["running_mean"], p["running_var"], name=mod)
        if grp == 1:
            parts.features = bn
        else:
            parts.bns.append(bn)
    gemms = by_op.get("Gemm", [])
    if len(gemms) != 1 or {"weight", "bias"} - set(gemms[0][3]):
        found = [g[2] for g in gemms]
        raise checkpoint_error(path, fmt, f"expected exactly one Gemm (fc) with weight and bias, found {found}")
    _, _, gname, gp = gemms[0]
    parts.fc = (gname, gp["weight"], gp["bias"])
    initializers.sort()
    parts.prelus = [(k, v) for _, k, v in initializers if v.is_floating_point() and v.ndim in (1, 3)]
    if classifier:
        w = classifier.get("1.weight")
        b = classifier.get("1.bias")
        extra = sorted(set(classifier) - {"1.weight", "1.bias"})
        if w is None or b is None or extra:
            raise checkpoint_error(
                path,
                fmt,
                "classifier must be Sequential(Dropout, Linear): keys classifier.1.weight/bias"
                + describe_keys(
                    "found",
                    [f"classifier.{k}" for k in classifier],
                    {f"classifier.{k}": v for k, v in classifier.items()},
                ),
            )
        parts.classifier = (w, b)
    return parts
