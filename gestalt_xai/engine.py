"""Work units and the engines that run them: in this process, in a local process pool, or as Ray tasks.

A stage that has more work than one process should do splits it into :class:`WorkUnit` s (a variant × seed training
of the imbalance experiment, a shard of the explain stage's batches) and hands them to :func:`run_units`. Each unit is
a module-level function ``function(payload, ctx) -> dict`` that writes its outputs into its own folder ``ctx.out``
and returns a small JSON record; it must be deterministic given its payload and thread count.

**Commit.** A unit writes into a temporary sibling of its output folder (``<out>.tmp-engine``); only when the
function returns does the driver rename that folder to ``unit.out`` (one atomic rename on the run's filesystem) and
append the unit to the stage instance's :class:`~gestalt_xai.runs.Ledger`. A unit killed at any point therefore
leaves at most a temporary folder (removed on the next try) and is run again; a finished unit is never run again
while its ledger record (same ``digest``: the caller's hash of what the unit computes) and its folder exist.

**Failures.** A unit that raises becomes one :class:`~gestalt_xai.runs.ErrorRow` (``item_id`` the unit id, ``key``
the unit's key) and a failed ledger record; the other units finish. A worker process that dies (killed, out of
memory) is a failure of its unit only: Ray reruns such a unit up to ``retries`` times (Ray's ``max_retries`` counts
system failures only, never an exception of the unit), a broken local pool marks its unfinished units failed.

**Engines** (:class:`EngineConfig`, the options a stage mixes in):

* ``local`` with ``workers: 1`` — the units one after the other in this process (the default);
* ``local`` with ``workers: N`` — a pool of ``N`` spawned processes (``concurrent.futures``; spawned, not forked, so
  no torch thread pool is inherited half-initialised);
* ``ray`` — each unit a Ray task with ``num_cpus`` = its threads and ``memory`` = its declared peak (Ray's
  scheduler places it; Moritz et al., "Ray: a distributed framework for emerging AI applications", OSDI 2018). The
  driver connects to ``ray_address`` or ``RAY_ADDRESS`` (an existing cluster) or, with neither, starts a Ray instance
  on this machine bound to the loopback address with usage statistics off, and shuts it down afterwards. A Ray
  instance already initialised in the process (``ray.init`` by a test or a notebook) is used as it is. Ray
  starts its workers with ``OMP_NUM_THREADS=1`` unless a task says otherwise; every unit here sets torch's intra-op
  threads to its own ``threads`` before it runs, in every engine, because CPU results depend on the thread count
  (the order of floating-point reductions), so a unit gives the same bytes on any engine.

  With ``ship_results: true`` a Ray worker writes into a temporary folder of its own machine and returns the
  folder's files through Ray's object store; the driver writes them. Workers then need read access to the run's
  inputs only (a copy at the same path); without it the run folder must be on a filesystem every node mounts at
  the same path.

Same units, same thread counts → the same files, whichever engine ran them; callers that combine units' outputs do
so in a fixed order (by unit id, or as the caller lists them), never in completion order.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from gestalt_xai.config import StageConfig
from gestalt_xai.errors import ConfigError, error_kind
from gestalt_xai.runs import ErrorRow, Ledger, Run, torch_threads

log = logging.getLogger(__name__)

__all__ = ["ENGINE_FIELDS", "EngineConfig", "UnitContext", "UnitOutcome", "WorkUnit", "digest", "run_units"]

#: the options of :class:`EngineConfig`: they change where units run, never a number (ledger fingerprints skip them)
ENGINE_FIELDS = ("engine", "workers", "ray_address", "ship_results", "retries")
_TMP_SUFFIX = ".tmp-engine"


class EngineConfig(StageConfig):
    """Options of a stage whose work units run through :mod:`gestalt_xai.engine` (mixed into its options)."""

    engine: Literal["local", "ray"] = Field("local", description="local: this machine (in this process, or a "
                                            "process pool with workers > 1); ray: Ray tasks (a local instance, or "
                                            "the cluster at ray_address / RAY_ADDRESS)")
    workers: int = Field(1, ge=1, description="local engine: units at once (1: one after the other in this process); "
                                              "a local Ray instance gets workers × unit threads CPUs")
    ray_address: str | None = Field(None, description="ray: address of an existing cluster (default: the "
                                                      "RAY_ADDRESS environment variable, else a local instance)")
    ship_results: bool = Field(False, description="ray: return units' output files to the driver through Ray's "
                                                  "object store (no shared filesystem needed for outputs)")
    retries: int = Field(1, ge=0, description="ray: reruns of a unit whose worker process died (an exception of the "
                                              "unit itself is never retried: it is an error row)")


@dataclass(frozen=True)
class WorkUnit:
    """One unit of work.

    Attributes
    ----------
    unit_id: unique within the stage instance (the ledger item and the error row's ``item_id``).
    function: a module-level function ``(payload, ctx) -> dict`` (importable by name in a worker).
    payload: its picklable argument.
    out: the unit's output folder (inside the run); committed whole when the function returns.
    digest: what the unit computes (e.g. :func:`digest` of its options and inputs): a ledger record with another
        digest does not count as done.
    threads: torch CPU threads the unit runs with (and Ray's ``num_cpus`` for it).
    memory_mb: its peak memory, declared to Ray's scheduler (0: undeclared).
    key: the structured key of its error row.
    needs: paths inside ``out`` a finished unit must still have to count as done (e.g. outputs the caller deletes
        once it has used them, and needs again when it must use them again).
    """

    unit_id: str
    function: Callable[[Any, UnitContext], dict[str, Any]]
    payload: Any
    out: Path
    digest: str = ""
    threads: int = 1
    memory_mb: int = 0
    key: Mapping[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class UnitContext:
    """What a unit's function gets besides its payload: its id, the run folder, where to write, its threads."""

    unit_id: str
    run_path: Path
    out: Path
    threads: int


@dataclass
class UnitOutcome:
    """How one unit ended: ``status`` is ``done`` (ran now), ``reused`` (finished earlier) or ``failed``."""

    unit_id: str
    status: Literal["done", "reused", "failed"]
    record: dict[str, Any] = field(default_factory=dict)
    error: ErrorRow | None = None
    seconds: float = 0.0


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable ``parts`` (sorted keys), for :attr:`WorkUnit.digest`.

    >>> digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1})
    True
    """
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- inside a worker
def _execute(unit: WorkUnit, run_path: Path, out: Path) -> dict[str, Any]:
    """Run ``unit`` writing into ``out`` (a fresh folder), pinned to its thread count; its record."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ctx = UnitContext(unit.unit_id, run_path, out, unit.threads)
    with torch_threads(unit.threads):
        record = unit.function(unit.payload, ctx)
    if not isinstance(record, dict):
        raise TypeError(f"unit {unit.unit_id}: {getattr(unit.function, '__name__', unit.function)} returned "
                        f"{type(record).__name__}, not a dict")
    return record


