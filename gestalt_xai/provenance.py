"""Provenance a run's manifest records (:class:`~gestalt_xai.runs.Run`): package versions, the source commit, memory
(of this process, and of the whole process tree while a study runs: :class:`ProcessTreeMemory`), folder sizes."""

from __future__ import annotations

import functools
import logging
import os
import resource
import subprocess
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_PACKAGES", "ProcessTreeMemory", "folder_size_mb", "git_commit", "package_versions",
           "peak_memory_mb", "rusage_peaks_mb"]

#: packages whose versions every manifest records
MANIFEST_PACKAGES = (
    "gestalt-xai", "torch", "torchvision", "numpy", "scipy", "pandas", "pyarrow", "scikit-learn", "scikit-image",
    "opencv-python", "opencv-python-headless", "facenet-pytorch", "insightface", "onnx", "captum", "zennit",
    "Pillow", "pydantic", "matplotlib", "seaborn",
)


def package_versions() -> dict[str, str | None]:
    """Installed version of each of :data:`MANIFEST_PACKAGES` (``None`` when it is not installed)."""
    return dict(_package_versions())


@functools.cache
def _package_versions() -> dict[str, str | None]:  # looked up once per process: every manifest write records them
    out: dict[str, str | None] = {}
    for name in MANIFEST_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def git_commit() -> str | None:
    """Commit of the gestalt-xai source tree, when it is a git checkout (no network involved; asked once per
    process)."""
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


def rusage_peaks_mb() -> dict[str, float]:
    """``getrusage``'s peak resident set of this process (``self``) and of the largest of its finished, waited-for
    child processes (``children``), in MiB. Neither counts processes that run at the same time together, and a
    forked child's peak includes the parent's pages it shared at the fork (Linux keeps it across ``exec``)."""
    return {"self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
            "children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1)}


def folder_size_mb(path: str | Path) -> float:
    """The summed size of the files under ``path`` (their apparent size, as ``du --apparent-size``), in MiB."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                continue
    return round(total / 2**20, 1)


class ProcessTreeMemory:
    """The peak of the summed resident memory of this process and all its descendants (worker pools, Ray workers,
    subprocesses), sampled with psutil by a background thread while the ``with`` block runs.

    ``RUSAGE_SELF`` sees this process only and ``RUSAGE_CHILDREN`` only the largest finished child, so neither
    measures a pool of workers running together; the sample does, up to what lives shorter than ``interval``. RSS
    counts pages shared between processes (a forked worker's copy-on-write pages) once per process, so the sum is an
    upper bound of the memory the tree needs.

    Examples
    --------
    >>> with ProcessTreeMemory(interval=0.05) as mem:
    ...     block = bytearray(b"x" * (64 * 2**20))
    >>> mem.peak_mb >= 64
    True
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        #: peak of this process' and its descendants' summed RSS, and of the descendants' alone (MiB)
        self.peak_mb = 0.0
        self.peak_children_mb = 0.0
        self._window_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> float:
        """Take one sample now (also done by the thread); returns the tree's summed RSS in MiB."""
        import psutil

        me = psutil.Process()
        own = me.memory_info().rss
        children = 0
        for child in me.children(recursive=True):
            try:
                children += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        total = (own + children) / 2**20
        self.peak_mb = max(self.peak_mb, round(total, 1))
        self.peak_children_mb = max(self.peak_children_mb, round(children / 2**20, 1))
        self._window_mb = max(self._window_mb, round(total, 1))
        return total

    def window(self) -> float:
        """The peak since the last call (e.g. of one stage), and start a new window."""
        self.sample()
        peak, self._window_mb = self._window_mb, 0.0
        return peak

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a failed sample must not end a study
                log.debug("memory sample failed: %s", exc)

    def __enter__(self) -> ProcessTreeMemory:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="gestalt-xai-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
