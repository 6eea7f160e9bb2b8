"""Provenance a run's manifest records (:class:`~gestalt_xai.runs.Run`): package versions, the source commit, memory."""

from __future__ import annotations

import resource
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["MANIFEST_PACKAGES", "package_versions", "git_commit", "peak_memory_mb"]

#: packages whose versions every manifest records
MANIFEST_PACKAGES = (
    "gestalt-xai", "torch", "torchvision", "numpy", "scipy", "pandas", "pyarrow", "scikit-learn", "scikit-image",
    "opencv-python", "opencv-python-headless", "facenet-pytorch", "insightface", "onnx", "captum", "zennit",
    "Pillow", "pydantic", "matplotlib", "seaborn",
)


def package_versions() -> dict[str, str | None]:
    """Installed version of each of :data:`MANIFEST_PACKAGES` (``None`` when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in MANIFEST_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """Commit of the gestalt-xai source tree, when it is a git checkout (no network involved)."""
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def peak_memory_mb() -> float:
    """This process' peak resident memory so far, in MiB."""
    # ru_maxrss is in KiB on Linux: the process' peak resident set so far
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