def _guarded(unit: WorkUnit, run_path: Path, out: Path) -> tuple[str, Any, float]:
    """``("ok", record, seconds)`` or ``("error", (kind, message), seconds)``: a unit's exception travels back as
    data, so an engine never mistakes it for a dead worker."""
    t0 = time.perf_counter()
    try:
        return "ok", _execute(unit, run_path, out), time.perf_counter() - t0
    except Exception as exc:  # a failed unit is an error row; the others go on
        log.debug("unit %s failed:\n%s", unit.unit_id, traceback.format_exc())
        return "error", (error_kind(exc), f"{type(exc).__name__}: {exc}"), time.perf_counter() - t0


def _guarded_shipped(unit: WorkUnit, run_path: Path) -> tuple[str, Any, float, bytes]:
    """:func:`_guarded` writing into a temporary folder of the worker's machine; its files come back as a tar."""
    with tempfile.TemporaryDirectory(prefix="gestalt-xai-unit-") as tmp:
        out = Path(tmp) / "out"
        status, value, seconds = _guarded(unit, run_path, out)
        buf = io.BytesIO()
        if status == "ok":
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for p in sorted(out.rglob("*")):
                    if p.is_file():
                        tar.add(p, arcname=p.relative_to(out).as_posix(), recursive=False)
        return status, value, seconds, buf.getvalue()


# ------------------------------------------------------------------------------------------------- engines
Submit = Callable[[Sequence[WorkUnit], Run], Iterator[tuple[WorkUnit, tuple[str, Any, float]]]]


def _tmp(unit: WorkUnit) -> Path:
    return unit.out.with_name(unit.out.name + _TMP_SUFFIX)


def _sequential(units: Sequence[WorkUnit], run: Run, cfg: EngineConfig) -> Iterator[tuple[WorkUnit, Any]]:
    for unit in units:
        yield unit, _guarded(unit, run.path, _tmp(unit))


def _pool(units: Sequence[WorkUnit], run: Run, cfg: EngineConfig) -> Iterator[tuple[WorkUnit, Any]]:
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(cfg.workers, len(units)), mp_context=ctx) as pool:
        futures = {pool.submit(_guarded, u, run.path, _tmp(u)): u for u in units}
        for fut in cf.as_completed(futures):
            unit = futures[fut]
            try:
                yield unit, fut.result()
            except cf.process.BrokenProcessPool as exc:  # a worker died: its unit (and the pool's others) failed
                yield unit, ("error", ("worker_died", f"worker process died: {exc}"), 0.0)


