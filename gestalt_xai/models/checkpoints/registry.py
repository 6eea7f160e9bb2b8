"""The checkpoint format registry: each format declares how it is recognised, read and exemplified.

A format is one module that builds a :class:`CheckpointFormat` and passes it to :func:`register_format`; the package
``__init__`` imports the format modules, and their import order is the order :func:`~.detect.detect_format` asks
them in. :func:`~.load.load_model` dispatches on :data:`CHECKPOINT_FORMATS` only, and the contract test
(``tests/test_checkpoint_formats.py``) runs every registered format through ``write_example`` → detect → load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gestalt_xai.errors import CheckpointError
from gestalt_xai.models.gestaltmatcher import ChannelOrder, GestaltMatcher
from gestalt_xai.registry import Registry

__all__ = [
    "CHECKPOINT_FORMATS",
    "CheckpointFormat",
    "FormatId",
    "LoadOptions",
    "LoadedCheckpoint",
    "checkpoint_error",
    "register_format",
]

FormatId = Literal["gestalt-xai", "insightface", "gm-arc-pt", "onnx", "gm-arc-pickle"]


@dataclass(frozen=True)
class LoadOptions:
    """What :func:`~.load.load_model` passes on to a format's reader (see its parameters)."""

    arch: str | None = None
    channel_order: ChannelOrder | None = None
    trust_pickle: bool = False


@dataclass
class LoadedCheckpoint:
    """A format reader's result.

    Attributes
    ----------
    model : the model (on CPU).
    format : the format that holds it. A torch file is told apart by its contents while it is read, so this may
        differ from the format the reader was asked for (a ``.pth`` of onnx2torch keys is ``gm-arc-pt``, a
        whole pickled module ``gm-arc-pickle``).
    weights : the file whose SHA-256 identifies the model.
    placeholders : globals of a pickle that the restricted unpickler replaced by placeholders.
    """

    model: GestaltMatcher
    format: str
    weights: Path
    placeholders: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format.

    Attributes
    ----------
    name : the format id (``load_model(format=…)``, CLI ``--format``, ``model.config["source"]["format"]``).
    description : what the file looks like, for error messages.
    detect : ``detect(path, head)`` — is this file of this format, judged from its name and first bytes (``head``
        is ``None`` when there is no such file)? Nothing is unpickled.
    load : ``load(path, options) -> LoadedCheckpoint``.
    write_example : ``write_example(model, folder) -> path`` writes ``model`` (a :class:`GestaltMatcher` with a
        classifier) in this format, as the tools that make such files do; for tests.
    stores_classifier : the format holds the classifier head (else embedding only).
    needs_trust_pickle : reading it requires ``trust_pickle=True``.
    """

    name: str
    description: str
    detect: Callable[[Path, bytes | None], bool]
    load: Callable[[Path, LoadOptions], LoadedCheckpoint]
    write_example: Callable[[GestaltMatcher, Path], Path]
    stores_classifier: bool = True
    needs_trust_pickle: bool = False


#: every registered format by name, in detection order
CHECKPOINT_FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format")


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    """Add ``fmt`` to :data:`CHECKPOINT_FORMATS` (after the formats registered before it); returns it."""
    CHECKPOINT_FORMATS.add(fmt.name, fmt)
    return fmt


def checkpoint_error(path: Path | str, fmt: str, problem: str) -> CheckpointError:
    """``CheckpointError("<path>: expected <description of fmt>; <problem>")``."""
    described = CHECKPOINT_FORMATS.get(fmt, None)
    return CheckpointError(f"{path}: expected {described.description if described else fmt}; {problem}")
