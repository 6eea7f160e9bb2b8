"""The work-unit ledger of a stage instance: an append-only JSON-lines file that survives ``kill -9``.

Stages reach it through :meth:`gestalt_xai.runs.Run.ledger` (which keys it by the running instance and fingerprints
it with the stage's options); :mod:`gestalt_xai.runs` re-exports :class:`Ledger`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

__all__ = ["Ledger"]


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
