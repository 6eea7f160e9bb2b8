"""Stage-instance fingerprints: what a stage instance ran on, so an unchanged instance is skipped in milliseconds.

A finished instance records in its manifest entry (:meth:`gestalt_xai.stages.Stage.__call__`):

``fingerprint``
    a hash of the stage name, its validated options, the gestalt-xai version and the state of its *inputs*: the
    run paths it reads (the stage's declared ``reads`` plus every ``{run}/…`` path in its options) and every file or
    folder outside the run its options name. A path's state is the relative name, size and ``st_mtime_ns`` of each
    file under it (a stat walk: no file is opened), so a rewritten input changes it and an untouched one does not.
``declared_outputs`` and ``outputs_token``
    the run paths it writes (the stage's ``writes`` plus the paths of :attr:`StageResult.outputs`) and the same kind
    of hash over their state. Several instances may write into one folder (every ``explain`` into ``maps/``): when
    one of them runs, the tokens of the others that write there are brought up to date
    (:func:`refresh_overlapping`), so only a change made outside the runner counts as a change.

The study runner skips an instance whose recorded fingerprint equals the one computed now and whose declared outputs
all exist (status ``skipped: unchanged``). Before the first stage runs it marks *stale* every instance whose outputs
are missing or changed since the last run (:func:`invalidate_changed`), so deleting a stage's outputs reruns that
stage, and the stages that read them see changed inputs and rerun too; nothing else does. It is the rule build
tools apply to recorded inputs and outputs (DVC's ``dvc.lock`` hashes of a stage's ``deps`` and ``outs``, Snakemake's
rerun triggers on changed parameters, code and input files), with file stats in place of content hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gestalt_xai.config import RUN_VARIABLE

__all__ = ["StageInputs", "SKIPPED_UNCHANGED", "invalidate_changed", "overlaps", "path_token", "refresh_overlapping",
           "recorded_outputs", "reusable"]

#: the manifest status of an instance skipped because nothing it depends on changed
SKIPPED_UNCHANGED = "skipped: unchanged"
#: statuses whose recorded fingerprint and outputs can be reused
_REUSABLE = {"done", SKIPPED_UNCHANGED}
_RUN_PREFIX = "{" + RUN_VARIABLE + "}"


def _walk(path: Path, name: str) -> list[Any]:
    """``[name, size, mtime_ns]`` of a file, of every file under a folder (sorted), or ``[name, "missing"]``."""
    try:
        st = path.stat()
    except OSError:
        return [[name, "missing"]]
    if not path.is_dir():
        return [[name, st.st_size, st.st_mtime_ns]]
    out: list[Any] = [[name, "dir"]]
    for root, dirs, files in os.walk(path):
        dirs.sort()
        rel = Path(root).relative_to(path).as_posix()
        for f in sorted(files):
            if f.startswith(".") and f.endswith(".tmp"):  # an atomic write in progress (gestalt_xai.files)
                continue
            try:
                fst = os.stat(os.path.join(root, f))
            except OSError:
                continue
            out.append([f"{name}/{f}" if rel == "." else f"{name}/{rel}/{f}", fst.st_size, fst.st_mtime_ns])
    return out


def path_token(root: Path | None, paths: Iterable[str]) -> str:
    """A short hash of the state (names, sizes, mtimes) of ``paths``: relative to ``root``, or absolute if ``None``.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_text("x")
    >>> before = path_token(d, ["a.txt", "b"])
    >>> before == path_token(d, ["b", "a.txt"]), before == path_token(d, ["a.txt"])
    (True, False)
    """
    entries = [e for p in sorted(set(paths)) for e in _walk(root / p if root is not None else Path(p), p)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def overlaps(a: str, b: str) -> bool:
    """Whether run paths ``a`` and ``b`` are the same or one lies inside the other.

    >>> overlaps("maps", "maps/effects.parquet"), overlaps("aligned/atlas.png", "aligned/alignment.parquet")
    (True, False)
    """
    a, b = a.strip("/"), b.strip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


@dataclass(frozen=True)
class StageInputs:
    """What a stage instance reads: run paths (relative) and paths outside the run its options name (absolute)."""

    stage: str
    options: Mapping[str, Any]
    reads: tuple[str, ...]
    external: tuple[str, ...]

    @classmethod
    def of(cls, stage: str, declared_reads: Sequence[str], options: Mapping[str, Any], run_path: Path) -> StageInputs:
        """The inputs of a stage with ``declared_reads`` and JSON ``options`` in the run at ``run_path``.

        An option string ``{run}/x`` reads the run path ``x``; a string naming an existing file or folder (it has a
        ``/``) reads it, as a run path when it lies in the run.
        """
        reads, external = set(declared_reads), set()
        for text in _strings(options):
            if text == _RUN_PREFIX or text.startswith(_RUN_PREFIX + "/"):
                rel = text[len(_RUN_PREFIX):].strip("/")
                if rel and RUN_VARIABLE not in rel:
                    reads.add(rel)
                continue
            if "/" not in text and os.sep not in text or "{" in text:
                continue
            p = Path(text).expanduser()
            if not p.exists():
                continue
            p = p.resolve()
            try:
                reads.add(p.relative_to(run_path).as_posix())
            except ValueError:
                external.add(str(p))
        return cls(stage, options, tuple(sorted(r for r in reads if r)), tuple(sorted(external)))

    def fingerprint(self, run_path: Path, version: str | None) -> str:
        """The hash of the stage, its options, the code version and the inputs' state now."""
        data = {"stage": self.stage, "options": self.options, "version": version,
                "reads": path_token(run_path, self.reads),
                "external": path_token(None, self.external) if self.external else ""}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded_outputs(entry: Mapping[str, Any]) -> list[str]:
    """The run paths a finished instance declared as its outputs (its manifest entry's ``declared_outputs``)."""
    return list(entry.get("declared_outputs") or [])


