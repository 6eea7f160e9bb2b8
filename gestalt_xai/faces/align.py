"""Similarity alignment onto the ArcFace 112×112 template, and mapping points and maps both ways.

The transform ``M`` (2×3, float64) maps photo pixels to crop pixels: ``[x', y'] = M @ [x, y, 1]``. It is estimated by
least squares (Umeyama) from the 5 landmarks onto :data:`ARCFACE_TEMPLATE` with scikit-image, and the crop is cut
with ``cv2.warpAffine`` and a black border, as insightface and GestaltMatcher-Arc do. Keeping ``M`` lets later stages
draw template-space maps back onto the original photo (:func:`warp_crop_to_photo`) and bring photo-space masks or
gaze points into the crop (:func:`warp_photo_to_crop`, :func:`transform_points`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

from gestalt_xai.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from gestalt_xai.runs import Run

__all__ = [
    "ARCFACE_TEMPLATE",
    "CROP_SIZE",
    "LANDMARK_NAMES",
    "Alignment",
    "estimate_transform",
    "invert_transform",
    "transform_points",
    "warp_to_crop",
    "warp_crop_to_photo",
    "warp_photo_to_crop",
    "align_face",
    "eye_level_rotation",
    "yaw_proxy",
    "mouth_drop",
    "turn_photo",
    "turn_points",
    "load_alignments",
    "row_matrix",
    "row_landmarks",
]

CROP_SIZE = 112
#: ArcFace 112×112 template (insightface ``arcface_dst``): image-left eye, image-right eye, nose tip,
#: image-left mouth corner, image-right mouth corner
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
LANDMARK_NAMES = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")


def _check_points(points: np.ndarray, n: int | None = None) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or (n is not None and pts.shape[0] != n):
        want = f"({n}, 2)" if n else "(N, 2)"
        raise InputError(f"expected landmarks of shape {want}, got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise InputError("landmarks contain NaN or infinite values")
    return pts


def estimate_transform(landmarks5: np.ndarray, template: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) from photo landmarks to template.

    >>> M = estimate_transform(ARCFACE_TEMPLATE * 2 + 10)
    >>> np.allclose(transform_points(ARCFACE_TEMPLATE * 2 + 10, M), ARCFACE_TEMPLATE)
    True
    """
    src = _check_points(landmarks5, len(template))
    tform = SimilarityTransform.from_estimate(src, np.asarray(template, np.float64))
    if not tform:
        raise InputError("landmarks are degenerate (e.g. all in one point); cannot estimate the alignment")
    M = np.asarray(tform.params[:2], dtype=np.float64)
    if not np.all(np.isfinite(M)) or abs(np.linalg.det(M[:, :2])) < 1e-12:
        raise InputError("landmarks are degenerate; cannot estimate the alignment")
    return M


def invert_transform(M: np.ndarray) -> np.ndarray:
    """Inverse of a 2×3 affine transform (crop → photo for an alignment matrix)."""
    return cv2.invertAffineTransform(np.asarray(M, dtype=np.float64))


