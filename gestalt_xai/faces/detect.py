"""Face detectors: MTCNN (default, weights ship inside facenet-pytorch) and RetinaFace (user-supplied weights).

A detector is any object with a ``name`` and ``detect(rgb) -> list[Detection]`` (most confident first). Landmarks are
in photo pixels, origin top-left, in the order image-left eye, image-right eye, nose, image-left mouth corner,
image-right mouth corner — the order of the ArcFace template.

Bad photos fail with a :class:`~gestalt_xai.errors.DetectionError` that says why: a photo with a side shorter than
:data:`MIN_FACE_PIXELS` cannot hold a detectable face (:func:`check_face_size`). :func:`faces_by_orientation` looks
for faces in the photo as stored and turned upside down, for the align stage to keep the upright orientation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from gestalt_xai.errors import ConfigError, DetectionError
from gestalt_xai.faces.align import turn_photo

log = logging.getLogger(__name__)

__all__ = ["Detection", "FaceDetector", "MTCNNDetector", "make_detector", "DETECTORS", "MIN_FACE_PIXELS",
           "ORIENTATIONS", "PROBE_SIDE", "check_face_size", "faces_by_orientation"]

#: The shortest photo side (pixels) that can hold a face a detector finds. MTCNN searches faces of at least
#: ``min_face_size`` = 20 pixels: its image pyramid starts at 12/20 of the photo and P-Net reads 12×12 windows, so a
#: photo with a side below 20 pixels is never scanned (facenet-pytorch then fails inside ``torch.cat`` on an empty
#: pyramid). RetinaFace's smallest anchor is 16 pixels of its 640-pixel input, but a photo enlarged from fewer than
#: 20 pixels holds no facial detail for it to find either.
MIN_FACE_PIXELS = 20
#: the turns (degrees) under which :func:`faces_by_orientation` looks for faces, as-stored first
ORIENTATIONS = (0, 180)
#: longest side (pixels) of the copies :func:`faces_by_orientation` counts faces on (GM-Arc's RetinaFace input)
PROBE_SIDE = 640


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


def check_face_size(rgb: np.ndarray, where: str = "photo", min_side: int = MIN_FACE_PIXELS) -> None:
    """Raise :class:`DetectionError` when a side of ``rgb`` is shorter than ``min_side`` pixels.

    >>> check_face_size(np.zeros((1, 50, 3), np.uint8), "thin.png")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gestalt_xai.errors.DetectionError: thin.png: the photo is 50×1 pixels, too small to hold a face (...)
    """
    h, w = np.shape(rgb)[:2]
    if min(h, w) < min_side:
        raise DetectionError(f"{where}: the photo is {w}×{h} pixels, too small to hold a face (a face needs a photo "
                             f"of at least {min_side} pixels on each side)")


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
        self.min_face_size = int(min_face_size)
        self._mtcnn = MTCNN(keep_all=True, min_face_size=min_face_size, device=device, post_process=False)
        self._mtcnn.eval()

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an ``H×W×3`` uint8 RGB photo, most confident first.

        Raises :class:`DetectionError` for a photo with a side shorter than ``min_face_size``, which MTCNN's
        image pyramid cannot scan.
        """
        import torch

        check_face_size(rgb, min_side=max(self.min_face_size, MIN_FACE_PIXELS))
        with torch.inference_mode():
            boxes, probs, points = self._mtcnn.detect(np.ascontiguousarray(rgb), landmarks=True)
        if boxes is None:
            return []
        found = [Detection(np.asarray(b, np.float64), np.asarray(p, np.float64).reshape(5, 2), float(s))
                 for b, s, p in zip(boxes, probs, points, strict=True) if s is not None and s >= self.threshold]
        return sorted(found, key=lambda d: -d.score)


def faces_by_orientation(detector: FaceDetector, rgb: np.ndarray,
                         probe_side: int = PROBE_SIDE) -> tuple[list[int], dict[int, list[Detection]]]:
    """Which way up a photo is: the turns of :data:`ORIENTATIONS` ranked by how many faces ``detector`` finds.

    A photo stored upside down (without an EXIF orientation) shows upside-down faces. MTCNN finds none in most
    such photos — and where it does find some, their landmarks still look upright (eyes above the mouth: it puts the
    "mouth" on the forehead), so the landmarks alone cannot tell. The detector is therefore run on copies of the
    photo (longest side at most ``probe_side`` pixels, so big photos cost little) as stored and turned by 180°;
    the turn with more faces ranks first, and as stored wins a tie. Measured with MTCNN on 46 rendered synthetic
    faces (:mod:`gestalt_xai.data.synthetic`), the astronaut, Tom Hanks and insightface's ``t1`` group photo: the
    upright photo always had more faces (``t1``: 6 upright, 1 upside down). Photos turned by a quarter (stored
    sideways) are not searched: MTCNN finds as many (false) faces in some of them as in the upright photo.

    Returns
    -------
    ranked : the angles, most faces first.
    found : ``angle → detections`` on the turned photo at full size, for the angles whose probe *was* the full-size
        photo (photos no longer than ``probe_side``); the caller detects again for the others.
    """
    h, w = rgb.shape[:2]
    scale = min(1.0, probe_side / max(h, w))
    probe = rgb
    if scale < 1.0:
        import cv2

        probe = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    counts, found = {}, {}
    for angle in ORIENTATIONS:
        try:
            faces = detector.detect(turn_photo(probe, angle))
        except DetectionError:  # the shrunken copy is too small: count nothing, the full-size photo decides
            faces = []
        counts[angle] = len(faces)
        if scale == 1.0:
            found[angle] = faces
    ranked = sorted(ORIENTATIONS, key=lambda a: -counts[a])  # stable: as stored first on a tie
    return ranked, found


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