def reusable(entry: Mapping[str, Any] | None, fingerprint: str, run_path: Path) -> bool:
    """Whether a recorded instance can be skipped: it finished, with this fingerprint, and its outputs all exist."""
    if not entry or entry.get("status") not in _REUSABLE or entry.get("fingerprint") != fingerprint:
        return False
    outputs = recorded_outputs(entry)
    return bool(outputs) and all((run_path / p).exists() for p in outputs)


def refresh_overlapping(run: Any, instance: str, outputs: Sequence[str]) -> list[str]:
    """After ``instance`` wrote ``outputs``: bring the ``outputs_token`` of every other reusable instance that writes
    into the same paths up to date (their own outputs are not changed by it). Returns the instances refreshed."""
    refreshed = []
    for other, entry in run.manifest.get("stages", {}).items():
        theirs = recorded_outputs(entry)
        if other == instance or entry.get("status") not in _REUSABLE or "outputs_token" not in entry:
            continue
        if any(overlaps(a, b) for a in outputs for b in theirs):
            run.update_stage(other, outputs_token=path_token(run.path, theirs))
            refreshed.append(other)
    return refreshed


def invalidate_changed(run: Any, instances: Iterable[str]) -> dict[str, str]:
    """Mark stale every one of ``instances`` whose recorded outputs are missing or changed since it (or a stage
    writing into the same folders) last ran; returns instance → reason. Done before the first stage of a study runs,
    so a rerun interrupted half-way still knows what it has to redo."""
    stale = {}
    stages = run.manifest.get("stages", {})
    for instance in instances:
        entry = stages.get(instance)
        if not entry or entry.get("status") not in _REUSABLE or "fingerprint" not in entry:
            continue
        outputs = recorded_outputs(entry)
        missing = [p for p in outputs if not (run.path / p).exists()]
        if missing:
            reason = f"outputs missing: {', '.join(missing)}"
        elif entry.get("outputs_token") != path_token(run.path, outputs):
            reason = "outputs changed since it ran"
        else:
            continue
        run.update_stage(instance, status=f"stale ({reason})", fingerprint=None)
        stale[instance] = reason
    return stale
