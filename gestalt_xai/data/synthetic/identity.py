"""Random identities (face shape + appearance) and photo conditions (pose, light, camera nuisance).

Everything is drawn from an explicit :class:`numpy.random.Generator`, so a cohort is a pure function of its seed.
Identity and photo conditions are drawn independently of the syndrome: planted phenotypes are the only difference
between groups (unless the confounder option is on).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gestalt_xai.data.synthetic.face_model import FaceShape, Pose

__all__ = ["Appearance", "PhotoConditions", "sample_identity", "sample_photo", "SKIN_TONES", "HAIR_STYLES"]

#: skin tones from very light to very dark (sRGB 0..1), interpolated along this path; anchors are rough
#: averages of reflectance-based tone scales (light Fitzpatrick I → dark VI), not measurements of any person
SKIN_TONES = np.array([
    [0.96, 0.85, 0.78], [0.91, 0.75, 0.64], [0.83, 0.64, 0.50], [0.70, 0.50, 0.36],
    [0.53, 0.35, 0.24], [0.36, 0.23, 0.16], [0.27, 0.18, 0.13],
])
_HAIR = np.array([
    [0.06, 0.05, 0.05], [0.16, 0.11, 0.08], [0.30, 0.20, 0.12], [0.45, 0.31, 0.18],
    [0.70, 0.56, 0.36], [0.55, 0.25, 0.12], [0.60, 0.58, 0.56],
])
_HAIR_P = np.array([0.30, 0.25, 0.18, 0.11, 0.07, 0.05, 0.04])
_IRIS = np.array([[0.25, 0.15, 0.08], [0.38, 0.24, 0.12], [0.30, 0.35, 0.20], [0.28, 0.42, 0.58], [0.42, 0.52, 0.60]])
_IRIS_P = np.array([0.45, 0.22, 0.10, 0.15, 0.08])
HAIR_STYLES = ("short", "medium", "long")


@dataclass(frozen=True)
class Appearance:
    """Colours (sRGB 0..1) and styles of one identity."""

    skin: tuple[float, float, float]
    skin_tone: float  # position along :data:`SKIN_TONES`, 0 light … 1 dark
    lip: tuple[float, float, float]
    iris: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: str
    hair_volume: float
    blush: float
    texture_seed: int


@dataclass(frozen=True)
class PhotoConditions:
    """Everything about one photo that is not the person: canvas, pose, light, background and camera nuisance."""

    width: int
    height: int
    pose: Pose
    light_azimuth: float  # degrees, 0 = frontal, + = from the image right
    light_elevation: float  # degrees above the horizon
    ambient: float
    exposure: float
    white_balance: tuple[float, float, float]
    background: tuple[tuple[float, float, float], tuple[float, float, float]]
    shirt: tuple[float, float, float]
    blur_sigma: float  # pixels (after down-sampling)
    noise_sigma: float  # 0..255 scale
    jpeg_quality: int
    noise_seed: int


def _tone(t: float) -> np.ndarray:
    x = t * (len(SKIN_TONES) - 1)
    i = min(int(x), len(SKIN_TONES) - 2)
    f = x - i
    return SKIN_TONES[i] * (1 - f) + SKIN_TONES[i + 1] * f


def sample_identity(rng: np.random.Generator, age: float | None = None) -> tuple[FaceShape, Appearance]:
    """Draw one identity: a :class:`FaceShape` (no phenotype) and an :class:`Appearance`."""
    a = float(rng.uniform(0.0, 1.0)) if age is None else float(age)
    child = 1.0 - a

    def n(mu: float, sd: float, lo: float, hi: float) -> float:
        return float(np.clip(rng.normal(mu, sd), lo, hi))

    spacing = n(1.0, 0.035, 0.92, 1.08)
    shape = FaceShape(
        age=a,
        eye_spacing=spacing,
        brow_span=spacing,
        eye_width=n(0.50 + 0.04 * child, 0.02, 0.44, 0.58),
        eye_open=n(0.165 + 0.02 * child, 0.012, 0.13, 0.20),
        eye_slant=n(3.0, 2.0, -1.5, 7.0),
        iris_r=n(0.102 + 0.008 * child, 0.004, 0.092, 0.118),
        brow_y=n(-0.36, 0.02, -0.42, -0.31),
        brow_thick=n(0.085 - 0.012 * child, 0.01, 0.06, 0.11),
        brow_arch=n(0.05, 0.015, 0.02, 0.09),
        nasion_y=n(-0.10, 0.02, -0.15, -0.05),
        nose_tip_y=n(0.64 - 0.06 * child, 0.03, 0.54, 0.72),
        nose_width=n(0.28 - 0.03 * child, 0.02, 0.22, 0.34),
        bridge_width=n(0.085, 0.008, 0.07, 0.10),
        nostril_show=n(0.2 + 0.1 * child, 0.05, 0.1, 0.4),
        philtrum_len=n(0.20 - 0.03 * child, 0.015, 0.15, 0.24),
        upper_lip=(ul := n(0.105, 0.012, 0.08, 0.13)),
        upper_lip_base=ul,
        lower_lip=n(0.145, 0.015, 0.11, 0.18),
        mouth_half_w=n(0.41 - 0.03 * child, 0.02, 0.34, 0.47),
        mouth_curve=n(0.0, 0.01, -0.02, 0.025),
        chin_y=n(1.80 - 0.12 * child, 0.04, 1.60, 1.90),
        chin_half_w=n(0.30, 0.03, 0.24, 0.36),
        gonion_y=n(1.20 - 0.08 * child, 0.04, 1.05, 1.30),
        jaw_half_w=n(1.12 + 0.04 * child, 0.04, 1.02, 1.22),
        face_half_w=n(1.56 + 0.04 * child, 0.03, 1.50, 1.66),
        ear_y=n(0.18, 0.03, 0.12, 0.24),
        ear_h=n(0.80 - 0.05 * child, 0.04, 0.70, 0.88),
        ear_w=n(0.30, 0.02, 0.26, 0.34),
        hairline_y=n(-1.80 - 0.05 * child, 0.04, -1.92, -1.72),
        crown_y=n(-2.45 - 0.10 * child, 0.05, -2.60, -2.35),
    )
    t = float(rng.beta(1.1, 1.1))
    skin = np.clip(_tone(t) * rng.normal(1.0, 0.03, 3), 0, 1)
    lip_base = np.array([0.76, 0.28, 0.30]) * (1.0 - 0.55 * t)
    lip = 0.42 * skin + 0.58 * lip_base
    if t > 0.5:  # darker skin: lips darker and cooler than the skin around them
        lip = lip * (1.0 - 0.35 * (t - 0.5)) * np.array([0.95, 0.88, 0.98])
    lip = np.clip(lip + rng.normal(0, 0.015, 3), 0, 1)
    dark = t > 0.45
    hp = _HAIR_P.copy()
    if dark:  # darker skin tones mostly with dark hair
        hp = hp * np.array([3.0, 1.5, 0.6, 0.3, 0.05, 0.1, 0.5])
    if a < 0.8:
        hp[-1] = 0.0  # no grey hair for the young
    hair = _HAIR[rng.choice(len(_HAIR), p=hp / hp.sum())] * rng.normal(1.0, 0.06, 3)
    ip = _IRIS_P.copy()
    if t > 0.4:
        ip = ip * np.array([3.0, 1.5, 0.3, 0.05, 0.05])
    iris = _IRIS[rng.choice(len(_IRIS), p=ip / ip.sum())] * rng.normal(1.0, 0.08, 3)
    look = Appearance(
        skin=tuple(float(v) for v in skin),
        skin_tone=t,
        lip=tuple(float(v) for v in lip),
        iris=tuple(float(v) for v in np.clip(iris, 0, 1)),
        hair=tuple(float(v) for v in np.clip(hair, 0, 1)),
        hair_style=str(rng.choice(HAIR_STYLES, p=[0.45, 0.30, 0.25])),
        hair_volume=float(rng.uniform(0.10, 0.30)),
        blush=float(rng.uniform(0.0, 1.0)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )
    return shape, look


def sample_photo(rng: np.random.Generator, canvas: tuple[int, int] = (360, 440),
                 jpeg_quality: tuple[int, int] = (72, 95)) -> PhotoConditions:
    """Draw one photo's conditions: canvas size, face placement/pose, lighting, background and camera nuisance."""
    w = int(rng.integers(canvas[0], canvas[1] + 1))
    h = int(round(w * rng.uniform(1.0, 1.2)))
    side = min(w, h)
    scale = float(side * rng.uniform(0.115, 0.16))  # pixels per face unit (≈ inter-pupillary distance)
    cx = float(w * rng.uniform(0.43, 0.57))
    cy = float(np.clip(h * rng.uniform(0.42, 0.52), 2.3 * scale, h - 2.2 * scale))
    pose = Pose(cx=cx, cy=cy, scale=scale, roll=float(rng.normal(0, 3.5)), yaw=float(rng.uniform(-8, 8)))
    bg_hue = rng.uniform(0.2, 0.85, 3)
    bg_hue = 0.55 * bg_hue + 0.45 * bg_hue.mean()  # muted colours
    bg2 = np.clip(bg_hue * rng.uniform(0.6, 1.0), 0, 1)
    shirt = rng.uniform(0.05, 0.85, 3)
    return PhotoConditions(
        width=w, height=h, pose=pose,
        light_azimuth=float(rng.uniform(-45, 45)),
        light_elevation=float(rng.uniform(15, 50)),
        ambient=float(rng.uniform(0.42, 0.58)),
        exposure=float(rng.uniform(0.92, 1.10)),
        white_balance=tuple(float(v) for v in rng.normal(1.0, 0.03, 3)),
        background=(tuple(float(v) for v in bg_hue), tuple(float(v) for v in bg2)),
        shirt=tuple(float(v) for v in shirt),
        blur_sigma=float(rng.uniform(0.0, 1.0)),
        noise_sigma=float(rng.uniform(0.5, 4.0)),
        jpeg_quality=int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )
