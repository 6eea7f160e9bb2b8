"""Contract test over the stage registry: every registered stage runs, in pipeline order, on a tiny synthetic cohort
(with the options it declares as ``tiny_options``), twice into two different folders; a stage registered later is
tested here with no test edit.

Each stage must return a :class:`StageResult`, record a finished manifest entry with its options, write what it
declares (inside the run), and write the same bytes in both folders (a run folder can be moved or shared: no absolute
path, no unsorted set, no time stamp in any output; only the manifest's timing fields differ).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gestalt_xai.runs import LAYOUT, Run
from gestalt_xai.stages import StageResult, load_stages

STAGE_NAMES = list(load_stages())
#: files that may differ between two identical runs: timings, and the ledger's own bookkeeping
VOLATILE = {LAYOUT.manifest}


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory) -> tuple[Run, Run, dict[str, StageResult]]:
    runs = (Run(tmp_path_factory.mktemp("first")), Run(tmp_path_factory.mktemp("second") / "moved" / "elsewhere"))
    results: dict[str, StageResult] = {}
    for run in runs:
        for name, spec in load_stages().items():
            results[name] = spec(run, {**spec.tiny_options, "seed": 0} if "seed" in spec.options.model_fields
                                 else dict(spec.tiny_options))
    return runs[0], runs[1], results


def _files(root: Path, rel: str) -> dict[str, bytes]:
    top = root / rel
    paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.exists() else []
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in paths
            if p.relative_to(root).as_posix() not in VOLATILE}


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_keeps_the_contract(twin_runs, name: str) -> None:
    first, second, results = twin_runs
    spec = load_stages()[name]
    result = results[name]
    assert isinstance(result, StageResult)
    entry = first.manifest["stages"][name]
    assert entry["status"] == "done" and entry["stage"] == name
    assert entry["n_errors"] == first.error_count(name)
    assert entry["timing"]["seconds"] >= 0 and entry["timing"]["peak_memory_mb"] > 0
    # provenance: the options it ran with, as validated (defaults filled in)
    assert set(entry["config"]) == set(spec.options.model_fields)
    for label, path in result.outputs.items():
        assert Path(path).exists(), f"{name} output {label} missing"
        assert not Path(entry["outputs"][label]).is_absolute(), "outputs inside the run are recorded relative to it"
    for rel in spec.writes:
        assert (first.path / rel).exists(), f"{name} declares it writes {rel}, which is missing"
        a, b = _files(first.path, rel), _files(second.path, rel)
        assert a, f"{name}: nothing written under {rel}"
        assert a.keys() == b.keys(), f"{name}: {sorted(a.keys() ^ b.keys())[:5]} differ between two runs"
        different = [k for k in a if a[k] != b[k]]
        assert not different, f"{name}: {different[:5]} differ between two identical runs in different folders"


def test_errors_and_manifest_name_no_absolute_run_path(twin_runs) -> None:
    first, second, _ = twin_runs
    for run in (first, second):
        assert str(run.path) not in json.dumps(run.manifest["stages"]) + json.dumps(run.manifest["models"])
        assert not run.errors()["message"].str.contains(str(run.path), regex=False).any()
    assert (first.path / LAYOUT.errors).read_bytes() == (second.path / LAYOUT.errors).read_bytes()
