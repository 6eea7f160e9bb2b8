"""Load and save GestaltMatcher models in every format GestaltMatcher-Arc users have.

:func:`load_model` recognises

=================  ==========================================================  ==================  ==============
format id          file                                                        layout              channel order
=================  ==========================================================  ==================  ==============
``gestalt-xai``    ``<id>.safetensors`` + ``<id>.json`` (:func:`save_model`)    native or fused     from the JSON
``insightface``    arcface_torch ``.pth`` backbone ``state_dict``              native              RGB
``gm-arc-pt``      GM-Arc per-epoch ``…_e{N}.pt`` wrapper ``state_dict``        fused (onnx2torch)  RGB (see below)
``onnx``           ``glint360k_r100.onnx`` (initializers read with ``onnx``)   fused               RGB
``gm-arc-pickle``  GM-Arc ``…_last_model.pth`` whole pickled module            fused (onnx2torch)  RGB (see below)
=================  ==========================================================  ==================  ==============

Everything except the ``.onnx`` file and our own safetensors is read with ``torch.load(weights_only=True)``. The
whole-module pickle needs arbitrary classes to unpickle (which can execute code), so it is refused unless
``trust_pickle=True`` (CLI ``--trust-pickle``); even then it goes through :class:`RestrictedUnpickler`, which
rebuilds tensors only and replaces every other class or function by an inert placeholder, so no code from the file
runs.

**onnx2torch key mapping.** GM-Arc's wrapper (``lib/models/my_arcface.py``) converts the insightface ONNX with
onnx2torch, moves the ``Gemm`` and the last ``BatchNormalization`` into ``features`` and adds
``classifier = Sequential(Dropout, Linear(512, C))``. onnx2torch 1.4.1 (GM-Arc's pin) names modules
``{OpType}_{k}``, ``k`` counting nodes of that op type in graph order from 0; onnx2torch ≥ 1.5 uses the ONNX node
name and, for unnamed nodes (as in insightface's exports), ``{OpType}``, ``{OpType}_1``, … — both are accepted
(``Conv`` ≡ ``Conv_0``). PReLU slopes are not module parameters there but buffers
``initializers.onnx_initializer_{k}`` (shape ``(C, 1, 1)``), numbered in graph order too. In eval-mode ONNX
exports every BatchNorm that follows a conv is folded into it, so the graph order per op type is

* ``Conv``: stem ``conv1``, then per block ``conv1``, ``conv2``, ``downsample.0`` (the shortcut conv is traced after
  ``conv2`` because insightface's ``forward`` computes it after ``bn3``);
* ``BatchNormalization``: each block's pre-activation ``bn1``, the head ``bn2``, then ``features`` (BN1d) —
  so the features BN is number 25 for iResNet-50 (24 blocks) and 50 for iResNet-100 (49 blocks), as in GM-Arc's
  ``features.BatchNormalization_25|50``;
* ``PRelu`` slopes: stem, then one per block; ``Gemm_0`` is ``fc``.

These counters were checked against real onnx2torch output (1.5.15, and 1.4.1's naming code) for r18/r50 in the
tests. The mapping is positional within each op type and every tensor's shape is checked, so a checkpoint of a
different architecture fails with a message instead of loading garbage.

**Channel order.** GM-Arc's inference (``lib/encode.py``) reads photos with OpenCV and converts BGR → RGB, but its
training dataset (``GestaltMatcherDataset``) feeds ``cv2.imread`` output (BGR) without conversion, so the fine-tuned
``.pt``/``.pth`` weights were trained on BGR input while GM-Arc evaluates them on RGB. We default to RGB for every
GM-Arc format — the order that reproduces GM-Arc's published encodings — and record it in ``model.channel_order``;
pass ``channel_order="BGR"`` to feed the order the fine-tuning saw. insightface's arcface_torch backbones (and so the
``.onnx``) were trained on RGB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import types
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gestalt_xai.errors import CheckpointError, ConfigError
from gestalt_xai.models.gestaltmatcher import ChannelOrder, GestaltMatcher
from gestalt_xai.models.iresnet import ARCH_LAYERS, IResNet, build_iresnet, canonical_arch
from gestalt_xai.runs import atomic_write_bytes

__all__ = [
    "FORMATS",
    "RestrictedUnpickler",
    "check_classes",
    "detect_format",
    "load_model",
    "model_sha256",
    "read_lookup_table",
    "save_model",
]

log = logging.getLogger(__name__)

FormatId = Literal["gestalt-xai", "insightface", "gm-arc-pt", "onnx", "gm-arc-pickle"]
FORMATS: dict[str, str] = {
    "gestalt-xai": "gestalt-xai checkpoint (<id>.safetensors + <id>.json, written by save_model)",
    "insightface": "insightface arcface_torch iResNet state_dict "
    "(.pth: conv1, bn1, prelu, layer1.0.bn1 … fc, features)",
    "gm-arc-pt": "GestaltMatcher-Arc per-epoch state_dict (.pt: base.Conv_i, base.BatchNormalization_j, "
    "base.initializers.onnx_initializer_k, features.Gemm_0, features.BatchNormalization_25|50, classifier.1)",
    "onnx": "ONNX iResNet backbone (GestaltMatcher-Arc glint360k_r100.onnx)",
    "gm-arc-pickle": "GestaltMatcher-Arc whole pickled module (…_last_model.pth)",
}
FORMAT_VERSION = 1
_MAX_LISTED = 12

# ============================================================================================ small helpers


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


def read_lookup_table(path: str | os.PathLike[str]) -> list[str]:
    """GM-Arc's ``lookup_table_gmdb_<version>.txt``: a header line, then a JSON list (class index → syndrome id).

    A file holding only the JSON list is accepted too. Ids are returned as strings.
    """
    p = Path(path)
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as exc:
        raise ConfigError(f"cannot read lookup table {p}: {exc}") from exc
    for line in reversed(lines):
        try:
            ids = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(ids, list):
            return [str(i) for i in ids]
    raise ConfigError(f"{p} is not a GM-Arc lookup table (expected a header line, then a JSON list of syndrome ids)")


def _shape(t: Any) -> str:
    return str(list(t.shape)) if hasattr(t, "shape") else type(t).__name__


def _describe_keys(title: str, keys: Iterable[str], tensors: Mapping[str, Any]) -> str:
    keys = list(keys)
    if not keys:
        return ""
    shown = ", ".join(f"{k} {_shape(tensors[k])}" if k in tensors else k for k in keys[:_MAX_LISTED])
    more = f" … (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"\n  {title} ({len(keys)}): {shown}{more}"


def _fail(path: Path | str, fmt: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: expected {FORMATS.get(fmt, fmt)}; {problem}")


# ============================================================================================ our own format


def _own_paths(path: Path) -> tuple[Path, Path]:
    base = path.with_suffix("") if path.suffix in {".safetensors", ".json"} else path
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def save_model(model: GestaltMatcher, path: str | os.PathLike[str], *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as ``<path>.safetensors`` (weights) + ``<path>.json`` (config); returns the weights path.

    The JSON holds ``arch``, ``width``, ``fused``, ``num_classes``, ``syndrome_ids`` (class index order),
    ``channel_order``, ``preprocessing`` and whatever ``extra`` adds (e.g. training provenance). Both files are
    written atomically (temporary name, then rename).
    """
    from safetensors.torch import save as st_save

    weights, cfg_path = _own_paths(Path(path))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # one metadata key only: safetensors writes several in an unstable order, and the same model must give the
    # same bytes (and hash) every time
    data = st_save(state, metadata={"format": f"gestalt-xai/{FORMAT_VERSION}"})
    cfg = dict(model.config)
    cfg.update(
        format="gestalt-xai",
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

    weights, cfg_path = _own_paths(path)
    fmt = "gestalt-xai"
    if not cfg_path.exists():
        raise _fail(path, fmt, f"its config {cfg_path.name} is missing beside the weights")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise _fail(cfg_path, fmt, f"config is not valid JSON ({exc})") from exc
    missing_fields = [k for k in ("arch", "width", "num_classes", "channel_order") if k not in cfg]
    if missing_fields:
        raise _fail(cfg_path, fmt, f"config lacks fields {missing_fields}")
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise _fail(weights, fmt, f"weights unreadable or truncated ({exc})") from exc
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
    _load_strict(model, state, weights, fmt)
    return model


# ============================================================================================ state-dict loading


def _load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: Path,
    fmt: str,
    source_names: Mapping[str, str] | None = None,
) -> None:
    """``load_state_dict(strict=True)`` with a CheckpointError that lists missing/unexpected keys and shapes.

    ``num_batches_tracked`` counters are optional (older insightface checkpoints lack them). ``source_names`` maps
    target keys to the checkpoint's own names for messages about mapped formats.
    """
    target = module.state_dict()
    state = dict(state)
    for k in target:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = target[k].clone()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or mismatched:

        def name(k: str) -> str:
            return f"{k} (= {source_names[k]})" if source_names and k in source_names else k

        msg = "the weights do not fit the model built from it"
        msg += _describe_keys("missing keys (expected shape)", missing, target)
        msg += _describe_keys("unexpected keys", unexpected, state)
        if mismatched:
            shown = ", ".join(
                f"{name(k)}: file {_shape(state[k])} vs model {_shape(target[k])}" for k in mismatched[:_MAX_LISTED]
            )
            msg += f"\n  shape mismatches ({len(mismatched)}): {shown}"
        raise _fail(path, fmt, msg)
    module.load_state_dict(state, strict=True)


