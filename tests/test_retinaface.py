"""RetinaFace-ResNet50 (biubug6 layout, GM-Arc processing): weights, priors, decoding, NMS, detect()."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gestalt_xai.errors import CheckpointError, ConfigError, InputError
from gestalt_xai.faces.detect import Detection, make_detector
from gestalt_xai.faces.retinaface import (
    BGR_MEAN,
    CFG_RE50,
    RetinaFace,
    RetinaFaceDetector,
    decode_boxes,
    decode_detections,
    decode_landmarks,
    load_retinaface,
    nms_inclusive,
    prior_boxes,
    resize_longest_side,
)

VARIANCE = CFG_RE50.variance


def _random_tensor(key: str, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.zeros((), dtype=torch.long)
    if like.dim() == 4:  # conv kernels: He-scaled, so activations stay finite through the 50 layers
        fan_in = like[0].numel()
        return torch.randn(like.shape, generator=generator) * math.sqrt(2.0 / fan_in)
    if key.endswith("running_var"):
        return torch.rand(like.shape, generator=generator) + 0.5
    scale = 1.0 if key.endswith("weight") else 0.0  # BatchNorm γ around 1; biases, β and means around 0
    return scale + 0.1 * torch.randn(like.shape, generator=generator)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """A random-weight state dict in biubug6's key layout (what Resnet50_Final.pth holds, minus 'module.').

    Drawn directly (model built on the meta device): much faster than ResNet-50's own initialisation.
    """
    with torch.device("meta"):
        layout = RetinaFace().state_dict()
    generator = torch.Generator().manual_seed(0)
    return {key: _random_tensor(key, like, generator) for key, like in layout.items()}


@pytest.fixture(scope="module")
def confident_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random weights whose class heads say "face" with p = sigmoid(5) ≈ 0.993 everywhere."""
    out = dict(state)
    for level in range(3):
        key = f"ClassHead.{level}.conv1x1"
        out[f"{key}.weight"] = torch.zeros_like(state[f"{key}.weight"])
        out[f"{key}.bias"] = torch.tensor([0.0, 5.0, 0.0, 5.0])
    return out


# ------------------------------------------------------------------------------------------------ weights


def test_layout_has_biubug6_names(state: dict[str, torch.Tensor]) -> None:
    expected = {
        "body.conv1.weight": (64, 3, 7, 7), "body.layer4.2.bn3.running_var": (2048,),
        "fpn.output1.0.weight": (256, 512, 1, 1), "fpn.output3.0.weight": (256, 2048, 1, 1),
        "fpn.merge1.0.weight": (256, 256, 3, 3), "fpn.merge2.1.num_batches_tracked": (),
        "ssh1.conv3X3.0.weight": (128, 256, 3, 3), "ssh2.conv5X5_1.0.weight": (64, 256, 3, 3),
        "ssh2.conv5X5_2.1.bias": (64,), "ssh3.conv7X7_2.0.weight": (64, 64, 3, 3),
        "ssh3.conv7x7_3.1.running_mean": (64,), "ClassHead.0.conv1x1.weight": (4, 256, 1, 1),
        "BboxHead.1.conv1x1.bias": (8,), "LandmarkHead.2.conv1x1.weight": (20, 256, 1, 1),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    # IntermediateLayerGetter drops everything after layer4
    assert not any(k.startswith(("body.fc", "body.avgpool")) for k in state)
    assert len(state) == 456


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_state_dict_file_loads_with_and_without_prefix(state, tmp_path: Path, prefix: str) -> None:
    path = tmp_path / "Resnet50_Final.pth"
    # the released file is a DataParallel state dict from 2019-era PyTorch: legacy (non-zip) serialisation
    torch.save({prefix + k: v for k, v in state.items()}, path, _use_new_zipfile_serialization=not prefix)
    model = load_retinaface(path)
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    x = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(1)) * 50
    with torch.inference_mode():
        loc, conf, landms = model(x)
    n_priors = len(prior_boxes((32, 64)))
    assert (loc.shape, conf.shape, landms.shape) == ((1, n_priors, 4), (1, n_priors, 2), (1, n_priors, 10))
    assert torch.isfinite(loc).all() and torch.allclose(conf.sum(-1), torch.ones(1, n_priors))


