"""The class-imbalance experiment on a tiny grid of the shared trained run: configuration errors before any work, the
pre-declared probe, tables and summary computed from the run's numbers, reuse of finished units, and the Ray engine
(a local instance started here, loopback only) giving the same tables as the local engine, also after one unit's
worker was killed mid-run."""

from __future__ import annotations

import builtins
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from gestalt_xai.errors import ConfigError
from gestalt_xai.experiments.imbalance import ImbalanceConfig, imbalance_stage
from gestalt_xai.runs import LAYOUT, Run
from gestalt_xai.stages import get_stage

#: 2 variants (the reference, the largest syndrome cut to 2 training subjects) × 2 seeds, one epoch of fine-tuning
TINY = {"init_model": "demo_r18_w0.25", "train": {"preset": "demo", "epochs": 1}, "seeds": [0, 1],
        "subsample": {"sizes": [2]}, "probe": {"per_syndrome": 1, "subsampled": 3},
        "methods": ["gradcam", "saliency"], "comparisons": ["spearman"], "faithfulness": {"steps": 4},
        "unit_threads": 1}
TABLES = ("design", "probe", "similarity", "effects", "localisation", "rank_agreement", "faithfulness", "accuracy",
          "training")


def _copy(run: Run, dest: Path) -> Run:
    shutil.copytree(run.path, dest)
    return Run(dest)


def _outputs(run: Run) -> dict[str, bytes]:
    root = run.path / LAYOUT.imbalance
    files = [root / f"{t}.parquet" for t in TABLES] + [root / "summary.md", root / "trend.png"]
    return {p.name: p.read_bytes() for p in files}


@pytest.mark.parametrize("options, field", [
    ({"seeds": [0]}, "seeds"),
    ({"variants": {"full": {"epochs": 0}}}, "variants.full.epochs"),
    ({"variants": {"full": {"seed": 3}}}, "variants.full"),
    ({"reference": "nope"}, "reference"),
    ({"targets": ["pair"]}, "targets"),
    ({"comparisons": ["pearsonn"]}, "comparisons"),
    ({"methods": ["gradcamm"]}, "gradcamm"),
    ({"subsample": {"sizes": [5, 5]}}, "sizes"),
])
def test_a_wrong_config_fails_before_any_work_naming_the_field(options, field, tmp_path):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        get_stage("imbalance").validate(options)
    with pytest.raises(ConfigError):
        imbalance_stage(tmp_path / "run", options)
    assert not (tmp_path / "run" / LAYOUT.imbalance).exists()


@pytest.fixture(scope="module")
def local_grid(trained_run, tmp_path_factory):
    """The tiny grid run once with the local engine (the tables every other run is compared with)."""
    run = _copy(trained_run, tmp_path_factory.mktemp("imbalance") / "local")
    result = imbalance_stage(run, TINY)
    return run, result


