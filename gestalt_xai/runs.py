"""Run folders: one study = one folder, with a manifest, an error table and resumable work units.

A :class:`Run` owns ``manifest.json`` (configuration, package versions, seeds, model hashes, git commit, stage timings
and peak memory) and ``errors.parquet`` (every per-item failure, never silent). Stages record finished work units in a
:class:`Ledger` (an append-only JSON-lines file flushed to disk after every item), write each output to a temporary
name and rename it, and rebuild their tables from the ledger sorted by item id. A run killed at any point therefore
resumes where it stopped, and a rerun with the same configuration and seed reproduces every output byte for byte;
only the ``timing`` entries of the manifest differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from pydantic import BaseModel

log = logging.getLogger(__name__)

__all__ = [
    "Run",
    "Ledger",
    "ErrorRow",
    "StageRecord",
    "ERROR_COLUMNS",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_parquet",
    "seed_everything",
    "progress",
    "progress_bar",
    "ProgressBar",
    "quiet",
    "set_quiet",
    "torch_threads",
    "sha256_file",
]

#: ``key`` holds the failed work unit's structured key (JSON object, sorted keys; "" when the item id says it all)
ERROR_COLUMNS = ["stage", "item_id", "error_kind", "message", "key"]

#: packages whose versions every manifest records
MANIFEST_PACKAGES = (
    "gestalt-xai", "torch", "torchvision", "numpy", "scipy", "pandas", "pyarrow", "scikit-learn", "scikit-image",
    "opencv-python", "opencv-python-headless", "facenet-pytorch", "insightface", "onnx", "captum", "zennit",
    "Pillow", "pydantic", "matplotlib", "seaborn",
)

_QUIET = False
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------- file writing
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    A reader (or a resumed run) never sees a half-written file, even after ``kill -9``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path`` (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    """Atomically write ``df`` as Parquet without the index; the same frame always gives the same bytes."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False, engine="pyarrow", compression="zstd")
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- seeds and progress
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's legacy and torch's global generators (code should still prefer explicit generators)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU threads (a process-wide setting, so it is restored); ``None``: unchanged."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_quiet(quiet: bool) -> None:
    """Silence progress bars (``--quiet``)."""
    global _QUIET
    _QUIET = quiet


def quiet() -> bool:
    """Whether progress display is off (``--quiet`` or ``GESTALT_XAI_QUIET`` set)."""
    return _QUIET or bool(os.environ.get("GESTALT_XAI_QUIET"))


class ProgressBar:
    """Handle of a running progress bar: ``advance(n, status=…)``; does nothing when progress is off."""

    def __init__(self, bar: Any = None, task: Any = None) -> None:
        self._bar, self._task = bar, task

    def advance(self, n: int = 1, status: str | None = None) -> None:
        if self._bar is None:
            return
        fields: dict[str, Any] = {"advance": n}
        if status is not None:
            fields["status"] = status
        self._bar.update(self._task, **fields)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, silent: bool = False) -> Iterator[ProgressBar]:
    """A rich progress bar on stderr with a free-text status column (e.g. live training metrics).

    Silent with ``--quiet``, ``GESTALT_XAI_QUIET`` or ``silent=True``.
    """
    if silent or quiet():
        yield ProgressBar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        yield ProgressBar(bar, bar.add_task(description, total=total, status=""))


