"""One exception hierarchy for the toolkit.

Every error raised on purpose by gestalt-xai derives from :class:`GestaltXAIError`. Messages name the file or field
concerned and say what to do, so that a per-item failure can be written to ``errors.parquet`` as it is.
"""

from __future__ import annotations


class GestaltXAIError(Exception):
    """Base class of all errors raised on purpose by gestalt-xai."""

    #: short machine-readable kind written to ``errors.parquet``
    kind = "error"


class InputError(GestaltXAIError):
    """An input file or table is missing, unreadable, unsafe or malformed."""

    kind = "input"


class DetectionError(InputError):
    """No usable face was found in a photo."""

    kind = "no_face"


class ConfigError(GestaltXAIError):
    """A configuration value is wrong; raised before any work starts."""

    kind = "config"


class CheckpointError(GestaltXAIError):
    """A model checkpoint cannot be recognised or loaded."""

    kind = "checkpoint"


def error_kind(exc: BaseException) -> str:
    """Return the short kind recorded for ``exc`` in ``errors.parquet``.

    >>> error_kind(DetectionError("no face"))
    'no_face'
    >>> error_kind(ValueError("x"))
    'ValueError'
    """
    if isinstance(exc, GestaltXAIError):
        return exc.kind
    return type(exc).__name__
