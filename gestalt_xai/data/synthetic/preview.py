"""Preview montage of a synthetic cohort: one face per syndrome with its planted features outlined."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from gestalt_xai.data.synthetic.cohort import CONTROL_ID, SynthConfig, mark_mask, plan_cohort
from gestalt_xai.data.synthetic.face_model import Pose
from gestalt_xai.data.synthetic.identity import PhotoConditions, sample_identity
from gestalt_xai.data.synthetic.phenotypes import PHENOTYPES, apply_features, feature_regions, rasterise_regions
from gestalt_xai.data.synthetic.renderer import render_photo

__all__ = ["render_preview", "PALETTE"]

#: outline colours (RGB), one per feature of a syndrome
PALETTE = [(255, 215, 0), (0, 220, 255), (255, 80, 200), (120, 255, 80), (255, 140, 40), (170, 120, 255)]
_TILE_W, _TILE_H, _TEXT_H = 300, 350, 92


def _canonical_photo(rng: np.random.Generator) -> PhotoConditions:
    w, h = 360, 420
    pose = Pose(cx=w / 2, cy=h * 0.47, scale=w * 0.15, roll=0.0, yaw=0.0)
    bg = tuple(float(v) for v in 0.5 * rng.uniform(0.35, 0.8, 3) + 0.25)
    return PhotoConditions(width=w, height=h, pose=pose, light_azimuth=-25.0, light_elevation=35.0, ambient=0.5,
                           exposure=1.0, white_balance=(1.0, 1.0, 1.0), background=(bg, tuple(0.8 * v for v in bg)),
                           shirt=tuple(float(v) for v in rng.uniform(0.1, 0.8, 3)), blur_sigma=0.0,
                           noise_sigma=1.0, jpeg_quality=95, noise_seed=int(rng.integers(0, 2**31 - 1)))


def _put(img: np.ndarray, text: str, org: tuple[int, int], colour: tuple[int, int, int], scale: float = 0.42) -> None:
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def render_preview(cfg: SynthConfig, path: str | Path, columns: int = 5) -> Path:
    """Write a PNG montage: one face per syndrome (plus a control and, if configured, the confounder mark),
    each feature at the syndrome's mean effect and outlined by its truth mask.

    Parameters
    ----------
    cfg:
        The cohort configuration (syndromes are designed exactly as :func:`synth_stage` designs them).
    path:
        Output PNG.
    columns:
        Faces per row.
    """
    plan = plan_cohort(cfg)
    entries: list[tuple[str, dict[str, float]]] = []
    if cfg.n_controls:
        entries.append((CONTROL_ID, {}))
    for s in plan.syndromes:
        entries.append((s.syndrome_id, {f.feature: f.effect for f in s.features}))
    tiles = []
    for k, (sid, effects) in enumerate(entries):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7, k]))
        base, look = sample_identity(rng, age=float(rng.uniform(0.3, 1.0)))
        photo = _canonical_photo(rng)
        shape = apply_features(base, effects)
        mark = cfg.confounder is not None and cfg.confounder.syndrome == sid
        out = render_photo(shape, look, photo, mark=mark)
        img = cv2.resize(out.rgb, (_TILE_W, _TILE_H), interpolation=cv2.INTER_AREA)
        sx, sy = _TILE_W / photo.width, _TILE_H / photo.height
        regions = feature_regions(base, effects)
        keys = [key for key in PHENOTYPES if key in regions]
        size = (photo.height, photo.width)
        outlined = [(key, rasterise_regions(*regions[key], shape, photo.pose, size)) for key in keys]
        if mark:
            outlined.append(("confounder mark", mark_mask(shape, photo.pose, size)))
        for i, (_, m) in enumerate(outlined):
            small = cv2.resize(m.astype(np.uint8), (_TILE_W, _TILE_H), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(img, contours, -1, PALETTE[i % len(PALETTE)], 1, cv2.LINE_AA)
        for x, y in out.landmarks5:
            cv2.circle(img, (int(round(x * sx)), int(round(y * sy))), 2, (0, 255, 0), -1, cv2.LINE_AA)
        panel = np.full((_TEXT_H, _TILE_W, 3), 24, np.uint8)
        title = "controls (no feature)" if sid == CONTROL_ID else sid
        _put(panel, title, (6, 16), (255, 255, 255), 0.5)
        for i, (key, _) in enumerate(outlined):
            feat = PHENOTYPES.get(key)
            label = key.replace("_", " ")
            if feat is not None:
                label = f"{label} {feat.hpo_id}" + ("" if feat.visible_in_crop else " (out of crop)")
            _put(panel, label, (6, 34 + 14 * i), PALETTE[i % len(PALETTE)], 0.36)
        tiles.append(np.vstack([img, panel]))
    rows = []
    blank = np.full_like(tiles[0], 255)
    for r in range(0, len(tiles), columns):
        row = tiles[r:r + columns]
        row += [blank] * (columns - len(row))
        rows.append(np.hstack(row))
    montage = np.vstack(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", montage[..., ::-1])
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    from gestalt_xai.runs import atomic_write_bytes

    atomic_write_bytes(path, buf.tobytes())
    return path