@contextlib.contextmanager
def _ray_session(cfg: EngineConfig, units: Sequence[WorkUnit]) -> Iterator[Any]:
    try:
        import ray
    except ImportError:
        raise ConfigError("engine: ray needs Ray installed (pip install 'gestalt-xai[ray]')") from None
    if ray.is_initialized():
        yield ray
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    # Ray's progress-bar support replaces builtins.print in the driver process (ray.experimental.tqdm_ray) unless
    # told not to: a library must not change the caller's print
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # this machine only: loopback, no dashboard, no usage statistics sent anywhere
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        cpus = cfg.workers * max(u.threads for u in units)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray(units: Sequence[WorkUnit], run: Run, cfg: EngineConfig) -> Iterator[tuple[WorkUnit, Any]]:
    with _ray_session(cfg, units) as ray:
        remote = ray.remote(_guarded_shipped if cfg.ship_results else _guarded)
        refs = {}
        for u in units:
            options: dict[str, Any] = {"num_cpus": u.threads, "max_retries": cfg.retries,
                                       "name": f"gestalt-xai:{u.unit_id}"}
            if u.memory_mb:
                options["memory"] = u.memory_mb * 2**20
            task = remote.options(**options)
            ref = task.remote(u, run.path) if cfg.ship_results else task.remote(u, run.path, _tmp(u))
            refs[ref] = u
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            unit = refs[ready[0]]
            try:
                result = ray.get(ready[0])
            except Exception as exc:  # the worker died more often than retries allow (or the task was cancelled)
                yield unit, ("error", ("worker_died", f"{type(exc).__name__}: {exc}"), 0.0)
                continue
            if cfg.ship_results:
                status, value, seconds, archive = result
                if status == "ok":
                    _unpack(archive, _tmp(unit))
                result = (status, value, seconds)
            yield unit, result


def _unpack(archive: bytes, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
        tar.extractall(out, filter="data")


_ENGINES: dict[tuple[str, bool], Callable[..., Iterator[tuple[WorkUnit, Any]]]] = {
    ("local", False): _sequential, ("local", True): _pool, ("ray", False): _ray, ("ray", True): _ray}


# ----------------------------------------------------------------------------------------------------- driver
def _commit(unit: WorkUnit) -> None:
    """Replace ``unit.out`` by the unit's finished temporary folder."""
    tmp = _tmp(unit)
    if unit.out.exists():
        shutil.rmtree(unit.out)
    os.replace(tmp, unit.out)


def run_units(run: Run, units: Sequence[WorkUnit], cfg: EngineConfig, ledger: Ledger | None = None,
              on_done: Callable[[UnitOutcome], None] | None = None) -> dict[str, UnitOutcome]:
    """Run the ``units`` not finished yet on the engine of ``cfg``; every unit's :class:`UnitOutcome` by id.

    ``ledger`` defaults to the running stage instance's (:meth:`Run.ledger`). Units whose ledger record is done with
    the same digest and whose folder exists are ``reused``, not run. ``on_done`` is called in the driver as units end
    (in completion order: combine outputs in a fixed order afterwards). Outcomes come back in the order of ``units``.
    """
    ids = [u.unit_id for u in units]
    if len(set(ids)) != len(ids):
        raise ValueError("work unit ids must be unique")
    ledger = ledger if ledger is not None else run.ledger()
    done = ledger.done()
    outcomes: dict[str, UnitOutcome] = {}
    todo = []
    for u in units:
        rec = done.get(u.unit_id)
        if rec is not None and rec.get("digest", "") == u.digest and u.out.is_dir() and \
                all((u.out / n).exists() for n in u.needs):
            outcomes[u.unit_id] = UnitOutcome(u.unit_id, "reused", rec)
        else:
            todo.append(u)
    log.info("engine %s: %d units, %d finished earlier, %d to run", cfg.engine, len(units), len(outcomes), len(todo))
    if todo:
        engine = _ENGINES[(cfg.engine, cfg.workers > 1 and len(todo) > 1)]
        for unit, (status, value, seconds) in engine(todo, run, cfg):
            if status == "ok":
                _commit(unit)
                ledger.add(unit.unit_id, {"digest": unit.digest, **value})
                outcome = UnitOutcome(unit.unit_id, "done", value, seconds=seconds)
            else:
                kind, message = value
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(_tmp(unit))
                ledger.add(unit.unit_id, {"digest": unit.digest, "error": message}, ok=False)
                outcome = UnitOutcome(unit.unit_id, "failed", {}, ErrorRow(unit.unit_id, kind, message, unit.key),
                                      seconds)
                log.warning("unit %s failed: %s", unit.unit_id, message)
            outcomes[unit.unit_id] = outcome
            if on_done is not None:
                on_done(outcome)
    return {i: outcomes[i] for i in ids}
