"""The work-unit engine (gestalt_xai.engine): commit and ledger, failures as error rows, thread pinning, the local
process pool, and the explain stage's shards (the same map store, byte for byte, however they ran; a killed run
resumes without rerunning a finished shard). The Ray engine is tested in test_imbalance.py on the experiment's grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from attribution_helpers import make_tiny_run

from gestalt_xai.attribution import explain as explain_mod
from gestalt_xai.attribution.explain import ExplainConfig, explain_stage
from gestalt_xai.engine import EngineConfig, WorkUnit, digest, run_units
from gestalt_xai.runs import Run, write_parquet

METHODS = {"methods": ["gradcam", "saliency", "input_x_gradient"], "batch_size": 2, "overlay": 0, "threads": 1}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("engine") / "run")


def _copy(run: Run, dest: Path) -> Run:
    shutil.copytree(run.path, dest)
    return Run(dest)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fit_unit(payload: dict, ctx) -> dict:
    """A real unit: least squares on seeded data with torch (threads as pinned), written as a table."""
    if payload["seed"] < 0:
        raise ValueError(f"seed {payload['seed']} is negative")
    g = torch.Generator().manual_seed(payload["seed"])
    x = torch.randn(256, 8, generator=g, dtype=torch.float64)
    y = x @ torch.arange(8, dtype=torch.float64) + 0.01 * torch.randn(256, generator=g, dtype=torch.float64)
    coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].numpy()
    write_parquet(pd.DataFrame({"coef": coef, "threads": torch.get_num_threads()}), ctx.out / "coef.parquet")
    return {"rows": len(coef)}


def _units(run: Run, seeds: list[int], threads: int = 1) -> list[WorkUnit]:
    return [WorkUnit(f"fit/{s}", fit_unit, {"seed": s}, out=run.path / "units" / f"fit{s}", digest=digest(s),
                     threads=threads, key={"seed": s}) for s in seeds]


def test_units_commit_once_failures_are_error_rows_and_threads_are_pinned(tmp_path):
    run = Run(tmp_path / "run")
    with run.stage("fit"):
        outcomes = run_units(run, _units(run, [1, -1, 2], threads=2), EngineConfig())
    assert [o.status for o in outcomes.values()] == ["done", "failed", "done"]
    err = outcomes["fit/-1"].error
    assert err.item_id == "fit/-1" and err.error_kind == "ValueError" and "negative" in err.message
    assert not (run.path / "units" / "fit-1").exists() and not list((run.path / "units").glob("*.tmp-engine"))
    table = pd.read_parquet(run.path / "units" / "fit1" / "coef.parquet")
    np.testing.assert_allclose(table["coef"], np.arange(8), atol=0.01)
    assert (table["threads"] == 2).all()  # the unit ran with its own thread count, restored afterwards
    before = {p: p.stat().st_mtime_ns for p in (run.path / "units").rglob("*.parquet")}
    with run.stage("fit"):  # a rerun: finished units are reused, the failed one is tried again
        again = run_units(run, _units(run, [1, -1, 2], threads=2), EngineConfig())
    assert [o.status for o in again.values()] == ["reused", "failed", "reused"]
    assert {p: p.stat().st_mtime_ns for p in (run.path / "units").rglob("*.parquet")} == before
    with run.stage("fit"):  # another digest (the unit computes something else now): run again
        changed = [WorkUnit(u.unit_id, u.function, u.payload, u.out, digest="other", threads=u.threads)
                   for u in _units(run, [1])]
        assert run_units(run, changed, EngineConfig())["fit/1"].status == "done"


@pytest.mark.parametrize("engine", [{"shard_batches": 1}, {"shard_batches": 2, "workers": 2}],
                         ids=["sequential", "pool"])
def test_sharded_explain_writes_the_same_map_store(tiny_run, tmp_path, engine):
    plain = _copy(tiny_run, tmp_path / "plain")
    sharded = _copy(tiny_run, tmp_path / "sharded")
    explain_stage(plain, ExplainConfig(**METHODS))
    explain_stage(sharded, ExplainConfig(**METHODS, **engine))
    a, b = _files(plain.path / "maps"), _files(sharded.path / "maps")
    assert len(plain.map_store()) == 6 * 3 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert (plain.path / "errors.parquet").read_bytes() == (sharded.path / "errors.parquet").read_bytes()


class Killed(BaseException):
    """A kill of the process (no ``Exception``: nothing catches it as a unit's failure)."""


def test_killed_sharded_explain_resumes_without_rerunning_finished_shards(tiny_run, tmp_path, monkeypatch):
    clean = _copy(tiny_run, tmp_path / "clean")
    explain_stage(clean, ExplainConfig(**METHODS))
    run = _copy(tiny_run, tmp_path / "killed")
    calls: list[str] = []
    kill = [True]
    real = explain_mod.explain_shard

    def killed_on_second(payload, ctx):
        calls.append(ctx.unit_id)
        if kill[0] and len(calls) == 2:
            kill[0] = False
            raise Killed  # the process dies here: no error row, no ledger record, nothing committed
        return real(payload, ctx)

    monkeypatch.setattr(explain_mod, "explain_shard", killed_on_second)
    with pytest.raises(Killed):
        explain_stage(run, ExplainConfig(**METHODS, shard_batches=1))
    assert len(run.map_store()) == 0  # shards are absorbed only once all have ended
    first = calls[0]
    calls.clear()
    explain_stage(run, ExplainConfig(**METHODS, shard_batches=1))
    assert first not in calls and len(calls) == 2  # the finished shard was absorbed, not run again
    a, b = _files(clean.path / "maps"), _files(run.path / "maps")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
