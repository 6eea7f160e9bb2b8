"""Measure MTCNN's landmark convention against the ArcFace template on real photos shipped inside packages.

For every face MTCNN finds in insightface's t1.jpg, scikit-image's astronaut and insightface's already aligned
Tom_Hanks_54745.png, align it (least-squares similarity onto the template) and report the per-landmark offset
(detected landmark mapped into the crop − template point), in crop pixels, as a Markdown table. The Tom Hanks crop
was aligned by insightface's own pipeline, so its raw MTCNN landmarks show the convention difference directly.

Usage: python scripts/measure_mtcnn_offsets.py
"""

from __future__ import annotations

import numpy as np

from gestalt_xai.data.examples import example_photo_paths
from gestalt_xai.data.images import load_image
from gestalt_xai.faces.align import ARCFACE_TEMPLATE, LANDMARK_NAMES, estimate_transform, transform_points, yaw_proxy
from gestalt_xai.faces.detect import MTCNNDetector


def main() -> None:
    detector = MTCNNDetector(threshold=0.95)
    rows, raw_aligned = [], None
    for name, path in example_photo_paths().items():
        photo = load_image(path)
        for det in detector.detect(photo):
            yaw = yaw_proxy(det.landmarks)
            offset = transform_points(det.landmarks, estimate_transform(det.landmarks)) - ARCFACE_TEMPLATE
            rows.append((name, yaw, offset))
            if name == "insightface_tom_hanks_aligned":
                raw_aligned = det.landmarks - ARCFACE_TEMPLATE
    frontal = [r for r in rows if abs(r[1]) <= 0.2]
    print(f"MTCNN (facenet-pytorch 2.5.3, threshold 0.95): {len(rows)} faces, {len(frontal)} frontal (|yaw| ≤ 0.2)\n")
    print("| landmark | mean dx (frontal) | mean dy (frontal) | mean ‖offset‖ (frontal) "
          "| raw dx, dy on the aligned Tom Hanks crop |")
    print("|---|---|---|---|---|")
    off = np.stack([r[2] for r in frontal])
    for i, lm in enumerate(LANDMARK_NAMES):
        raw = f"{raw_aligned[i, 0]:+.1f}, {raw_aligned[i, 1]:+.1f}" if raw_aligned is not None else "—"
        print(f"| {lm} | {off[:, i, 0].mean():+.2f} | {off[:, i, 1].mean():+.2f} | "
              f"{np.linalg.norm(off[:, i], axis=1).mean():.2f} | {raw} |")
    print("\nOffsets in crop pixels (112² template); +dy = lower in the image.")


if __name__ == "__main__":
    main()
