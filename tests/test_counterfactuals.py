"""Counterfactual renderings: identical draws, changes confined to the feature's region, change masks, the synth pass
(deterministic, resumable, outside every cohort table) and the align stage's crops cut with the factual matrix."""

from __future__ import annotations

import functools
import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from gestalt_xai.data.cohort import load_cohort
from gestalt_xai.data.images import load_image
from gestalt_xai.data.synthetic import PHENOTYPES, ConfounderConfig, SynthConfig, load_truth, synth_stage
from gestalt_xai.data.synthetic.cohort import mark_mask, photo_conditions, plan_cohort, render_image, subject_identity
from gestalt_xai.data.synthetic.counterfactuals import (
    CHANGE_THRESHOLD,
    change_mask,
    plan_variants,
    render_counterfactual,
    render_counterfactuals,
)
from gestalt_xai.data.synthetic.identity import sample_identity, sample_photo
from gestalt_xai.data.synthetic.phenotypes import CONFLICTS, apply_features, feature_regions, rasterise_regions
from gestalt_xai.data.synthetic.renderer import prepare_scene, render_photo
from gestalt_xai.data.synthetic.truth import decode_mask_bits
from gestalt_xai.errors import InputError
from gestalt_xai.faces.align import row_matrix, warp_photo_to_crop, warp_to_crop
from gestalt_xai.faces.stage import AlignConfig, _folder_cohort, align_stage
from gestalt_xai.runs import LAYOUT, Run, write_parquet

#: a tiny cohort with the confounder on: every syndrome is rare, so each of its photos is a test photo in some split
TINY = SynthConfig(seed=5, n_syndromes=2, n_frequent=0, rare_subjects=(2, 3), images_per_subject=(1, 2),
                   n_controls=0, canvas=(200, 220), confounder=ConfounderConfig(syndrome="S01", rate=0.6,
                                                                                 base_rate=0.2), workers=1)