def test_local_grid_declares_the_probe_and_computes_every_table(local_grid, trained_run):
    run, result = local_grid
    root = run.path / LAYOUT.imbalance
    design, probe = pd.read_parquet(root / "design.parquet"), pd.read_parquet(root / "probe.parquet")
    focus = design["focus_syndrome"].iloc[0]
    table = run.image_table()
    train_subjects = table[table["sets"].str.contains("train")].groupby("syndrome_id")["subject_id"].nunique()
    assert focus == train_subjects.sort_values(ascending=False, kind="stable").index[0]  # the largest
    assert set(design["variant"]) == {"full", "sub2"} and set(design["seed"]) == {0, 1}
    assert table.set_index("image_id").loc[probe["image_id"], "test"].all()  # test patients only
    focus_tests = table[table["test"] & (table["syndrome_id"] == focus)]
    assert (probe["syndrome_id"] == focus).sum() == min(3, len(focus_tests))
    training = pd.read_parquet(root / "training.parquet")
    got = training[training["syndrome_id"] == focus].set_index(["variant", "seed"])["n_train_subjects"]
    assert (got.loc["sub2"] == 2).all() and (got.loc["full"] == train_subjects[focus]).all()
    sim = pd.read_parquet(root / "similarity.parquet")
    assert set(sim["pair"]) == {"seed", "reference"}
    assert set(sim.loc[sim["pair"] == "reference", "seed_b"]) == {0, 1}
    assert (sim["seed"] != sim["seed_b"]).all()  # other seeds only: the reference's self-similarity is the floor
    assert sim["value"].between(-1, 1).all() and sim["value"].notna().mean() > 0.9
    effects = pd.read_parquet(root / "effects.parquet")
    focus_effects = effects[(effects["group"] == "focus")]
    assert {"similarity", "localisation", "deletion_gap"} <= set(focus_effects["measure"])
    assert (focus_effects.loc[focus_effects["variant"] == "full", "effect"].abs() < 1e-12).all()
    assert (effects["noise_band"].dropna() >= 0).all()
    assert focus_effects.loc[focus_effects["measure"] == "similarity", "noise_band"].notna().all()
    summary = (root / "summary.md").read_text()
    verdicts = [line for line in summary.splitlines() if line.startswith("- ") and "→" in line]
    assert verdicts and all(("measurable trend" in v) or ("beyond seed noise" in v) or ("too few" in v)
                            for v in verdicts)
    # the statements are this run's numbers: the first similarity line quotes the reference's value
    row = focus_effects[(focus_effects["measure"] == "similarity") & (focus_effects["variant"] == "full")].iloc[0]
    assert f"reference {row['value']:.3f}" in summary
    # nothing of the variants is left in the run: no maps, no weights, no model in run/models
    assert not list(root.glob("units/*/maps")) and not list(root.rglob("*.safetensors"))
    assert sorted(p.name for p in (run.path / "models").glob("*.safetensors")) == \
        sorted(p.name for p in (trained_run.path / "models").glob("*.safetensors"))
    assert run.error_count("imbalance") == 0
    assert "4 run now" in result.summary[0]


def test_a_rerun_reuses_every_unit_and_rewrites_nothing(local_grid, tmp_path):
    run = _copy(local_grid[0], tmp_path / "again")
    before = _outputs(run)
    result = imbalance_stage(run, TINY)
    assert "0 run now, 4 reused" in result.summary[0]
    assert _outputs(run) == before


def _kill_when_running(unit_id: str, seen: list[int], stop: threading.Event) -> None:
    """Kill (SIGKILL) the Ray worker process running ``unit_id`` once it has started."""
    title = f"ray::gestalt-xai:{unit_id}"
    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if title in " ".join(proc.info["cmdline"] or []):
                time.sleep(0.5)  # mid-run: the unit is loading its data or training
                os.kill(proc.info["pid"], signal.SIGKILL)
                seen.append(proc.info["pid"])
                return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.allow_hosts(["127.0.0.1"])  # Ray's driver, raylet and workers talk over loopback only (this test alone)
def test_ray_engine_gives_the_local_tables_and_a_killed_worker_loses_nothing_finished(local_grid, tmp_path):
    ray = pytest.importorskip("ray")  # `make test` installs the ray extra, so CI never skips this
    expected = _outputs(local_grid[0])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")  # as engine.py does: Ray must not replace builtins.print
    print_before = builtins.print
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        run = _copy(local_grid[0], tmp_path / "ray")
        shutil.rmtree(run.path / LAYOUT.imbalance)
        (run.path / LAYOUT.ledger / "imbalance.jsonl").unlink()
        seen: list[int] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_kill_when_running, args=("sub2/s1", seen, stop), daemon=True)
        watcher.start()
        result = imbalance_stage(run, {**TINY, "engine": "ray", "retries": 0})
        stop.set()
        watcher.join()
        assert seen, "the unit's worker was never seen running"
        assert "3 run now, 0 reused, 1 failed" in result.summary[0]
        errors = run.errors()
        assert errors.loc[errors["stage"] == "imbalance", ["item_id", "error_kind"]].values.tolist() == \
            [["sub2/s1", "worker_died"]]
        assert len(list((run.path / LAYOUT.imbalance).glob("units/*/maps"))) == 3  # kept for the complete tables
        result = imbalance_stage(run, {**TINY, "engine": "ray", "retries": 0})
        assert "1 run now, 3 reused, 0 failed" in result.summary[0]  # nothing that had finished ran again
        assert _outputs(run) == expected  # every unit on Ray: the local engine's bytes
        assert run.error_count("imbalance") == 0
        assert builtins.print is print_before  # the session's print is left alone
    finally:
        ray.shutdown()


def test_options_validate_as_the_pipeline_gives_them():
    cfg = ImbalanceConfig(**TINY)
    assert cfg.engine == "local" and cfg.seeds == [0, 1]
