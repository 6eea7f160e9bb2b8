"""The study runner: instance selection (--from/--only), pipeline variables, per-instance --set, optional stages,
input fingerprints (an unchanged stage is skipped; deleted outputs or changed options rerun that stage and its
readers, nothing else), resume of an interrupted stage, and the run's measurements (peak memory of child processes).

The stages here are tiny ones registered for the test (each writes one small file), except one check on the real
``atlas`` stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from gestalt_xai.cli import build_app
from gestalt_xai.config import StageConfig
from gestalt_xai.errors import ConfigError
from gestalt_xai.fingerprints import SKIPPED_UNCHANGED
from gestalt_xai.runs import Run
from gestalt_xai.stages import Stage, StageResult, register_stage, unregister_stage
from gestalt_xai.study import run_study

ENV = {"COLUMNS": "200"}


class Nested(BaseModel):
    model_config = {"extra": "forbid"}
    a: int = 1


class TinyConfig(StageConfig):
    size: int = 1
    tag: str = ""
    data: str | None = None
    nested: Nested = Field(default_factory=Nested)
    items: list[str] = Field(default_factory=lambda: ["a", "b", "c"])
    crash_on: str = ""
    child_mb: int = 0


def _tiny(name: str, reads: tuple[str, ...], out: str, order: int) -> Stage:
    """A stage reading ``reads`` and writing ``out``: its text is the options plus what it read."""

    def function(run: Run, cfg: TinyConfig) -> StageResult:
        if cfg.child_mb:  # a child process holding ``child_mb`` MiB of touched memory for a second
            subprocess.run([sys.executable, "-c", f"import time; b = b'x' * ({cfg.child_mb} * 2**20); "
                                                  "time.sleep(1.0)"], check=True)
        ledger = run.ledger(cfg, ignore=("crash_on",))
        done = ledger.done()
        with open(run.path / "units.log", "a") as log:  # every unit computed, in order
            for item in cfg.items:
                if item in done:
                    continue
                if item == cfg.crash_on:
                    raise RuntimeError(f"killed at {item}")
                log.write(f"{run.active_stage}:{item}\n")
                ledger.add(item, {})
        seen = [(run.path / r).read_text() for r in reads if (run.path / r).is_file()]
        path = run.path / out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([cfg.model_dump(mode="json"), seen]))
        return StageResult(items=len(cfg.items), outputs={"out": path}, summary=[f"wrote {out}"])

    return register_stage(Stage(name=name, options=TinyConfig, function=function, summary=f"test stage {name}",
                                reads=reads, writes=(out,), order=order))


@pytest.fixture
def tiny_stages():
    """make → use → more (a chain through files), side (reads nothing), two ``fan`` instances writing one folder and
    ``gather`` reading it (as explain → maps/ → aggregate)."""
    specs = [_tiny("t_make", (), "t/made.txt", 1001), _tiny("t_use", ("t/made.txt",), "t/used.txt", 1002),
             _tiny("t_more", ("t/used.txt",), "t/more.txt", 1003), _tiny("t_side", (), "side/side.txt", 1004),
             _tiny("t_opt", (), "opt/opt.txt", 1005)]
    fan = register_stage(Stage(name="t_fan", options=TinyConfig, summary="writes into the shared folder fan/",
                               function=_fan, writes=("fan",), order=1006))
    gather = _tiny("t_gather", ("fan",), "gather.txt", 1007)
    yield specs + [fan, gather]
    for spec in specs + [fan, gather]:
        unregister_stage(spec.name)


def _fan(run: Run, cfg: TinyConfig) -> StageResult:
    path = run.dir("fan") / f"{cfg.tag}.txt"
    path.write_text(cfg.tag)
    with open(run.path / "units.log", "a") as log:
        log.write(f"{run.active_stage}:{cfg.tag}\n")
    return StageResult(items=1, outputs={"part": path})


CHAIN = """name: chain
seed: 0
variables: {label: null, extra: ""}
stages:
  - t_make: {tag: "{label}"}
  - t_use: {}
  - t_more: {}
  - t_side: {}
  - t_opt: {optional: true, data: "{extra}"}