#: JPEG blocks (encode_jpeg: 8×8, no chroma subsampling)
BLOCK = 8


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _blocks_touching(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown to every 8×8 JPEG block (aligned at the photo's origin) it touches."""
    h, w = mask.shape
    hb, wb = -(-h // BLOCK), -(-w // BLOCK)
    padded = np.zeros((hb * BLOCK, wb * BLOCK), bool)
    padded[:h, :w] = mask
    touched = padded.reshape(hb, BLOCK, wb, BLOCK).any(axis=(1, 3))
    return np.repeat(np.repeat(touched, BLOCK, 0), BLOCK, 1)[:h, :w]


# ------------------------------------------------------------------------------------------------ rendering
def test_nothing_removed_is_the_factual_photo() -> None:
    plan = plan_cohort(TINY)
    image = next(im for im in plan.images if im.mark and len(im.subject.effects) >= 2)
    factual = render_image(TINY, image, keep_photo=True)
    same = render_counterfactual(TINY, image)
    assert same.jpeg == factual.jpeg, "a counterfactual that changes nothing must be the factual JPEG byte for byte"
    assert np.array_equal(same.clean, render_counterfactual(TINY, image, mark=True).clean)
    assert same.clean.dtype == np.float32 and same.clean.shape == factual.photo.rgb.shape
    assert factual.photo.clean is None, "the clean photo is kept only when asked for"
    # removing something does change it, and only an existing feature can be removed
    first = list(image.subject.effects)[0]
    without = render_counterfactual(TINY, image, remove=[first])
    assert without.jpeg != factual.jpeg
    # the synth pass draws the photo's scene once for all its variants: the same bytes as drawing it each time
    item = render_counterfactuals(TINY, image)
    assert item.jpegs[f"without_{first}"] == without.jpeg
    assert item.jpegs["without_mark"] == render_counterfactual(TINY, image, mark=False).jpeg
    base, look = subject_identity(TINY, image.subject)
    other = plan_cohort(TINY).images[image.index - 1]
    with pytest.raises(ValueError, match="another identity or photo"):
        render_photo(base, look, photo_conditions(TINY, image),
                     scene=prepare_scene(base, look, photo_conditions(TINY, other)))
    with pytest.raises(KeyError, match="not planted"):
        render_counterfactual(TINY, image, remove=["hypotelorism" if "hypertelorism" in image.subject.effects
                                                   else "hypertelorism"])


def _identity(i: int) -> tuple:
    rng = np.random.default_rng([707, i])
    base, look = sample_identity(rng)
    return base, look, sample_photo(rng, (320, 360))


@functools.lru_cache(maxsize=8)
def _render(i: int, effects: tuple[tuple[str, float], ...], mark: bool = False):
    base, look, photo = _identity(i)
    return render_photo(apply_features(base, dict(effects)), look, photo, mark=mark, clean=True)


def _with_others(key: str) -> dict[str, float]:
    """``key`` and every other catalogue feature compatible with the ones already chosen, all at effect 1.0."""
    chosen = {key: 1.0}
    for k in PHENOTYPES:
        if k not in chosen and not any(len((set(chosen) | {k}) & c) > 1 for c in CONFLICTS):
            chosen[k] = 1.0
    return {k: chosen[k] for k in PHENOTYPES if k in chosen}


def _check_locality(factual, counterfactual, region: np.ndarray, what: str) -> tuple[int, float]:
    changed = change_mask(factual.clean, counterfactual.clean)
    assert changed.any(), f"{what}: removing it must change the photo"
    outside = changed & ~region
    assert not outside.any(), (f"{what}: {int(outside.sum())} pixels change by more than {CHANGE_THRESHOLD} levels "
                               f"outside its region mask (before noise and JPEG)")
    # after identical noise and JPEG: differences only in the region or the 8×8 blocks touching it
    moved = (factual.rgb != counterfactual.rgb).any(-1)
    allowed = region | _blocks_touching(region)
    share = float((moved & allowed).sum() / max(int(moved.sum()), 1))
    assert share >= 0.99, f"{what}: only {share:.4f} of the JPEG changes lie in its region or touching blocks"
    return int(changed.sum()), share


@pytest.mark.parametrize("key", list(PHENOTYPES))
def test_removing_a_feature_changes_only_its_region(key: str) -> None:
    """For every catalogue feature, planted at effect 1.0 alone and among every compatible feature."""
    for i, effects in ((0, {key: 1.0}), (1, _with_others(key))):
        base, look, photo = _identity(i)
        factual = _render(i, tuple(effects.items()))
        counterfactual = _render(i, tuple((k, v) for k, v in effects.items() if k != key))
        shape = apply_features(base, effects)
        region = rasterise_regions(*feature_regions(base, effects)[key], shape, photo.pose,
                                   (photo.height, photo.width))
        n_changed, _ = _check_locality(factual, counterfactual, region, f"{key} (face {i}, {len(effects)} features)")
        assert n_changed < region.sum(), "the change mask is tighter than the region mask"


def test_the_mark_changes_only_the_mark_mask() -> None:
    for i, effects in ((0, {}), (1, _with_others("full_cheeks"))):
        base, look, photo = _identity(i)
        shape = apply_features(base, effects)
        region = mark_mask(shape, photo.pose, (photo.height, photo.width))
        without = _render(i, tuple(effects.items()))
        with_mark = _render(i, tuple(effects.items()), mark=True)
        _check_locality(with_mark, without, region, f"the mark (face {i})")


# ------------------------------------------------------------------------------------------------ synth pass
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> tuple[Run, Run]:
    """The tiny cohort rendered twice: in this process and with two worker processes."""
    a, b = Run(tmp_path_factory.mktemp("cf_a")), Run(tmp_path_factory.mktemp("cf_b"))
    synth_stage(a, TINY)
    synth_stage(b, TINY.model_copy(update={"workers": 2}))
    return a, b


def test_synth_writes_every_variant_with_its_change_mask(tiny_runs) -> None:
    run = tiny_runs[0]
    cohort = run.path / "cohort"
    plan = plan_cohort(TINY)
    truth = load_truth(run.path)
    table = truth.counterfactuals
    splits = load_cohort(cohort).splits
    tests = set(splits.loc[splits["set"].isin(["frequent_test", "rare_test"]), "image_id"])
    assert set(table["image_id"]) == tests == {im.image_id for im in plan.images}
    assert {"with_mark", "without_mark", "without_all_features"} <= set(table["variant"])
    for image in plan.images:
        rows = table[table["image_id"] == image.image_id]
        variants = plan_variants(image, mark_variants=True)
        assert list(rows["variant"]) == [v.name for v in sorted(variants, key=lambda v: v.mask_bit)]
        bits = decode_mask_bits(cohort / "counterfactuals" / "change_masks" / f"{image.image_id}.png")
        features = truth.features[truth.features["image_id"] == image.image_id].set_index("feature")
        region = truth.masks(image.image_id)
        masks = truth.change_masks(image.image_id)
        for r in rows.itertuples():
            assert (cohort / r.path).is_file() and r.path == f"counterfactuals/images/{r.image_id}/{r.variant}.jpg"
            assert ((bits >> r.mask_bit) & 1).sum() == r.change_px == masks[r.variant].sum()
            if r.feature in ("all", "mark"):
                assert r.change_px > 0
            if r.feature not in ("all", "mark"):
                assert r.variant == f"without_{r.feature}" and r.mask_bit == features.loc[r.feature, "mask_bit"]
                assert not (masks[r.variant] & ~region[r.feature]).any(), "change mask inside the region mask"
            elif r.variant == "without_mark":
                assert not (masks[r.variant] & ~region["confounder"]).any()
        if len(features) == 1:  # one feature: without it is without all of them
            only = rows[rows["feature"] == features.index[0]].iloc[0]
            assert masks["without_all_features"].sum() == only.change_px
    card = (cohort / "data_card.md").read_text(encoding="utf-8")
    assert f"**{len(table)} counterfactual renderings of {table['image_id'].nunique()} photos**" in card


def test_same_seed_gives_identical_counterfactual_files(tiny_runs) -> None:
    a, b = tiny_runs
    da, db = _digest(a.path / LAYOUT.counterfactuals), _digest(b.path / LAYOUT.counterfactuals)
    assert len(da) > 20 and da == db


def test_counterfactuals_enter_no_cohort_table(tiny_runs, synthetic_run) -> None:
    cohort = tiny_runs[0].path / "cohort"
    ids = sorted(im.image_id for im in plan_cohort(TINY).images)
    # the GMDB folder reader, the photo-folder reader and the truth tables list the factual photos only
    assert sorted(load_cohort(cohort).images["image_id"]) == ids
    assert sorted(_folder_cohort(cohort / "images").images["image_id"]) == ids
    assert sorted(load_truth(cohort).images["image_id"]) == ids
    for f in cohort.glob("*.*"):
        if f.suffix in (".csv", ".tsv", ".txt"):
            text = f.read_text(encoding="utf-8")
            assert "counterfactual" not in text and "without_" not in text and "with_mark" not in text, f
    # an aligned run: its cohort, splits, image table and crops hold the factual photos only
    run = synthetic_run
    ids = sorted(load_truth(run.path).images["image_id"])
    assert len(run.counterfactuals()) and sorted(run.cohort().images["image_id"]) == ids
    assert sorted(run.image_table()["image_id"]) == ids
    assert set(run.cohort().splits["image_id"]) <= set(ids) and set(run.aligned_ids()) <= set(ids)
    assert sorted(p.stem for p in (run.path / LAYOUT.aligned).glob("*.png")) == run.aligned_ids()


def test_rerun_and_option_changes_do_not_render_the_photos_again(tiny_runs, tmp_path: Path) -> None:
    run = Run(shutil.copytree(tiny_runs[0].path, tmp_path / "run"))
    before = _digest(run.path / "cohort")
    again = synth_stage(run, TINY)
    assert again.extra["n_rendered"] == 0 and again.extra["n_counterfactuals_rendered"] == 0
    assert _digest(run.path / "cohort") == before
    no_mark = synth_stage(run, SynthConfig(**{**TINY.model_dump(), "counterfactuals": {"mark": False}}))
    assert no_mark.extra["n_rendered"] == 0 and no_mark.extra["n_counterfactuals_rendered"] > 0
    table = load_truth(run.path).counterfactuals
    assert not table["feature"].eq("mark").any()
    assert not any("mark" in p.name for p in (run.path / LAYOUT.counterfactuals).rglob("*.jpg"))
    off = synth_stage(run, SynthConfig(**{**TINY.model_dump(), "counterfactuals": {"sets": []}}))
    assert off.extra["n_rendered"] == 0 and not (run.path / LAYOUT.counterfactuals).exists()
    assert load_truth(run.path).counterfactuals.empty
    synth_stage(run, TINY)
    assert _digest(run.path / "cohort") == before


# ------------------------------------------------------------------------------------------------ align
def test_counterfactual_crops_are_cut_with_the_factual_matrix(synthetic_run) -> None:
    run = synthetic_run
    cf = run.counterfactuals()
    truth = load_truth(run.path)
    with_features = set(run.image_table().query("test")["image_id"]) & set(truth.features["image_id"])
    assert len(cf) > 10 and set(cf["image_id"]) == with_features & set(run.aligned_ids())
    # a test photo with nothing to remove (a control; no confounder in this cohort) has no counterfactual at all
    bare = set(run.image_table().query("test")["image_id"]) - with_features
    assert bare and not any((run.path / LAYOUT.counterfactuals / "change_masks" / f"{i}.png").exists() for i in bare)
    alignments = run.alignments(aligned_only=True).set_index("image_id")
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (17, 17))  # 8 px: JPEG blocks reach ≤ 8 photo px ≈ 6 crop px
    worst, shares = 0, []
    for image_id, rows in cf.groupby("image_id"):
        factual = run.crops([image_id])[0].astype(np.int16)
        crops, masks = run.counterfactual_crops(image_id), run.change_masks(image_id)
        assert set(crops) == set(masks) == set(rows["variant"])
        M = row_matrix(alignments.loc[image_id])
        photo_masks = truth.change_masks(image_id)
        for r in rows.itertuples():
            crop, mask = crops[r.variant], masks[r.variant]
            assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8 and mask.shape == (112, 112)
            assert r.change_px_crop == mask.sum()
            assert np.array_equal(mask, warp_photo_to_crop(photo_masks[r.variant], M)), "bits warped as documented"
            diff = np.abs(crop.astype(np.int16) - factual).max(-1)
            near = cv2.dilate(mask.astype(np.uint8), disk).astype(bool)
            # the same noise, the same JPEG blocks, the same matrix: away from the change the crops agree up to a few
            # levels of JPEG ringing re-sampled by the warp (a re-detected matrix would move every edge of the face)
            worst = max(worst, int(diff[~near].max()))
            shares.append(float((diff[~near] > 2).mean()))
            if r.change_px_crop:
                assert diff[mask].max() > 0
    # the tolerance tells matrices apart: the same counterfactual cut with the matrix half a pixel off fails it
    r = cf.iloc[0]
    shifted = row_matrix(alignments.loc[r.image_id]) + [[0, 0, 0.5], [0, 0, 0]]
    moved = warp_to_crop(load_image(run.path / "cohort" / r.path), shifted).astype(np.int16)
    near = cv2.dilate(run.change_masks(r.image_id)[r.variant].astype(np.uint8), disk).astype(bool)
    assert np.abs(moved - run.crops([r.image_id])[0].astype(np.int16)).max(-1)[~near].max() > 6
    print(f"\noutside the 8-px dilated change mask: largest difference {worst} levels, at most "
          f"{max(shares):.5f} of the pixels differ by more than 2")
    assert worst <= 6, worst
    assert max(shares) <= 0.002, max(shares)


def test_a_photo_that_failed_alignment_has_no_counterfactual_crops(synthetic_run, tmp_path: Path) -> None:
    run = Run(shutil.copytree(synthetic_run.path, tmp_path / "run"))
    shutil.rmtree(run.path / LAYOUT.aligned)
    (run.path / LAYOUT.ledger / "align.jsonl").unlink()
    cf = load_truth(run.path).counterfactuals
    failed, damaged, escaping = sorted(cf["image_id"].unique())[:3]
    # the factual photo of `failed` has no landmarks; one counterfactual file of `damaged` is broken; one row of
    # `escaping` points out of the cohort folder
    table = pd.read_csv(run.path / "face_coords.csv", dtype={"img": str})
    table[table["img"] != f"{failed}.jpg"].to_csv(run.path / "face_coords.csv", index=False)
    broken = cf[cf["image_id"] == damaged].iloc[0]
    (run.path / "cohort" / broken["path"]).write_bytes(b"not a jpeg")
    outside = cf.index[cf["image_id"] == escaping][0]
    cf.loc[outside, "path"] = "../face_coords.csv"
    write_parquet(cf, run.path / LAYOUT.counterfactuals / "counterfactuals.parquet")
    result = align_stage(run, AlignConfig(cohort=str(run.path / "cohort"), landmarks=str(run.path / "face_coords.csv")))
    errors = run.errors()
    errors = errors[errors["stage"] == "align"].set_index("item_id")
    assert sorted(errors.index) == sorted([failed, damaged, escaping]) and result.errors == 3
    assert errors.loc[failed, "key"] == "", "the factual's own error row, nothing for its counterfactuals"
    assert f'"counterfactual": "{broken["variant"]}"' in errors.loc[damaged, "key"]
    assert "resolves outside" in errors.loc[escaping, "message"]
    got = run.counterfactuals()
    assert failed not in set(got["image_id"]) and run.counterfactual_crops(failed) == {}
    assert run.change_masks(failed) == {} and not (run.path / LAYOUT.counterfactual_crops / failed).exists()
    skipped = {(damaged, broken["variant"]), (escaping, cf.loc[outside, "variant"])}
    expected = {(i, v) for i, v in zip(cf["image_id"], cf["variant"], strict=True) if i != failed} - skipped
    assert set(zip(got["image_id"], got["variant"], strict=True)) == expected


def test_counterfactuals_need_the_align_stage(tiny_runs) -> None:
    with pytest.raises(InputError, match="align"):
        Run(tiny_runs[0].path).counterfactuals()