def test_wrapped_state_dict_and_missing_batch_counters_load(state) -> None:
    counters_dropped = {"module." + k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = load_retinaface({"state_dict": counters_dropped})
    torch.testing.assert_close(model.state_dict()["fpn.merge1.0.weight"], state["fpn.merge1.0.weight"])


def test_wrong_key_names_raise_checkpoint_error_naming_keys(state) -> None:
    wrong = dict(state)
    wrong["ssh1.conv7X7_3.0.weight"] = wrong.pop("ssh1.conv7x7_3.0.weight")  # the case trap in SSH's names
    with pytest.raises(CheckpointError) as info:
        load_retinaface(wrong)
    message = str(info.value)
    assert "1 missing keys" in message and "ssh1.conv7x7_3.0.weight (64, 64, 3, 3)" in message
    assert "1 unexpected keys" in message and "ssh1.conv7X7_3.0.weight (64, 64, 3, 3)" in message


def test_shape_mismatch_raises_checkpoint_error(state) -> None:
    wrong = dict(state)
    wrong["ClassHead.0.conv1x1.weight"] = torch.zeros(6, 256, 1, 1)  # 3 anchors instead of 2
    expected = r"ClassHead\.0\.conv1x1\.weight \(6, 256, 1, 1\) vs \(4, 256, 1, 1\)"
    with pytest.raises(CheckpointError, match=expected):
        load_retinaface(wrong)


def test_mobilenet_file_is_recognised(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet0.25_Final.pth"
    torch.save({"module.body.stage1.0.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError) as info:
        load_retinaface(path)
    message = str(info.value)
    assert "unexpected keys" in message and "body.stage1.0.0.weight (8, 3, 3, 3)" in message
    assert "missing keys" in message and "more" in message and "MobileNet" in message


def test_unreadable_or_unsafe_files_raise_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_retinaface(tmp_path / "absent.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_retinaface(tmp_path / "list.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module: weights_only refuses it
    with pytest.raises(CheckpointError, match="weights_only"):
        load_retinaface(tmp_path / "module.pth")


def test_make_detector_needs_weights() -> None:
    with pytest.raises(ConfigError, match="detector-weights"):
        make_detector("retinaface")


def test_detector_rejects_bad_settings(state) -> None:
    with pytest.raises(ConfigError):
        RetinaFaceDetector(state, threshold=0.0)
    with pytest.raises(ConfigError):
        RetinaFaceDetector(state, nms_threshold=1.5)


# ------------------------------------------------------------------------------------------------- priors


def _priors_by_loops(height: int, width: int) -> torch.Tensor:
    """biubug6's PriorBox written as its plain loops (level, row, column, size), as an independent oracle."""
    rows = []
    for step, sizes in zip(CFG_RE50.steps, CFG_RE50.min_sizes, strict=True):
        for i in range(math.ceil(height / step)):
            for j in range(math.ceil(width / step)):
                for size in sizes:
                    cx, cy = (j + 0.5) * step / width, (i + 0.5) * step / height
                    rows.append([cx, cy, size / width, size / height])
    return torch.tensor(rows, dtype=torch.float32)


def test_priors_640_square() -> None:
    priors = prior_boxes((640, 640))
    assert priors.shape == (80 * 80 * 2 + 40 * 40 * 2 + 20 * 20 * 2, 4) == (16800, 4)
    # first cell of stride 8: centre (4, 4) px, anchors 16 and 32 px
    torch.testing.assert_close(priors[0], torch.tensor([4 / 640, 4 / 640, 16 / 640, 16 / 640]))
    torch.testing.assert_close(priors[1], torch.tensor([4 / 640, 4 / 640, 32 / 640, 32 / 640]))
    # second cell of the first row: x moves by one stride
    torch.testing.assert_close(priors[2], torch.tensor([12 / 640, 4 / 640, 16 / 640, 16 / 640]))
    # first cell of stride 16 (after 12800 stride-8 priors): centre (8, 8), anchor 64
    torch.testing.assert_close(priors[12800], torch.tensor([8 / 640, 8 / 640, 64 / 640, 64 / 640]))
    # last cell of stride 32: centre (19.5·32 = 624) px, anchor 512
    torch.testing.assert_close(priors[-1], torch.tensor([624 / 640, 624 / 640, 512 / 640, 512 / 640]))
    assert priors.dtype == torch.float32


def test_priors_non_square_match_loops() -> None:
    assert prior_boxes((480, 640)).shape[0] == 60 * 80 * 2 + 30 * 40 * 2 + 15 * 20 * 2
    priors = prior_boxes((100, 150))  # not divisible by the strides: ceil, as biubug6
    assert priors.shape[0] == 13 * 19 * 2 + 7 * 10 * 2 + 4 * 5 * 2
    torch.testing.assert_close(priors, _priors_by_loops(100, 150))
    # row i=1, column j=2 of stride 8, second anchor: x from column and width, y from row and height
    expected = torch.tensor([20 / 150, 12 / 100, 32 / 150, 32 / 100])
    torch.testing.assert_close(priors[(1 * 19 + 2) * 2 + 1], expected)


# ----------------------------------------------------------------------------------------------- decoding


def _encode(box: np.ndarray, points: np.ndarray, prior: torch.Tensor, hw: tuple[int, int]):
    """biubug6's encode/encode_landm for one box (input pixels) against one prior: the inverse of decoding."""
    height, width = hw
    cx, cy, pw, ph = prior.double().tolist()
    x1, y1, x2, y2 = box[0] / width, box[1] / height, box[2] / width, box[3] / height
    loc = [((x1 + x2) / 2 - cx) / (VARIANCE[0] * pw), ((y1 + y2) / 2 - cy) / (VARIANCE[0] * ph),
           math.log((x2 - x1) / pw) / VARIANCE[1], math.log((y2 - y1) / ph) / VARIANCE[1]]
    landm = [[(x / width - cx) / (VARIANCE[0] * pw), (y / height - cy) / (VARIANCE[0] * ph)]
             for x, y in points]
    return torch.tensor(loc), torch.tensor(landm).reshape(10)


HW = (96, 128)
BOX_A = np.array([20.0, 18.0, 60.0, 70.0])
POINTS_A = np.array([[30.0, 35.0], [50.0, 34.0], [41.0, 48.0], [32.0, 60.0], [49.0, 61.0]])
BOX_B = BOX_A + [80.0, 10.0, 80.0, 10.0]  # far away from A
POINTS_B = POINTS_A + [80.0, 10.0]


def _constructed_outputs(faces: list[tuple[int, np.ndarray, np.ndarray, float]], hw=HW):
    """Network outputs for input size ``hw`` where prior ``index`` encodes (box, points) with face prob p."""
    priors = prior_boxes(hw)
    loc = torch.zeros(len(priors), 4)
    landms = torch.zeros(len(priors), 10)
    conf = torch.zeros(len(priors), 2)
    conf[:, 0] = 1.0
    for index, box, points, p in faces:
        loc[index], landms[index] = _encode(box, points, priors[index], hw)
        conf[index] = torch.tensor([1 - p, p])
    return loc, conf, landms, priors


def test_decode_inverts_encoding() -> None:
    priors = prior_boxes(HW)
    for index in (0, 37, len(priors) - 1):  # priors of different levels and sizes
        loc, landm = _encode(BOX_A, POINTS_A, priors[index], HW)
        scale = torch.tensor([HW[1], HW[0]], dtype=torch.float32)
        box = decode_boxes(loc[None], priors[index][None]) * scale.repeat(2)
        points = decode_landmarks(landm[None], priors[index][None]) * scale
        np.testing.assert_allclose(box[0].numpy(), BOX_A, atol=1e-3)
        np.testing.assert_allclose(points[0].numpy(), POINTS_A, atol=1e-3)


def test_decode_detections_returns_constructed_faces_in_score_order() -> None:
    faces = [(40, BOX_A, POINTS_A, 0.97), (300, BOX_B, POINTS_B, 0.99)]
    loc, conf, landms, priors = _constructed_outputs(faces)
    found = decode_detections(loc[None], conf[None], landms[None], priors, HW, threshold=0.5)
    np.testing.assert_allclose(found.scores, [0.99, 0.97], atol=1e-6)
    np.testing.assert_allclose(found.boxes, [BOX_B, BOX_A], atol=1e-3)
    np.testing.assert_allclose(found.landmarks, [POINTS_B, POINTS_A], atol=1e-3)
    assert found.boxes.dtype == np.float64 and found.landmarks.shape == (2, 5, 2)


def test_threshold_filters_by_confidence() -> None:
    faces = [(40, BOX_A, POINTS_A, 0.90), (300, BOX_B, POINTS_B, 0.99)]
    loc, conf, landms, priors = _constructed_outputs(faces)

    def count(scores: torch.Tensor, **kwargs) -> int:
        return len(decode_detections(loc, scores, landms, priors, HW, **kwargs).scores)

    strict = decode_detections(loc, conf, landms, priors, HW, threshold=0.95)
    np.testing.assert_allclose(strict.boxes, [BOX_B], atol=1e-3)
    assert count(conf, threshold=0.9) == 2  # ≥ threshold keeps the 0.90 face
    assert count(conf[:, 1], threshold=0.5) == 2  # an (N,) vector of face probabilities
    assert count(conf, threshold=0.995) == 0
    assert count(conf, threshold=0.5, keep_top_k=1) == 1


def test_nms_keeps_the_more_confident_of_overlapping_faces() -> None:
    shifted = BOX_A + [4.0, 2.0, 4.0, 2.0]  # IoU with A ≈ 0.8
    loc, conf, landms, priors = _constructed_outputs(
        [(40, BOX_A, POINTS_A, 0.97), (41, shifted, POINTS_A, 0.98), (300, BOX_B, POINTS_B, 0.96)])
    found = decode_detections(loc, conf, landms, priors, HW, threshold=0.95, nms_threshold=0.4)
    np.testing.assert_allclose(found.scores, [0.98, 0.96], atol=1e-6)
    np.testing.assert_allclose(found.boxes, [shifted, BOX_B], atol=1e-3)
    loose = decode_detections(loc, conf, landms, priors, HW, threshold=0.95, nms_threshold=0.9)
    assert len(loose.scores) == 3


def test_nms_uses_pixel_inclusive_sizes_like_py_cpu_nms() -> None:
    boxes = torch.tensor([[0.0, 0, 9, 9], [4, 0, 13, 9], [30, 30, 40, 40]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    # inclusive IoU (what py_cpu_nms computes): 6·10 / (100 + 100 − 60) = 0.43 > 0.4 → suppressed;
    # the continuous IoU would be 45 / 117 = 0.38 and keep it
    assert nms_inclusive(boxes, scores, 0.4).tolist() == [0, 2]
    assert nms_inclusive(boxes, scores, 0.45).tolist() == [0, 1, 2]
    assert nms_inclusive(torch.zeros(0, 4), torch.zeros(0), 0.4).tolist() == []


# ----------------------------------------------------------------------------------------------- detector


def test_resize_follows_gm_arc() -> None:
    for hw, longest in [((1000, 667), 640), ((300, 200), 640), ((240, 320), 64), ((97, 33), 64)]:
        ratio = longest / max(hw)
        expected = tuple(int(side * ratio) for side in hw)
        assert resize_longest_side(np.zeros((*hw, 3), np.uint8), longest).shape == (*expected, 3)


def test_detect_end_to_end_random_weights(confident_state) -> None:
    detector = RetinaFaceDetector(confident_state, threshold=0.9, resize_longest=64)
    assert detector.name == "retinaface"
    rng = np.random.default_rng(0)
    found = detector.detect(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    assert isinstance(found, list) and len(found) >= 1
    for det in found:
        assert isinstance(det, Detection)
        assert det.box.shape == (4,) and det.landmarks.shape == (5, 2) and det.score >= 0.9
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    with pytest.raises(InputError):
        detector.detect(np.zeros((48, 80), np.uint8))


class _StubNet(nn.Module):
    """Stands in for the network: records its input and returns outputs encoding chosen faces."""

    def __init__(self, faces) -> None:
        super().__init__()
        self.faces = faces
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor):
        self.seen = x.clone()
        loc, conf, landms, _ = _constructed_outputs(self.faces, hw=(x.shape[2], x.shape[3]))
        return loc[None], conf[None], landms[None]


def test_detect_preprocesses_like_gm_arc_and_maps_back_to_photo_pixels(state) -> None:
    detector = RetinaFaceDetector(state, threshold=0.95)
    photo_hw = (700, 500)  # longest side 700 → 640; 500·640/700 = 457.14 → 457 (int truncation)
    in_hw = (640, 457)
    face = (1000, np.array([100.0, 150.0, 300.0, 420.0]),
            np.array([[160.0, 250.0], [240.0, 252.0], [200.0, 310.0], [170.0, 360.0], [235.0, 362.0]]), 0.99)
    weak = (5000, face[1] + 200, face[2] + 200, 0.5)
    detector.net = _StubNet([face, weak])
    photo = np.empty((*photo_hw, 3), np.uint8)
    photo[...] = (10, 20, 30)  # RGB
    found = detector.detect(photo)

    seen = detector.net.seen
    assert seen is not None and tuple(seen.shape) == (1, 3, *in_hw)
    # BGR order, mean (104, 117, 123) subtracted, no scaling
    expected = torch.tensor([30 - BGR_MEAN[0], 20 - BGR_MEAN[1], 10 - BGR_MEAN[2]])
    torch.testing.assert_close(seen[0, :, 5, 7], expected)

    assert len(found) == 1
    scale = np.array([photo_hw[1] / in_hw[1], photo_hw[0] / in_hw[0]])  # per axis: 500/457, 700/640
    np.testing.assert_allclose(found[0].box, face[1] * np.tile(scale, 2), atol=1e-2)
    np.testing.assert_allclose(found[0].landmarks, face[2] * scale, atol=1e-2)
    assert found[0].score == pytest.approx(0.99)