def _strip_prefix(state: Mapping[str, Any], prefixes: Sequence[str] = ("module.", "_orig_mod.")) -> dict[str, Any]:
    out = dict(state)
    for prefix in prefixes:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _unwrap_state(obj: Any) -> Any:
    """Common containers around a state dict: ``{"state_dict": …}``, ``{"model": …}``."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "backbone"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return obj


def _native_arch(state: Mapping[str, torch.Tensor], path: Path, fmt: str) -> tuple[str, float]:
    counts = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(idx))
    layers = tuple(counts)
    arch = next((a for a, spec in ARCH_LAYERS.items() if spec == layers), None)
    if arch is None:
        raise _fail(
            path,
            fmt,
            f"blocks per stage {list(layers)} match no iResNet "
            f"({', '.join(f'{a} {list(s)}' for a, s in ARCH_LAYERS.items())})",
        )
    if "conv1.weight" not in state:
        raise _fail(path, fmt, "stem weight 'conv1.weight' is missing")
    width = state["conv1.weight"].shape[0] / 64
    return arch, width


def _load_insightface(state: Mapping[str, torch.Tensor], path: Path, arch: str | None) -> IResNet:
    fmt = "insightface"
    state = _strip_prefix(state)
    found_arch, width = _native_arch(state, path, fmt)
    if arch is not None and canonical_arch(arch) != found_arch:
        raise _fail(path, fmt, f"you asked for {canonical_arch(arch)} but the file holds {found_arch}")
    num_features = state["features.weight"].shape[0] if "features.weight" in state else 512
    fused = "layer1.0.bn2.weight" not in state and "layer1.0.conv1.bias" in state
    backbone = build_iresnet(found_arch, width, num_features=num_features, fused=fused)
    _load_strict(backbone, state, path, fmt)
    return backbone


# ============================================================================================ fused (ONNX) layout


@dataclass
class _BN:
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float | None = None
    name: str = ""


@dataclass
class _FusedParts:
    """A fused iResNet as ordered lists per op type (graph order), with the source names for messages."""

    convs: list[tuple[str, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    bns: list[_BN] = field(default_factory=list)  # blocks' bn1, head bn2 (and features when not split off)
    prelus: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    fc: tuple[str, torch.Tensor, torch.Tensor] | None = None
    features: _BN | None = None
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


def _build_from_fused(parts: _FusedParts, path: Path, fmt: str, arch: str | None) -> IResNet:
    if parts.features is None and parts.bns:
        parts.features = parts.bns.pop()  # not split off (plain onnx2torch graph / ONNX): the last BN is BN1d
    if parts.fc is None or parts.features is None or not parts.convs:
        raise _fail(
            path,
            fmt,
            "no Gemm/fc and final BatchNormalization found: this is not an iResNet graph "
            f"(found {len(parts.convs)} Conv, {len(parts.bns)} BatchNormalization, "
            f"{len(parts.prelus)} PRelu)",
        )
    n_blocks = len(parts.bns) - 1
    found = next((a for a, spec in ARCH_LAYERS.items() if sum(spec) == n_blocks), None)
    if found is None:
        raise _fail(
            path,
            fmt,
            f"{len(parts.bns)} surviving 2-d BatchNorms = {n_blocks} blocks + head, which "
            f"matches no iResNet (blocks: {', '.join(f'{a} {sum(s)}' for a, s in ARCH_LAYERS.items())})",
        )
    if arch is not None and canonical_arch(arch) != found:
        raise _fail(path, fmt, f"you asked for {canonical_arch(arch)} but the file holds {found}")
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
        raise _fail(path, fmt, "; ".join(problems))
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for tgt, (src, w, b) in zip(conv_names, parts.convs, strict=True):
        state[f"{tgt}.weight"], source[f"{tgt}.weight"] = w, f"{src} weight"
        if b is None:
            b = torch.zeros(w.shape[0], dtype=w.dtype)
        state[f"{tgt}.bias"], source[f"{tgt}.bias"] = b, f"{src} bias"

    def put_bn(tgt: str, bn: _BN) -> None:
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
    _load_strict(backbone, state, path, fmt, source_names=source)
    return backbone


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


def _is_onnx2torch_state(state: Mapping[str, Any]) -> bool:
    return any(_INITIALIZER.match(k) for k in state) or any(
        re.match(r"^(?:base\.|features\.)?(?:[\w/]*/)?(?:Conv|Gemm|BatchNormalization)(?:_\d+)?\.weight$", k)
        for k in state
    )


def _parts_from_onnx2torch(state: Mapping[str, torch.Tensor], path: Path, fmt: str) -> _FusedParts:
    """Group onnx2torch keys by op type and order them (counter, else file order)."""
    state = _strip_prefix(state)
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
        raise _fail(
            path,
            fmt,
            "keys that belong to no Conv/BatchNormalization/Gemm/PRelu-slope/classifier"
            + _describe_keys("unexpected keys", bad, state),
        )

    parts = _FusedParts()
    for _, _, mod, p in by_op.get("Conv", []):
        if "weight" not in p or p["weight"].ndim != 4:
            raise _fail(path, fmt, f"{mod}.weight is not a 4-d conv kernel ({_shape(p.get('weight'))})")
        parts.convs.append((mod, p["weight"], p.get("bias")))
    for grp, _, mod, p in by_op.get("BatchNormalization", []):
        missing = [a for a in ("weight", "bias", "running_mean", "running_var") if a not in p]
        if missing:
            raise _fail(path, fmt, f"BatchNorm {mod} lacks {', '.join(f'{mod}.{a}' for a in missing)}")
        bn = _BN(p["weight"], p["bias"], p["running_mean"], p["running_var"], name=mod)
        if grp == 1:
            parts.features = bn
        else:
            parts.bns.append(bn)
    gemms = by_op.get("Gemm", [])
    if len(gemms) != 1 or {"weight", "bias"} - set(gemms[0][3]):
        raise _fail(path, fmt, f"expected exactly one Gemm (fc) with weight and bias, found {[g[2] for g in gemms]}")
    _, _, gname, gp = gemms[0]
    parts.fc = (gname, gp["weight"], gp["bias"])
    initializers.sort()
    parts.prelus = [(k, v) for _, k, v in initializers if v.is_floating_point() and v.ndim in (1, 3)]
    if classifier:
        w = classifier.get("1.weight")
        b = classifier.get("1.bias")
        extra = sorted(set(classifier) - {"1.weight", "1.bias"})
        if w is None or b is None or extra:
            raise _fail(
                path,
                fmt,
                "classifier must be Sequential(Dropout, Linear): keys classifier.1.weight/bias"
                + _describe_keys(
                    "found",
                    [f"classifier.{k}" for k in classifier],
                    {f"classifier.{k}": v for k, v in classifier.items()},
                ),
            )
        parts.classifier = (w, b)
    return parts


# ============================================================================================ ONNX


def _parts_from_onnx(path: Path) -> _FusedParts:
    fmt = "onnx"
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - onnx is a dependency
        raise _fail(path, fmt, "the 'onnx' package is needed to read it (pip install onnx)") from exc
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError / OSError variants
        raise _fail(path, fmt, f"not a readable ONNX model, perhaps truncated ({type(exc).__name__}: {exc})") from exc
    graph = proto.graph
    if not graph.node:
        raise _fail(path, fmt, "the graph has no nodes (empty or truncated file)")
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
            raise _fail(path, fmt, f"node {node.name or node.op_type} reads {name!r}, which is not a constant weight")
        return values[name]

    node_name: dict[int, str] = {}
    counters: dict[str, int] = {}
    for node in graph.node:
        k = counters.get(node.op_type, 0)
        counters[node.op_type] = k + 1
        node_name[id(node)] = node.name or f"{node.op_type}_{k}"

    parts = _FusedParts()
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
                raise _fail(path, fmt, f"{nm}: grouped/dilated conv (group={groups}, dilations={dil}) is not iResNet")
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
                parts.bns.append(_BN(scale, bias, mean, var, eps=eps, name=nm))
        elif op == "PRelu":
            parts.prelus.append((nm, value(node.input[1], node)))
        elif op == "Gemm":
            if parts.fc is not None:
                raise _fail(path, fmt, f"a second Gemm ({nm}): iResNet has one fc")
            w = value(node.input[1], node)
            b = value(node.input[2], node) if len(node.input) > 2 else torch.zeros(w.shape[0])
            if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
                raise _fail(path, fmt, f"{nm}: Gemm with transA/alpha/beta is not supported")
            if not attr(node, "transB", 0):
                w = w.t().contiguous()
            parts.fc = (nm, w, b)
        elif op == "Add":
            pass  # residual sums (and nothing else in an iResNet export)
        elif op in allowed_shape_ops:
            pass
        elif not seen_conv and op in {"Sub", "Mul", "Div"}:
            raise _fail(
                path,
                fmt,
                f"the graph normalises its input ({op} node {nm} before the first Conv); "
                "export the backbone without preprocessing (GM-Arc normalises outside the network)",
            )
        else:
            raise _fail(
                path,
                fmt,
                f"unsupported op {op} (node {nm}); expected an iResNet export "
                "(Conv, BatchNormalization, PRelu, Add, Flatten, Gemm)",
            )
    return parts


# ============================================================================================ restricted unpickler


class _Opaque:
    """Inert stand-in for any class or function a pickle names; it only records what it was given."""

    _qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    @classmethod
    def _new(cls, *args: Any) -> _Opaque:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, {}, None, []
        return obj

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:  # NEWOBJ calls cls.__new__(cls, *args)
        return cls._new(*args)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:  # e.g. getattr(cls, "method")(…) in REDUCE
        return _Opaque(*args, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses (SETITEMS)
        self.items.append((key, value))

    def append(self, value: Any) -> None:  # list subclasses (APPENDS)
        self.items.append((None, value))

    def extend(self, values: Iterable[Any]) -> None:
        self.items.extend((None, v) for v in values)

    def __repr__(self) -> str:
        return f"<opaque {self._qualname}>"


def _safe_torch_attr(name: str) -> Any:
    obj = getattr(torch, name, None)
    if isinstance(obj, torch.dtype | torch.layout | torch.memory_format):
        return obj
    return None


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "UserDict": "collections"}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds tensors and plain containers and turns everything else into inert placeholders.

    Allowed globals: torch's tensor/parameter rebuild functions, storages (resolved by ``torch.load`` itself),
    ``collections.OrderedDict``, ``torch.Size``/``torch.device``, dtypes/layouts and plain builtin containers.
    Any other global (model classes, ``torch.fx`` graph rebuilders, ``os.system`` …) becomes a subclass of
    :class:`_Opaque` that records its arguments and state — nothing from the file is imported or executed.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("collections", "OrderedDict"): OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
    }
    _BUILTINS = {
        "set": set,
        "frozenset": frozenset,
        "slice": slice,
        "complex": complex,
        "bytearray": bytearray,
        "tuple": tuple,
        "list": list,
        "dict": dict,
        "int": int,
        "float": float,
        "bool": bool,
        "str": str,
    }
    opaque_names: set[str]

    def find_class(self, module: str, name: str) -> Any:
        if not hasattr(self, "opaque_names"):
            self.opaque_names = set()
        module = _PY2_MODULES.get(module, module)  # protocol 2 (torch.save's default) writes Python 2 names
        key = (module, name)
        if key in self._ALLOWED:
            return self._ALLOWED[key]
        if module == "builtins" and name in self._BUILTINS:
            return self._BUILTINS[name]
        if module == "torch" and (attr := _safe_torch_attr(name)) is not None:
            return attr
        qual = f"{module}.{name}"
        self.opaque_names.add(qual)
        return type(name, (_Opaque,), {"_qualname": qual})


def _collect_tensors(
    obj: Any, prefix: str = "", out: dict[str, torch.Tensor] | None = None, depth: int = 0
) -> dict[str, torch.Tensor]:
    """Walk an unpickled object tree and gather tensors under ``state_dict``-style names."""
    out = {} if out is None else out
    if depth > 200:
        return out
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj.detach()
        return out
    if isinstance(obj, _Opaque):
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
                    _collect_tensors(v, f"{prefix}{k}.", out, depth + 1)
        elif isinstance(obj.state, Mapping):
            _collect_tensors(dict(obj.state), prefix, out, depth + 1)
        return out
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(k, str):
                _collect_tensors(v, f"{prefix}{k}.", out, depth + 1)
    return out


def _load_restricted_pickle(path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    opaque: set[str] = set()

    class _Unpickler(RestrictedUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            self.opaque_names = opaque
            return super().find_class(module, name)

    def restricted_load(file: Any, **kwargs: Any) -> Any:
        # torch's legacy (non-zip) reader calls ``pickle_module.load`` directly: it must be restricted too
        return _Unpickler(file, **kwargs).load()

    pickle_module = types.SimpleNamespace(Unpickler=_Unpickler, load=restricted_load, __name__="restricted_pickle")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)  # noqa: S614
    except Exception as exc:
        raise _fail(
            path,
            "gm-arc-pickle",
            f"cannot be read even with the restricted unpickler ({type(exc).__name__}: {exc})",
        ) from exc
    return _collect_tensors(obj), opaque


# ============================================================================================ detection + loading


def detect_format(path: str | os.PathLike[str]) -> FormatId:
    """Guess a checkpoint's format from its name and first bytes (does not unpickle anything)."""
    p = Path(path)
    if p.suffix in {".safetensors", ".json"} or (not p.exists() and p.with_name(p.name + ".safetensors").exists()):
        return "gestalt-xai"
    if p.suffix == ".onnx":
        return "onnx"
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "gm-arc-pt" if p.suffix == ".pt" else "insightface"
    if p.suffix in {".pt", ".pth", ".bin", ".ckpt"}:
        return "gm-arc-pt" if p.suffix == ".pt" else "insightface"
    return "onnx"


