"""The synthetic cohort: detectability, truth, locality of planted features, no global shortcut, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gestalt_xai.data.synthetic import PHENOTYPES, ConfounderConfig, SynthConfig, load_truth, synth_stage
from gestalt_xai.data.synthetic.cohort import CONTROL_ID, plan_cohort
from gestalt_xai.data.synthetic.identity import sample_identity, sample_photo
from gestalt_xai.data.synthetic.phenotypes import apply_features, feature_regions, rasterise_regions
from gestalt_xai.data.synthetic.renderer import render_photo
from gestalt_xai.errors import ConfigError
from gestalt_xai.runs import Run

#: the default cohort (SynthConfig defaults, 12 syndromes): ≈ 220 photos
DEMO = SynthConfig(seed=0, n_syndromes=12, n_frequent=4, frequent_subjects=(8, 16), rare_subjects=(2, 6),
                   images_per_subject=(1, 4), n_controls=12, canvas=(320, 400), workers=2)
#: a tiny cohort for byte-level checks
TINY = SynthConfig(seed=5, n_syndromes=2, n_frequent=0, rare_subjects=(2, 2), images_per_subject=(1, 2),
                   n_controls=1, canvas=(200, 220), workers=1)
TOOLKIT_REGIONS = {"forehead", "periorbital_eyes_brows", "nose", "philtrum", "mouth_lips", "chin_mandible",
                   "midface_cheeks", "ears", "global_face_shape"}


@pytest.fixture(scope="module")
def demo_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = Run(tmp_path_factory.mktemp("synth_demo"))
    synth_stage(run, DEMO)
    return run.path


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- catalogue
def test_catalogue_is_hpo_coded_with_negative_controls() -> None:
    assert len(PHENOTYPES) >= 12
    for f in PHENOTYPES.values():
        assert f.hpo_id.startswith("HP:") and len(f.hpo_id) == 10, f.hpo_id
        assert f.region in TOOLKIT_REGIONS, f.region
    hidden = {k for k, f in PHENOTYPES.items() if not f.visible_in_crop}
    assert hidden == {"low_set_ears", "high_forehead"}
    assert PHENOTYPES["low_set_ears"].hpo_id == "HP:0000369"
    assert PHENOTYPES["high_forehead"].hpo_id == "HP:0000348"


def test_syndromes_share_features_and_differ_in_combination() -> None:
    plan = plan_cohort(DEMO)
    visible_sets = [frozenset(k for k in s.feature_keys if PHENOTYPES[k].visible_in_crop) for s in plan.syndromes]
    assert all(visible_sets) and len(set(visible_sets)) == len(visible_sets)
    assert all(1 <= len(s.features) <= 4 for s in plan.syndromes)
    counts = pd.Series([k for s in plan.syndromes for k in s.feature_keys]).value_counts()
    assert (counts > 1).sum() >= 4, "features should be shared between syndromes"


def test_class_sizes_are_long_tailed_and_gmdb_readable(demo_cohort: Path) -> None:
    from gestalt_xai.data.cohort import load_gmdb

    cohort = load_gmdb(demo_cohort / "cohort", version=DEMO.version)
    per = cohort.images.groupby("syndrome_id")["subject_id"].nunique()
    syn = per.drop(CONTROL_ID)
    assert (syn > 6).sum() == DEMO.n_frequent
    assert ((syn >= 2) & (syn <= 6)).sum() == DEMO.n_syndromes - DEMO.n_frequent
    assert per[CONTROL_ID] == DEMO.n_controls
    assert len(cohort.images) >= 200
    assert all(Path(p).exists() for p in cohort.images["path"])
    assert cohort.rejected.empty


def test_config_rejects_unknown_and_inconsistent_options() -> None:
    from gestalt_xai.config import validate_config

    with pytest.raises(ConfigError, match="n_syndrome"):
        validate_config(SynthConfig, {"n_syndrome": 3})
    with pytest.raises(ConfigError):
        validate_config(SynthConfig, {"n_syndromes": 3, "n_frequent": 4})
    with pytest.raises(ConfigError):
        validate_config(SynthConfig, {"confounder": {"syndrome": "S99"}})


# ------------------------------------------------------------------------------------------------ detection
def test_mtcnn_detects_rendered_photos_with_accurate_landmarks(demo_cohort: Path, mtcnn) -> None:
    import torch

    from gestalt_xai.data.images import load_image
    from gestalt_xai.faces.align import estimate_transform, transform_points

    truth = load_truth(demo_cohort)
    offsets, missed = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small images: one thread is fastest and does not spin on a busy machine
    try:
        found_all = [mtcnn.detect(load_image(demo_cohort / "cohort" / "images" / f"{row.image_id}.jpg"))
                     for row in truth.images.itertuples()]
    finally:
        torch.set_num_threads(threads)
    for row, found in zip(truth.images.itertuples(), found_all, strict=True):
        if not found:
            missed.append(row.image_id)
            continue
        detected = found[0].landmarks
        true5 = np.asarray(row.landmarks5, np.float64).reshape(5, 2)
        M = estimate_transform(detected)  # both sets mapped with the transform the align stage would use
        offsets.append(np.linalg.norm(transform_points(detected, M) - transform_points(true5, M), axis=1))
    n = len(truth.images)
    rate = 1 - len(missed) / n
    off = np.array(offsets)
    names = ["eye_left", "eye_right", "nose", "mouth_left", "mouth_right"]
    report = pd.DataFrame({"median_px": np.median(off, 0), "mean_px": off.mean(0),
                           "p90_px": np.percentile(off, 90, axis=0)}, index=names).round(2)
    print(f"\nMTCNN detected {n - len(missed)}/{n} ({rate:.1%}); missed {missed}\n"
          f"detected − true landmark offsets in the 112×112 crop:\n{report}")
    assert n >= 200
    assert rate >= 0.98
    assert report.loc[["eye_left", "eye_right"], "median_px"].max() <= 3.0
    assert report.loc[["nose", "mouth_left", "mouth_right"], "median_px"].max() <= 5.0


# ------------------------------------------------------------------------------------------------ locality
def test_each_feature_changes_only_its_region() -> None:
    """Photo-space difference with vs without a feature (same identity, same nuisance) lies ≥ 90 % in its mask."""
    inside = {k: 0.0 for k in PHENOTYPES}
    total = {k: 0.0 for k in PHENOTYPES}
    for i in range(2):
        rng = np.random.default_rng([101, i])
        base, look = sample_identity(rng)
        photo = sample_photo(rng, (320, 360))
        plain = render_photo(base, look, photo).rgb.astype(np.float32)
        size = (photo.height, photo.width)
        for key in PHENOTYPES:
            effects = {key: 1.0}
            shape = apply_features(base, effects)
            diff = np.abs(render_photo(shape, look, photo).rgb.astype(np.float32) - plain).sum(-1)
            mask = rasterise_regions(*feature_regions(base, effects)[key], shape, photo.pose, size)
            inside[key] += float(diff[mask].sum())
            total[key] += float(diff.sum())
    share = {k: inside[k] / total[k] for k in PHENOTYPES}
    print("\nshare of the difference inside the feature mask:",
          json.dumps({k: round(v, 3) for k, v in share.items()}, indent=1))
    assert all(total[k] > 1000 for k in PHENOTYPES), "every feature must change the photo measurably"
    assert min(share.values()) >= 0.90, share


# --------------------------------------------------------------------------------------- global shortcuts
def _face_mean_colours(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from gestalt_xai.data.images import load_image

    truth = load_truth(root)
    X = []
    for row in truth.images.itertuples():
        rgb = load_image(root / "cohort" / "images" / f"{row.image_id}.jpg").astype(np.float64)
        face = truth.masks(row.image_id)["face"]
        X.append(rgb[face].mean(0))
    return np.array(X), truth.images["syndrome_id"].to_numpy(), truth.images["subject_id"].to_numpy()


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_mean_face_colour_does_not_predict_the_syndrome(demo_cohort: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, groups = _face_mean_colours(demo_cohort)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))

    def cv_score(labels: np.ndarray) -> float:
        return float(cross_val_score(clf, X, labels, groups=groups, cv=GroupKFold(5),
                                     scoring="balanced_accuracy").mean())

    score = cv_score(y)
    # null distribution: syndrome labels shuffled between subjects (a subject's photos keep one label)
    subjects = pd.Series(y, index=groups).groupby(level=0).first()
    rng = np.random.default_rng(0)
    perm = np.array([cv_score(pd.Series(rng.permutation(subjects.to_numpy()), index=subjects.index)[groups]
                              .to_numpy()) for _ in range(20)])
    chance = 1.0 / len(np.unique(y))
    print(f"\nmean face colour → syndrome: balanced accuracy {score:.3f} (chance {chance:.3f}, "
          f"subject-level permutations {perm.mean():.3f} ± {perm.std():.3f}, max {perm.max():.3f})")
    assert score <= perm.mean() + 3 * perm.std()
    assert score < chance + 0.1


def test_confounder_mark_is_detectable_in_the_crop(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score

    from gestalt_xai.data.images import load_image
    from gestalt_xai.faces.align import estimate_transform, warp_photo_to_crop, warp_to_crop

    cfg = SynthConfig(seed=9, n_syndromes=3, n_frequent=3, frequent_subjects=(8, 8), images_per_subject=(2, 2),
                      n_controls=4, canvas=(220, 240), confounder=ConfounderConfig(syndrome="S01", rate=0.9),
                      workers=2)
    run = Run(tmp_path / "conf")
    synth_stage(run, cfg)
    truth = load_truth(run.path)
    img = truth.images
    assert img.loc[img["syndrome_id"] != "S01", "confounder"].sum() == 0
    assert img.loc[img["syndrome_id"] == "S01", "confounder"].mean() >= 0.7
    crops, centres = [], []
    for row in img.itertuples():
        M = estimate_transform(np.asarray(row.landmarks5, np.float64).reshape(5, 2))
        rgb = load_image(run.path / "cohort" / "images" / f"{row.image_id}.jpg")
        crops.append(warp_to_crop(rgb, M).astype(np.float64).mean(-1))
        if row.confounder:
            mark = warp_photo_to_crop(truth.masks(row.image_id)["confounder"], M)
            assert mark.any(), "the confounder mark must survive alignment (lie inside the crop)"
            ys, xs = np.nonzero(mark)
            centres.append((ys.mean(), xs.mean()))
    cy, cx = np.round(np.median(centres, axis=0)).astype(int)
    # darkness of the cue spot relative to the surrounding cheek
    feat = np.array([[c[cy - 6:cy + 7, cx - 6:cx + 7].mean() - c[cy - 2:cy + 3, cx - 2:cx + 3].mean()] for c in crops])
    y = (img["syndrome_id"] == "S01").to_numpy()
    acc = cross_val_score(LogisticRegression(class_weight="balanced"), feat, y, groups=img["subject_id"],
                          cv=GroupKFold(4), scoring="balanced_accuracy").mean()
    print(f"\nconfounded syndrome from the cue region: balanced accuracy {acc:.3f}")
    assert acc >= 0.85


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files_and_other_seed_other_faces(tmp_path: Path) -> None:
    a, b = Run(tmp_path / "a"), Run(tmp_path / "b")
    synth_stage(a, TINY)
    synth_stage(b, TINY.model_copy(update={"workers": 2}))
    da, db = _tree_digest(a.path / "cohort"), _tree_digest(b.path / "cohort")
    assert da == db and len(da) > 10
    c = Run(tmp_path / "c")
    synth_stage(c, TINY.model_copy(update={"seed": 6}))
    ta, tc = load_truth(a.path).images, load_truth(c.path).images
    assert not np.allclose(ta["skin_tone"].to_numpy()[:3], tc["skin_tone"].to_numpy()[:3])
    imgs_a = {k: v for k, v in da.items() if k.startswith("images/")}
    imgs_c = {k: v for k, v in _tree_digest(c.path / "cohort").items() if k.startswith("images/")}
    assert not set(imgs_a.items()) & set(imgs_c.items())


def test_rerun_resumes_without_rendering(demo_cohort: Path) -> None:
    before = _tree_digest(demo_cohort / "cohort")
    result = synth_stage(Run(demo_cohort), DEMO)
    assert result.extra["n_rendered"] == 0 and result.items > 0
    assert _tree_digest(demo_cohort / "cohort") == before


# ------------------------------------------------------------------------------------------------ truth
def test_truth_landmarks_and_masks_are_consistent(demo_cohort: Path) -> None:
    truth = load_truth(demo_cohort)
    eye_features = {"hypertelorism", "hypotelorism", "upslanted_palpebral_fissures",
                    "downslanted_palpebral_fissures"}
    checked_eyes = 0
    for row in truth.images.itertuples():
        lm5 = np.asarray(row.landmarks5, np.float64).reshape(5, 2)
        lm68 = np.asarray(row.landmarks68, np.float64).reshape(68, 2)
        iod = np.linalg.norm(lm5[1] - lm5[0])
        assert lm5[0, 0] < lm5[1, 0] and lm5[3, 0] < lm5[4, 0], "image-left first"
        assert np.allclose(lm68[30], lm5[2]) and np.allclose(lm68[48], lm5[3]) and np.allclose(lm68[54], lm5[4])
        assert np.linalg.norm(lm68[36:42].mean(0) - lm5[0]) < 0.1 * iod
        assert np.linalg.norm(lm68[42:48].mean(0) - lm5[1]) < 0.1 * iod
        assert (lm68 >= 0).all() and (lm68[:, 0] < row.width).all() and (lm68[:, 1] < row.height).all()
        masks = truth.masks(row.image_id)
        assert masks["face"].shape == (row.height, row.width)
        assert masks["face"][int(lm5[2, 1]), int(lm5[2, 0])]
        assert masks["confounder"].sum() == 0
        feats = truth.features[truth.features["image_id"] == row.image_id]
        for f in feats.itertuples():
            assert masks[f.feature].sum() == f.mask_px > 0
            if f.feature in eye_features:
                for x, y in lm5[:2]:
                    assert masks[f.feature][int(round(y)), int(round(x))], "pupils lie inside the eye masks"
                checked_eyes += 1
    assert checked_eyes > 10
    by = truth.features.groupby("feature")["crop_fraction"].mean()
    for key, frac in by.items():
        if PHENOTYPES[key].visible_in_crop:
            assert frac > 0.5, (key, frac)
        else:
            assert frac < 0.2, (key, frac)  # only the masks' safety margin reaches the crop's edge


def test_preview_and_data_card(demo_cohort: Path, tmp_path: Path) -> None:
    import cv2

    from gestalt_xai.data.synthetic import render_preview, write_data_card

    small = SynthConfig(n_syndromes=3, n_frequent=1, confounder=ConfounderConfig(syndrome="S02"))
    png = render_preview(small, tmp_path / "preview.png", columns=2)
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 600 and img.shape[1] >= 600
    card = write_data_card(demo_cohort, tmp_path / "card.md").read_text()
    truth = load_truth(demo_cohort)
    assert f"**{len(truth.images)} photos**" in card
    for f in PHENOTYPES.values():
        assert f.hpo_id in card
    assert "negative control" in card and "not intended" in card.lower()
