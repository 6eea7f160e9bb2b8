"""Run folders: manifest, error table, ledger (resumable work units), atomic deterministic writes, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from gestalt_xai.config import PipelineConfig, StageConfig, load_pipeline, validate_config
from gestalt_xai.errors import ConfigError
from gestalt_xai.runs import ErrorRow, Ledger, Run, write_parquet


def test_manifest_records_config_seed_versions_timing(tmp_path: Path) -> None:
    run = Run(tmp_path / "r")
    with run.stage("demo", {"size": 3}, seed=7) as st:
        st.n_items, st.n_errors = 5, 1
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    entry = m["stages"]["demo"]
    assert entry["config"] == {"size": 3} and entry["seed"] == 7 and entry["status"] == "done"
    assert entry["n_items"] == 5 and entry["n_errors"] == 1
    assert entry["timing"]["seconds"] >= 0 and entry["timing"]["peak_memory_mb"] > 0
    assert m["packages"]["torch"] and m["packages"]["numpy"] and "git_commit" in m
    run.record_model("m1", "ab" * 32, {"arch": "r18"})
    assert Run(tmp_path / "r").manifest["models"]["m1"]["sha256"] == "ab" * 32  # reopened, kept


def test_failed_stage_is_marked_in_manifest(tmp_path: Path) -> None:
    run = Run(tmp_path)
    with pytest.raises(RuntimeError), run.stage("boom"):
        raise RuntimeError("disk full")
    entry = run.manifest["stages"]["boom"]
    assert entry["status"] == "failed" and "disk full" in entry["error"]


def test_errors_table_replaces_the_running_instance_rows_sorted(tmp_path: Path) -> None:
    run = Run(tmp_path)
    assert run.errors().empty and list(run.errors().columns) == ["stage", "item_id", "error_kind", "message", "key"]
    with run.stage("align"):
        run.write_errors([ErrorRow("b", "input", "bad"), ErrorRow("a", "no_face", f"{run.path}/cohort/a.jpg: none")])
    with run.stage("embed"):
        run.write_errors([ErrorRow("c", "input", "x")])
    with run.stage("align"):
        run.write_errors([ErrorRow("z", "input", "again")])
    e = run.errors()
    assert e["item_id"].tolist() == ["z", "c"] and e["stage"].tolist() == ["align", "embed"]
    assert run.error_count("align") == 1 and run.error_count("explain") == 0
    # one input with several failed work units: one row each, the unit's key kept as structured JSON
    with run.stage("explain#2"):
        run.write_errors([ErrorRow("img1", "target", "no centroid", {"target": "centroid:S2", "model_id": "m"}),
                          ErrorRow("img1", "target", "no centroid", {"target": "centroid:S1", "model_id": "m"})])
    rows = run.errors().query("stage == 'explain#2'")
    assert [json.loads(k)["target"] for k in rows["key"]] == ["centroid:S1", "centroid:S2"]
    with pytest.raises(RuntimeError, match="no stage is running"):
        run.write_errors([])


def test_paths_inside_the_run_are_stored_relative_and_messages_shortened(tmp_path: Path) -> None:
    run = Run(tmp_path / "run")
    assert run.relative(run.path / "cohort" / "images" / "a.jpg") == "cohort/images/a.jpg"
    assert run.relative(tmp_path / "photos" / "b.jpg") == str((tmp_path / "photos" / "b.jpg").resolve())
    assert run.resolve("cohort/images/a.jpg") == run.path / "cohort" / "images" / "a.jpg"
    with run.stage("align"):
        run.write_errors([ErrorRow("a", "input", f"{run.path / 'cohort' / 'a.jpg'}: truncated")])
    assert run.errors()["message"].tolist() == ["cohort/a.jpg: truncated"]


def test_ledger_survives_torn_line_and_respects_fingerprint(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.jsonl", fingerprint="A")
    led.add("x", {"v": 1})
    led.add("y", {"v": 2}, ok=False)
    with open(tmp_path / "l.jsonl", "a") as fh:
        fh.write('{"item_id": "z", "ok": tr')  # a write cut by kill -9
    assert set(led.records()) == {"x", "y"}
    assert set(led.done()) == {"x"}  # failed items are retried
    assert Ledger(tmp_path / "l.jsonl", fingerprint="B").done() == {}  # other options → redo
    led.add("y", {"v": 3})
    assert set(led.done()) == {"x", "y"}


def test_run_ledger_fingerprint_ignores_named_fields(tmp_path: Path) -> None:
    run = Run(tmp_path)
    with run.stage("s"):
        run.ledger({"threshold": 0.9, "workers": 1}, ignore=("workers",)).add("i", {})
        assert "i" in run.ledger({"threshold": 0.9, "workers": 4}, ignore=("workers",)).done()
        assert "i" not in run.ledger({"threshold": 0.8, "workers": 1}, ignore=("workers",)).done()
    with run.stage("s#2"):  # another instance of the same stage has its own ledger
        assert "i" not in run.ledger({"threshold": 0.9, "workers": 1}, ignore=("workers",)).done()


def test_write_parquet_is_deterministic_and_atomic(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": [1, 2], "b": [[0.5, 1.5], [2.0, 3.0]]})
    write_parquet(df, tmp_path / "x.parquet")
    first = (tmp_path / "x.parquet").read_bytes()
    write_parquet(df.copy(), tmp_path / "x.parquet")
    assert (tmp_path / "x.parquet").read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_config_errors_name_the_field() -> None:
    class Opts(StageConfig):
        size: int = 1

    with pytest.raises(ConfigError, match=r"stages\[2\]\.x\.colour: Extra inputs"):
        validate_config(Opts, {"colour": "red"}, where="stages[2].x")
    with pytest.raises(ConfigError, match=r"size: Input should be a valid integer"):
        validate_config(Opts, {"size": "big"})


def test_pipeline_file_validation(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("name: t\nstages:\n  - align: {images: x}\n    atlas: {}\n")
    with pytest.raises(ConfigError, match="exactly one stage name"):
        load_pipeline(p)
    p.write_text("name: t\nstagez: []\n")
    with pytest.raises(ConfigError, match="stagez"):
        load_pipeline(p)
    p.write_text("name: t\nseed: 3\nstages:\n  - align: {images: x}\n")
    assert isinstance(load_pipeline(p), PipelineConfig) and load_pipeline(p).seed == 3
