"""The stage contract: a stage registered anywhere shows up in the CLI, `study check` and `study status` with no
other edit, and repeated instances of a stage keep their own ledger, error rows and manifest entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field
from typer.testing import CliRunner

from gestalt_xai.cli import build_app
from gestalt_xai.config import StageConfig
from gestalt_xai.errors import ConfigError
from gestalt_xai.runs import ErrorRow, Run
from gestalt_xai.stages import STAGES, StageResult, load_stages, stage, unregister_stage
from gestalt_xai.study import run_study

ENV = {"COLUMNS": "200"}


class ThrowawayConfig(StageConfig):
    fail: list[str] = Field(default_factory=list, description="items that fail")
    items: list[str] = Field(default_factory=lambda: ["a", "b", "c"], description="items to process")
    mode: str = Field("plain", description="a free-text option")


@pytest.fixture
def throwaway():
    """A stage registered at run time (as a lab's plugin would); it records its items in a ledger and writes one
    error row per item named in ``fail``."""

    @stage("throwaway", options=ThrowawayConfig, summary="a stage that exists only in this test",
           writes=("throwaway",), example="gestalt-xai throwaway --run runs/x", order=999)
    def throwaway_stage(run: Run, cfg: ThrowawayConfig) -> StageResult:
        ledger = run.ledger(cfg)
        out = run.dir("throwaway")
        for item in cfg.items:
            if item not in cfg.fail:
                ledger.add(item, {})
        (out / f"{run.active_stage.replace('#', '-')}.txt").write_text(",".join(sorted(ledger.done())))
        run.write_errors(ErrorRow(i, "input", f"{i} is broken", {"mode": cfg.mode}) for i in cfg.fail)
        return StageResult(items=len(cfg.items), outputs={"throwaway": out}, summary=[f"mode {cfg.mode}"])

    yield throwaway_stage
    unregister_stage("throwaway")


def test_throwaway_stage_appears_in_help_check_and_status(throwaway, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(build_app(), ["--help"], env=ENV)
    assert result.exit_code == 0 and "throwaway" in result.output and "exists only in this test" in result.output
    result = runner.invoke(build_app(), ["throwaway", "--help"], env=ENV)
    assert result.exit_code == 0, result.output
    assert "--items" in result.output and "--mode" in result.output and "--set" in result.output
    assert "gestalt-xai throwaway --run runs/x" in result.output

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: t\nstages:\n  - throwaway: {mode: fancy}\n")
    result = runner.invoke(build_app(), ["study", "check", str(pipeline)])
    assert result.exit_code == 0 and "throwaway" in result.output
    pipeline.write_text("name: t\nstages:\n  - throwaway: {mood: fancy}\n")
    result = runner.invoke(build_app(), ["study", "check", str(pipeline)])
    assert isinstance(result.exception, ConfigError) and "stages[0].throwaway.mood" in str(result.exception)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = runner.invoke(build_app(), ["study", "status", "--run", str(run_dir)], env=ENV)
    assert result.exit_code == 0 and "throwaway" in result.output and "not run" in result.output
    # the command runs it: flags (comma lists), --set and the summary
    result = runner.invoke(build_app(), ["throwaway", "--run", str(run_dir), "--items", "x,y", "--set", "mode=cli"],
                           env=ENV)
    assert result.exit_code == 0, result.output
    assert "mode cli" in result.output
    assert (run_dir / "throwaway" / "throwaway.txt").read_text() == "x,y"
    result = runner.invoke(build_app(), ["study", "status", "--run", str(run_dir)], env=ENV)
    row = next(line for line in result.output.splitlines() if "throwaway" in line and "done" in line)
    assert "2" in row


def test_repeated_stage_instances_keep_their_own_error_rows_and_ledgers(throwaway, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: t\nstages:\n"
                        "  - throwaway: {fail: [a]}\n"
                        "  - throwaway: {fail: [b], mode: second}\n"
                        "  - throwaway: {id: named, fail: [c]}\n")
    run = run_study(pipeline, tmp_path / "run")
    errors = run.errors().sort_values("stage")
    assert errors[["stage", "item_id"]].values.tolist() == [["named", "c"], ["throwaway", "a"],
                                                            ["throwaway#2", "b"]]
    assert json.loads(errors.set_index("stage").loc["throwaway#2", "key"]) == {"mode": "second"}
    stages = run.manifest["stages"]
    assert set(stages) == {"throwaway", "throwaway#2", "named"}
    assert {s["stage"] for s in stages.values()} == {"throwaway"}
    assert all(s["status"] == "done" and s["n_errors"] == 1 for s in stages.values())
    # each instance's ledger holds its own finished items
    texts = {p.name: p.read_text() for p in (run.path / "throwaway").iterdir()}
    assert texts == {"throwaway.txt": "b,c", "throwaway-2.txt": "a,c", "named.txt": "a,b"}
    # a rerun keeps every instance's rows (none replaces another's)
    run = run_study(pipeline, tmp_path / "run")
    assert len(run.errors()) == 3


def test_instance_ids_must_be_unique_and_valid(throwaway, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: t\nstages:\n  - throwaway: {id: x}\n  - throwaway: {id: x}\n")
    with pytest.raises(ConfigError, match="'x' is used twice"):
        run_study(pipeline, tmp_path / "run")
    pipeline.write_text("name: t\nstages:\n  - throwaway: {id: 'a b'}\n")
    with pytest.raises(ConfigError, match="not a valid id"):
        run_study(pipeline, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # validation fails before any work


def test_stage_registry_is_the_only_list() -> None:
    stages = load_stages()
    for name in ("synth", "align", "atlas", "train", "embed", "match", "explain", "aggregate", "example_photos"):
        assert name in stages and stages[name].example.startswith(f"gestalt-xai {name}")
    assert STAGES.keys() >= stages.keys()
    with pytest.raises(ConfigError, match="already registered"):
        @stage("align", options=ThrowawayConfig, summary="a second align")
        def align_stage(run, cfg):  # noqa: ANN001
            return StageResult()


def test_pipeline_repeating_explain_keeps_each_instance_error_row(tmp_path: Path) -> None:
    """The demo lists explain three times: a failing item in each instance stays in errors.parquet."""
    from attribution_helpers import make_tiny_run

    run = make_tiny_run(tmp_path / "run")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: twice\nstages:\n"
                        "  - explain: {methods: [saliency], images: [A00], syndromes: 'A,Z', overlay: 0}\n"
                        "  - explain: {methods: [gradcam], images: [B00], syndromes: 'Z,B', overlay: 0}\n")
    run = run_study(pipeline, run.path)
    errors = run.errors().query("stage.str.startswith('explain')").sort_values("stage")
    assert errors[["stage", "item_id"]].values.tolist() == [["explain", "A00"], ["explain#2", "B00"]]
    assert [json.loads(k) for k in errors["key"]] == [{"model_id": "clf", "target": "centroid:Z"}] * 2
    assert "no gallery subject of syndrome 'Z'" in errors["message"].iloc[0]
    # the good items of both instances were explained
    index = run.map_store().index()
    assert sorted(zip(index["image_id"], index["target"], index["method"], strict=True)) == [
        ("A00", "centroid:A", "saliency"), ("B00", "centroid:B", "gradcam")]
