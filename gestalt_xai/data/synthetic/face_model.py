"""Parametric face geometry in a face-centred frame, its projection into a photo, and the landmark conventions.

The *face frame* has its origin midway between the pupils, ``x`` to the image right, ``y`` down and ``z`` towards the
camera; lengths are in face units ``u`` (one unit ≈ an adult inter-pupillary distance, so a face without
hyper-/hypotelorism has its pupils one unit apart). :class:`FaceShape` holds every shape parameter; planted phenotypes
(:mod:`.phenotypes`) edit a few of them, and :func:`build_geometry` turns a shape into named outlines and points.

Proportions are deliberately a little wider and taller than an average adult face so that the ears and the hairline
fall outside the ArcFace 112×112 crop (the crop spans about ±1.6 u horizontally and 1.47 u above the eyes); the two
phenotypes placed there (low-set ears, high forehead) are therefore invisible to a model that sees only the crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = [
    "FaceShape",
    "FaceGeometry",
    "Pose",
    "build_geometry",
    "landmarks68",
    "landmarks5",
    "project",
]


@dataclass(frozen=True)
class FaceShape:
    """Shape parameters of one face (face units; angles in degrees). Defaults describe an average adult."""

    age: float = 1.0  # 0 = small child … 1 = adult (proportions only)
    eye_spacing: float = 1.0  # pupil to pupil
    eye_width: float = 0.46  # palpebral fissure length
    eye_open: float = 0.15  # fissure height
    eye_slant: float = 3.0  # outer canthus above inner canthus (positive = upslant)
    iris_r: float = 0.095
    epicanthus: float = 0.0  # 0..1 strength of the inner-canthal fold
    brow_y: float = -0.36  # lower edge of the brow arch
    brow_thick: float = 0.07
    brow_arch: float = 0.05
    brow_span: float = 1.0  # brows follow the identity's eye spacing, not a phenotype's
    synophrys: float = 0.0  # 0..1 density of hair across the glabella
    nasion_y: float = -0.10
    nose_tip_y: float = 0.64
    nose_width: float = 0.26  # alar half-width
    bridge_width: float = 0.085  # half-width between the bridge's side shadows
    bridge_depth: float = 1.0  # 1 = normal projection (shading contrast), 0 = flat
    nostril_show: float = 0.2  # 0..1 how much of the nostrils faces the camera
    tip_up: float = 0.0  # upward rotation of the tip (anteversion)
    philtrum_len: float = 0.20
    philtrum_depth: float = 1.0  # 1 = marked columns and groove, 0 = smooth
    upper_lip: float = 0.095  # upper vermilion height at the midline
    upper_lip_base: float = 0.095  # the identity's upper lip (keeps the stomion in place when the lip thins)
    lower_lip: float = 0.13
    mouth_half_w: float = 0.38
    mouth_curve: float = 0.0  # corners up (+) or down (-)
    chin_y: float = 1.80
    chin_half_w: float = 0.30
    gonion_y: float = 1.20
    jaw_half_w: float = 1.12
    face_half_w: float = 1.55  # head half-width at the ears
    cheek_full: float = 0.0  # 0..1 lateral cheek fullness
    ear_y: float = 0.18  # ear centre
    ear_h: float = 0.80
    ear_w: float = 0.30
    ear_tilt: float = 8.0  # top of the ear tilted backwards (outwards in a frontal view)
    hairline_y: float = -1.78  # hairline at the midline
    hairline_raise: float = 0.0  # phenotype: extra height of the central hairline
    crown_y: float = -2.45  # top of the skull


@dataclass(frozen=True)
class Pose:
    """Where and how the face sits in the photo: similarity placement plus a small yaw (degrees)."""

    cx: float  # photo x of the face-frame origin (pupil midpoint)
    cy: float
    scale: float  # photo pixels per face unit
    roll: float = 0.0
    yaw: float = 0.0

    def matrix(self, ss: float = 1.0) -> np.ndarray:
        """2×3 matrix from yaw-projected face coordinates to (super-sampled) photo pixels."""
        a = math.radians(self.roll)
        s = self.scale * ss
        return np.array([[s * math.cos(a), -s * math.sin(a), self.cx * ss],
                         [s * math.sin(a), s * math.cos(a), self.cy * ss]], dtype=np.float64)


@dataclass
class FaceGeometry:
    """Named outlines and points of one face in the face frame: ``(N, 3)`` arrays ``x, y, z``."""

    shape: FaceShape
    parts: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.parts[name]


# ----------------------------------------------------------------------------------------------------- helpers
def _catmull_rom(points: np.ndarray, n: int, closed: bool = False) -> np.ndarray:
    """Smooth curve through ``points`` (K, 2) with ``n`` samples (centripetal-free uniform Catmull–Rom)."""
    p = np.asarray(points, dtype=np.float64)
    if closed:
        p = np.vstack([p[-1], p, p[0], p[1]])
    else:
        p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    segs = len(p) - 3
    t = np.linspace(0, segs, n, endpoint=not closed)
    i = np.minimum(t.astype(int), segs - 1)
    u = (t - i)[:, None]
    p0, p1, p2, p3 = p[i], p[i + 1], p[i + 2], p[i + 3]
    return 0.5 * ((2 * p1) + (-p0 + p2) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u**2
                  + (-p0 + 3 * p1 - 3 * p2 + p3) * u**3)


def _resample(curve: np.ndarray, n: int) -> np.ndarray:
    """``n`` points equally spaced by arc length along a polyline."""
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    target = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(target, s, curve[:, k]) for k in range(curve.shape[1])], axis=1)


def _with_z(xy: np.ndarray, z: np.ndarray | float) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    zz = np.broadcast_to(np.asarray(z, dtype=np.float64), (len(xy),))
    return np.column_stack([xy, zz])


def _rot(points: np.ndarray, centre: np.ndarray, deg: float) -> np.ndarray:
    a = math.radians(deg)
    R = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (points - centre) @ R.T + centre


def surface_z(shape: FaceShape, x: np.ndarray) -> np.ndarray:
    """Depth of the face surface at lateral position ``x`` (an ellipsoidal head, 1.15 u deep at the midline)."""
    r = np.clip(np.abs(x) / shape.face_half_w, 0.0, 1.0)
    return 1.15 * np.sqrt(1.0 - r**2)


# ---------------------------------------------------------------------------------------------------- geometry
def _eye(shape: FaceShape, side: int) -> dict[str, np.ndarray]:
    """One eye (``side`` -1 = image-left, +1 = image-right): fissure, lids, iris and its landmark points."""
    pupil = np.array([side * shape.eye_spacing / 2, 0.0])
    half = shape.eye_width / 2
    # medial (inner) canthus towards the midline; positive slant lifts the outer canthus (y is down)
    tilt = -side * shape.eye_slant
    t = np.linspace(0.0, 1.0, 25)  # 0 = inner canthus, 1 = outer canthus
    x = pupil[0] - side * half + side * 2 * half * t
    up = shape.eye_open * 0.60 * np.sin(np.pi * t**0.85) ** 0.9
    lo = shape.eye_open * 0.40 * np.sin(np.pi * t**1.1) ** 1.1
    upper = np.column_stack([x, -up])
    lower = np.column_stack([x, lo])
    upper = _rot(upper, pupil, tilt)
    lower = _rot(lower, pupil, tilt)
    crease = _rot(np.column_stack([x[3:-2], -up[3:-2] * 1.55 - 0.035]), pupil, tilt)
    inner, outer = upper[0], upper[-1]
    # 68-point order: outer → upper lid → inner → lower lid (image-left eye), mirrored for the right eye
    idx_up = [8, 16]  # points at 1/3 and 2/3 of the fissure from the inner canthus
    if side < 0:
        pts = [outer, upper[idx_up[1]], upper[idx_up[0]], inner, lower[idx_up[0]], lower[idx_up[1]]]
    else:
        pts = [inner, upper[idx_up[0]], upper[idx_up[1]], outer, lower[idx_up[1]], lower[idx_up[0]]]
    return {"upper": upper, "lower": lower, "crease": crease, "pupil": pupil[None], "lm": np.array(pts),
            "inner": inner[None], "outer": outer[None]}


def _brow(shape: FaceShape, side: int) -> np.ndarray:
    """Closed brow outline: lower edge inner→outer, then upper edge back (tapering outwards)."""
    ex = shape.brow_span / 2
    t = np.linspace(0.0, 1.0, 20)
    x0, x1 = 0.12, ex + 0.40
    x = side * (x0 + (x1 - x0) * t)
    lower_y = shape.brow_y + 0.025 - shape.brow_arch * np.sin(np.pi * np.clip(t * 1.15, 0, 1)) + 0.04 * t**2
    thick = shape.brow_thick * (1.0 - 0.62 * t**1.3)
    lower = np.column_stack([x, lower_y])
    upper = np.column_stack([x, lower_y - thick])
    return np.vstack([lower, upper[::-1]])


def _lower_contour(shape: FaceShape) -> np.ndarray:
    """Face outline from the image-left ear level (y = 0) under the chin to the image-right ear level."""
    hw, jw, cw = shape.face_half_w, shape.jaw_half_w, shape.chin_half_w
    gy, chy = shape.gonion_y, shape.chin_y
    bulge = 0.17 * shape.cheek_full
    right = np.array([
        [hw, 0.0],
        [hw - 0.03 + bulge * 0.6, 0.40],
        [0.5 * (hw + jw) + 0.03 + bulge, 0.80],
        [jw + bulge * 0.35, gy],
        # the jaw between gonion and chin stays convex however short the chin is (micrognathia)
        [0.5 * (jw + cw) + 0.05, gy + 0.62 * (chy - gy) + 0.04],
        [cw, chy - 0.07],
        [0.0, chy],
    ])
    left = right.copy()
    left[:, 0] *= -1  # image-left ear level → chin
    ctrl = np.vstack([left, right[::-1][1:]])
    return _catmull_rom(ctrl, 121)


def _skull(shape: FaceShape) -> np.ndarray:
    """Upper head outline from the image-right ear level over the crown to the image-left ear level."""
    a = np.linspace(0.0, np.pi, 81)
    hw = shape.face_half_w
    x = hw * np.cos(a) * (1.0 + 0.03 * np.sin(a))
    y = shape.crown_y * np.sin(a) ** 0.9
    return np.column_stack([x, y])


def _hairline(shape: FaceShape) -> np.ndarray:
    """Hairline from the image-left temple to the image-right temple."""
    hw = shape.face_half_w
    x = np.linspace(-0.93 * hw, 0.93 * hw, 81)
    r = np.abs(x) / hw
    # temples: the hairline sweeps down at the sides, framing an oval forehead (inside the crop, but identity only)
    q = np.clip((r - 0.45) / 0.48, 0, 1)
    side_drop = 1.25 * q * q * (3 - 2 * q)
    centre = 0.10 * r**2
    # a phenotype raises only the central part, where the baseline hairline is already above the crop
    raise_w = np.clip(1.0 - ((r - 0.30) / 0.22).clip(0, 1), 0, 1) ** 1.5
    y = shape.hairline_y + centre + side_drop - shape.hairline_raise * raise_w
    return np.column_stack([x, y])


def _ear(shape: FaceShape, side: int) -> dict[str, np.ndarray]:
    hw = shape.face_half_w
    c = np.array([side * (hw + shape.ear_w * 0.50), shape.ear_y])
    a = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    h, w = shape.ear_h / 2, shape.ear_w / 2
    # wider at the top (helix) than at the lobule
    wx = w * (1.0 + 0.22 * (-np.sin(a)))
    outline = np.column_stack([c[0] + side * wx * np.cos(a), c[1] + h * np.sin(a)])
    tilt = side * shape.ear_tilt
    outline = _rot(outline, c, tilt)
    concha = np.column_stack([c[0] + side * (w * 0.10 + w * 0.45 * np.cos(a)), c[1] + 0.05 + h * 0.42 * np.sin(a)])
    concha = _rot(concha, c, tilt)
    helix = np.column_stack([c[0] + side * (w * 0.15 + wx * 0.78 * np.cos(a)), c[1] - 0.02 + h * 0.80 * np.sin(a)])
    helix = _rot(helix, c, tilt)
    return {"outline": outline, "concha": concha, "helix": helix[(a > 0.6 * np.pi) | (a < 0.15 * np.pi)]}


def _mouth(shape: FaceShape) -> dict[str, np.ndarray]:
    sub_y = shape.nose_tip_y + 0.10
    ym = sub_y + shape.philtrum_len + shape.upper_lip_base  # stomion: does not move when the lip only thins
    mw = shape.mouth_half_w
    cy = ym + 0.01 - shape.mouth_curve
    ul, ll = shape.upper_lip, shape.lower_lip
    peak_x = 0.085
    # upper vermilion border: corner → peak → cupid's-bow dip → peak → corner
    ub = np.array([[-mw, cy], [-0.62 * mw, ym - 0.55 * ul], [-peak_x, ym - ul - 0.01], [0.0, ym - ul + 0.018],
                   [peak_x, ym - ul - 0.01], [0.62 * mw, ym - 0.55 * ul], [mw, cy]])
    upper_outer = _catmull_rom(ub, 41)
    stom = _catmull_rom(np.array([[-mw, cy], [-0.5 * mw, ym + 0.004], [0, ym + 0.012], [0.5 * mw, ym + 0.004],
                                  [mw, cy]]), 41)
    lb = np.array([[mw, cy], [0.6 * mw, ym + 0.7 * ll], [0.0, ym + ll], [-0.6 * mw, ym + 0.7 * ll], [-mw, cy]])
    lower_outer = _catmull_rom(lb, 41)
    lm_outer = np.array([ub[0], upper_outer[10], ub[2], ub[3], ub[4], upper_outer[30], ub[6],
                         lower_outer[10], lower_outer[15], lb[2], lower_outer[25], lower_outer[30]])
    inner = np.array([[-mw * 0.9, cy], stom[12], stom[20], stom[28], [mw * 0.9, cy], stom[28], stom[20], stom[12]])
    return {"upper_outer": upper_outer, "stomion": stom, "lower_outer": lower_outer, "lm_outer": lm_outer,
            "lm_inner": inner, "corners": np.array([[-mw, cy], [mw, cy]]), "ym": np.array([[0.0, ym]])}


def _nose(shape: FaceShape) -> dict[str, np.ndarray]:
    tip = np.array([0.0, shape.nose_tip_y - 0.05 * shape.tip_up])
    sub_y = shape.nose_tip_y + 0.10
    nw = shape.nose_width
    bridge = np.array([[0.0, shape.nasion_y + k * (tip[1] - shape.nasion_y) / 3] for k in range(3)] + [tip])
    lower = np.array([[-nw * 0.80, sub_y - 0.035], [-nw * 0.42, sub_y - 0.005], [0.0, sub_y],
                      [nw * 0.42, sub_y - 0.005], [nw * 0.80, sub_y - 0.035]])
    ala = {}
    for side in (-1, 1):
        ala[side] = _catmull_rom(np.array([[side * nw * 0.55, shape.nose_tip_y - 0.20],
                                           [side * nw * 1.02, shape.nose_tip_y - 0.02],
                                           [side * nw * 0.95, sub_y - 0.03], [side * nw * 0.60, sub_y - 0.01]]), 20)
    return {"tip": tip[None], "bridge": bridge, "lower": lower, "ala_l": ala[-1], "ala_r": ala[1],
            "subnasale": np.array([[0.0, sub_y]])}


def build_geometry(shape: FaceShape) -> FaceGeometry:
    """All outlines and landmark points of a face in the face frame (``z`` from the ellipsoidal head model)."""
    g = FaceGeometry(shape=shape)
    P = g.parts

    def put(name: str, xy: np.ndarray, dz: float = 0.0, z: float | None = None) -> None:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        zz = surface_z(shape, xy[:, 0]) + dz if z is None else np.full(len(xy), z)
        P[name] = _with_z(xy, zz)

    contour = _lower_contour(shape)
    put("contour", contour, z=0.0)
    put("skull", _skull(shape), z=0.0)
    put("hairline", _hairline(shape), dz=-0.05)
    for side, tag in ((-1, "l"), (1, "r")):
        e = _eye(shape, side)
        for k, v in e.items():
            put(f"eye_{tag}_{k}", v, dz=-0.10)
        put(f"brow_{tag}", _brow(shape, side), dz=-0.02)
        ear = _ear(shape, side)
        for k, v in ear.items():
            put(f"ear_{tag}_{k}", v, z=-0.15)
    n = _nose(shape)
    nose_len = shape.nose_tip_y - shape.nasion_y
    put("nose_tip", n["tip"], dz=0.30 * nose_len + 0.02)
    put("nose_bridge", n["bridge"], dz=0.0)
    P["nose_bridge"][:, 2] += np.linspace(0.02, 0.30 * nose_len + 0.02, 4) * shape.bridge_depth
    put("nose_lower", n["lower"], dz=0.12)
    put("ala_l", n["ala_l"], dz=0.08)
    put("ala_r", n["ala_r"], dz=0.08)
    put("subnasale", n["subnasale"], dz=0.12)
    m = _mouth(shape)
    for k, v in m.items():
        put(f"mouth_{k}", v, dz=0.05)
    # jaw landmarks 0–16: 17 points along the lower contour at equal arc length
    put("jaw_lm", _resample(contour, 17), z=0.0)
    return g


def landmarks68(g: FaceGeometry) -> np.ndarray:
    """The 68 iBUG-convention points (0-based: jaw 0–16, brows 17–26, nose 27–35, eyes 36–47, lips 48–67)."""
    P = g.parts
    brow_l = P["brow_l"][:20]  # lower edge inner → outer (image-left brow)
    brow_r = P["brow_r"][:20]
    bl = brow_l[[19, 14, 9, 5, 1]]  # outer → inner, as iBUG 17–21
    br = brow_r[[1, 5, 9, 14, 19]]  # inner → outer, as iBUG 22–26
    bridge = np.vstack([P["nose_bridge"][:3], P["nose_tip"]])  # point 30 is exactly the 5-point nose tip
    pts = np.vstack([P["jaw_lm"], bl, br, bridge, P["nose_lower"], P["eye_l_lm"], P["eye_r_lm"],
                     P["mouth_lm_outer"], P["mouth_lm_inner"]])
    assert pts.shape == (68, 3)
    return pts


def landmarks5(g: FaceGeometry) -> np.ndarray:
    """Pupil centres, nose tip, mouth corners (image-left first), face frame ``(5, 3)``."""
    P = g.parts
    return np.vstack([P["eye_l_pupil"], P["eye_r_pupil"], P["nose_tip"], P["mouth_corners"]])


def project(points: np.ndarray, pose: Pose, ss: float = 1.0) -> np.ndarray:
    """Face-frame ``(N, 3)`` points → photo pixels ``(N, 2)`` (orthographic yaw about the head's vertical axis)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    b = math.radians(pose.yaw)
    x = p[:, 0] * math.cos(b) + p[:, 2] * math.sin(b)
    M = pose.matrix(ss)
    return np.column_stack([x, p[:, 1]]) @ M[:, :2].T + M[:, 2]


def with_shape(shape: FaceShape, **changes: float) -> FaceShape:
    """A copy of ``shape`` with some parameters changed."""
    return replace(shape, **changes)
