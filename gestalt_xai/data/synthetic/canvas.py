"""The renderer's drawing surface: a float RGB canvas painted with feathered, anti-aliased shapes (region of interest
only), as used by :mod:`~gestalt_xai.data.synthetic.renderer`."""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["Canvas", "cov_in"]


class Canvas:
    """A float RGB canvas with region-of-interest painting of feathered, anti-aliased shapes."""

    def __init__(self, h: int, w: int, img: np.ndarray | None = None) -> None:
        self.h, self.w = h, w
        self.img = np.zeros((h, w, 3), np.float32) if img is None else img

    def alpha(self, polys: list[np.ndarray], feather: float = 0.0, pad: float = 0.0,
              lines: float = 0.0) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Coverage of filled polygons (or polylines of width ``lines``) in their bounding box."""
        allp = np.vstack(polys)
        m = int(math.ceil(3 * feather + lines + pad)) + 2
        x0 = max(int(math.floor(allp[:, 0].min())) - m, 0)
        y0 = max(int(math.floor(allp[:, 1].min())) - m, 0)
        x1 = min(int(math.ceil(allp[:, 0].max())) + m, self.w)
        y1 = min(int(math.ceil(allp[:, 1].max())) + m, self.h)
        if x1 <= x0 or y1 <= y0:
            return None
        a = np.zeros((y1 - y0, x1 - x0), np.uint8)
        pts = [np.round((p - [x0, y0]) * 16).astype(np.int32) for p in polys]
        if lines > 0:
            cv2.polylines(a, pts, False, 255, thickness=max(1, int(round(lines))), lineType=cv2.LINE_AA, shift=4)
        else:
            cv2.fillPoly(a, pts, 255, lineType=cv2.LINE_AA, shift=4)
        af = a.astype(np.float32) * (1.0 / 255.0)
        if feather > 0.3:
            af = cv2.GaussianBlur(af, (0, 0), feather)
        return (slice(y0, y1), slice(x0, x1)), af

    def paint(self, cov: tuple[tuple[slice, slice], np.ndarray] | None, colour: np.ndarray | tuple[float, ...],
              opacity: float = 1.0) -> None:
        if cov is None or opacity <= 0:
            return
        roi, a = cov
        a = a * opacity
        region = self.img[roi]
        if callable(colour):
            col = colour(roi)  # a field evaluated in the covered region only
        elif isinstance(colour, np.ndarray) and colour.ndim == 3:
            col = colour if colour.shape[:2] == a.shape else colour[roi]  # region-local or canvas-sized field
        else:
            col = np.asarray(colour, np.float32)
        region += (col - region) * a[..., None]

    def multiply(self, cov: tuple[tuple[slice, slice], np.ndarray] | None, factor: np.ndarray | tuple[float, ...],
                 opacity: float = 1.0) -> None:
        """Darken/tint by ``factor`` where covered (shadows keep the texture underneath)."""
        if cov is None or opacity <= 0:
            return
        roi, a = cov
        f = np.asarray(factor, np.float32)
        self.img[roi] *= 1.0 + (f - 1.0) * (a * opacity)[..., None]


def cov_in(cov: tuple[tuple[slice, slice], np.ndarray] | None, roi: tuple[slice, slice]) -> np.ndarray:
    """Coverage ``cov`` re-cut to the region ``roi`` (zero where ``cov`` does not reach)."""
    out = np.zeros((roi[0].stop - roi[0].start, roi[1].stop - roi[1].start), np.float32)
    if cov is None:
        return out
    (cy, cx), a = cov
    y0, y1 = max(cy.start, roi[0].start), min(cy.stop, roi[0].stop)
    x0, x1 = max(cx.start, roi[1].start), min(cx.stop, roi[1].stop)
    if y1 > y0 and x1 > x0:
        out[y0 - roi[0].start:y1 - roi[0].start, x0 - roi[1].start:x1 - roi[1].start] = \
            a[y0 - cy.start:y1 - cy.start, x0 - cx.start:x1 - cx.start]
    return out
