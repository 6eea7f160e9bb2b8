"""The eyetrack stage end to end: a simulated study written in two vendor formats is read back through the readers,
pseudonymised, scored against the run's maps beside the face prior, chance and the ceiling; the planted-features
effect comes from the simulated experts' fixations; bad recordings are error rows; wrong options fail first."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gestalt_xai.attribution.explain import explain_stage
from gestalt_xai.errors import ConfigError
from gestalt_xai.experiments.eyetracking.stage import eyetrack_stage
from gestalt_xai.runs import Run

SIM = {"observers": {"expert": 4, "non_clinician": 4}, "images_per_syndrome": 2}
OPTIONS = {"simulate": SIM, "borji_splits": 10}


@pytest.fixture(scope="module")
def tracked(trained_run, tmp_path_factory) -> Run:
    run = Run(shutil.copytree(trained_run.path, tmp_path_factory.mktemp("eyetrack") / "run"))
    explain_stage(run, {"methods": ["saliency", "gradcam"], "images": "test", "overlay": 0, "threads": 2})
    eyetrack_stage(run, OPTIONS)
    return run


def _out(run: Run) -> Path:
    return run.path / "experiments" / "eyetracking"


def test_simulated_study_is_read_back_exactly_and_labelled_simulated(tracked: Run) -> None:
    out = _out(tracked)
    truth = pd.read_parquet(out / "simulated" / "truth.parquet")
    fix = pd.read_parquet(out / "fixations.parquet")
    key = pd.read_csv(out / "private" / "participants_key.csv", dtype=str)
    raw = fix.assign(participant=fix["participant"].map(dict(zip(key["pseudonym"], key["participant"], strict=True))))
    merged = truth.merge(raw, on=["participant", "image_id", "start_ms"], suffixes=("_true", ""))
    assert len(fix) == len(truth) == len(merged)  # every simulated fixation, through the ASC and Tobii readers
    assert np.abs(merged[["x", "y"]].to_numpy() - merged[["x_true", "y_true"]].to_numpy()).max() < 0.05
    assert set(pd.read_parquet(out / "reading.parquet")["format"]) == {"eyelink_asc", "tobii_tsv"}
    for name in ("fixations", "scores", "observers", "images", "summary_table", "offcrop", "regions"):
        assert pd.read_parquet(out / f"{name}.parquet")["simulated"].all(), name
    summary = (out / "summary.md").read_text()
    assert "SIMULATED DATA" in summary and summary.count("SIMULATED") >= 5
    assert {p.name for p in (out / "figures").iterdir()} == {"fixations_and_maps.png", "metric_distributions.png"}


def test_no_output_names_a_participant(tracked: Run) -> None:
    out = _out(tracked)
    raw_ids = set(pd.read_csv(out / "private" / "participants_key.csv", dtype=str)["participant"])
    assert len(raw_ids) == 8
    for path in out.rglob("*"):
        if not path.is_file() or {"simulated", "private"} & set(path.relative_to(out).parts):
            continue
        text = pd.read_parquet(path).to_csv() if path.suffix == ".parquet" else path.read_bytes().decode("latin-1")
        assert not [r for r in raw_ids if r in text], path


def test_scores_sit_between_chance_and_the_ceiling(tracked: Run) -> None:
    table = pd.read_parquet(_out(tracked) / "summary_table.parquet")
    t = table[(table["breakdown"] == "group") & (table["group"] == "all observers")].set_index(["map", "metric"])
    assert t.loc[("uniform", "auc_borji"), "mean"] == pytest.approx(0.5)
    assert t.loc[("uniform", "nss"), "mean"] == pytest.approx(0.0, abs=1e-9)
    for metric in ("auc_judd", "nss", "cc", "sim", "information_gain"):
        assert t.loc[("ceiling", metric), "mean"] > t.loc[("uniform", metric), "mean"], metric
        assert t.loc[("face_prior", metric), "mean"] > t.loc[("uniform", metric), "mean"], metric
    # on the simulated data the face prior beats the centre bias (faces are not centred blobs)
    for metric in ("auc_judd", "nss", "cc", "information_gain"):
        assert t.loc[("face_prior", metric), "mean"] > t.loc[("centre_bias", metric), "mean"], metric
    assert {"saliency", "gradcam", "planted_features", "eyes_only"} <= set(t.index.get_level_values("map"))
    per_syndrome = table[table["breakdown"] == "syndrome"]
    assert per_syndrome["syndrome_id"].nunique() >= 3


def test_rerun_reuses_every_scored_image_and_writes_the_same_bytes(tracked: Run, tmp_path) -> None:
    out = _out(tracked)
    before = {n: (out / n).read_bytes() for n in ("scores.parquet", "summary_table.parquet", "summary.md")}
    result = eyetrack_stage(tracked, OPTIONS)
    assert result.extra["results"]["reused_images"] == result.extra["results"]["images"] > 0
    assert {n: (out / n).read_bytes() for n in before} == before


def _probe_diff(run: Run, share: float) -> pd.DataFrame:
    eyetrack_stage(run, {"simulate": {"observers": {"expert": 8, "non_clinician": 8}, "images_per_syndrome": 3,
                                      "expert_feature_share": share}, "borji_splits": 10, "figures": False})
    return pd.read_parquet(_out(run) / "probes.parquet").set_index(["group", "metric"])


def test_planted_features_beat_the_eyes_only_through_the_experts_fixations(synthetic_run, tmp_path) -> None:
    run = Run(shutil.copytree(synthetic_run.path, tmp_path / "run", ignore=shutil.ignore_patterns("maps")))
    with_features = _probe_diff(run, 0.6)
    assert len(with_features)  # the fixture cohort has syndromes whose planted features lie away from the eyes
    experts = with_features.loc["expert"]
    assert (experts["diff"] > 0).sum() >= 6  # planted above eyes on most metrics (KL sign-flipped)
    without = _probe_diff(run, 0.0).loc["expert"]
    # the same observers with no interest in the features: every metric's advantage shrinks, and the experts look
    # like the non-clinicians (the effect comes from the fixations, not from the probe maps)
    assert (without["diff"] < experts["diff"]).all()
    assert experts.loc["nss", "diff"] - without.loc["nss", "diff"] > 0.5
    assert (without["diff"] > 0).sum() <= 2
    assert "relative" in (_out(run) / "summary.md").read_text()


def test_bad_recordings_are_error_rows_and_the_rest_is_read(tracked: Run, tmp_path) -> None:
    study = shutil.copytree(_out(tracked) / "simulated", tmp_path / "study")
    asc = sorted(study.glob("*.asc"))
    lines = asc[0].read_text().splitlines()
    bad_line = next(i for i, line in enumerate(lines) if line.startswith("EFIX"))
    lines[bad_line] = "EFIX R 1200 not-a-number"
    asc[0].write_text("\n".join(lines) + "\n")
    (study / "zz_broken.asc").write_bytes(b"\x00\x01 not an EyeLink file")
    run = Run(shutil.copytree(tracked.path, tmp_path / "run", ignore=shutil.ignore_patterns("experiments")))
    result = eyetrack_stage(run, {"data": str(study), "sources": [{"format": "eyelink_asc", "path": "*.asc"},
                                                                  {"format": "tobii_tsv", "path": "*.tsv"}],
                                  "borji_splits": 10, "figures": False})
    errors = run.errors()
    errors = errors[errors["stage"] == "eyetrack"]
    malformed = errors[errors["error_kind"] == "malformed_rows"]
    assert len(malformed) == 1 and asc[0].name in malformed["message"].iloc[0]
    assert f"line(s) {bad_line + 1}" in malformed["message"].iloc[0]
    assert (errors["item_id"] == "zz_broken.asc").any()
    assert result.errors == len(errors) and result.extra["results"]["observers"] == 8
    assert result.extra["results"]["simulated"]  # read from a folder, still labelled: participants.csv says so


def test_wrong_options_fail_before_any_work(tracked: Run, tmp_path) -> None:
    run = Run(shutil.copytree(tracked.path, tmp_path / "run", ignore=shutil.ignore_patterns("experiments")))
    with pytest.raises(ConfigError, match="eyetrack.data"):
        eyetrack_stage(run, {"data": str(tmp_path / "nowhere")})
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "stimuli.csv").write_text("stimulus,image_id,width,height\n")
    with pytest.raises(ConfigError, match=r"eyetrack.sources\[0\].path"):
        eyetrack_stage(run, {"data": str(tmp_path / "study"), "sources": [{"format": "tobii_tsv", "path": "x.tsv"}]})
    with pytest.raises(ConfigError, match="eyetrack.methods"):
        eyetrack_stage(run, {"methods": ["no_such_method"]})
    with pytest.raises(ConfigError, match="format"):
        eyetrack_stage(run, {"data": str(tmp_path / "study"), "sources": [{"format": "edf", "path": "x"}]})
    assert not (run.path / "experiments" / "eyetracking" / "simulated").exists()