"""


def _pipeline(tmp_path: Path, text: str = CHAIN) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def _statuses(run: Run) -> dict[str, str]:
    return {k: v["status"] for k, v in run.manifest["stages"].items()}


def _ran(run: Run) -> list[str]:
    return run.manifest["measurements"]["ran"]


def test_second_run_skips_every_unchanged_stage(tiny_stages, tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    run = run_study(p, tmp_path / "run", variables={"label": "x"})
    assert _ran(run) == ["t_make", "t_use", "t_more", "t_side"]
    assert run.manifest["measurements"]["skipped_optional"] == ["t_opt"]
    assert _statuses(run)["t_opt"] == "skipped (input data='' missing)"
    units = (run.path / "units.log").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in run.path.rglob("*.txt")}

    run = run_study(p, run.path, variables={"label": "x"})
    statuses = _statuses(run)
    assert {k: statuses[k] for k in ("t_make", "t_use", "t_more", "t_side")} == dict.fromkeys(
        ("t_make", "t_use", "t_more", "t_side"), SKIPPED_UNCHANGED)
    assert _ran(run) == [] and run.manifest["measurements"]["skipped_unchanged"] == ["t_make", "t_use", "t_more",
                                                                                      "t_side"]
    assert (run.path / "units.log").read_text() == units  # no stage function was called
    assert {p: p.stat().st_mtime_ns for p in run.path.rglob("*.txt")} == mtimes
    # the skipped entries keep what the run that made the outputs recorded
    assert run.manifest["stages"]["t_use"]["n_items"] == 3 and run.manifest["stages"]["t_use"]["fingerprint"]
    # a variable's value is an input like any option: another label reruns t_make and what reads it
    run = run_study(p, run.path, variables={"label": "y"})
    assert _ran(run) == ["t_make", "t_use", "t_more"]
    assert json.loads((run.path / "t/made.txt").read_text())[0]["tag"] == "y"


def test_deleting_outputs_reruns_that_stage_and_its_readers_only(tiny_stages, tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    run = run_study(p, tmp_path / "run", variables={"label": "x"})
    (run.path / "t/used.txt").unlink()
    run = run_study(p, run.path, variables={"label": "x"})
    assert _ran(run) == ["t_use", "t_more"]
    assert run.manifest["measurements"]["stale"] == {"t_use": "outputs missing: t/used.txt"}
    # an output edited outside the runner is a change too
    (run.path / "t/made.txt").write_text("edited by hand")
    run = run_study(p, run.path, variables={"label": "x"})
    assert _ran(run) == ["t_make", "t_use", "t_more"]
    rerun = run_study(p, run.path, variables={"label": "x"}).manifest
    assert rerun["measurements"]["ran"] == [] and rerun["measurements_ran"]["ran"], "the work's measurements stay"


def test_changed_option_reruns_that_stage_and_its_readers(tiny_stages, tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    run = run_study(p, tmp_path / "run", variables={"label": "x"})
    run = run_study(p, run.path, variables={"label": "x"}, sets=["t_use.nested.a=5"])
    assert _ran(run) == ["t_use", "t_more"]
    assert run.manifest["stages"]["t_use"]["config"]["nested"] == {"a": 5}
    assert run.manifest["study"]["sets"] == ["t_use.nested.a=5"]
    # --force reruns regardless; forcing one stage reruns it and (its outputs rewritten) its readers
    run = run_study(p, run.path, variables={"label": "x"}, sets=["t_use.nested.a=5"], force=True)
    assert _ran(run) == ["t_make", "t_use", "t_more", "t_side"]
    run = run_study(p, run.path, variables={"label": "x"}, sets=["t_use.nested.a=5"], force=["t_more"])
    assert _ran(run) == ["t_more"]


def test_stages_writing_one_folder_rerun_when_it_is_deleted_and_not_otherwise(tiny_stages, tmp_path: Path) -> None:
    """Two instances write into fan/ (as every explain writes maps/): one's write does not make the other look
    changed, and deleting the folder reruns both (though the first recreates it) and their reader."""
    p = _pipeline(tmp_path, "name: fan\nstages:\n  - t_fan: {tag: one}\n  - t_fan: {tag: two}\n  - t_gather: {}\n")
    run = run_study(p, tmp_path / "run")
    assert _ran(run) == ["t_fan", "t_fan#2", "t_gather"]
    assert json.loads((run.path / "gather.txt").read_text())[1] == []  # gather reads the folder, not a file
    assert _ran(run_study(p, run.path)) == []
    run = run_study(p, run.path, sets=["t_fan#2.tag=zwei"])
    assert _ran(run) == ["t_fan#2", "t_gather"]
    assert _ran(run_study(p, run.path, sets=["t_fan#2.tag=zwei"])) == []
    import shutil

    shutil.rmtree(run.path / "fan")
    run = run_study(p, run.path, sets=["t_fan#2.tag=zwei"])
    assert _ran(run) == ["t_fan", "t_fan#2", "t_gather"]
    assert sorted(f.name for f in (run.path / "fan").iterdir()) == ["one.txt", "zwei.txt"]


def test_from_only_and_instance_ids(tiny_stages, tmp_path: Path) -> None:
    p = _pipeline(tmp_path, "name: ids\nstages:\n  - t_make: {}\n  - t_use: {}\n  - t_use: {size: 2}\n"
                            "  - t_more: {id: last}\n")
    run = run_study(p, tmp_path / "run", only=["t_use#2"])
    assert list(run.manifest["stages"]) == ["t_use#2"] and _ran(run) == ["t_use#2"]
    run = run_study(p, run.path, start_from="t_use#2")
    assert _ran(run) == ["last"]  # t_use#2 is unchanged
    assert list(run.manifest["stages"]) == ["t_use#2", "last"]
    run = run_study(p, run.path, only=["t_make", "last"])
    assert _ran(run) == ["t_make"]  # last reads t/used.txt, which did not change
    run = run_study(p, run.path, only=["t_use", "last"])
    assert _ran(run) == ["t_use", "last"]  # t_use rewrote t/used.txt
    for kwargs, flag in [({"only": ["explain#2"]}, "--only explain#2"), ({"start_from": "t_use#3"}, "--from t_use#3"),
                         ({"force": ["nope"]}, "--force-stage nope"), ({"sets": ["t_usee.size=3"]}, "--set t_usee")]:
        with pytest.raises(ConfigError, match=f"{flag}: no such stage instance .*t_make, t_use, t_use#2, last"):
            run_study(p, tmp_path / "never", **kwargs)
    assert not (tmp_path / "never").exists()


def test_variables_required_default_unknown_and_undeclared(tiny_stages, tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    with pytest.raises(ConfigError, match=r"variables\.label: required .*--var label=VALUE"):
        run_study(p, tmp_path / "never")
    with pytest.raises(ConfigError, match=r"--var lable: .* declares no variable 'lable' \(declared: extra, label\)"):
        run_study(p, tmp_path / "never", variables={"label": "x", "lable": "y"})
    bad = _pipeline(tmp_path, CHAIN.replace('tag: "{label}"', 'tag: "{label}-{labl}"'))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.t_make\.tag: \{labl\} is not a declared variable"):
        run_study(bad, tmp_path / "never", variables={"label": "x"})
    assert not (tmp_path / "never").exists()
    # defaults apply; {run} is left for the stages to expand
    p = _pipeline(tmp_path, 'name: v\nvariables: {label: dflt}\nstages:\n  - t_make: {tag: "{run}/{label}"}\n')
    run = run_study(p, tmp_path / "run")
    assert run.manifest["stages"]["t_make"]["config"]["tag"] == "{run}/dflt"
    assert run.manifest["study"]["variables"] == {"label": "dflt"}


def test_set_overrides_nested_options_and_a_wrong_key_fails_before_work(tiny_stages, tmp_path: Path) -> None:
    p = _pipeline(tmp_path, "name: s\nstages:\n  - t_make: {nested: {a: 2}}\n  - t_use: {}\n")
    run = run_study(p, tmp_path / "run", sets=["t_make.nested.a=7", "t_use.items=[x, y]"])
    assert run.manifest["stages"]["t_make"]["config"]["nested"] == {"a": 7}
    assert run.manifest["stages"]["t_use"]["config"]["items"] == ["x", "y"]
    for sets, field in [(["t_make.nested.b=1"], r"stages\[0\]\.t_make\.nested\.b"),
                        (["t_use.sise=1"], r"stages\[1\]\.t_use\.sise"),
                        (["t_make.size=many"], r"stages\[0\]\.t_make\.size"),
                        (["t_make.id=other"], "not id, optional")]:
        with pytest.raises(ConfigError, match=field):
            run_study(p, tmp_path / "never", sets=sets)
    assert not (tmp_path / "never").exists()


def test_optional_stage_runs_only_when_its_input_exists(tiny_stages, tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    data = tmp_path / "fixations"
    run = run_study(p, tmp_path / "run", variables={"label": "x", "extra": str(data)}, only=["t_opt"])
    assert _statuses(run)["t_opt"] == f"skipped (input data={str(data)!r} missing)"
    assert not (run.path / "opt").exists() and run.errors().empty
    data.mkdir()
    run = run_study(p, run.path, variables={"label": "x", "extra": str(data)}, only=["t_opt"])
    assert _statuses(run)["t_opt"] == "done" and (run.path / "opt/opt.txt").exists()
    assert run.manifest["stages"]["t_opt"]["config"]["data"] == str(data)
    # optional needs an option fed by a variable, else it could never be decided
    bad = _pipeline(tmp_path, "name: o\nstages:\n  - t_opt: {optional: true, data: /x}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.t_opt\.optional"):
        run_study(bad, tmp_path / "never")
    # gated on one variable: the other variable-fed option (a glob inside the folder) does not decide
    gated = _pipeline(tmp_path, 'name: g\nvariables: {extra: "", pattern: "*.asc"}\nstages:\n'
                                '  - t_opt: {optional: extra, data: "{extra}/{pattern}"}\n')
    run = run_study(gated, tmp_path / "gated", variables={"extra": str(data)})
    assert _statuses(run)["t_opt"] == "done"
    run = run_study(gated, tmp_path / "gated2")
    assert _statuses(run)["t_opt"] == "skipped (input variable extra='' missing)"
    with pytest.raises(ConfigError, match="'nope' is not a declared variable"):
        run_study(_pipeline(tmp_path, "name: n\nstages:\n  - t_opt: {optional: nope, data: /x}\n"), tmp_path / "n")


def test_an_interrupted_stage_resumes_without_redoing_finished_units(tiny_stages, tmp_path: Path) -> None:
    p = _pipeline(tmp_path, "name: r\nstages:\n  - t_make: {items: [a, b, c, d]}\n  - t_use: {}\n")
    with pytest.raises(RuntimeError, match="killed at c"):
        run_study(p, tmp_path / "run", sets=["t_make.crash_on=c"])
    run = Run(tmp_path / "run")
    assert _statuses(run)["t_make"] == "failed"
    run = run_study(p, run.path)
    assert (run.path / "units.log").read_text().split() == ["t_make:a", "t_make:b", "t_make:c", "t_make:d",
                                                            "t_use:a", "t_use:b", "t_use:c"]
    assert _ran(run) == ["t_make", "t_use"]


def test_peak_memory_counts_child_processes(tiny_stages, tmp_path: Path) -> None:
    p = _pipeline(tmp_path, "name: m\nstages:\n  - t_make: {child_mb: 300}\n")
    run = run_study(p, tmp_path / "run")
    m = run.manifest["measurements"]
    assert m["peak_memory_children_mb"] >= 290, m  # RUSAGE_SELF alone never sees it
    assert m["peak_memory_mb"] >= m["peak_memory_children_mb"] + m["ru_maxrss_mb"]["self"] * 0.5
    assert m["ru_maxrss_mb"]["children"] >= 290
    assert run.manifest["stages"]["t_make"]["timing"]["peak_memory_tree_mb"] >= 290
    assert m["run_folder_mb"] >= 0 and m["wall_seconds"] > 1.0


def test_cli_flags(tiny_stages, tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    runner = CliRunner()
    result = runner.invoke(build_app(), ["study", "check", str(p), "--var", "label=x", "--set", "t_use.size=2"],
                           env=ENV)
    assert result.exit_code == 0, result.output
    assert "t_make, t_use, t_more, t_side, t_opt (optional)" in result.output
    result = runner.invoke(build_app(), ["study", "check", str(p)])
    assert isinstance(result.exception, ConfigError) and "variables.label" in str(result.exception)
    run_dir = tmp_path / "run"
    args = ["study", "run", str(p), "--run", str(run_dir), "--var", "label=x"]
    result = runner.invoke(build_app(), [*args, "--only", "t_make", "--only", "t_use", "--set", "t_use.size=3"],
                           env=ENV)
    assert result.exit_code == 0, result.output
    assert "peak memory" in result.output and "run folder" in result.output and "ran 2 stage(s)" in result.output
    assert list(Run(run_dir).manifest["stages"]) == ["t_make", "t_use"]
    result = runner.invoke(build_app(), [*args, "--from", "t_use", "--set", "t_use.size=3"], env=ENV)
    assert "ran 2 stage(s), skipped 1 unchanged and 1 optional" in result.output, result.output
    assert SKIPPED_UNCHANGED in result.output
    result = runner.invoke(build_app(), [*args, "--force-stage", "t_side", "--set", "t_use.size=3"], env=ENV)
    assert "ran 1 stage(s)" in result.output, result.output
    result = runner.invoke(build_app(), [*args, "--force", "--only", "t_side"], env=ENV)
    assert "ran 1 stage(s)" in result.output and _statuses(Run(run_dir))["t_side"] == "done"
    result = runner.invoke(build_app(), [*args, "--var", "nope=1"], env=ENV)
    assert isinstance(result.exception, ConfigError) and "--var nope" in str(result.exception)


def test_real_stage_is_skipped_when_unchanged_and_reruns_when_its_input_changes(tmp_path: Path) -> None:
    """The atlas stage on a tiny run: skipped on the second run; a rewritten alignment table (its declared input)
    reruns it, and deleting its region table reruns it."""
    from attribution_helpers import make_tiny_run

    from gestalt_xai.runs import write_parquet

    run = make_tiny_run(tmp_path / "run", model=False)
    p = _pipeline(tmp_path, "name: atlas\nstages:\n  - atlas: {}\n")
    run = run_study(p, run.path)
    assert _ran(run) == ["atlas"] and set(run.manifest["stages"]["atlas"]["declared_outputs"]) == {
        "aligned/atlas.png", "aligned/regions.parquet"}
    assert _ran(run_study(p, run.path)) == []
    import pandas as pd

    table = run.path / "aligned/alignment.parquet"
    write_parquet(pd.read_parquet(table), table)
    assert _ran(run_study(p, run.path)) == ["atlas"]
    (run.path / "aligned/regions.parquet").unlink()
    run = run_study(p, run.path)
    assert _ran(run) == ["atlas"] and (run.path / "aligned/regions.parquet").exists()