def _torch_weights_only(path: Path, expected: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _PickleNeeded(str(exc)) from exc
    except Exception as exc:  # zip/EOF errors on truncated files
        raise _fail(
            path,
            expected,
            f"cannot be read as a torch file, perhaps truncated "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
        ) from exc


class _PickleNeeded(Exception):
    pass


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
    """Load a GestaltMatcher model from any supported checkpoint (see the module docstring for the formats).

    Parameters
    ----------
    path : the checkpoint (for our own format the ``.safetensors``, the ``.json`` or the common stem).
    trust_pickle : allow GM-Arc whole-module pickles (``_last_model.pth``). Unpickling arbitrary classes can run
        code, so this is off by default; when on, the file still goes through :class:`RestrictedUnpickler`, which
        extracts tensors only.
    arch : expected architecture (``"r50"``, ``"r100"`` …); inferred from the weights, so only a check.
    format : force a format id instead of detecting it.
    channel_order : override the channel order the model is fed (default: per format, see module docstring).
    syndrome_ids : the class-index → syndrome-id list (GM-Arc's lookup table, or a path to
        ``lookup_table_gmdb_<version>.txt``) for formats that do not store it. Checked against the classifier size.
    device : where to put the model.

    Returns the model in eval mode; ``model.config["source"]`` records format, path and SHA-256.

    Raises
    ------
    CheckpointError : unreadable/truncated file, unrecognised layout, missing/unexpected keys (listed with shapes),
        or a pickle without ``trust_pickle``.
    """
    p = Path(path)
    fmt: str = format or detect_format(p)
    if fmt not in FORMATS:
        raise CheckpointError(f"{p}: unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    classifier: tuple[torch.Tensor, torch.Tensor] | None = None
    order: ChannelOrder = channel_order or "RGB"
    opaque: set[str] = set()

    if fmt == "gestalt-xai":
        model = _load_own(p, channel_order)
        sha_path = _own_paths(p)[0]
    else:
        sha_path = p
        if fmt == "onnx":
            backbone = _build_from_fused(_parts_from_onnx(p), p, fmt, arch)
        else:
            try:
                obj = _torch_weights_only(p, fmt)
            except _PickleNeeded as exc:
                if not trust_pickle:
                    raise CheckpointError(
                        f"{p}: this is a whole pickled module (like GM-Arc's '…_last_model.pth'), not a state "
                        "dict. Unpickling it would import and run classes named inside the file, i.e. execute "
                        "code from it, so it is refused by default. If you trust where the file comes from, pass "
                        "trust_pickle=True (CLI: --trust-pickle): it is then read with a restricted unpickler "
                        "that extracts tensors only. Better: load it once and save it as a state dict or with "
                        f"'save_model'. (torch: {str(exc).splitlines()[0]})"
                    ) from exc
                fmt = "gm-arc-pickle"
                state, opaque = _load_restricted_pickle(p)
                obj = state
                log.info("%s: read with the restricted unpickler; placeholders for %s", p, sorted(opaque))
            state = _unwrap_state(obj)
            if not isinstance(state, Mapping) or not state:
                raise _fail(p, fmt, f"the file holds {type(obj).__name__}, not a state dict of tensors")
            bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise _fail(p, fmt, f"entries that are not tensors: {bad[:_MAX_LISTED]}")
            state = _strip_prefix(state)
            if any(k.startswith("backbone.") for k in state):  # our GestaltMatcher state dict via torch.save
                backbone = _load_insightface(
                    {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}, p, arch
                )
                if "classifier.1.weight" in state:
                    classifier = (state["classifier.1.weight"], state["classifier.1.bias"])
            elif _is_onnx2torch_state(state):
                if fmt == "insightface":
                    fmt = "gm-arc-pt"
                parts = _parts_from_onnx2torch(state, p, fmt)
                classifier = parts.classifier
                backbone = _build_from_fused(parts, p, fmt, arch)
            else:
                if fmt == "gm-arc-pt":
                    fmt = "insightface"
                backbone = _load_insightface(state, p, arch)
        num_classes = None if classifier is None else classifier[0].shape[0]
        model = GestaltMatcher(backbone, num_classes, channel_order=order, config={"source_format": fmt})
        if classifier is not None:
            assert model.classifier is not None
            _load_strict(model.classifier, {"1.weight": classifier[0], "1.bias": classifier[1]}, p, fmt)

    if syndrome_ids is not None:
        ids = (
            read_lookup_table(syndrome_ids)
            if isinstance(syndrome_ids, str | os.PathLike)
            else [str(s) for s in syndrome_ids]
        )
        if model.num_classes is None:
            raise ConfigError(f"{p}: a lookup table was given but the model has no classifier (embedding only)")
        if len(ids) != model.num_classes:
            raise ConfigError(
                f"{p}: the lookup table has {len(ids)} syndromes but the classifier has "
                f"{model.num_classes} outputs; use the lookup table the model was trained with"
            )
        model.syndrome_ids = ids
        model.config["syndrome_ids"] = ids
    model.config["source"] = {"format": fmt, "path": str(p), "sha256": model_sha256(sha_path)}
    if opaque:
        model.config["source"]["pickle_placeholders"] = sorted(opaque)
    return model.to(device).eval()


def check_classes(model: GestaltMatcher, syndrome_ids: Sequence[str], *, exact: bool = False) -> dict[str, int]:
    """Check a model's class list against a cohort's syndromes before any class-dependent work.

    Needed where classes matter (training/fine-tuning, logit targets); embedding-only use never calls it.
    Returns ``{syndrome_id: class index}`` for the cohort's syndromes.

    Parameters
    ----------
    syndrome_ids : the cohort's syndromes (any order).
    exact : require the same set of syndromes (fine-tuning the existing classifier); otherwise every cohort
        syndrome must be one of the model's classes.

    Raises
    ------
    ConfigError : no classifier, no lookup table, or syndromes missing from the model's classes.
    """
    wanted = [str(s) for s in syndrome_ids]
    if model.num_classes is None:
        raise ConfigError(
            "the model has no classifier (embedding-only, e.g. an ONNX member): class-dependent "
            "work (training the classifier as is, logit targets) needs a model with one"
        )
    if model.syndrome_ids is None:
        raise ConfigError(
            f"the model's {model.num_classes} classes have no syndrome ids: pass its lookup table "
            "(load_model(..., syndrome_ids='lookup_table_gmdb_<version>.txt'))"
        )
    index = {s: i for i, s in enumerate(model.syndrome_ids)}
    missing = [s for s in dict.fromkeys(wanted) if s not in index]
    if missing:
        raise ConfigError(
            f"{len(missing)} of the cohort's {len(set(wanted))} syndromes are not classes of the model "
            f"(e.g. {missing[:10]}); use a model trained on these syndromes, or embedding-only methods"
        )
    if exact:
        extra = sorted(set(index) - set(wanted))
        if extra:
            raise ConfigError(
                f"the model has {len(extra)} classes absent from the cohort (e.g. {extra[:10]}); "
                "exact class match is required here"
            )
    return {s: index[s] for s in dict.fromkeys(wanted)}
