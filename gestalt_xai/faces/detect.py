"""Face detectors: MTCNN (default, weights ship inside facenet-pytorch) and RetinaFace (user-supplied weights).

A detector is any object with a ``name`` and ``detect(rgb) -> list[Detection]`` (most confident first). Landmarks are
in photo pixels, origin top-left, in the order image-left eye, image-right eye, nose, image-left mouth corner,
image-right mouth corner — the order of the ArcFace template.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from gestalt_xai.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Detection", "FaceDetector", "MTCNNDetector", "make_detector", "DETECTORS"]


@dataclass(frozen=True)
class Detection:
    """One detected face.

    Attributes
    ----------
    box: ``(4,)`` float array ``x1, y1, x2, y2`` in photo pixels.
    landmarks: ``(5, 2)`` float array of (x, y) in template order.
    score: detector confidence in [0, 1].
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float


@runtime_checkable
class FaceDetector(Protocol):
    """What the align stage needs from a detector."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an ``H×W×3`` uint8 RGB photo with confidence ≥ the detector's threshold, most confident first."""
        ...


class MTCNNDetector:
    """MTCNN from facenet-pytorch with the P/R/O-Net weights shipped inside that package (no download).

    Parameters
    ----------
    threshold:
        Minimum face probability of the final stage (O-Net). False positives at p 0.82–0.87 vanish with ≥ 0.95.
    min_face_size:
        Smallest face (pixels) searched by the image pyramid.

    Notes
    -----
    MTCNN's landmark convention differs slightly from the ArcFace template's (its nose point lies lower); the README
    reports the offsets measured on real photos shipped inside installed packages.
    """

    name = "mtcnn"

    def __init__(self, threshold: float = 0.95, min_face_size: int = 20, device: str = "cpu") -> None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"detector threshold must be in (0, 1], got {threshold}")
        from facenet_pytorch import MTCNN

        self.threshold = float(threshold)
        self._mtcnn = MTCNN(keep_all=True, min_face_size=min_face_size, device=device, post_process=False)
        self._mtcnn.eval()

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import torch

        with torch.inference_mode():
            boxes, probs, points = self._mtcnn.detect(np.ascontiguousarray(rgb), landmarks=True)
        if boxes is None:
            return []
        found = [Detection(np.asarray(b, np.float64), np.asarray(p, np.float64).reshape(5, 2), float(s))
                 for b, s, p in zip(boxes, probs, points, strict=True) if s is not None and s >= self.threshold]
        return sorted(found, key=lambda d: -d.score)


#: detector names accepted by ``--detector``
DETECTORS = ("mtcnn", "retinaface")


def make_detector(name: str = "mtcnn", weights: str | Path | None = None, threshold: float = 0.95) -> FaceDetector:
    """Build a detector by name.

    ``retinaface`` needs ``weights``: the biubug6 ``Resnet50_Final.pth`` state dict GestaltMatcher-Arc uses
    (it ships with no package, so the user supplies it).
    """
    if name == "mtcnn":
        if weights is not None:
            raise ConfigError("MTCNN uses the weights shipped inside facenet-pytorch; do not pass --detector-weights")
        return MTCNNDetector(threshold=threshold)
    if name == "retinaface":
        from gestalt_xai.faces.retinaface import RetinaFaceDetector

        if weights is None:
            raise ConfigError("the retinaface detector needs --detector-weights PATH to the RetinaFace-ResNet50 state "
                              "dict GestaltMatcher-Arc uses (biubug6's Resnet50_Final.pth); no weights ship with "
                              "any package, and nothing is downloaded")
        return RetinaFaceDetector(weights, threshold=threshold)
    raise ConfigError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