def transform_points(points: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Apply a 2×3 affine transform to ``(N, 2)`` points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    M = np.asarray(M, dtype=np.float64)
    return pts @ M[:, :2].T + M[:, 2]


def warp_to_crop(photo: np.ndarray, M: np.ndarray, size: int = CROP_SIZE,
                 interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Cut the aligned ``size×size`` crop out of a photo (black border outside the photo)."""
    return cv2.warpAffine(np.ascontiguousarray(photo), np.asarray(M, np.float64), (size, size), flags=interpolation,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def warp_photo_to_crop(array: np.ndarray, M: np.ndarray, size: int = CROP_SIZE,
                       interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Bring a photo-space map or mask into template space. Boolean masks come back boolean (bilinear, ≥ 0.5)."""
    arr = np.asarray(array)
    if arr.dtype == bool:
        warped = warp_to_crop(arr.astype(np.float32), M, size, interpolation)
        return warped >= 0.5
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return warp_to_crop(arr, M, size, interpolation)


def warp_crop_to_photo(array: np.ndarray, M: np.ndarray, photo_hw: tuple[int, int],
                       interpolation: int = cv2.INTER_LINEAR, fill: float = 0.0) -> np.ndarray:
    """Draw a template-space map (or crop) back onto the original photo's pixel grid.

    Pixels of the photo that fall outside the crop get ``fill`` (use NaN to tell them apart for float maps).
    """
    arr = np.asarray(array)
    was_bool = arr.dtype == bool
    if was_bool or arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    h, w = photo_hw
    # M maps photo → crop, i.e. destination → source: exactly what WARP_INVERSE_MAP expects
    out = cv2.warpAffine(np.ascontiguousarray(arr), np.asarray(M, np.float64), (int(w), int(h)),
                         flags=interpolation | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=fill)
    return out >= 0.5 if was_bool else out


def align_face(photo: np.ndarray, landmarks5: np.ndarray, size: int = CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Align a face: return the ``size×size`` crop and the photo→crop matrix."""
    template = ARCFACE_TEMPLATE * (size / CROP_SIZE)
    M = estimate_transform(landmarks5, template)
    return warp_to_crop(photo, M, size), M


def yaw_proxy(landmarks5: np.ndarray) -> float:
    """Signed head-turn estimate from 5 landmarks: horizontal offset of the nose from the eye and mouth midpoints.

    Measured after alignment, in inter-ocular distances: ≈ 0 for a frontal face, ≈ ±0.25 for a clearly turned head,
    ±0.45 for a near profile (values measured on the example photos shipped inside insightface). Sign: positive when
    the nose points to the image right.
    """
    pts = transform_points(_check_points(landmarks5, 5), estimate_transform(landmarks5))
    eye_mid, mouth_mid = (pts[0] + pts[1]) / 2, (pts[3] + pts[4]) / 2
    inter_ocular = float(np.linalg.norm(pts[1] - pts[0]))
    return float(((pts[2, 0] - eye_mid[0]) + (pts[2, 0] - mouth_mid[0])) / 2 / inter_ocular)


def eye_level_rotation(landmarks5: np.ndarray) -> tuple[np.ndarray, float]:
    """Rotation about the nose that makes the eyes level (GM-Arc's optional first pass).

    Returns the 2×3 matrix (photo → rotated photo, same canvas size) and the angle in degrees.
    """
    pts = _check_points(landmarks5, 5)
    dx, dy = pts[1] - pts[0]
    angle = math.degrees(math.atan2(dy, dx))
    R = cv2.getRotationMatrix2D((float(pts[2, 0]), float(pts[2, 1])), angle, 1.0)
    return R, angle


def mouth_drop(landmarks5: np.ndarray) -> float:
    """How far the mouth lies below the eyes once the eyes are level, in inter-ocular distances.

    The mouth midpoint's distance from the eye line, signed positive on the side a face's mouth is on when the
    points are in template order (image-left eye first): ≈ 1 for a frontal face at any tilt, since levelling the
    eyes (:func:`eye_level_rotation`, GM-Arc's ``--two-pass``) does not change it. Zero or below means the mouth
    is above the eyes of a levelled face — no face looks like that; it is an upside-down face whose points were
    listed by image side (or points in the wrong order).

    >>> round(mouth_drop(ARCFACE_TEMPLATE), 2)
    1.15
    >>> round(mouth_drop(turn_points(ARCFACE_TEMPLATE, 180, (112, 112))), 2)  # the same face turned: still a face
    1.15
    >>> flipped = ARCFACE_TEMPLATE * [1, -1]  # eyes below the mouth, image-left eye first
    >>> round(mouth_drop(flipped), 2)
    -1.15
    """
    pts = _check_points(landmarks5, 5)
    eyes = pts[1] - pts[0]
    inter_ocular = float(np.linalg.norm(eyes))
    if inter_ocular == 0.0:
        raise InputError("landmarks put both eyes in one point; cannot tell the face's orientation")
    down = (pts[3] + pts[4]) / 2 - (pts[0] + pts[1]) / 2
    # the component of `down` along the eye line's normal: its y once the eye line is rotated onto the x axis
    return float((eyes[0] * down[1] - eyes[1] * down[0]) / inter_ocular**2)


def turn_photo(rgb: np.ndarray, angle: int) -> np.ndarray:
    """The photo turned by ``angle`` degrees, 0 or 180 (upside down); see :func:`turn_points` for the points."""
    if angle == 0:
        return rgb
    if angle == 180:
        return np.ascontiguousarray(rgb[::-1, ::-1])
    raise ValueError(f"angle must be 0 or 180, got {angle}")


def turn_points(points: np.ndarray, angle: int, photo_hw: tuple[int, int]) -> np.ndarray:
    """Map ``(N, 2)`` points between a ``photo_hw`` photo and the same photo turned by ``angle`` (0 or 180).

    Turning by 180° moves pixel ``(x, y)`` to ``(W-1-x, H-1-y)`` (:func:`turn_photo`); the map is its own inverse.

    >>> turn_points(np.array([[0.0, 0.0], [3.0, 1.0]]), 180, (2, 4)).tolist()
    [[3.0, 1.0], [0.0, 0.0]]
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if angle == 0:
        return pts.copy()
    if angle == 180:
        h, w = photo_hw
        return np.array([w - 1.0, h - 1.0]) - pts
    raise ValueError(f"angle must be 0 or 180, got {angle}")


@dataclass(frozen=True)
class Alignment:
    """The alignment of one photo: photo→crop matrix, landmarks used, and the detector's report."""

    matrix: np.ndarray
    landmarks: np.ndarray
    score: float
    n_faces: int
    detector: str

    @property
    def inverse(self) -> np.ndarray:
        """Crop → photo matrix."""
        return invert_transform(self.matrix)

    @property
    def scale(self) -> float:
        """Crop pixels per photo pixel."""
        return float(math.sqrt(abs(np.linalg.det(self.matrix[:, :2]))))

    @property
    def rotation_deg(self) -> float:
        """Rotation applied to the photo (degrees, counter-clockwise in image coordinates)."""
        return float(math.degrees(math.atan2(self.matrix[1, 0], self.matrix[0, 0])))


def row_matrix(row: pd.Series | dict) -> np.ndarray:
    """The 2×3 photo→crop matrix stored in an ``alignment.parquet`` row."""
    return np.asarray(row["matrix"], dtype=np.float64).reshape(2, 3)


def row_landmarks(row: pd.Series | dict) -> np.ndarray:
    """The ``(5, 2)`` photo landmarks stored in an ``alignment.parquet`` row."""
    return np.asarray(row["landmarks"], dtype=np.float64).reshape(5, 2)


def load_alignments(run: Run, ok_only: bool = True) -> pd.DataFrame:
    """Read ``aligned/alignment.parquet`` of a run (only successfully aligned images by default)."""
    import pandas as pd

    path = run.path / "aligned" / "alignment.parquet"
    if not path.exists():
        raise InputError(f"{path} not found: run the align stage first (gestalt-xai align --run {run.path})")
    df = pd.read_parquet(path)
    return df[df["ok"]].reset_index(drop=True) if ok_only else df
