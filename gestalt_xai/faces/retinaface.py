"""RetinaFace-ResNet50, the face detector GestaltMatcher-Arc crops and aligns with (user-supplied weights).

The network reproduces biubug6's ``Pytorch_Retinaface`` module for module, so the released
``Resnet50_Final.pth`` (the file GM-Arc's ``crop_align.py`` loads from ``saved_models/``) loads with strict
key matching::

    body     torchvision ResNet-50 trunk via IntermediateLayerGetter:
             layer2 → 512, layer3 → 1024, layer4 → 2048 channels (strides 8, 16, 32)
    fpn      output1/2/3 = conv1×1+BN+LeakyReLU(0) to 256 ch; top-down nearest upsampling + add;
             merge2 (level 2) then merge1 (level 1) = conv3×3+BN+LeakyReLU(0)
    ssh1..3  conv3X3 (3×3, 128 ch, no ReLU)
             ‖ conv5X5_1 → conv5X5_2 (64 ch) ‖ conv5X5_1 → conv7X7_2 → conv7x7_3 (64 ch)
             concatenated (256 ch) → ReLU      (the lower-case ``x`` in ``conv7x7_3`` is theirs)
    heads    ClassHead / BboxHead / LandmarkHead: one ``conv1x1`` per level, 2 anchors per location,
             2 / 4 / 10 values per anchor

Priors (``cfg_re50``): strides 8/16/32 with square anchors of 16,32 / 64,128 / 256,512 px, one location per
stride cell centred at ``(j + 0.5)·step``; coordinates are normalised by the network input's width and
height. Regression follows SSD with variances (0.1, 0.2): ``centre = prior_c + loc·0.1·prior_wh``,
``size = prior_wh·exp(loc·0.2)``; each landmark is ``prior_c + landm·0.1·prior_wh``.

GestaltMatcher-Arc's detection (``crop_align.py`` / ``lib/face_alignment.py``), reproduced by
:class:`RetinaFaceDetector`:

1. the photo (read by OpenCV, so **BGR**) is resized with ``cv2.resize`` (bilinear) by
   ``640 / longest side``, each side truncated with ``int()`` — small photos are enlarged as well;
2. input = ``float32(BGR) − (104, 117, 123)``, no scaling to [0, 1];
3. face probability = softmax column 1; keep ``p > 0.02``; top 5000 by score; NMS at IoU 0.4 with Ross
   Girshick's ``py_cpu_nms`` (pixel-inclusive ``+1`` widths); keep 750;
4. keep the single most confident face; boxes and landmarks are scaled back by
   ``max(original) / max(resized)``.

Deviations, on purpose: the confidence cut-off is ``threshold`` (default 0.95, as for MTCNN) instead of 0.02;
all faces above it are returned, most confident first (picking one is the align stage's job); coordinates
are mapped back per axis (``x·W/w``, ``y·H/h``) rather than by the long-side factor, which is off by up to
one resized pixel on the short side because of the ``int()`` truncation. GM-Arc also truncates the landmarks
to whole pixels before alignment; here they stay floating point.

Landmark order (verified in biubug6's training augmentation, whose horizontal flip swaps points 0↔1 and
3↔4, and in GM-Arc, which levels the eyes with the vector from point 0 to point 1 and maps the points
straight onto the ArcFace template): image-left eye, image-right eye, nose tip, image-left mouth corner,
image-right mouth corner.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gestalt_xai.errors import CheckpointError, ConfigError, InputError
from gestalt_xai.faces.detect import Detection, check_face_size

log = logging.getLogger(__name__)

__all__ = [
    "BGR_MEAN",
    "CFG_RE50",
    "FaceCandidates",
    "RetinaFace",
    "RetinaFaceConfig",
    "RetinaFaceDetector",
    "decode_boxes",
    "decode_detections",
    "decode_landmarks",
    "load_retinaface",
    "nms_inclusive",
    "prior_boxes",
    "resize_longest_side",
]

#: per-channel mean subtracted from the BGR input (biubug6 calls it ``rgb_mean``; it is in OpenCV's BGR order)
BGR_MEAN: tuple[float, float, float] = (104.0, 117.0, 123.0)


@dataclass(frozen=True)
class RetinaFaceConfig:
    """Architecture and prior settings (biubug6 ``cfg_re50``; the keys that matter at inference).

    Attributes
    ----------
    min_sizes: anchor side lengths in input pixels, one tuple per pyramid level.
    steps: stride of each pyramid level in input pixels.
    variance: SSD regression variances (centre, size).
    clip: clamp priors to [0, 1] (off for ResNet-50).
    return_layers: ResNet stages fed to the FPN and the names ``IntermediateLayerGetter`` gives their outputs.
    in_channel: ResNet-50 layer1 width / 2 (layer2/3/4 have 2/4/8 times this many channels).
    out_channel: FPN, SSH and head width.
    """

    min_sizes: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
    steps: tuple[int, ...] = (8, 16, 32)
    variance: tuple[float, float] = (0.1, 0.2)
    clip: bool = False
    return_layers: tuple[tuple[str, int], ...] = (("layer2", 1), ("layer3", 2), ("layer4", 3))
    in_channel: int = 256
    out_channel: int = 256

    @property
    def anchors_per_location(self) -> int:
        """Anchors per feature-map cell (2 for ``cfg_re50``; the heads are built for one common count)."""
        counts = {len(sizes) for sizes in self.min_sizes}
        if len(counts) != 1:
            raise ConfigError(f"every pyramid level needs the same number of anchors, got {self.min_sizes}")
        return counts.pop()


#: the configuration GestaltMatcher-Arc uses (``cfg`` in its ``crop_align.py``)
CFG_RE50 = RetinaFaceConfig()


# --------------------------------------------------------------------------------------------------- network


def _conv_bn(inp: int, out: int, kernel: int, leaky: float | None) -> nn.Sequential:
    """Conv (no bias) + BN (+ LeakyReLU unless ``leaky`` is None): biubug6's conv_bn, conv_bn1X1, …"""
    layers: list[nn.Module] = [nn.Conv2d(inp, out, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(out)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(negative_slope=leaky))
    return nn.Sequential(*layers)


class FPN(nn.Module):
    """Three-level feature pyramid: 1×1 lateral convs, nearest top-down upsampling, 3×3 merge convs."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        leaky = 0.1 if out_channels <= 64 else 0.0  # biubug6: leaky only for the narrow MobileNet variant
        self.output1 = _conv_bn(in_channels[0], out_channels, 1, leaky)
        self.output2 = _conv_bn(in_channels[1], out_channels, 1, leaky)
        self.output3 = _conv_bn(in_channels[2], out_channels, 1, leaky)
        self.merge1 = _conv_bn(out_channels, out_channels, 3, leaky)
        self.merge2 = _conv_bn(out_channels, out_channels, 3, leaky)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        c3, c4, c5 = features
        p5 = self.output3(c5)
        p4 = self.output2(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p4 = self.merge2(p4)
        p3 = self.output1(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        p3 = self.merge1(p3)
        return [p3, p4, p5]


class SSH(nn.Module):
    """Single Stage Headless context module: 3×3, 5×5 and 7×7 receptive fields (stacked 3×3 convs)."""

    def __init__(self, in_channel: int, out_channel: int) -> None:
        super().__init__()
        if out_channel % 4:
            raise ConfigError(f"SSH out_channel must be divisible by 4, got {out_channel}")
        leaky = 0.1 if out_channel <= 64 else 0.0
        quarter = out_channel // 4
        self.conv3X3 = _conv_bn(in_channel, out_channel // 2, 3, None)
        self.conv5X5_1 = _conv_bn(in_channel, quarter, 3, leaky)
        self.conv5X5_2 = _conv_bn(quarter, quarter, 3, None)
        self.conv7X7_2 = _conv_bn(quarter, quarter, 3, leaky)
        self.conv7x7_3 = _conv_bn(quarter, quarter, 3, None)  # sic: lower-case x, as in the released weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5 = self.conv5X5_1(x)
        branch7 = self.conv7x7_3(self.conv7X7_2(branch5))
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(branch5), branch7], dim=1))


class AnchorHead(nn.Module):
    """A 1×1 conv predicting ``values`` numbers per anchor, flattened to ``(B, H·W·anchors, values)``.

    The flattening order (row, column, anchor) is the order of :func:`prior_boxes`.
    """

    def __init__(self, in_channels: int, anchors: int, values: int) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(in_channels, anchors * values, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """RetinaFace-ResNet50 in biubug6's module layout (state-dict compatible with ``Resnet50_Final.pth``).

    ``forward`` takes a ``(B, 3, H, W)`` BGR, mean-subtracted float tensor and returns
    ``(loc, conf, landms)``: ``(B, N, 4)`` box regressions, ``(B, N, 2)`` softmax probabilities (column 1 =
    face) and ``(B, N, 10)`` landmark regressions for the ``N`` priors of :func:`prior_boxes` at ``(H, W)``.

    The trunk is built with random weights (``resnet50(weights=None)``); nothing is downloaded. Load real
    weights with :func:`load_retinaface`.
    """

    def __init__(self, cfg: RetinaFaceConfig = CFG_RE50) -> None:
        super().__init__()
        from torchvision.models import resnet50
        from torchvision.models._utils import IntermediateLayerGetter  # its names are the weights' names

        self.cfg = cfg
        self.body = IntermediateLayerGetter(resnet50(weights=None), dict(cfg.return_layers))
        width = cfg.in_channel
        self.fpn = FPN([width * 2, width * 4, width * 8], cfg.out_channel)
        self.ssh1 = SSH(cfg.out_channel, cfg.out_channel)
        self.ssh2 = SSH(cfg.out_channel, cfg.out_channel)
        self.ssh3 = SSH(cfg.out_channel, cfg.out_channel)
        anchors = cfg.anchors_per_location
        levels = len(cfg.steps)
        self.ClassHead = nn.ModuleList(AnchorHead(cfg.out_channel, anchors, 2) for _ in range(levels))
        self.BboxHead = nn.ModuleList(AnchorHead(cfg.out_channel, anchors, 4) for _ in range(levels))
        self.LandmarkHead = nn.ModuleList(AnchorHead(cfg.out_channel, anchors, 10) for _ in range(levels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pyramid = self.fpn(list(self.body(x).values()))
        features = [self.ssh1(pyramid[0]), self.ssh2(pyramid[1]), self.ssh3(pyramid[2])]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, features, strict=True)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features, strict=True)], dim=1)
        landms = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features, strict=True)], dim=1)
        return loc, F.softmax(logits, dim=-1), landms


# ----------------------------------------------------------------------------------------------- weights

_DATAPARALLEL_PREFIX = "module."


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if hasattr(value, "shape") else type(value).__name__


def _key_report(title: str, keys: Sequence[str], shapes: Mapping[str, Any], limit: int = 20) -> str:
    listed = ", ".join(f"{key} {_shape(shapes[key])}" for key in keys[:limit])
    more = f", … and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {title}: {listed}{more}"


def _read_state_dict(weights: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict in ``weights`` (file or mapping), with any DataParallel ``module.`` prefix removed."""
    if isinstance(weights, Mapping):
        raw: Any = weights
        where = "the given state dict"
    else:
        path = Path(weights)
        where = str(path)
        if not path.is_file():
            raise CheckpointError(f"RetinaFace weights not found: {path} (expected biubug6's "
                                  "Resnet50_Final.pth)")
        try:
            # weights_only: never execute pickled code from a user-supplied file
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError, …
            raise CheckpointError(f"cannot read RetinaFace weights {path} as a plain state dict "
                                  f"(torch.load weights_only=True): {type(exc).__name__}: {exc}") from exc
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]  # training checkpoints wrap it; biubug6/GM-Arc unwrap the same key
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        raise CheckpointError(f"{where} is not a state dict (mapping of parameter names to tensors), "
                              f"got {type(raw).__name__}")
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key.removeprefix(_DATAPARALLEL_PREFIX)
        if name in state:
            raise CheckpointError(f"{where} holds {name!r} both with and without the "
                                  f"{_DATAPARALLEL_PREFIX!r} prefix")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        state[name] = value
    return state


