"""Bad input found by trying it (issue #13): each case gets its exact outcome.

Symbolic link loops in a photo folder, photos too small to hold a face, photos stored upside down without an EXIF
orientation, landmarks of an upside-down face, and maps drawn onto the original photo.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gestalt_xai.data.images import load_image, save_png
from gestalt_xai.errors import DetectionError
from gestalt_xai.faces.align import (
    ARCFACE_TEMPLATE,
    estimate_transform,
    load_alignments,
    mouth_drop,
    row_landmarks,
    row_matrix,
    transform_points,
    turn_photo,
    turn_points,
)
from gestalt_xai.faces.detect import MIN_FACE_PIXELS, faces_by_orientation
from gestalt_xai.faces.stage import AlignConfig, _folder_cohort, align_stage
from gestalt_xai.runs import Run


# ------------------------------------------------------------------------------------------- symbolic link loops
def _loops(folder: Path) -> None:
    os.symlink(folder / "loop_b.jpg", folder / "loop_a.jpg")
    os.symlink(folder / "loop_a.jpg", folder / "loop_b.jpg")
    os.symlink("self.png", folder / "self.png")
    os.symlink(folder / "missing.png", folder / "dangling.png")
    (folder / "album.jpg").mkdir()


def test_symlink_loops_in_a_photo_folder_are_error_rows_naming_the_file(tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    save_png(d / "grey.png", np.full((64, 64, 3), 127, np.uint8))
    _loops(d)
    (d / "notes.txt").write_text("not a photo: ignored")
    cohort = _folder_cohort(d)
    assert cohort.images["image_id"].tolist() == ["grey"]
    rejected = cohort.rejected.set_index("image_id")["message"]
    assert sorted(rejected.index) == ["album", "dangling", "loop_a", "loop_b", "self"]
    for name in ("loop_a", "loop_b", "self"):
        assert "symbolic link loop" in rejected[name] and Path(rejected[name].split("'")[1]).stem == name
    assert "missing.png, which does not exist" in rejected["dangling"]
    assert rejected["dangling"].startswith(f"{d / 'dangling.png'}: ")
    assert "a folder, not a photo" in rejected["album"]

    run = Run(tmp_path / "run")
    align_stage(run, AlignConfig(images=str(d), orientation="as_stored"))
    errors = run.errors().set_index("item_id")
    assert sorted(errors.index) == ["album", "dangling", "grey", "loop_a", "loop_b", "self"]
    assert errors.loc["loop_a", "error_kind"] == "input" and "loop_a.jpg" in errors.loc["loop_a", "message"]
    assert errors.loc["grey", "error_kind"] == "no_face"  # the readable photo was still tried
    assert run.manifest["stages"]["align"]["n_errors"] == 6


def test_only_symlink_loops_still_run(tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    os.symlink("self.png", d / "self.png")
    run = Run(tmp_path / "run")
    align_stage(run, AlignConfig(images=str(d)))
    assert run.errors()["item_id"].tolist() == ["self"]
    assert not run.alignments()["ok"].any()


# ---------------------------------------------------------------------------------------------- too small photos
@pytest.mark.parametrize("shape", [(1, 50), (3, 3), (50, 1), (MIN_FACE_PIXELS - 1, 400)])
def test_photo_too_small_to_hold_a_face(tmp_path: Path, mtcnn, shape: tuple[int, int]) -> None:
    h, w = shape
    photo = np.full((h, w, 3), 100, np.uint8)
    with pytest.raises(DetectionError, match=f"the photo is {w}×{h} pixels, too small to hold a face"):
        mtcnn.detect(photo)  # facenet-pytorch itself fails inside torch.cat
    d = tmp_path / "photos"
    d.mkdir()
    save_png(d / "tiny.png", photo)
    run = Run(tmp_path / "run")
    align_stage(run, AlignConfig(images=str(d)))
    row = run.errors().iloc[0]
    assert row["error_kind"] == "no_face"
    assert f"tiny.png: the photo is {w}×{h} pixels, too small to hold a face" in row["message"]
    assert f"at least {MIN_FACE_PIXELS} pixels on each side" in row["message"]


def test_smallest_photo_is_scanned(mtcnn) -> None:
    assert mtcnn.detect(np.full((MIN_FACE_PIXELS, MIN_FACE_PIXELS, 3), 100, np.uint8)) == []


# ------------------------------------------------------------------------------------------------ upside down
@pytest.fixture(scope="module")
def upside_down_run(tmp_path_factory, example_photos) -> Run:
    """Each real photo as stored and turned upside down (no EXIF orientation), aligned with the defaults."""
    root = tmp_path_factory.mktemp("upside_down")
    d = root / "photos"
    d.mkdir()
    for name in ("insightface_t1", "insightface_tom_hanks_aligned", "skimage_astronaut"):
        photo = load_image(example_photos[name])
        save_png(d / f"{name}.png", photo)
        save_png(d / f"{name}__180.png", turn_photo(photo, 180))
    run = Run(root / "run")
    align_stage(run, AlignConfig(images=str(d)))
    return run


@pytest.mark.parametrize("name", ["insightface_t1", "insightface_tom_hanks_aligned", "skimage_astronaut"])
def test_upside_down_photo_aligns_to_the_upright_crop(upside_down_run: Run, name: str) -> None:
    table = upside_down_run.alignments().set_index("image_id")
    up, down = table.loc[name], table.loc[f"{name}__180"]
    assert up["ok"] and down["ok"], (up["message"], down["message"])
    assert up["orientation"] == 0 and down["orientation"] == 180
    assert up["n_faces"] == down["n_faces"] == (6 if name == "insightface_t1" else 1)
    hw = (int(down["photo_height"]), int(down["photo_width"]))
    # the same face, landmarks within 2 px once the turn is undone; stored in the turned photo's own pixels
    assert np.abs(turn_points(row_landmarks(down), 180, hw) - row_landmarks(up)).max() < 2.0
    crop_up = load_image(upside_down_run.crop_path(name)).astype(int)
    crop_down = load_image(upside_down_run.crop_path(f"{name}__180")).astype(int)
    assert np.abs(crop_up - crop_down).mean() < 1.0  # upright, the same crop
    eyes = transform_points(row_landmarks(down), row_matrix(down))[:2]
    assert np.abs(eyes - ARCFACE_TEMPLATE[:2]).max() < 3  # the eyes land on the template, not the mouth


def test_upside_down_without_orientation_search_is_a_no_face_row(tmp_path: Path, example_photos) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    save_png(d / "astronaut__180.png", turn_photo(load_image(example_photos["skimage_astronaut"]), 180))
    run = Run(tmp_path / "run")
    align_stage(run, AlignConfig(images=str(d), orientation="as_stored"))
    assert run.errors().iloc[0]["error_kind"] == "no_face"
    run = Run(tmp_path / "auto")
    align_stage(run, AlignConfig(images=str(d), two_pass=True))
    row = load_alignments(run).iloc[0]
    assert row["orientation"] == 180 and abs(row["two_pass_angle"]) < 10  # levelled in the upright (turned) photo
    eyes = transform_points(row_landmarks(row), row_matrix(row))[:2]
    assert np.abs(eyes - ARCFACE_TEMPLATE[:2]).max() < 3


def test_orientation_probe_prefers_the_upright_photo(example_photos, mtcnn) -> None:
    from gestalt_xai.data.synthetic.identity import sample_identity, sample_photo
    from gestalt_xai.data.synthetic.renderer import render_photo

    rng = np.random.default_rng(7)
    photos = [load_image(example_photos["insightface_t1"])]  # 1280 px wide: probed at 640
    photos += [render_photo(*sample_identity(rng), sample_photo(rng)).rgb for _ in range(2)]
    for photo in photos:
        assert faces_by_orientation(mtcnn, photo)[0] == [0, 180]
        assert faces_by_orientation(mtcnn, turn_photo(photo, 180))[0] == [180, 0]
    ranked, found = faces_by_orientation(mtcnn, photos[0])
    assert found == {}  # probed on a smaller copy: the caller detects at full size


def test_upside_down_landmarks_are_an_error_row_and_tilted_ones_pass(tmp_path: Path, example_photos, mtcnn) -> None:
    """Landmark tables cannot be detected again: an upside-down face listed by image side is refused, saying why;
    the same face with its points in anatomical order (a similarity can turn it) and a tilted face align."""
    import cv2

    photo = load_image(example_photos["skimage_astronaut"])
    lm = mtcnn.detect(photo)[0].landmarks
    hw = photo.shape[:2]
    turned = turn_points(lm, 180, hw)  # the same points, in the upside-down photo
    by_image_side = turned[[1, 0, 2, 4, 3]]  # image-left eye first: the person's left eye in a turned photo
    R = cv2.getRotationMatrix2D((256, 256), 70, 1.0)
    d = tmp_path / "photos"
    d.mkdir()
    save_png(d / "down_sided.png", turn_photo(photo, 180))
    save_png(d / "down_anatomical.png", turn_photo(photo, 180))
    save_png(d / "tilted.png", cv2.warpAffine(photo, R, (512, 512)))
    rows = []
    for image_id, pts in (("down_sided", by_image_side), ("down_anatomical", turned),
                          ("tilted", transform_points(lm, R))):
        row = {"img": f"{image_id}.png", "bbox_x1": 0, "bbox_y1": 0, "bbox_x2": 1, "bbox_y2": 1}
        row.update({f"kp{i + 1}_{a}": pts[i, j] for i in range(5) for j, a in enumerate("xy")})
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "face_coords.csv", index=False)
    run = Run(tmp_path / "run")
    align_stage(run, AlignConfig(images=str(d), landmarks=str(tmp_path / "face_coords.csv")))
    errors = run.errors().set_index("item_id")
    assert errors.index.tolist() == ["down_sided"]
    assert errors.loc["down_sided", "error_kind"] == "input"
    message = errors.loc["down_sided", "message"]
    assert "the face is upside down" in message and "mouth above the eyes once the eyes are level" in message
    ok = load_alignments(run).set_index("image_id")
    reference = estimate_transform(lm)
    for image_id in ("down_anatomical", "tilted"):
        assert mouth_drop(row_landmarks(ok.loc[image_id])) > 0.8
        eyes = transform_points(row_landmarks(ok.loc[image_id]), row_matrix(ok.loc[image_id]))
        assert np.abs(eyes - transform_points(lm, reference)).max() < 1e-6  # the upright crop's geometry


def test_mouth_drop_ignores_tilt_and_catches_mirrored_faces() -> None:
    import cv2

    for angle in range(-180, 181, 15):
        R = cv2.getRotationMatrix2D((56, 56), angle, 0.7)
        pts = transform_points(ARCFACE_TEMPLATE, R)
        assert mouth_drop(pts) == pytest.approx(mouth_drop(ARCFACE_TEMPLATE))
        assert mouth_drop(pts[[1, 0, 2, 4, 3]]) == pytest.approx(-mouth_drop(ARCFACE_TEMPLATE))  # mirrored


# ------------------------------------------------------------------------------------------ maps on the photo
def test_overlay_on_photo_draws_the_maps_over_the_original_photo(trained_run: Run, tmp_path: Path) -> None:
    from gestalt_xai.attribution.explain import ExplainConfig, explain_stage
    from gestalt_xai.viz import overlay_figure

    shutil.copytree(trained_run.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    image_id = sorted(run.image_table().query("test and aligned")["image_id"])[0]
    explain_stage(run, ExplainConfig(methods=["gradcam"], images=[image_id], overlay=1, overlay_on_photo=True))
    figures = sorted(p.name for p in (run.path / "maps" / "figures").glob("*.png"))
    assert len(figures) == 2 and figures[1] == figures[0].replace(".png", "__photo.png")
    # the figure is the maps drawn through the inverse alignment onto the photo the cohort names
    row = run.alignments().set_index("image_id").loc[image_id]
    photo = load_image(run.cohort().images.set_index("image_id").loc[image_id, "path"])
    assert photo.shape[:2] == (row["photo_height"], row["photo_width"]) and photo.shape[:2] != (112, 112)
    store = run.map_store()
    (key, face_map), = list(store.iter_maps(store.index(image_id=image_id)))
    label = f"gradcam\n{key['layer'].split('.')[-1]}"
    stored = (run.path / "maps" / "figures" / figures[1]).read_bytes()
    expected = tmp_path / "expected.png"
    overlay_figure(load_image(run.crop_path(image_id)), {label: face_map}, signed={label: True},
                   title=f"{image_id} · {key['model_id']} · {key['target']} (score {key['target_value']:.3f})",
                   photo=photo, matrix=row_matrix(row), path=expected)
    assert stored == expected.read_bytes()
    assert stored != (run.path / "maps" / "figures" / figures[0]).read_bytes()
