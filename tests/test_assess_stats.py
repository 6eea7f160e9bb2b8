"""Subject-level statistics (gestalt_xai.assess.stats): bootstrap over subjects, strata breakdowns, paired tests."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from gestalt_xai.aggregate.faces import strata_of
from gestalt_xai.assess.stats import MIN_PAIRED, breakdown, holm, paired_tests, subject_bootstrap


def _subjects(n: int = 12, per: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"s{i:02d}" for i in range(n)], per)
    values = np.repeat(rng.normal(size=n), per) + 0.1 * rng.normal(size=n * per)
    return values, subjects


def test_bootstrap_resamples_subjects_not_images():
    values, subjects = _subjects()
    base = subject_bootstrap(values, subjects, n_boot=1000)
    # one subject photographed 60 more times: still one subject, same mean and interval
    extra = np.full(60, values[subjects == "s03"].mean())
    dup = subject_bootstrap(np.concatenate([values, extra]), np.concatenate([subjects, ["s03"] * 60]), n_boot=1000)
    assert dup == pytest.approx(base, abs=1e-12)
    # an image-level bootstrap would have shrunk the interval with 4× the rows
    assert base[2] - base[1] > 0.5


def test_bootstrap_deterministic_and_matches_scipy():
    values, subjects = _subjects(9)
    a = subject_bootstrap(values, subjects, seed=3)
    assert a == subject_bootstrap(values, subjects, seed=3)
    assert a != subject_bootstrap(values, subjects, seed=4)
    assert a[1] < a[0] < a[2]
    narrow = subject_bootstrap(values, subjects, seed=3, level=0.5)
    assert a[1] < narrow[1] < narrow[2] < a[2]
    from scipy.stats import bootstrap

    means = pd.Series(values).groupby(subjects).mean().to_numpy()
    try:
        ci = bootstrap((means,), np.mean, n_resamples=2000, method="percentile", rng=np.random.default_rng(3))
    except TypeError:  # scipy < 1.15 has no ``rng``
        pytest.skip("scipy.stats.bootstrap without rng")
    assert a[1:] == pytest.approx((ci.confidence_interval.low, ci.confidence_interval.high), abs=1e-12)


def test_bootstrap_degenerate():
    m, lo, hi = subject_bootstrap([1.0, 2.0, np.nan], ["a", "a", "b"])
    assert m == 1.5 and np.isnan(lo) and np.isnan(hi)  # b has no finite value: one subject
    assert all(np.isnan(subject_bootstrap([], [])))
    assert subject_bootstrap([2.0, 2.0], ["a", "b"]) == (2.0, 2.0, 2.0)


def test_holm_known_values():
    # R: p.adjust(c(.01, .02, .03, .04), "holm")
    assert holm([0.01, 0.02, 0.03, 0.04]).tolist() == pytest.approx([0.04, 0.06, 0.06, 0.06])
    assert holm([0.04, 0.01, 0.03, 0.02]).tolist() == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]  # capped at 1, and never below a smaller p's adjusted value
    out = holm([np.nan, 0.02, 0.01])
    assert np.isnan(out[0]) and out[1:].tolist() == pytest.approx([0.02, 0.02])
    assert holm([]).shape == (0,)


def _paired_frame(shift: float, n: int = 12, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    rows = []
    for i, b in enumerate(base):
        for rep in range(2):  # two photos per subject
            rows.append({"subject_id": f"s{i}", "method": "grad", "v": b + rep * 0.01})
            rows.append({"subject_id": f"s{i}", "method": "ig", "v": b + shift + 0.05 * rng.normal()})
    return pd.DataFrame(rows)


def test_paired_shift_significant_zero_not():
    shifted = paired_tests(_paired_frame(1.0), "v")
    assert shifted[["method_a", "method_b", "n_subjects"]].values.tolist() == [["grad", "ig", 12]]
    assert shifted["p"][0] < 0.001 and shifted["median_diff"][0] == pytest.approx(-1.0, abs=0.2)
    assert paired_tests(_paired_frame(1.0), "v", alternative="less")["p"][0] < 0.001  # grad < ig
    assert paired_tests(_paired_frame(1.0), "v", alternative="greater")["p"][0] > 0.99
    assert paired_tests(_paired_frame(0.0), "v")["p"][0] > 0.05
    same = _paired_frame(0.0).assign(v=lambda f: f["subject_id"].str[1:].astype(float))
    row = paired_tests(same, "v").iloc[0]
    assert row["p"] == 1.0 and row["reason"] == "all differences zero"


def test_paired_too_few_subjects_and_missing_methods():
    f = _paired_frame(1.0, n=8)
    f = f[~((f["method"] == "ig") & f["subject_id"].isin(["s0", "s1", "s2"]))]  # ig lacks 3 subjects
    row = paired_tests(f, "v").iloc[0]
    assert row["n_subjects"] == 5 == MIN_PAIRED - 1
    assert np.isnan(row["p"]) and np.isnan(row["p_holm"]) and "5 paired subjects" in row["reason"]


def test_paired_holm_within_groups():
    parts = []
    for metric, shift in (("deletion", 1.0), ("insertion", 0.0)):
        f = _paired_frame(shift)
        third = f[f["method"] == "grad"].assign(method="saliency", v=lambda x: x["v"] + 2.0)
        parts.append(pd.concat([f, third]).assign(metric=metric))
    out = paired_tests(pd.concat(parts), "v", keys=["metric"])
    assert out.groupby("metric").size().tolist() == [3, 3]
    for _, group in out.groupby("metric"):
        assert group["p_holm"].to_numpy() == pytest.approx(holm(group["p"].to_numpy()))
        assert (group["p_holm"] >= group["p"]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paired_tests(pd.concat(parts), "v", keys=["metric"])


def _cohort() -> tuple[pd.DataFrame, pd.DataFrame]:
    images = pd.DataFrame({"image_id": [f"i{i}" for i in range(6)], "subject_id": ["a", "a", "b", "c", "d", "e"],
                           "sex": ["F", "F", "F", "M", "M", None], "age": [3.0, 3.5, 12.0, 4.0, 1.0, np.nan]})
    frame = pd.DataFrame({"method": ["grad"] * 6 + ["ig"] * 6, "image_id": list(images["image_id"]) * 2,
                          "subject_id": list(images["subject_id"]) * 2,
                          "v": [1.0, 3.0, 4.0, 6.0, 8.0, 10.0, 0.0, 0.0, 0.0, 0.0, np.nan, 1.0]})
    frame = pd.concat([frame, pd.DataFrame({"method": ["grad"], "image_id": ["x"], "subject_id": ["z"], "v": [5.0]})])
    return images, frame  # subject z is not in the cohort's strata table


def test_breakdown_rows_per_stratum():
    images, frame = _cohort()
    table = strata_of(images, [0, 2, 5, 10, 18])
    out = breakdown(frame, "v", ["method"], table, seed=1)
    grad = out[out["method"] == "grad"].set_index("stratum")
    # ancestry is absent from the cohort: skipped; strata labelled as the aggregate stage labels them
    assert list(grad.index) == ["all", "sex:F", "sex:M", "age_band:0-2y", "age_band:2-5y", "age_band:10-18y"]
    # a: (1+3)/2 = 2, b: 4, c: 6, d: 8, e: 10, z: 5 — subject means averaged
    assert grad.loc["all", ["mean", "n_images", "n_subjects"]].tolist() == [35 / 6, 7, 6]
    assert grad.loc["sex:F", ["mean", "n_images", "n_subjects"]].tolist() == [3.0, 3, 2]
    assert grad.loc["age_band:2-5y", ["mean", "n_subjects"]].tolist() == [4.0, 2]
    assert np.isnan(grad.loc["age_band:0-2y", "ci_lo"])  # one subject: no interval
    assert grad.loc["all", "ci_lo"] < grad.loc["all", "mean"] < grad.loc["all", "ci_hi"]
    ig = out[out["method"] == "ig"].set_index("stratum")
    assert ig.loc["all", ["n_images", "n_subjects"]].tolist() == [5, 4]  # d's NaN dropped: d counts nowhere
    assert "age_band:0-2y" not in ig.index
    again = breakdown(frame, "v", ["method"], table, seed=1)
    pd.testing.assert_frame_equal(out, again)


def test_breakdown_without_strata():
    _, frame = _cohort()
    out = breakdown(frame, "v", [], None)
    assert out["stratum"].tolist() == ["all"] and out["n_subjects"][0] == 6
    only_sex = breakdown(frame, "v", ["method"], pd.DataFrame({"subject_id": ["a", "c"], "sex": ["F", "M"]}))
    assert sorted(only_sex["stratum"].unique()) == ["all", "sex:F", "sex:M"]
