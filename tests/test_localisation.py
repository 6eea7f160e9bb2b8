"""The localisation tables' building blocks (assess/localisation.py) on hand-made maps, masks and effects: the ratio
against change masks, the Localiser, rank correlations, summaries and the mark's effect."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gestalt_xai.assess.localisation import (
    Localiser,
    area_share,
    change_mask_source,
    face_region,
    localisation_summary,
    mark_effects,
    rank_correlations,
    relevance_mass_accuracy,
    spearman_by_group,
    wilson_interval,
)

FACE = face_region()


def _box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((112, 112), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_face_region_is_the_atlas_face_without_background():
    from gestalt_xai.faces.regions import LABEL, template_atlas

    assert np.array_equal(FACE, template_atlas() != LABEL["background"])
    assert 0.3 < FACE.mean() < 0.95 and not FACE[0, 0] and FACE[60, 56]


def test_ratio_is_one_over_area_when_all_mass_is_inside_and_one_for_a_uniform_map():
    nose, mouth = _box(55, 75, 45, 67), _box(85, 97, 38, 74)
    assert FACE[nose].all() and FACE[mouth].all()  # both masks lie inside the face
    masks = np.stack([nose, mouth])
    inside = np.where(nose, 2.0, -0.5)  # all positive mass in the nose mask; negative relevance elsewhere
    uniform = np.ones((112, 112))
    mass = relevance_mass_accuracy(np.stack([inside, uniform])[:, None], masks, FACE)  # all pairs: (2 maps, 2 masks)
    area = area_share(masks, FACE)
    assert area == pytest.approx([nose.sum() / FACE.sum(), mouth.sum() / FACE.sum()])
    assert mass[0] == pytest.approx([1.0, 0.0])
    assert mass[0, 0] / area[0] == pytest.approx(1 / area[0])
    assert mass[1] / area == pytest.approx([1.0, 1.0])  # the uniform-map reference
    # relevance outside the face does not count, and a mask's part outside the face does not either
    background = ~FACE
    mass_bg = relevance_mass_accuracy(inside + 50.0 * background, np.stack([nose | background, mouth]), FACE)
    area_bg = area_share(np.stack([nose | background, mouth]), FACE)
    assert mass_bg == pytest.approx(mass[0]) and area_bg == pytest.approx(area)
    # no positive mass in the face: no share
    assert np.isnan(relevance_mass_accuracy(-uniform, masks, FACE)).all()


def _variants(image_id: str, features: list[str], marked: bool = False) -> list[dict[str, object]]:
    rows = [{"image_id": image_id, "variant": f"without_{f}", "feature": f, "change": "remove"} for f in features]
    rows.append({"image_id": image_id, "variant": "without_all_features", "feature": "all", "change": "remove"})
    rows.append({"image_id": image_id, "variant": "without_mark" if marked else "with_mark", "feature": "mark",
                 "change": "remove" if marked else "add"})
    return rows


MASKS = {"without_nose": _box(55, 75, 45, 67), "without_mouth": _box(85, 97, 38, 74),
         "without_ear": _box(0, 20, 0, 8),  # outside the face: not in the crop
         "without_all_features": _box(55, 97, 38, 74), "without_mark": _box(70, 80, 84, 94),
         "with_mark": _box(70, 80, 84, 94)}


def _row(image_id, syndrome, target_group="centroid:own", method="hirescam"):
    return {"image_id": image_id, "model_id": "m", "target": f"centroid:{syndrome}", "method": method, "layer": "",
            "subject_id": f"s_{image_id}", "syndrome_id": syndrome, "target_group": target_group}


def test_localiser_rows_own_targets_in_crop_features_and_the_mark_on_the_confounded_syndrome():
    variants = pd.DataFrame(_variants("a", ["nose", "mouth", "ear"], marked=True) + _variants("b", ["nose", "mouth"]))
    errors: list = []
    loc = Localiser({"change": change_mask_source(variants, lambda i: MASKS)}, "S01", errors)
    m = np.where(MASKS["without_nose"], 1.0, 0.0) + np.where(MASKS["without_mark"], 1.0, 0.0)
    loc.add(_row("a", "S01"), m)
    loc.add(_row("b", "S02"), m)
    loc.add(_row("b", "S02", target_group="centroid:S01"), m)  # not an own target: no rows
    table = loc.table()
    assert not errors and set(table["mask_kind"]) == {"change"}
    a = table[table.image_id == "a"].set_index("feature")
    assert sorted(a.index) == ["mark", "mouth", "nose"]  # the ear's mask lies outside the face
    share_nose = MASKS["without_nose"].sum() / (MASKS["without_nose"].sum() + MASKS["without_mark"].sum())
    assert a.loc["nose", "rma"] == pytest.approx(share_nose)
    assert a.loc["nose", "ratio"] == pytest.approx(share_nose * FACE.sum() / MASKS["without_nose"].sum())
    # the nose ties with the mark at the top: both rank metrics share the tie
    assert a.loc["nose", "rra"] == pytest.approx(share_nose) and a.loc["nose", "pointing"] == pytest.approx(share_nose)
    assert a.loc["mouth", "ratio"] == 0.0 and a.loc["mouth", "pointing"] == 0.0
    assert a.loc["mark", "variant"] == "without_mark" and a.loc["nose", "mask_px"] == MASKS["without_nose"].sum()
    assert sorted(table[table.image_id == "b"]["feature"]) == ["mouth", "nose"]  # not the confounded syndrome
    # an image whose change masks cannot be read is an error row, not a crash
    broken = Localiser({"change": change_mask_source(variants, lambda i: {})}, "S01", errors)
    broken.add(_row("a", "S01"), m)
    assert not len(broken.table()) and errors[0].item_id == "a" and "change masks" in errors[0].message


def test_spearman_by_group_matches_scipy_and_has_the_sign_of_the_relation():
    rng = np.random.default_rng(0)
    frames = []
    for g in range(6):
        x = rng.normal(size=7)
        y = (1 if g % 2 else -1) * x + 0.3 * rng.normal(size=7)
        if g == 5:
            x[:3] = x[3]  # ties
        frames.append(pd.DataFrame({"g": g, "x": x, "y": y}))
    frame = pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=0)  # group order must not matter
    got = spearman_by_group(frame, ["g"], "x", "y").set_index("g")
    for g, part in frame.groupby("g"):
        assert got.loc[g, "rho"] == pytest.approx(stats.spearmanr(part["x"], part["y"]).statistic)
    assert (np.sign(got["rho"]) == [-1, 1, -1, 1, -1, 1]).all()
    constant = spearman_by_group(pd.DataFrame({"g": [0, 0, 0], "x": [1, 2, 3], "y": [5, 5, 5]}), ["g"], "x", "y")
    assert np.isnan(constant["rho"].iloc[0])


def test_rank_correlations_per_patient_and_patients_with_too_few_features():
    rows, effects = [], []
    for image_id, feats, sign in (("p1", ["f1", "f2", "f3", "f4"], 1), ("p2", ["f1", "f2"], 1),
                                  ("p3", ["f1", "f2", "f3"], -1)):
        for k, f in enumerate(feats):
            rows.append({**_row(image_id, "S"), "feature": f, "variant": f"without_{f}", "rma": 0.1 * k,
                         "mask_kind": "change"})
            effects.append({"image_id": image_id, "model_id": "m", "target": "centroid:S", "variant": f"without_{f}",
                            "delta": sign * (0.01 * k ** 2)})
    rows.append({**_row("p1", "S"), "feature": "mark", "variant": "without_mark", "rma": 0.9, "mask_kind": "change"})
    out = rank_correlations(pd.DataFrame(rows), pd.DataFrame(effects)).set_index("image_id")
    assert out.loc["p1", "rho"] == pytest.approx(1.0) and out.loc["p1", "n_features"] == 4  # the mark left out
    assert np.isnan(out.loc["p2", "rho"]) and out.loc["p2", "n_features"] == 2
    assert out.loc["p3", "rho"] == pytest.approx(-1.0)


@pytest.mark.parametrize(("k", "n"), [(0, 5), (8, 10), (10, 10), (37, 120)])
def test_wilson_interval_equals_scipys(k, n):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert (float(lo), float(hi)) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_summary_puts_the_random_control_beside_the_trained_model_and_the_mark_effect_per_set():
    feats = []
    for model, inside in (("trained", 3.0), ("random_init", 1.0)):
        for kind, scale in (("change", 1.0), ("region", 0.5)):
            for i in range(4):
                for f, r in (("nose", inside), ("mouth", inside + 1), ("mark", 2 * inside)):
                    feats.append({**_row(f"i{i}", "S01"), "model_id": model, "feature": f, "mask_kind": kind,
                                  "ratio": scale * r, "rma": 0.1 * scale * r, "area_share": 0.1, "rra": 0.2,
                                  "pointing": float(i % 2), "variant": f"without_{f}"})
    feats = pd.DataFrame(feats)
    patients = pd.DataFrame([{"model_id": m, "method": "hirescam", "layer": "", "target_group": "centroid:own",
                              "mask_kind": "change", "rho": rho}
                             for m, rho in (("trained", 0.5), ("trained", np.nan), ("random_init", 0.0))])
    table, lines = localisation_summary(feats, patients, {"random_init": "trained"}, "S01")
    t = table.set_index(["model_id", "mask_kind"])
    assert t.loc[("trained", "change"), "ratio_mean"] == pytest.approx(3.5)
    assert t.loc[("trained", "change"), "mark_ratio_mean"] == 6.0
    assert t.loc[("trained", "region"), "ratio_mean"] == pytest.approx(1.75)
    assert t.loc[("trained", "change"), "rma_mean"] == pytest.approx(0.35)
    assert t.loc[("trained", "change"), "chance"] == pytest.approx(0.1)
    assert t.loc[("trained", "change"), "pointing_mean"] == pytest.approx(0.5)
    assert t.loc[("trained", "change"), "n_patients"] == 1 and t.loc[("trained", "change"), "n_patients_all"] == 2
    assert t.loc[("trained", "region"), "n_patients"] == 0 and np.isnan(t.loc[("trained", "region"), "rho_mean"])
    assert t.loc[("random_init", "change"), "random_control"]
    assert t.loc[("random_init", "change"), "control_of"] == "trained"
    assert (t["uniform_ratio"] == 1.0).all()
    assert len(lines) == 1 and "(3.50× per feature" in lines[0] and "(1.75× per feature" in lines[0]
    assert "beside it the random control random_init: change masks RMA 0.15 (chance 0.10, 1.50×)" in lines[0]

    effects = pd.DataFrame([
        {"image_id": i, "model_id": "trained", "target": "centroid:S01", "variant": v, "feature": "mark",
         "change": c, "delta": d}
        for i, v, c, d in (("a", "without_mark", "remove", 0.2), ("b", "without_mark", "remove", -0.1),
                           ("c", "without_mark", "remove", 0.3), ("d", "with_mark", "add", -0.05),
                           ("e", "with_mark", "add", 0.01))])
    images = pd.DataFrame({"image_id": list("abcde"), "syndrome_id": ["S01", "S01", "S01", "S02", "S03"],
                           "sets": ["frequent_test,test", "frequent_test,test", "frequent_gallery,train",
                                    "frequent_test,test", "frequent_test,test"], "undiagnosed": False})
    marks, mark_lines = mark_effects(effects, images, "S01")
    m = marks.set_index(["set", "change"])
    assert (m.loc[("test", "remove"), "n"], m.loc[("test", "remove"), "n_expected"]) == (2, 1)
    assert (m.loc[("test", "add"), "n"], m.loc[("test", "add"), "n_expected"]) == (2, 1)
    assert m.loc[("train", "remove"), "mean_delta"] == pytest.approx(0.3)
    lo, hi = wilson_interval(1, 2)
    assert (m.loc[("test", "remove"), "ci_low"], m.loc[("test", "remove"), "ci_high"]) == pytest.approx((lo, hi))
    assert len(mark_lines) == 2 and "1/2 marked S01 photos" in mark_lines[0] and "test set" in mark_lines[0]
