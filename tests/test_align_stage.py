"""The align stage end to end: error rows, resumption after kill -9, byte-identical reruns, CLI and pipeline."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gestalt_xai.config import validate_config
from gestalt_xai.data.images import load_image, save_png
from gestalt_xai.errors import ConfigError
from gestalt_xai.faces.align import ARCFACE_TEMPLATE, load_alignments, row_landmarks, row_matrix, transform_points
from gestalt_xai.faces.stage import AlignConfig, align_stage
from gestalt_xai.runs import Run

CLI = [sys.executable, "-m", "gestalt_xai.cli"]


@pytest.fixture()
def photo_dir(tmp_path: Path, example_photos) -> Path:
    """Real photos plus every kind of bad input."""
    d = tmp_path / "photos"
    d.mkdir()
    shutil.copy(example_photos["skimage_astronaut"], d / "astronaut.png")
    shutil.copy(example_photos["insightface_t1"], d / "group.jpg")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notimage.png").write_bytes(b"%PDF-1.4 definitely not a picture")
    data = Path(example_photos["insightface_t1"]).read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 4])
    (d / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    save_png(d / "noface.png", np.full((200, 200, 3), 127, np.uint8))
    Image.new("RGB", (4000, 3000), (90, 90, 90)).save(d / "huge.png")  # 12 Mpx, refused with max_pixels below
    return d


def test_bad_inputs_become_error_rows_and_run_goes_on(tmp_path: Path, photo_dir: Path) -> None:
    run = Run(tmp_path / "run")
    result = align_stage(run, AlignConfig(images=str(photo_dir), max_pixels=5_000_000))
    table = pd.read_parquet(result.outputs["alignments"])
    assert table["image_id"].tolist() == sorted(table["image_id"])
    ok = table[table["ok"]]
    assert sorted(ok["image_id"]) == ["astronaut", "group"]
    assert ok.set_index("image_id").loc["group", "n_faces"] == 6
    errors = run.errors().set_index("item_id")
    assert sorted(errors.index) == ["empty", "huge", "noface", "notimage", "phone", "truncated"]
    assert errors.loc["noface", "error_kind"] == "no_face"
    assert "decompression bomb" in errors.loc["huge", "message"]
    assert "HEIC" in errors.loc["phone", "message"]
    for item, row in errors.iterrows():
        assert row["message"], item
    # crops exist only for aligned photos, carry no metadata, and put the eyes at the template
    crops = sorted(p.name for p in (tmp_path / "run" / "aligned").glob("*.png"))
    assert crops == ["astronaut.png", "group.png"]
    for name in crops:
        with Image.open(tmp_path / "run" / "aligned" / name) as img:
            assert img.size == (112, 112) and len(img.getexif()) == 0 and not img.info
    row = load_alignments(run).set_index("image_id").loc["astronaut"]
    eyes = transform_points(row_landmarks(row), row_matrix(row))[:2]
    assert np.abs(eyes - ARCFACE_TEMPLATE[:2]).max() < 3
    group = load_alignments(run).set_index("image_id").loc["group"]
    assert bool(group["frontal"]) and abs(group["yaw"]) < 0.2  # the frontal face of the group photo was kept
    m = run.manifest["stages"]["align"]
    assert m["n_items"] == 8 and m["n_errors"] == 6 and m["status"] == "done"


def test_aligned_input_passes_through_unchanged(tmp_path: Path, example_photos) -> None:
    d = tmp_path / "crops"
    d.mkdir()
    shutil.copy(example_photos["insightface_tom_hanks_aligned"], d / "tom.png")
    save_png(d / "wrong_size.png", np.zeros((100, 120, 3), np.uint8))
    run = Run(tmp_path / "run")
    align_stage(run, AlignConfig(images=str(d), aligned_input=True))
    original = load_image(d / "tom.png")
    assert np.array_equal(load_image(tmp_path / "run" / "aligned" / "tom.png"), original)
    row = load_alignments(run).iloc[0]
    assert np.array_equal(row_matrix(row), np.eye(2, 3))
    assert "112×112" in run.errors().set_index("item_id").loc["wrong_size", "message"]


def test_external_landmark_table_gmarc_layout(tmp_path: Path, example_photos, mtcnn) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    shutil.copy(example_photos["skimage_astronaut"], d / "a1.png")
    lm = mtcnn.detect(load_image(d / "a1.png"))[0].landmarks + [1.5, -2.0]
    row = {"img": "a1_aligned.jpg", "bbox_x1": 0, "bbox_y1": 0, "bbox_x2": 1, "bbox_y2": 1}
    row.update({f"kp{i + 1}_{a}": lm[i, j] for i in range(5) for j, a in enumerate("xy")})
    pd.DataFrame([row]).to_csv(tmp_path / "face_coords.csv", index=False)
    run = Run(tmp_path / "run")
    align_stage(run, AlignConfig(images=str(d), landmarks=str(tmp_path / "face_coords.csv")))
    got = load_alignments(run).iloc[0]
    assert got["detector"] == "landmark_table"
    assert np.allclose(row_landmarks(got), lm)


def test_config_errors_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of 'images'"):
        validate_config(AlignConfig, {})
    with pytest.raises(ConfigError, match="threshold"):
        validate_config(AlignConfig, {"images": "x", "threshold": 1.5})
    with pytest.raises(ConfigError, match="detectr"):
        validate_config(AlignConfig, {"images": "x", "detectr": "mtcnn"})
    with pytest.raises(ConfigError, match="detector_weights"):
        validate_config(AlignConfig, {"images": "x", "detector": "retinaface"})
    run = Run(tmp_path / "run")
    with pytest.raises(ConfigError, match="not found"):
        align_stage(run, AlignConfig(images=str(tmp_path / "missing")))
    assert not (tmp_path / "run" / "aligned").exists()


def test_cli_reports_config_error_naming_field(tmp_path: Path) -> None:
    out = subprocess.run([*CLI, "align", "--run", str(tmp_path / "r"), "--images", str(tmp_path),
                          "--threshold", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "threshold" in out.stderr and "Traceback" not in out.stderr


def _many_photos(root: Path, example_photos, n: int) -> Path:
    d = root / "photos"
    d.mkdir()
    src = load_image(example_photos["skimage_astronaut"])
    for i in range(n):
        # distinct photos: shifted copies on a larger canvas
        canvas = np.full((600, 600, 3), 40 + 10 * (i % 5), np.uint8)
        canvas[i * 4: i * 4 + 512, 20 + i * 2: 20 + i * 2 + 512] = src
        save_png(d / f"p{i:02d}.png", canvas)
    (d / "zz_broken.jpg").write_bytes(b"broken")
    return d


def _outputs(run_dir: Path) -> dict[str, bytes]:
    skip = {"manifest.json"}
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in skip and ".ledger" not in p.parts}


@pytest.mark.slow
def test_killed_run_resumes_to_same_outputs(tmp_path: Path, example_photos) -> None:
    photos = _many_photos(tmp_path, example_photos, 14)
    env = {**os.environ, "GESTALT_XAI_QUIET": "1", "OMP_NUM_THREADS": "1"}
    args = ["align", "--images", str(photos)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, "-q", *args, "--run", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ledger = killed / ".ledger" / "align.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline:
        if ledger.exists() and ledger.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = ledger.read_text().count("\n")
    assert 3 <= n_before < 15, "the run must be killed part-way"
    assert not (killed / "aligned" / "alignment.parquet").exists()
    done = subprocess.run([*CLI, "-q", *args, "--run", str(killed)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = ledger.read_text().strip().splitlines()
    assert len(lines) <= 15 + 1  # finished photos were not redone (one torn line at most)
    fresh = tmp_path / "fresh"
    subprocess.run([*CLI, "-q", *args, "--run", str(fresh)], env=env, check=True, timeout=300)
    a, b = _outputs(killed), _outputs(fresh)
    assert sorted(a) == sorted(b)
    differing = [k for k in a if a[k] != b[k] and k not in ("cohort/cohort.json",)]
    assert not differing, differing
    assert (killed / "aligned" / "p00.png").exists() and len(pd.read_parquet(killed / "errors.parquet")) == 1


def test_pipeline_rerun_is_byte_identical(tmp_path: Path) -> None:
    """Same config and seed → same bytes (run the pipeline twice into the same path; manifest timing aside)."""
    from gestalt_xai.study import run_study

    target = tmp_path / "demo"
    pipeline = Path(__file__).parent.parent / "pipelines" / "example_photos.yaml"
    run_study(pipeline, target)
    first = _outputs(target)
    m1 = Run(target).manifest
    shutil.rmtree(target)
    run_study(pipeline, target)
    second = _outputs(target)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []
    m2 = Run(target).manifest
    for m in (m1, m2):
        m.pop("measurements"), m.pop("measurements_ran")  # the run's wall time, memory and size
        for st in m["stages"].values():
            st.pop("timing")
            # the fingerprints of what a stage read and wrote (file sizes and times: a rerun's are its own)
            st.pop("fingerprint"), st.pop("outputs_token")
    assert m1 == m2


def test_two_pass_levels_a_tilted_face(tmp_path: Path, example_photos) -> None:
    import cv2

    photo = load_image(example_photos["skimage_astronaut"])
    R = cv2.getRotationMatrix2D((256, 256), 25, 1.0)  # tilt the head by 25°
    d = tmp_path / "photos"
    d.mkdir()
    save_png(d / "tilted.png", cv2.warpAffine(photo, R, (512, 512)))
    run = Run(tmp_path / "run")
    align_stage(run, AlignConfig(images=str(d), two_pass=True))
    row = load_alignments(run).iloc[0]
    assert row["two_pass_angle"] < -10  # the first pass saw the tilt (MTCNN under-estimates it: why two passes)
    from gestalt_xai.faces.align import Alignment

    al = Alignment(row_matrix(row), row_landmarks(row), row["score"], 1, "mtcnn")
    assert al.rotation_deg == pytest.approx(25 - 2.7, abs=3)  # the tilt undone (the astronaut's own roll ≈ 2.7°)
    eyes = transform_points(row_landmarks(row), row_matrix(row))[:2]
    assert np.abs(eyes - ARCFACE_TEMPLATE[:2]).max() < 3  # landmarks are in the original photo's pixels


def test_retinaface_detector_through_the_stage(tmp_path: Path, example_photos) -> None:
    """The stage builds RetinaFace from a biubug6-layout file and records every photo (random weights)."""
    import torch

    from gestalt_xai.faces.retinaface import RetinaFace

    with torch.device("meta"):
        layout = RetinaFace().state_dict()
    g = torch.Generator().manual_seed(0)
    state = {"module." + k: (1.0 if k.endswith("weight") else 0.0) + 0.05 * torch.randn(v.shape, generator=g)
             for k, v in layout.items()}
    for level in range(3):  # class heads say "face" everywhere, so detections exist
        state[f"module.ClassHead.{level}.conv1x1.weight"].zero_()
        state[f"module.ClassHead.{level}.conv1x1.bias"] = torch.tensor([0.0, 5.0, 0.0, 5.0])
    torch.save(state, tmp_path / "Resnet50_Final.pth")
    d = tmp_path / "photos"
    d.mkdir()
    save_png(d / "a.png", load_image(example_photos["skimage_astronaut"])[::2, ::2].copy())
    run = Run(tmp_path / "run")
    result = align_stage(run, AlignConfig(images=str(d), detector="retinaface",
                                          detector_weights=str(tmp_path / "Resnet50_Final.pth")))
    table = pd.read_parquet(result.outputs["alignments"])
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["ok"] and row["detector"] == "retinaface" and row["n_faces"] >= 1) or row["error_kind"]
    with pytest.raises(ConfigError, match="detector_weights"):
        align_stage(run, AlignConfig(images=str(d), detector="retinaface", detector_weights=str(tmp_path / "x")))


def test_parallel_workers_give_the_same_outputs(tmp_path: Path, example_photos) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("skimage_astronaut", "insightface_t1"):
        shutil.copy(example_photos[name], d / Path(example_photos[name]).name)
    (d / "bad.jpg").write_bytes(b"nope")
    one, two = Run(tmp_path / "one"), Run(tmp_path / "two")
    align_stage(one, AlignConfig(images=str(d), workers=1))
    align_stage(two, AlignConfig(images=str(d), workers=2))
    a, b = _outputs(one.path), _outputs(two.path)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a if k != "cohort/cohort.json")


def test_photo_folder_refuses_symlinks_out_of_it(tmp_path: Path) -> None:
    from gestalt_xai.faces.stage import _folder_cohort

    d = tmp_path / "photos"
    d.mkdir()
    save_png(d / "inside.png", np.zeros((8, 8, 3), np.uint8))
    save_png(tmp_path / "secret.png", np.zeros((8, 8, 3), np.uint8))
    os.symlink(tmp_path / "secret.png", d / "link.png")
    cohort = _folder_cohort(d)
    assert cohort.images["image_id"].tolist() == ["inside"]
    assert cohort.rejected["image_id"].tolist() == ["link"]
    assert "outside the image root" in cohort.rejected["message"].iloc[0]
