"""Fixations into the crop, fixation densities, baselines, and the per-observer analysis built on them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gestalt_xai.experiments.eyetracking import analysis as an
from gestalt_xai.experiments.eyetracking import fixmaps
from gestalt_xai.faces.align import ARCFACE_TEMPLATE, invert_transform, transform_points


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def test_to_crop_lands_photo_landmarks_on_the_template_and_scales_sigma() -> None:
    m = _similarity(0.37, 0.2, -40.0, 12.0)
    photo = transform_points(ARCFACE_TEMPLATE, invert_transform(m))  # where the template's landmarks are in the photo
    fix = pd.DataFrame({"image_id": "a", "x": photo[:, 0], "y": photo[:, 1], "photo_px_per_degree": 50.0})
    out = fixmaps.to_crop(fix, {"a": m})
    np.testing.assert_allclose(out[["cx", "cy"]].to_numpy(), ARCFACE_TEMPLATE, atol=1e-9)
    assert out["in_crop"].all()
    np.testing.assert_allclose(out["crop_px_per_degree"], 50.0 * 0.37)
    # a fixation on an image without an alignment gets no crop position
    other = fixmaps.to_crop(fix.assign(image_id="b"), {"a": m})
    assert other["cx"].isna().all() and not other["in_crop"].any()


def test_in_crop_is_the_nearest_pixel_rule() -> None:
    fix = pd.DataFrame({"image_id": "a", "x": [-0.6, -0.4, 111.4, 111.6], "y": 5.0, "photo_px_per_degree": np.nan})
    out = fixmaps.to_crop(fix, {"a": np.array([[1.0, 0, 0], [0, 1.0, 0]])})
    assert out["in_crop"].tolist() == [False, True, True, False]
    assert out["crop_px_per_degree"].isna().all()


def test_gaussian_density_is_normalised_centred_and_has_the_given_sigma() -> None:
    d = fixmaps.gaussian_density(np.array([50.3]), np.array([60.7]), 4.0)
    yy, xx = np.mgrid[:112, :112]
    mx, my = (d * xx).sum(), (d * yy).sum()
    assert d.sum() == pytest.approx(1.0)
    assert (mx, my) == pytest.approx((50.3, 60.7), abs=1e-6)
    assert np.sqrt((d * (xx - mx) ** 2).sum()) == pytest.approx(4.0, rel=1e-3)
    # per-fixation σ: each fixation keeps equal mass however wide its Gaussian
    two = fixmaps.gaussian_density(np.array([30.0, 85.0]), np.array([56.0, 56.0]), np.array([2.0, 6.0]))
    assert two[:, :56].sum() == pytest.approx(0.5, abs=1e-3)
    weighted = fixmaps.gaussian_density(np.array([30.0, 80.0]), np.array([56.0, 56.0]), 3.0, np.array([1.0, 3.0]))
    assert weighted[:, :56].sum() == pytest.approx(0.25, abs=1e-6)
    assert fixmaps.gaussian_density(np.array([]), np.array([]), 3.0) is None


def _fixations(rng: np.random.Generator, centres: dict[str, tuple[float, float]], images: list[str], n: int = 12
               ) -> pd.DataFrame:
    rows = []
    for image in images:
        for obs, (x, y) in centres.items():
            for k in range(n):
                rows.append({"participant": obs, "image_id": image, "fixation": k, "duration_ms": 200.0,
                             "cx": x + rng.normal(0, 3), "cy": y + rng.normal(0, 3), "in_crop": True,
                             "crop_px_per_degree": np.nan})
    return pd.DataFrame(rows)


def test_face_prior_and_leave_one_observer_out_leave_the_right_data_out() -> None:
    d = {i: fixmaps.gaussian_density(np.array([x]), np.array([56.0]), 3.0) for i, x in (("a", 20.0), ("b", 90.0))}
    prior = fixmaps.face_prior(d)
    assert np.array_equal(prior["a"], d["b"]) and np.array_equal(prior["b"], d["a"])
    fix = _fixations(np.random.default_rng(0), {"o1": (30.0, 40.0), "o2": (80.0, 70.0), "o3": (80.0, 70.0)}, ["a"])
    loo = fixmaps.loo_densities(fix, fallback_sigma_px=4.0)
    assert set(loo) == {"o1", "o2", "o3"}
    assert loo["o1"][70, 80] > 100 * loo["o1"][40, 30]  # o1's own fixations are not in its ceiling map
    assert loo["o2"][40, 30] > 0.1 * loo["o2"][70, 80]  # o2's ceiling holds o1 and o3


def test_filters_count_what_they_drop() -> None:
    fix = pd.DataFrame({"fixation": [0, 1, 2, 3, 0, 1], "duration_ms": [50.0, 70.0, 300.0, 3000.0, 400.0, 90.0]})
    kept, dropped = fixmaps.filter_fixations(fix, min_duration_ms=80, max_duration_ms=2000)
    assert kept["duration_ms"].tolist() == [300.0, 90.0]
    assert dropped == {"first": 2, "short": 1, "long": 1}
    kept, dropped = fixmaps.filter_fixations(fix, drop_first=False, min_duration_ms=0)
    assert len(kept) == 6 and dropped == {"first": 0, "short": 0, "long": 0}


def _image(rng: np.random.Generator) -> an.ImageFixations:
    centres = {f"o{i}": (40.0 + i, 50.0 - i) for i in range(4)}
    fix = _fixations(rng, centres, ["a", "b"])
    here = fix[fix["image_id"] == "a"]
    own = {o: fixmaps.fixation_density(g, fallback_sigma_px=4.0) for o, g in here.groupby("participant")}
    prior = fixmaps.centre_bias()
    other = fix[fix["image_id"] == "b"]
    return an.ImageFixations("a", here, own, fixmaps.loo_densities(here, fallback_sigma_px=4.0),
                             dict.fromkeys(own, prior),
                             (other["cx"].to_numpy() + 0.5, other["cy"].to_numpy() + 0.5))


def test_scores_put_the_density_at_the_ceiling_side_and_uniform_at_chance() -> None:
    image = _image(np.random.default_rng(1))
    pooled = np.mean(list(image.own.values()), axis=0)
    elsewhere = fixmaps.gaussian_density(np.array([90.0]), np.array([95.0]), 6.0)
    uniform = np.full((112, 112), 1 / 112**2)
    scores = an.score_image(image, {"density": pooled, "uniform": uniform, "elsewhere": elsewhere}, seed=3,
                            borji_splits=20)
    mean = scores.groupby(["map", "metric"])["value"].mean().unstack("metric")
    assert set(mean.index) == {"density", "uniform", "elsewhere", "ceiling", "face_prior"}
    for metric in an.METRICS:
        good, bad = mean.loc["density", metric], mean.loc["elsewhere", metric]
        assert (good < bad) if metric in an.LOWER_IS_BETTER else (good > bad), metric
    # ties of a flat map: exactly 0.5 where ties count half, around 0.5 where AUC-Judd breaks them by jitter
    assert mean.loc["uniform", ["auc_borji", "auc_shuffled"]].tolist() == pytest.approx([0.5] * 2)
    assert abs(mean.loc["uniform", "auc_judd"] - 0.5) < 0.1
    assert mean.loc["uniform", ["nss", "cc"]].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    # the same seed gives the same bytes; each observer's negatives are shared by every map
    again = an.score_image(image, {"density": pooled, "uniform": uniform, "elsewhere": elsewhere}, seed=3,
                           borji_splits=20)
    pd.testing.assert_frame_equal(scores, again)


def test_relative_scores_put_the_mean_between_prior_and_ceiling_or_leave_it_undefined() -> None:
    per_obs = pd.DataFrame({"group": "g", "participant": ["p1"] * 3 + ["p2"] * 3, "metric": "nss",
                            "map": ["face_prior", "ceiling", "m"] * 2, "value": [1.0, 3.0, 2.0, 0.5, 1.5, 2.5],
                            "n_images": 4})
    rel = an.relative_scores(per_obs)
    assert rel.set_index(["participant", "map"]).loc[("p2", "m"), ["prior", "ceiling"]].tolist() == [0.5, 1.5]
    summary = an.group_summary(rel).set_index("map")
    # ratio of means: (2.25 − 0.75) / (2.25 − 0.75)
    assert summary.loc["m", "relative"] == pytest.approx(1.0)
    assert summary.loc["face_prior", "relative"] == 0 and summary.loc["ceiling", "relative"] == 1
    assert summary.loc["m", "span"] == pytest.approx(1.5) and summary.loc["m", "span_ci_lo"] > 0
    # KL: lower is better, so a result below the prior towards the ceiling is still between 0 and 1
    kl = per_obs.assign(metric="kl_div", value=[3.0, 1.0, 2.0, 3.0, 1.0, 2.0])
    assert an.group_summary(an.relative_scores(kl)).set_index("map").loc["m", "relative"] == pytest.approx(0.5)
    # a ceiling no better than the prior gives no scale
    flat = per_obs.assign(value=[1.0, 1.0, 2.0, 1.5, 1.4, 2.5])
    undefined = an.group_summary(an.relative_scores(flat)).set_index("map")
    assert np.isnan(undefined.loc["m", "relative"]) and undefined.loc["m", "span_ci_lo"] <= 0


def test_probe_contrast_reads_the_sign_of_each_metric() -> None:
    rows = []
    rng = np.random.default_rng(0)
    for p in range(8):
        for metric, (a, b) in {"nss": (2.0, 1.0), "kl_div": (1.0, 2.0)}.items():
            for m, v in (("planted_features", a), ("eyes_only", b), ("face_prior", 0.5), ("ceiling", 3.0)):
                rows.append({"group": "expert", "participant": f"P{p}", "syndrome_id": "S03", "map": m,
                             "metric": metric, "value": v + rng.normal(0, 0.1)})
    out = an.probe_contrast(pd.DataFrame(rows), {"S03"}).set_index("metric")
    assert out.loc["nss", "diff"] > 0.8 and out.loc["kl_div", "diff"] > 0.8  # KL: lower is better, sign flipped
    assert (out["p"] < 0.01).all() and (out["n_observers"] == 8).all()
    assert an.probe_contrast(pd.DataFrame(rows), {"S09"}).empty
