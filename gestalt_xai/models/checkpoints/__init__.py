"""Load and save GestaltMatcher models in every format GestaltMatcher-Arc users have.

:func:`load_model` recognises the registered formats (:data:`CHECKPOINT_FORMATS`, one module each):

=================  ==========================================================  ==================  ==============
format id          file                                                        layout              channel order
=================  ==========================================================  ==================  ==============
``gestalt-xai``    ``<id>.safetensors`` + ``<id>.json`` (:func:`save_model`)    native or fused     from the JSON
``insightface``    arcface_torch ``.pth`` backbone ``state_dict``              native              RGB
``gm-arc-pt``      GM-Arc per-epoch ``…_e{N}.pt`` wrapper ``state_dict``        fused (onnx2torch)  RGB (see below)
``onnx``           ``glint360k_r100.onnx`` (initializers read with ``onnx``)   fused               RGB
``gm-arc-pickle``  GM-Arc ``…_last_model.pth`` whole pickled module            fused (onnx2torch)  RGB (see below)
=================  ==========================================================  ==================  ==============

Everything except the ``.onnx`` file and our own safetensors is read with ``torch.load(weights_only=True)``
(:mod:`~.torch_file`). The whole-module pickle needs arbitrary classes to unpickle (which can execute code), so it is
refused unless ``trust_pickle=True`` (a model declaration's ``trust_pickle: true``); even then it goes through
:data:`RestrictedUnpickler`, which rebuilds tensors only and replaces every other class or function by an inert
placeholder, so no code from the file runs.

Modules: :mod:`~.registry` (:class:`CheckpointFormat`, :func:`register_format`), :mod:`~.detect`
(:func:`detect_format`), :mod:`~.load` (:func:`load_model`), one module per format (:mod:`~.own`,
:mod:`~.onnx_graph`, :mod:`~.insightface`, :mod:`~.gmarc_pt`, :mod:`~.gmarc_pickle`), the layouts they share
(:mod:`~.native`, :mod:`~.onnx2torch` with GM-Arc's key mapping, :mod:`~.fused` with the ONNX graph order) and
:mod:`~.classes` (lookup tables, :func:`check_classes`). A new format is one module that calls
:func:`register_format`, imported below; ``tests/test_checkpoint_formats.py`` then tests it through its
``write_example``.

**Channel order.** We default to RGB for every GM-Arc format — the order that reproduces GM-Arc's published
encodings — and record it in ``model.channel_order``; pass ``channel_order="BGR"`` to feed the order GM-Arc's
fine-tuning saw (:mod:`~.gmarc_pt`). insightface's arcface_torch backbones (and so the ``.onnx``) were trained on
RGB.
"""

# isort: off
# The format modules register themselves on import, and registration order is detection order: gestalt-xai and
# onnx by name before the torch files, whose first bytes could look like anything.
from gestalt_xai.models.checkpoints import own  # noqa: F401
from gestalt_xai.models.checkpoints import onnx_graph  # noqa: F401
from gestalt_xai.models.checkpoints import insightface  # noqa: F401
from gestalt_xai.models.checkpoints import gmarc_pt  # noqa: F401
from gestalt_xai.models.checkpoints import gmarc_pickle  # noqa: F401

# isort: on

from gestalt_xai.models.checkpoints.classes import check_classes, read_lookup_table
from gestalt_xai.models.checkpoints.detect import detect_format
from gestalt_xai.models.checkpoints.load import load_model, model_sha256
from gestalt_xai.models.checkpoints.own import FORMAT_VERSION, save_model
from gestalt_xai.models.checkpoints.registry import (
    CHECKPOINT_FORMATS,
    CheckpointFormat,
    FormatId,
    LoadedCheckpoint,
    LoadOptions,
    register_format,
)
from gestalt_xai.models.checkpoints.torch_file import RestrictedUnpickler

__all__ = [
    "CHECKPOINT_FORMATS",
    "FORMAT_VERSION",
    "CheckpointFormat",
    "FormatId",
    "LoadOptions",
    "LoadedCheckpoint",
    "RestrictedUnpickler",
    "check_classes",
    "detect_format",
    "load_model",
    "model_sha256",
    "read_lookup_table",
    "register_format",
    "save_model",
]
