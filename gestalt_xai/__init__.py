"""gestalt-xai: explain facial syndrome classifiers (GestaltMatcher-style).

Stages: align → embed/match → explain → aggregate → assess/experiments → export. Each stage is one module with one
entry function ``<stage>_stage(run, cfg)``, one CLI subcommand and one folder in a run directory.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gestalt-xai")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
