"""The ``gm-arc-pt`` format: GestaltMatcher-Arc's per-epoch ``…_e{N}.pt`` wrapper ``state_dict`` (onnx2torch names).

GM-Arc's ``MyArcFace`` (``lib/models/my_arcface.py``) holds the onnx2torch conversion of insightface's ONNX backbone
as ``base``, its ``Gemm`` and last ``BatchNormalization`` as ``features`` and ``classifier = Sequential(Dropout,
Linear(512, C))``; the keys are read by :mod:`~.onnx2torch`. :class:`GMArcWrapper` rebuilds that module from an
ONNX file (for examples and tests; it needs the ``onnx2torch`` package).

**Channel order.** GM-Arc's inference (``lib/encode.py``) reads photos with OpenCV and converts BGR → RGB, but its
training dataset (``GestaltMatcherDataset``) feeds ``cv2.imread`` output (BGR) without conversion, so the fine-tuned
``.pt``/``.pth`` weights were trained on BGR input while GM-Arc evaluates them on RGB. We default to RGB for every
GM-Arc format — the order that reproduces GM-Arc's published encodings — and record it in ``model.channel_order``;
pass ``channel_order="BGR"`` to feed the order the fine-tuning saw.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from gestalt_xai.models.checkpoints.onnx_graph import export_onnx
from gestalt_xai.models.checkpoints.registry import CheckpointFormat, LoadedCheckpoint, LoadOptions, register_format
from gestalt_xai.models.checkpoints.torch_file import load_torch_file
from gestalt_xai.models.gestaltmatcher import GestaltMatcher

__all__ = ["GM_ARC_PT", "GMArcWrapper", "gmarc_wrapper_of"]

NAME = "gm-arc-pt"


class GMArcWrapper(nn.Module):
    """GM-Arc's ``MyArcFace`` structure: the onnx2torch ``base`` cut after the flatten, ``features`` = the Gemm and
    the last BatchNorm taken out of ``base``, and ``classifier`` (GM-Arc: ``Sequential(Dropout, Linear(512, C))``).

    ``forward(x) -> (logits, representations)`` as GM-Arc's.
    """

    def __init__(self, onnx_path: Path, classifier: nn.Module) -> None:
        import onnx2torch

        super().__init__()
        self.base = onnx2torch.convert(str(onnx_path))
        bns = sorted(
            (n for n, _ in self.base.named_children() if n.startswith("BatchNormalization")),
            key=lambda n: int(n.rsplit("_", 1)[1]) if "_" in n else 0,
        )
        gemm_name, bn_name = "Gemm", bns[-1]
        self.features = nn.Sequential()
        self.features.add_module(gemm_name, self.base.get_submodule(gemm_name))
        self.features.add_module(bn_name, self.base.get_submodule(bn_name))
        graph = self.base.graph
        flatten = next(n for n in graph.nodes if n.op == "call_module" and n.target.startswith("Flatten"))
        output = next(n for n in graph.nodes if n.op == "output")
        output.args = (flatten,)
        graph.eliminate_dead_code()
        graph.lint()
        self.base.recompile()
        self.base.delete_submodule(gemm_name)
        self.base.delete_submodule(bn_name)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        representations = self.features(self.base(x))
        return self.classifier(representations), representations


def gmarc_wrapper_of(model: GestaltMatcher, folder: Path) -> GMArcWrapper:
    """``model`` as GM-Arc holds it: its backbone exported to ONNX in ``folder`` and converted, its classifier."""
    if model.classifier is None:
        raise ValueError("a GM-Arc wrapper needs a model with a classifier")
    onnx_path = export_onnx(model.backbone, folder / "gmarc_base.onnx")
    return GMArcWrapper(onnx_path, copy.deepcopy(model.classifier)).eval()


def _detect(path: Path, head: bytes | None) -> bool:
    return head is not None and path.suffix == ".pt"


def _load(path: Path, options: LoadOptions) -> LoadedCheckpoint:
    return load_torch_file(path, NAME, options)


def _write_example(model: GestaltMatcher, folder: Path) -> Path:
    path = folder / "s1_example_e1.pt"
    torch.save(gmarc_wrapper_of(model, folder).state_dict(), path)
    return path


GM_ARC_PT = register_format(
    CheckpointFormat(
        name=NAME,
        description="GestaltMatcher-Arc per-epoch state_dict (.pt: base.Conv_i, base.BatchNormalization_j, "
        "base.initializers.onnx_initializer_k, features.Gemm_0, features.BatchNormalization_25|50, classifier.1)",
        detect=_detect,
        load=_load,
        write_example=_write_example,
    )
)