def progress(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr (none with ``--quiet``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress_bar(description, total) as bar:
        for item in iterable:
            yield item
            bar.advance()


# ------------------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class ErrorRow:
    """One per-item failure, as stored in ``errors.parquet``.

    ``item_id`` names the input that failed (an image id, a file); ``key`` the work unit when one input has several
    (e.g. ``{"model_id": "m", "target": "centroid:S01", "method": "gradcam"}``), stored as a JSON object.
    """

    stage: str
    item_id: str
    error_kind: str
    message: str
    key: Mapping[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, str]:
        """The row as ``errors.parquet`` stores it."""
        key = json.dumps(dict(self.key), sort_keys=True, default=str) if self.key else ""
        return {"stage": self.stage, "item_id": str(self.item_id), "error_kind": self.error_kind,
                "message": self.message, "key": key}


@dataclass
class StageRecord:
    """What a stage reports about itself while it runs; written to the manifest when the stage ends."""

    name: str
    n_items: int = 0
    n_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Ledger:
    """Append-only record of finished work units of one stage (a JSON-lines file).

    Each :meth:`add` appends one line and fsyncs it, so the ledger survives ``kill -9``; a torn last line is ignored
    when reading. Records carry an ``ok`` flag: :meth:`done` returns only successful items (failed ones are retried
    on the next run, in case the user fixed the input).
    """

    def __init__(self, path: str | Path, fingerprint: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        #: records made under another fingerprint (another configuration) do not count as done
        self.fingerprint = fingerprint

    def records(self) -> dict[str, dict[str, Any]]:
        """Latest record per item id."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return out
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn write of a killed run: that item was not finished
                out[entry["item_id"]] = entry
        return out

    def done(self) -> dict[str, dict[str, Any]]:
        """Records of the items that finished successfully."""
        return {k: v for k, v in self.records().items()
                if v.get("ok", True) and (self.fingerprint is None or v.get("_fp") == self.fingerprint)}

    def add(self, item_id: str, record: dict[str, Any], ok: bool = True) -> None:
        """Record that ``item_id`` finished (its outputs must already be written)."""
        entry = {"item_id": str(item_id), "ok": bool(ok), **record}
        if self.fingerprint is not None:
            entry["_fp"] = self.fingerprint
        line = (json.dumps(entry, sort_keys=True, default=_json_default) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # close a line torn by a killed run, so this record stays readable
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def reset(self) -> None:
        """Forget every recorded item (used when a stage's configuration changed)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in MANIFEST_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    """Commit of the gestalt-xai source tree, when it is a git checkout (no network involved)."""
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _peak_memory_mb() -> float:
    # ru_maxrss is in KiB on Linux: the process' peak resident set so far
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


# ---------------------------------------------------------------------------------------------------------- Run
class Run:
    """A study folder (``runs/<name>/``) with its manifest, error table and per-stage subfolders.

    Parameters
    ----------
    path:
        The run folder; created if missing. An existing folder is reopened and its manifest kept.

    Examples
    --------
    >>> import tempfile
    >>> run = Run(tempfile.mkdtemp())
    >>> with run.stage("demo", {"size": 3}, seed=0) as st:
    ...     st.n_items = 2
    >>> run.manifest["stages"]["demo"]["n_items"]
    2
    """

    MANIFEST = "manifest.json"
    ERRORS = "errors.parquet"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self._manifest = self._read_manifest()
        #: appended to manifest stage names while a pipeline runs the same stage again ("#2", …)
        self.stage_suffix = ""
        if not (self.path / self.ERRORS).exists():
            write_parquet(pd.DataFrame({c: pd.Series(dtype="string") for c in ERROR_COLUMNS}), self.path / self.ERRORS)

    # -- folders -------------------------------------------------------------------------------------------
    def dir(self, name: str) -> Path:
        """Return (and create) the subfolder ``name`` of the run."""
        d = self.path / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def ledger(self, stage: str, config: BaseModel | dict[str, Any] | None = None,
               ignore: tuple[str, ...] = ()) -> Ledger:
        """The work-unit ledger of ``stage`` (``.ledger/<stage>.jsonl``).

        With ``config``, finished items count as done only if they were made with the same options (fields named
        in ``ignore``, such as worker counts, do not matter), so a rerun with changed options recomputes them.
        """
        fp = None
        if config is not None:
            data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
            data = {k: v for k, v in data.items() if k not in ignore}
            fp = hashlib.sha256(json.dumps(data, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]
        return Ledger(self.path / ".ledger" / f"{stage}.jsonl", fingerprint=fp)

    # -- manifest ------------------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as last written."""
        return json.loads(json.dumps(self._manifest))

    def _read_manifest(self) -> dict[str, Any]:
        p = self.path / self.MANIFEST
        if p.exists():
            return json.loads(p.read_text(encoding="utf-8"))
        return {"stages": {}, "models": {}}

    def _write_manifest(self) -> None:
        m = self._manifest
        m["gestalt_xai_version"] = _package_versions()["gestalt-xai"]
        m["packages"] = _package_versions()
        m["python"] = sys.version.split()[0]
        m["platform"] = f"{platform.system()}-{platform.machine()}"
        m["git_commit"] = _git_commit()
        text = json.dumps(m, indent=2, sort_keys=True, default=_json_default) + "\n"
        atomic_write_text(self.path / self.MANIFEST, text)

    def set_study(self, name: str, seed: int, config: dict[str, Any]) -> None:
        """Record the pipeline (study) definition this run follows."""
        self._manifest["study"] = {"name": name, "seed": seed, "config": config}
        self._write_manifest()

    def record_model(self, model_id: str, sha256: str, info: dict[str, Any] | None = None) -> None:
        """Record a model's content hash and description under ``manifest["models"][model_id]``."""
        self._manifest.setdefault("models", {})[model_id] = {"sha256": sha256, **(info or {})}
        self._write_manifest()

    @contextlib.contextmanager
    def stage(self, name: str, cfg: BaseModel | dict[str, Any] | None = None,
              seed: int | None = None) -> Iterator[StageRecord]:
        """Context manager around one stage: records options, seed, counts, timings and peak memory.

        The stage's entry is written as ``running`` first, then ``done`` or ``failed`` (with the error message), so an
        interrupted run is visible in the manifest.
        """
        config = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg or {})
        name = name + self.stage_suffix
        if seed is None and isinstance(config.get("seed"), int):
            seed = config["seed"]
        record = StageRecord(name=name)
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"config": config, "seed": seed, "status": "running",
                                 "timing": {"started": started.isoformat(timespec="seconds")}}
        self._manifest.setdefault("stages", {})[name] = entry
        self._write_manifest()
        status, message = "done", None
        try:
            yield record
        except BaseException as exc:
            status, message = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            entry.update({"status": status, "n_items": record.n_items, "n_errors": record.n_errors, **record.extra})
            if message:
                entry["error"] = message
            entry["timing"] = {
                "started": started.isoformat(timespec="seconds"),
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - t0, 3),
                "peak_memory_mb": _peak_memory_mb(),
            }
            self._write_manifest()

    # -- errors --------------------------------------------------------------------------------------------
    def errors(self) -> pd.DataFrame:
        """All per-item failures recorded so far."""
        return pd.read_parquet(self.path / self.ERRORS)

    def write_errors(self, stage: str, rows: Iterable[ErrorRow] | pd.DataFrame) -> None:
        """Replace ``stage``'s rows of ``errors.parquet`` with ``rows`` (sorted, so reruns give the same bytes)."""
        if isinstance(rows, pd.DataFrame):
            new = rows
        else:
            new = pd.DataFrame([r.as_record() for r in rows], columns=ERROR_COLUMNS)
        new = new.assign(stage=stage).reindex(columns=ERROR_COLUMNS).fillna("")
        old = self.errors().reindex(columns=ERROR_COLUMNS).fillna("")
        table = pd.concat([old[old["stage"] != stage], new], ignore_index=True)
        table = table.astype("string").sort_values(["stage", "item_id", "key"], kind="stable").reset_index(drop=True)
        write_parquet(table, self.path / self.ERRORS)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"
