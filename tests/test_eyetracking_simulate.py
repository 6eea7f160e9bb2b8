"""The simulated eye-tracking study: reproducible, on the face, experts on the planted features, files that map back
to the truth (a reader-free check of the writers: the formats module's readers are tested on these files too)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from gestalt_xai.config import validate_config
from gestalt_xai.data.synthetic.truth import load_masks, load_truth
from gestalt_xai.errors import ConfigError
from gestalt_xai.experiments.eyetracking.simulate import TRUTH_COLUMNS, SimulationConfig, simulate_study
from gestalt_xai.faces.align import CROP_SIZE, row_matrix, transform_points


@pytest.fixture(scope="module")
def study(synthetic_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "study"
    return simulate_study(synthetic_run, out, SimulationConfig(seed=0))


@pytest.fixture(scope="module")
def no_share(synthetic_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "no_share"
    return simulate_study(synthetic_run, out, SimulationConfig(seed=0, expert_feature_share=0.0))


def _truth(paths) -> pd.DataFrame:
    return pd.read_parquet(paths["truth"])


def _hits(truth: pd.DataFrame, run) -> pd.DataFrame:
    """Per fixation: inside the face mask, inside a visible planted feature's mask (one away from the eyes),
    outside the 112² crop."""
    tables = load_truth(run.path)
    align = run.alignments().set_index("image_id")
    parts = []
    for image_id, g in truth.groupby("image_id"):
        masks = load_masks(run.path / "cohort", image_id, tables.features)
        feats = tables.features[(tables.features["image_id"] == image_id) & tables.features["visible_in_crop"]]
        union, off_eyes = np.zeros_like(masks["face"]), np.zeros_like(masks["face"])
        for f, region in zip(feats["feature"], feats["region"], strict=True):
            union |= masks[f]
            off_eyes |= masks[f] if region != "periorbital_eyes_brows" else False
        x, y = np.rint(g["x"]).astype(int).to_numpy(), np.rint(g["y"]).astype(int).to_numpy()
        ok = (x >= 0) & (y >= 0) & (x < union.shape[1]) & (y < union.shape[0])
        face, feature, away = np.zeros(len(g), bool), np.zeros(len(g), bool), np.zeros(len(g), bool)
        face[ok], feature[ok], away[ok] = masks["face"][y[ok], x[ok]], union[y[ok], x[ok]], off_eyes[y[ok], x[ok]]
        crop = transform_points(g[["x", "y"]].to_numpy(), row_matrix(align.loc[image_id]))
        off = ~((crop >= 0) & (crop < CROP_SIZE)).all(1)
        parts.append(pd.DataFrame({"face": face, "feature": feature, "feature_off_eyes": away, "off_crop": off},
                                  index=g.index))
    return truth.join(pd.concat(parts))


def test_same_seed_same_bytes_another_seed_other_data(synthetic_run, study, tmp_path):
    again = simulate_study(synthetic_run, tmp_path / "again", SimulationConfig(seed=0))
    assert sorted(again) == sorted(study)
    for key, path in study.items():
        assert again[key].read_bytes() == path.read_bytes(), key
    other = simulate_study(synthetic_run, tmp_path / "other", SimulationConfig(seed=1))
    assert other["truth"].read_bytes() != study["truth"].read_bytes()
    assert other["tobii_tsv"].read_bytes() != study["tobii_tsv"].read_bytes()


def test_tables_labelled_simulated_and_small(study):
    truth = _truth(study)
    assert list(truth.columns) == TRUTH_COLUMNS
    assert truth.equals(truth.sort_values(["participant", "trial", "fixation"],
                                          key=lambda c: c.astype(int) if c.name == "trial" else c))
    people = pd.read_csv(study["participants"], dtype={"participant": str})
    assert people["simulated"].all() and people.groupby("group").size().to_dict() == {"expert": 6, "non_clinician": 6}
    # half of each group in each format
    fmt = truth.groupby("participant")[["group", "format"]].first().value_counts()
    assert set(fmt.to_numpy()) == {3} and len(fmt) == 4
    answers = pd.read_csv(study["answers"], dtype=str)
    assert (answers["simulated"] == "True").all() and len(answers) == 12 * truth["image_id"].nunique()
    ascs = [p for k, p in study.items() if k.startswith("eyelink_asc:")]
    assert len(ascs) == 6 and all(p.read_text().startswith("** SIMULATED DATA") for p in ascs)
    tsv = pd.read_csv(study["tobii_tsv"], sep="\t", dtype=str)
    assert (tsv["Recording name"] == "SIMULATED").all()
    # a few kB per trial in all (the demo's 12 observers × 24 photos stay near 1.5 MB)
    size = sum(p.stat().st_size for p in study.values())
    assert size < 6000 * len(answers), size


def test_fixations_on_the_face_a_few_outside_the_crop(synthetic_run, study):
    hits = _hits(_truth(study), synthetic_run)
    assert hits["face"].mean() > 0.75
    later = hits[hits["fixation"] > 0]
    assert 0.01 < later["off_crop"].mean() < 0.15
    assert (later["target"].isin(["ear_left", "ear_right", "forehead"])).any()
    assert hits["duration_ms"].min() >= 80 and 200 < hits["duration_ms"].mean() < 320
    # the first fixation of a trial starts at the onset, on the stimulus centre (the drift-check target)
    first = hits[hits["fixation"] == 0]
    assert (first["start_ms"] == 0).all() and (first["target_kind"] == "centre").all()


def test_experts_look_at_the_planted_features_because_of_the_masks(synthetic_run, study, no_share):
    share = _hits(_truth(study), synthetic_run).groupby("group")[["feature", "feature_off_eyes"]].mean()
    assert share.loc["expert", "feature"] > share.loc["non_clinician", "feature"] + 0.12, share
    # features away from the eyes (everybody looks at the eyes): experts there 1.5 times as often at least
    assert share.loc["expert", "feature_off_eyes"] > 1.5 * share.loc["non_clinician", "feature_off_eyes"], share
    # without the feature share the experts' habits alone do not bring them onto the features
    flat = _hits(_truth(no_share), synthetic_run).groupby("group")[["feature", "feature_off_eyes"]].mean()
    assert (flat.loc["expert"] < flat.loc["non_clinician"] + 0.03).all(), flat
    assert abs(flat.loc["non_clinician", "feature"] - share.loc["non_clinician", "feature"]) < 1e-12  # unchanged
    cohort = load_truth(synthetic_run.path).images[["image_id", "syndrome_id"]].astype(str)
    answers = pd.read_csv(study["answers"], dtype=str).merge(cohort, on="image_id")
    people = pd.read_csv(study["participants"], dtype=str)
    right = answers.merge(people, on="participant").assign(right=lambda d: d["answer"] == d["syndrome_id"])
    accuracy = right.groupby("group")["right"].mean()
    assert accuracy["expert"] > accuracy["non_clinician"] + 0.2, accuracy


def _stimuli(paths) -> pd.DataFrame:
    return pd.read_csv(paths["stimuli"], dtype={"image_id": str}).set_index("stimulus")


def test_asc_efix_lines_map_back_to_the_truth(study):
    truth = _truth(study)
    stimuli = _stimuli(study)
    rows = []
    for key, path in study.items():
        if not key.startswith("eyelink_asc:"):
            continue
        onset, place = None, None
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if m := re.match(r"MSG\t(\d+) TRIALID (\d+)$", line):
                onset, trial = int(m[1]), m[2]
            elif m := re.match(r"MSG\t\d+ !V IMGLOAD CENTER \S*/(\S+) (\d+) (\d+) (\d+) (\d+)$", line):
                place = (m[1], *map(float, m.groups()[1:]))
            elif m := re.match(r"EFIX ([LR])\s+(\d+)\t(\d+)\t(\d+)\t\s*([-\d.]+)\t\s*([-\d.]+)\t\s*\d+$", line):
                stim, xc, yc, w, h = place
                box = stimuli.loc[stim]
                sx, sy = float(m[5]) - (xc - w / 2), float(m[6]) - (yc - h / 2)
                assert int(m[3]) - int(m[2]) + 1 == int(m[4])
                rows.append({"participant": path.stem, "trial": trial, "stimulus": stim, "line": n, "eye": m[1],
                             "start_ms": float(int(m[2]) - onset), "duration_ms": float(m[4]),
                             "x": box["crop_left"] + sx * box["crop_width"] / box["width"],
                             "y": box["crop_top"] + sy * box["crop_height"] / box["height"]})
    parsed = pd.DataFrame(rows)
    asc = truth[truth["format"] == "eyelink_asc"].reset_index(drop=True)
    assert len(parsed) == len(asc) > 100
    for col in ("participant", "trial", "stimulus", "line", "eye", "start_ms", "duration_ms"):
        assert (parsed[col].to_numpy() == asc[col].to_numpy()).all(), col
    assert (asc["source"] == asc["participant"] + ".asc").all()
    assert np.abs(parsed[["x", "y"]].to_numpy() - asc[["x", "y"]].to_numpy()).max() < 0.05


def test_tobii_samples_map_back_to_the_truth(study):
    truth = _truth(study)
    stimuli = _stimuli(study)
    tsv = pd.read_csv(study["tobii_tsv"], sep="\t", decimal=",", dtype={"Participant name": str})
    tsv["line"] = np.arange(len(tsv)) + 2
    assert set(tsv["Eye movement type"]) == {"Fixation", "Saccade"}
    # one sample every 1000/30 ms within a stimulus, time running on between stimuli
    step = tsv.groupby("Participant name")["Recording timestamp"].diff().dropna()
    assert (step > 0).all()
    shown = tsv.groupby(["Participant name", "Presented Stimulus name"])["Recording timestamp"].diff().dropna()
    assert set(shown) == {33, 34}
    fix = tsv[tsv["Eye movement type"] == "Fixation"]
    fix = fix.groupby(["Participant name", "Eye movement type index"], sort=False).first().reset_index()
    box = stimuli.loc[fix["Presented Stimulus name"]]
    x = box["crop_left"].to_numpy() + fix["Fixation point X (MCSnorm)"].to_numpy() * box["crop_width"].to_numpy()
    y = box["crop_top"].to_numpy() + fix["Fixation point Y (MCSnorm)"].to_numpy() * box["crop_height"].to_numpy()
    tob = truth[truth["format"] == "tobii_tsv"].reset_index(drop=True)
    assert len(fix) == len(tob) > 100
    assert (fix["Participant name"].to_numpy() == tob["participant"].to_numpy()).all()
    assert (fix["line"].to_numpy() == tob["line"].to_numpy()).all()
    assert (fix["Gaze event duration"].to_numpy() == tob["duration_ms"].to_numpy()).all()
    assert np.abs(np.column_stack([x, y]) - tob[["x", "y"]].to_numpy()).max() < 0.05
    onset = tsv.groupby(["Participant name", "Presented Stimulus name"], sort=False)["Recording timestamp"].min()
    shown = pd.MultiIndex.from_frame(fix[["Participant name", "Presented Stimulus name"]])
    start = fix["Recording timestamp"].to_numpy() - onset.loc[shown].to_numpy()
    assert (start == tob["start_ms"].to_numpy()).all()


def test_images_given_by_id_and_options_checked(synthetic_run, tmp_path):
    ids = sorted(synthetic_run.image_table()["image_id"])[:3]
    paths = simulate_study(synthetic_run, tmp_path, SimulationConfig(images=ids, observers={"expert": 1,
                                                                                           "non_clinician": 2}))
    truth = _truth(paths)
    assert sorted(truth["image_id"].unique()) == ids and truth["participant"].nunique() == 3
    assert "tobii_tsv" in paths  # the second non-clinician
    with pytest.raises(ConfigError, match="accuracy"):
        validate_config(SimulationConfig, {"observers": {"expert": 2, "resident": 2}})
    with pytest.raises(ConfigError, match="observers"):
        validate_config(SimulationConfig, {"observers": {"expert": 0}})
