"""The command line: every stage command documents a runnable example, pipelines validate, options parse."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gestalt_xai.cli import _options, build_app
from gestalt_xai.config import load_pipeline
from gestalt_xai.errors import ConfigError
from gestalt_xai.stages import load_stages
from gestalt_xai.study import plan_study

PIPELINES = sorted((Path(__file__).parent.parent / "pipelines").glob("*.yaml"))
app = build_app()


@pytest.mark.parametrize("command", list(load_stages()))
def test_every_stage_command_has_help_with_an_example_and_the_common_options(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output and f"gestalt-xai {command} --run" in result.output
    assert "--run" in result.output and "--config" in result.output and "--set" in result.output


def test_every_pipeline_stage_is_registered_and_valid() -> None:
    assert PIPELINES, "no pipeline files found"
    import yaml

    for path in PIPELINES:
        required = [k for k, v in (yaml.safe_load(path.read_text()).get("variables") or {}).items() if v is None]
        if required:  # a study on the user's data (tests/test_gmdb_pipeline.py runs it with its variables given)
            with pytest.raises(ConfigError, match=f"variables.{required[0]}: required"):
                plan_study(load_pipeline(path), where=str(path))
            continue
        plan = plan_study(load_pipeline(path), where=str(path))
        assert plan and all(step.stage.name in load_stages() for step in plan)


def test_demo_pipeline_runs_every_stage_in_order() -> None:
    names = [n for n, _ in load_pipeline(Path(__file__).parent.parent / "pipelines" / "demo.yaml").stage_items()]
    order = ["synth", "align", "train", "embed", "match", "explain", "aggregate"]
    assert [n for n in names if n in order] == sorted([n for n in names if n in order], key=order.index)
    assert set(order) <= set(names)


def test_set_options_override_config_file_and_nest(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\naugment:\n  flip: true\n")
    opts = _options(cfg, ["epochs=5", "augment.flip=false", "syndromes=[S01, S02]"], seed=7, init=None)
    assert opts == {"epochs": 5, "augment": {"flip": False}, "syndromes": ["S01", "S02"], "seed": 7}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _options(None, ["epochs"])


def test_wrong_pipeline_option_fails_before_work_naming_the_field(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\nstages:\n  - synth: {n_syndromes: 6}\n  - explain: {methods: [gradcam], target: logits}\n")
    result = CliRunner().invoke(app, ["study", "check", str(p)])
    assert isinstance(result.exception, ConfigError)
    assert "stages[1].explain.target" in str(result.exception)
    p.write_text("name: bad\nstages:\n  - synth: {}\n  - teleport: {}\n")
    result = CliRunner().invoke(app, ["study", "check", str(p)])
    assert isinstance(result.exception, ConfigError) and "unknown stage 'teleport'" in str(result.exception)


def test_stage_actions_run_through_the_generated_command(tmp_path: Path) -> None:
    """synth's --preview replaces the stage (no --run needed, no cohort written); flags and --set both reach it."""
    png = tmp_path / "montage.png"
    result = CliRunner().invoke(app, ["synth", "--preview", str(png), "--n-syndromes", "2", "--set", "n_frequent=1"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "cohort").exists()
    result = CliRunner().invoke(app, ["atlas"])
    assert isinstance(result.exception, ConfigError) and "--run RUN_DIR is required" in str(result.exception)
    result = CliRunner().invoke(app, ["align", "--run", str(tmp_path / "r"), "--detector", "dlib"])
    assert result.exit_code == 2 and "dlib" in result.output  # a choice is checked by the flag itself