def load_retinaface(weights: str | Path | Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                    cfg: RetinaFaceConfig = CFG_RE50) -> RetinaFace:
    """Build :class:`RetinaFace` and load a biubug6-layout state dict with strict key and shape matching.

    Parameters
    ----------
    weights:
        Path to ``Resnet50_Final.pth`` (keys with or without DataParallel's ``module.`` prefix, optionally
        wrapped in ``{"state_dict": ...}``) or an already loaded state dict.
    device:
        Where the model lives.
    cfg:
        Architecture; :data:`CFG_RE50` for the released weights.

    Returns
    -------
    The model in eval mode.

    Raises
    ------
    CheckpointError
        The file is missing or not a plain state dict, or its keys/shapes differ from the model's; the
        message lists missing and unexpected keys and mismatched shapes. Only BatchNorm
        ``num_batches_tracked`` counters may be absent (PyTorch < 0.4.1 did not save them; inference never
        reads them).

    Examples
    --------
    >>> net = RetinaFace()
    >>> load_retinaface({"module." + k: v for k, v in net.state_dict().items()}).training
    False
    """
    state = _read_state_dict(weights)
    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        model = RetinaFace(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(_key_report("missing keys (model shape)", missing, expected))
        if unexpected:
            parts.append(_key_report("unexpected keys (checkpoint shape)", unexpected, state))
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (checkpoint vs model): " + ", ".join(
                f"{k} {_shape(state[k])} vs {_shape(expected[k])}" for k in mismatched[:20]))
        hint = ""
        if any(k.startswith("body.stage") for k in unexpected):
            hint = " — this looks like the MobileNet-0.25 RetinaFace; GM-Arc uses Resnet50_Final.pth"
        raise CheckpointError("RetinaFace-ResNet50 weights do not match biubug6's layout: "
                              + "; ".join(parts) + hint)
    copy = isinstance(weights, Mapping)  # never alias the caller's tensors
    tensors = {key: state[key].to(ref.dtype, copy=copy) if key in state else torch.zeros((), dtype=ref.dtype)
               for key, ref in expected.items()}  # an absent num_batches_tracked counter starts at 0
    # assign=True puts the checkpoint's tensors into the meta-device model instead of copying into random ones
    model.load_state_dict(tensors, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # pragma: no cover - layout invariant
        raise CheckpointError("RetinaFace: some parameters were not filled by the state dict")
    return model.to(device).eval()


# -------------------------------------------------------------------------------------- priors and decoding


def prior_boxes(image_hw: tuple[int, int], cfg: RetinaFaceConfig = CFG_RE50) -> torch.Tensor:
    """Anchor boxes for a network input of ``image_hw`` pixels, in the order the heads emit them.

    Level by level (stride 8, 16, 32), row by row, column by column, then anchor size; each level has
    ``ceil(H / step) × ceil(W / step)`` cells.

    Parameters
    ----------
    image_hw: ``(height, width)`` of the network input.
    cfg: prior settings.

    Returns
    -------
    ``(N, 4)`` float32 ``cx, cy, w, h``, normalised by the input width (x, w) and height (y, h).

    Examples
    --------
    >>> priors = prior_boxes((640, 640))
    >>> priors.shape[0], [round(v, 5) for v in priors[0].tolist()]
    (16800, [0.00625, 0.00625, 0.025, 0.025])
    """
    height, width = (int(v) for v in image_hw)
    if height <= 0 or width <= 0:
        raise ConfigError(f"image size must be positive, got {image_hw}")
    levels = []
    for step, sizes in zip(cfg.steps, cfg.min_sizes, strict=True):
        rows, cols = -(-height // step), -(-width // step)  # ceil division
        cy = (torch.arange(rows, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")  # (rows, cols)
        anchor_w = torch.tensor(sizes, dtype=torch.float64) / width
        anchor_h = torch.tensor(sizes, dtype=torch.float64) / height
        shape = (rows, cols, len(sizes))
        level = torch.stack([grid_x[..., None].expand(shape), grid_y[..., None].expand(shape),
                             anchor_w.expand(shape), anchor_h.expand(shape)], dim=-1)
        levels.append(level.reshape(-1, 4))
    priors = torch.cat(levels).to(torch.float32)
    return priors.clamp_(0.0, 1.0) if cfg.clip else priors


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor,
                 variance: tuple[float, float] = CFG_RE50.variance) -> torch.Tensor:
    """SSD box decoding: ``(N, 4)`` regressions → ``(N, 4)`` normalised ``x1, y1, x2, y2``.

    ``centre = prior_c + loc_c·v₀·prior_wh``, ``size = prior_wh·exp(loc_wh·v₁)``.
    """
    centre = priors[:, :2] + loc[:, :2] * variance[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * variance[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def decode_landmarks(landms: torch.Tensor, priors: torch.Tensor,
                     variance: tuple[float, float] = CFG_RE50.variance) -> torch.Tensor:
    """Landmark decoding: ``(N, 10)`` regressions → ``(N, 5, 2)`` normalised ``prior_c + d·v₀·prior_wh``."""
    return priors[:, None, :2] + landms.reshape(-1, 5, 2) * variance[0] * priors[:, None, 2:]


def nms_inclusive(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS with pixel-inclusive sizes (``x2 − x1 + 1``), like the ``py_cpu_nms`` GM-Arc uses.

    A box is suppressed when its IoU with a higher-scoring kept box exceeds ``iou_threshold``. Returns the
    indices of kept boxes, highest score first.

    Examples
    --------
    >>> boxes = torch.tensor([[0.0, 0, 9, 9], [4, 0, 13, 9]])  # IoU 60/140 = 0.43 (inclusive), 45/117 = 0.38
    >>> nms_inclusive(boxes, torch.tensor([0.9, 0.8]), 0.4).tolist()
    [0]
    """
    from torchvision.ops import nms

    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # IoU with (x2 + 1, y2 + 1) and continuous areas equals py_cpu_nms's inclusive IoU.
    shifted = torch.cat([boxes[:, :2], boxes[:, 2:] + 1.0], dim=1)
    return nms(shifted.float(), scores.float(), float(iou_threshold))


class FaceCandidates(NamedTuple):
    """Decoded detections in network-input pixels, most confident first."""

    boxes: np.ndarray  # (K, 4) x1, y1, x2, y2
    landmarks: np.ndarray  # (K, 5, 2) x, y in template order
    scores: np.ndarray  # (K,)


def decode_detections(loc: torch.Tensor, conf: torch.Tensor, landms: torch.Tensor, priors: torch.Tensor,
                      image_hw: tuple[int, int], *, variance: tuple[float, float] = CFG_RE50.variance,
                      threshold: float = 0.02, nms_threshold: float = 0.4, top_k: int = 5000,
                      keep_top_k: int = 750) -> FaceCandidates:
    """Turn raw RetinaFace outputs into scored faces: threshold → top-k → NMS → keep-top-k (GM-Arc's order).

    Parameters
    ----------
    loc, conf, landms:
        Network outputs for one image: ``(N, 4)``, ``(N, 2)`` softmax probabilities (column 1 = face; an
        ``(N,)`` vector of face probabilities is accepted too) and ``(N, 10)``; a leading batch dimension of 1
        is dropped.
    priors:
        ``(N, 4)`` from :func:`prior_boxes` for the same input size.
    image_hw:
        ``(height, width)`` of the network input: normalised coordinates are multiplied by it.
    threshold:
        Keep faces with probability ≥ this (GM-Arc: > 0.02).
    nms_threshold, top_k, keep_top_k:
        GM-Arc's 0.4, 5000 and 750.

    Returns
    -------
    :class:`FaceCandidates` in input pixels, float64, sorted by descending score.

    Examples
    --------
    >>> priors = prior_boxes((64, 64))
    >>> conf = torch.zeros(len(priors), 2); conf[0, 1] = 0.99
    >>> zeros = torch.zeros(len(priors), 10)
    >>> found = decode_detections(zeros[:, :4], conf, zeros, priors, (64, 64))
    >>> found.boxes.tolist(), found.scores.round(2).tolist()
    ([[-4.0, -4.0, 12.0, 12.0]], [0.99])
    """
    loc, conf, landms = (t.squeeze(0) if t.dim() == 3 and t.shape[0] == 1 else t for t in (loc, conf, landms))
    scores = conf[:, 1] if conf.dim() == 2 else conf
    if not (loc.shape[0] == scores.shape[0] == landms.shape[0] == priors.shape[0]):
        raise ValueError(f"outputs and priors disagree on the prior count: loc {tuple(loc.shape)}, "
                         f"conf {tuple(conf.shape)}, landms {tuple(landms.shape)}, "
                         f"priors {tuple(priors.shape)}")
    keep = torch.nonzero(scores >= threshold).squeeze(1)
    keep = keep[torch.argsort(scores[keep], descending=True)[:top_k]]
    height, width = image_hw
    priors = priors[keep].to(loc.dtype)
    boxes = decode_boxes(loc[keep], priors, variance) * loc.new_tensor([width, height, width, height])
    points = decode_landmarks(landms[keep], priors, variance) * loc.new_tensor([width, height])
    scores = scores[keep]
    kept = nms_inclusive(boxes, scores, nms_threshold)[:keep_top_k]
    return FaceCandidates(boxes[kept].double().cpu().numpy(), points[kept].double().cpu().numpy(),
                          scores[kept].double().cpu().numpy())


# ---------------------------------------------------------------------------------------------- detector


def resize_longest_side(image: np.ndarray, longest: int) -> np.ndarray:
    """Resize so the longest side is ``longest`` pixels, as GM-Arc does (``int()``-truncated sides, bilinear).

    Photos smaller than ``longest`` are enlarged too.

    Examples
    --------
    >>> resize_longest_side(np.zeros((300, 200, 3), np.uint8), 640).shape
    (640, 426, 3)
    """
    import cv2

    ratio = float(longest) / max(image.shape[:2])
    height, width = (max(1, int(side * ratio)) for side in image.shape[:2])
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


class RetinaFaceDetector:
    """RetinaFace-ResNet50 face detector with GestaltMatcher-Arc's pre- and post-processing.

    Parameters
    ----------
    weights:
        biubug6's ``Resnet50_Final.pth`` (the file GM-Arc loads), with or without the ``module.`` prefix, or
        an already loaded state dict. Loaded with ``torch.load(weights_only=True)`` and strict key matching.
    threshold:
        Minimum face probability in (0, 1]. GM-Arc keeps anything above 0.02 and then only the top face.
    nms_threshold:
        IoU above which a less confident overlapping box is dropped (GM-Arc: 0.4).
    resize_longest:
        Longest side of the network input in pixels (GM-Arc: 640); ``None`` runs on the photo as it is.
    device:
        Torch device for the network.

    Examples
    --------
    >>> detector = RetinaFaceDetector(RetinaFace().state_dict(), threshold=0.99, resize_longest=64)
    >>> isinstance(detector.detect(np.zeros((48, 64, 3), np.uint8)), list)
    True
    """

    name = "retinaface"

    def __init__(self, weights: str | Path | Mapping[str, torch.Tensor], threshold: float = 0.95,
                 nms_threshold: float = 0.4, resize_longest: int | None = 640, device: str = "cpu") -> None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"detector threshold must be in (0, 1], got {threshold}")
        if not 0.0 < nms_threshold <= 1.0:
            raise ConfigError(f"NMS IoU threshold must be in (0, 1], got {nms_threshold}")
        if resize_longest is not None and resize_longest < 32:
            raise ConfigError(f"resize_longest must be ≥ 32 pixels (the coarsest stride) or None, "
                              f"got {resize_longest}")
        self.threshold = float(threshold)
        self.nms_threshold = float(nms_threshold)
        self.resize_longest = resize_longest
        self.device = torch.device(device)
        self.cfg = CFG_RE50
        self.net: nn.Module = load_retinaface(weights, self.device, self.cfg)

    def network_input(self, rgb: np.ndarray) -> torch.Tensor:
        """``(1, 3, h, w)`` tensor the network sees: resized, RGB → BGR, minus :data:`BGR_MEAN`, unscaled."""
        image = rgb if self.resize_longest is None else resize_longest_side(rgb, self.resize_longest)
        bgr = image[..., ::-1].astype(np.float32) - np.asarray(BGR_MEAN, np.float32)
        return torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))[None].to(self.device)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an ``H×W×3`` uint8 RGB photo with probability ≥ ``threshold``, most confident first.

        Boxes and landmarks are in the photo's pixels (origin top-left), landmarks in template order. A photo with a
        side shorter than :data:`~gestalt_xai.faces.detect.MIN_FACE_PIXELS` raises
        :class:`~gestalt_xai.errors.DetectionError`.
        """
        if not (isinstance(rgb, np.ndarray) and rgb.ndim == 3 and rgb.shape[2] == 3
                and rgb.dtype == np.uint8):
            raise InputError("RetinaFaceDetector.detect expects an H×W×3 uint8 RGB array, got "
                             f"{type(rgb).__name__} {getattr(rgb, 'shape', '')} {getattr(rgb, 'dtype', '')}")
        check_face_size(rgb)
        height, width = rgb.shape[:2]
        x = self.network_input(rgb)
        in_hw = (int(x.shape[2]), int(x.shape[3]))
        with torch.inference_mode():
            loc, conf, landms = self.net(x)
        priors = prior_boxes(in_hw, self.cfg).to(loc.device)
        found = decode_detections(loc[0], conf[0], landms[0], priors, in_hw, variance=self.cfg.variance,
                                  threshold=self.threshold, nms_threshold=self.nms_threshold)
        # network-input pixels → photo pixels per axis (each side was scaled by its own truncated factor)
        scale = np.array([width / in_hw[1], height / in_hw[0]])
        return [Detection(box * np.tile(scale, 2), points * scale, float(score))
                for box, points, score in zip(found.boxes, found.landmarks, found.scores, strict=True)]
