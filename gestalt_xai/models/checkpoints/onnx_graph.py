"""The ``onnx`` format: an iResNet backbone exported to ONNX (GM-Arc's ``glint360k_r100.onnx``), read with ``onnx``.

The initializers are read from the graph (constants, ``Identity``/``Unsqueeze`` of constants, BatchNorms not folded
by the exporter are folded here) into :class:`~.fused.FusedParts`; nothing is executed. insightface's arcface_torch
backbones (and so the ``.onnx``) were trained on RGB input, the default ``channel_order``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch

from gestalt_xai.faces.align import CROP_SIZE
from gestalt_xai.models.checkpoints.fused import BN, FusedParts, build_from_fused
from gestalt_xai.models.checkpoints.registry import (
    CheckpointFormat,
    LoadedCheckpoint,
    LoadOptions,
    checkpoint_error,
    register_format,
)
from gestalt_xai.models.checkpoints.state_dict import wrap_backbone
from gestalt_xai.models.gestaltmatcher import GestaltMatcher
from gestalt_xai.models.iresnet import IResNet

__all__ = ["ONNX", "export_onnx", "parts_from_onnx"]

NAME = "onnx"


def parts_from_onnx(path: Path) -> FusedParts:
    """The Conv/BatchNorm/PRelu/Gemm tensors of an ONNX iResNet graph, in graph order."""
    fmt = NAME
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - onnx is a dependency
        raise checkpoint_error(path, fmt, "the 'onnx' package is needed to read it (pip install onnx)") from exc
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError / OSError variants
        raise checkpoint_error(
            path, fmt, f"not a readable ONNX model, perhaps truncated ({type(exc).__name__}: {exc})"
        ) from exc
    graph = proto.graph
    if not graph.node:
        raise checkpoint_error(path, fmt, "the graph has no nodes (empty or truncated file)")
    values: dict[str, torch.Tensor] = {
        init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer
    }
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            consumers[inp] = consumers.get(inp, 0) + 1

    def attr(node: Any, name: str, default: Any) -> Any:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def value(name: str, node: Any) -> torch.Tensor:
        if name not in values:
            raise checkpoint_error(
                path, fmt, f"node {node.name or node.op_type} reads {name!r}, which is not a constant weight"
            )
        return values[name]

    node_name: dict[int, str] = {}
    counters: dict[str, int] = {}
    for node in graph.node:
        k = counters.get(node.op_type, 0)
        counters[node.op_type] = k + 1
        node_name[id(node)] = node.name or f"{node.op_type}_{k}"

    parts = FusedParts()
    conv_of_output: dict[str, int] = {}
    allowed_shape_ops = {"Flatten", "Reshape", "Shape", "Gather", "Unsqueeze", "Concat", "Dropout", "Cast"}
    seen_conv = False
    for node in graph.node:
        op, nm = node.op_type, node_name[id(node)]
        if op == "Constant":
            t = attr(node, "value", None)
            if t is not None:
                values[node.output[0]] = torch.from_numpy(numpy_helper.to_array(t).copy())
        elif op == "Identity":
            if node.input[0] in values:
                values[node.output[0]] = values[node.input[0]]
        elif op == "Unsqueeze" and node.input[0] in values:  # PReLU slopes of exports without constant folding
            axes = attr(node, "axes", None)
            if axes is None and len(node.input) > 1:
                axes = value(node.input[1], node).tolist()
            t = values[node.input[0]]
            for ax in sorted(int(a) % (t.ndim + len(axes)) for a in axes):
                t = t.unsqueeze(ax)
            values[node.output[0]] = t
        elif op == "Conv":
            seen_conv = True
            w = value(node.input[1], node)
            b = value(node.input[2], node) if len(node.input) > 2 and node.input[2] else None
            groups, dil = attr(node, "group", 1), list(attr(node, "dilations", [1, 1]))
            if groups != 1 or any(d != 1 for d in dil):
                raise checkpoint_error(
                    path, fmt, f"{nm}: grouped/dilated conv (group={groups}, dilations={dil}) is not iResNet"
                )
            conv_of_output[node.output[0]] = len(parts.convs)
            parts.convs.append((nm, w, b))
        elif op == "BatchNormalization":
            scale, bias, mean, var = (value(node.input[i], node) for i in range(1, 5))
            eps = float(attr(node, "epsilon", 1e-5))
            src = node.input[0]
            if src in conv_of_output and consumers.get(src, 0) == 1:
                # a BN right after a conv (non-folded export): fold it here, as the exporter would have
                i = conv_of_output[src]
                cname, w, b = parts.convs[i]
                s = scale / torch.sqrt(var + eps)
                b0 = b if b is not None else torch.zeros_like(mean)
                parts.convs[i] = (cname, w * s.reshape(-1, 1, 1, 1), (b0 - mean) * s + bias)
                conv_of_output[node.output[0]] = i
            else:
                parts.bns.append(BN(scale, bias, mean, var, eps=eps, name=nm))
        elif op == "PRelu":
            parts.prelus.append((nm, value(node.input[1], node)))
        elif op == "Gemm":
            if parts.fc is not None:
                raise checkpoint_error(path, fmt, f"a second Gemm ({nm}): iResNet has one fc")
            w = value(node.input[1], node)
            b = value(node.input[2], node) if len(node.input) > 2 else torch.zeros(w.shape[0])
            if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
                raise checkpoint_error(path, fmt, f"{nm}: Gemm with transA/alpha/beta is not supported")
            if not attr(node, "transB", 0):
                w = w.t().contiguous()
            parts.fc = (nm, w, b)
        elif op == "Add":
            pass  # residual sums (and nothing else in an iResNet export)
        elif op in allowed_shape_ops:
            pass
        elif not seen_conv and op in {"Sub", "Mul", "Div"}:
            raise checkpoint_error(
                path,
                fmt,
                f"the graph normalises its input ({op} node {nm} before the first Conv); "
                "export the backbone without preprocessing (GM-Arc normalises outside the network)",
            )
        else:
            raise checkpoint_error(
                path,
                fmt,
                f"unsupported op {op} (node {nm}); expected an iResNet export "
                "(Conv, BatchNormalization, PRelu, Add, Flatten, Gemm)",
            )
    return parts


def export_onnx(backbone: IResNet, path: Path, clear_names: bool = True) -> Path:
    """Export ``backbone`` (put in eval mode) as insightface's ``torch2onnx`` does: the TorchScript exporter, so
    every BatchNorm after a conv is folded into it; node names cleared as in their files unless ``clear_names`` is
    False."""
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone.eval(), torch.zeros(1, 3, CROP_SIZE, CROP_SIZE), buf, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    if clear_names:
        for node in proto.graph.node:
            node.name = ""
    onnx.save(proto, str(path))
    return path


def _detect(path: Path, head: bytes | None) -> bool:
    return path.suffix == ".onnx"


def _load(path: Path, options: LoadOptions) -> LoadedCheckpoint:
    backbone = build_from_fused(parts_from_onnx(path), path, NAME, options.arch)
    model = wrap_backbone(backbone, None, path, NAME, options.channel_order)
    return LoadedCheckpoint(model, NAME, path)


def _write_example(model: GestaltMatcher, folder: Path) -> Path:
    return export_onnx(model.backbone, folder / "glint360k_example.onnx")


ONNX = register_format(
    CheckpointFormat(
        name=NAME,
        description="ONNX iResNet backbone (GestaltMatcher-Arc glint360k_r100.onnx)",
        detect=_detect,
        load=_load,
        write_example=_write_example,
        stores_classifier=False,
    )
)
