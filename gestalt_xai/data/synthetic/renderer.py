"""Paint a parametric face as a raw photo: layered, anti-aliased OpenCV drawing with analytic shading.

The face is painted at twice the output resolution (super-sampling) with sub-pixel polygon coordinates
(``cv2.fillPoly(..., cv2.LINE_AA, shift=4)``), feathered alpha masks and Lambertian shading of an ellipsoidal head
lit from a random direction, then down-sampled (area averaging) and passed through a camera model: exposure, white
balance, blur, sensor noise and JPEG compression.

Locality is a design rule: every layer depends only on the shape parameters of its own part and on fields (shading,
skin texture, noise) that depend on the identity and the photo conditions, never on a phenotype. A planted phenotype
therefore changes pixels only near the parts it edits, which the truth masks record and the tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from gestalt_xai.data.synthetic.canvas import Canvas, cov_in
from gestalt_xai.data.synthetic.face_model import (
    FaceGeometry,
    FaceShape,
    Pose,
    build_geometry,
    landmarks5,
    landmarks68,
    project,
)
from gestalt_xai.data.synthetic.identity import Appearance, PhotoConditions

__all__ = ["RenderedPhoto", "Scene", "prepare_scene", "render_photo", "ellipse", "SUPERSAMPLE", "MARK_CENTRE",
           "MARK_RADIUS", "encode_jpeg"]

SUPERSAMPLE = 2
#: the confounder mark: a mole-like dark spot on the image-right cheek (face frame, face units); large and dark enough
#: (≈ 10 px across in the 112² crop) for the demo model to learn it as a Clever-Hans cue
MARK_CENTRE = (0.62, 0.74)
MARK_RADIUS = 0.14


@dataclass
class RenderedPhoto:
    """One rendered photo and its geometric ground truth (photo pixels, origin top-left)."""

    rgb: np.ndarray  # H×W×3 uint8, exactly what the JPEG on disk decodes to
    jpeg: bytes
    landmarks5: np.ndarray  # (5, 2)
    landmarks68: np.ndarray  # (68, 2)
    geometry: FaceGeometry
    photo: PhotoConditions
    #: H×W×3 float32 in 8-bit units (0..255, not clipped): the photo after down-sampling, exposure, white balance
    #: and blur, before sensor noise, rounding and JPEG; only when :func:`render_photo` is asked for it
    clean: np.ndarray | None = None


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """Baseline JFIF JPEG without metadata (deterministic for the same pixels and quality).

    Chroma is not subsampled (4:4:4), so a local change spills into its 8×8 blocks only, not 16×16 ones.
    """
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:  # pragma: no cover - cv2 fails only on invalid arrays
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _light_vector(photo: PhotoConditions) -> np.ndarray:
    az, el = math.radians(photo.light_azimuth), math.radians(photo.light_elevation)
    # y is down, so light from above has a negative y component
    return np.array([math.sin(az) * math.cos(el), -math.sin(el), math.cos(az) * math.cos(el)])


def _face_coords(pose: Pose, roi: tuple[slice, slice], ss: int, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Face-frame (x, y) of every ``step``-th super-sampled pixel in ``roi`` (yaw ignored: shading only)."""
    Minv = cv2.invertAffineTransform(pose.matrix(ss))
    ys, xs = np.mgrid[roi[0].start:roi[0].stop:step, roi[1].start:roi[1].stop:step].astype(np.float32)
    X = Minv[0, 0] * xs + Minv[0, 1] * ys + Minv[0, 2]
    Y = Minv[1, 0] * xs + Minv[1, 1] * ys + Minv[1, 2]
    X /= math.cos(math.radians(pose.yaw))
    return X.astype(np.float32), Y.astype(np.float32)


def _shade_fields(shape: _Frame, photo: PhotoConditions, X: np.ndarray, Y: np.ndarray,
                  rng: np.random.Generator, px_per_u: float) -> tuple[np.ndarray, np.ndarray]:
    """Lambert + specular shading of the ellipsoidal head, and a multiplicative skin texture field."""
    L = _light_vector(photo)
    b = math.radians(photo.pose.yaw)
    # the shading ellipsoid uses identity-only extents (a phenotype such as micrognathia must not relight the face)
    c0 = 0.5 * (shape.crown_y + 1.8)
    half_h = 0.5 * (1.8 - shape.crown_y)
    nx = X / (shape.face_half_w * 1.08)
    ny = (Y - c0) / half_h * 0.75
    nz = np.sqrt(np.clip(1.0 - nx**2 - ny**2, 0.02, 1.0))
    # rotate normals by the head's yaw so the light stays fixed in the camera frame
    nx, nz = nx * math.cos(b) + nz * math.sin(b), -nx * math.sin(b) + nz * math.cos(b)
    lam = np.clip(nx * L[0] + ny * L[1] + nz * L[2], 0.0, 1.0)
    shade = photo.ambient + (1.0 - photo.ambient) * lam
    hv = L + np.array([0.0, 0.0, 1.0])
    hv /= np.linalg.norm(hv)
    spec = np.clip(nx * hv[0] + ny * hv[1] + nz * hv[2], 0, 1) ** 24
    h, w = X.shape
    coarse = rng.standard_normal((h // 8 + 2, w // 8 + 2)).astype(np.float32)
    coarse = cv2.GaussianBlur(coarse, (0, 0), max(0.8, 0.06 * px_per_u / 8))
    coarse = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    coarse /= coarse.std() + 1e-6
    fine = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 0.9)
    fine /= fine.std() + 1e-6
    texture = 1.0 + 0.018 * coarse + 0.016 * fine
    return np.stack([shade, spec], axis=0), texture


#: per-channel exponents of the shading: shadows of skin are warmer (sub-surface scattering keeps red)
_SKIN_GAMMA = np.array([0.80, 1.0, 1.12], np.float32)


def _skin_field(skin: np.ndarray, shade: np.ndarray, spec: np.ndarray, texture: np.ndarray) -> np.ndarray:
    ls = np.log(np.clip(shade, 0.02, 1.2))[..., None]
    field = skin * np.exp(ls * _SKIN_GAMMA) * texture[..., None]
    # darker skin shows relatively more specular sheen
    field += ((0.08 + 0.14 * (1.0 - float(skin.mean()))) * spec)[..., None]
    return field.astype(np.float32)


def ellipse(cx: float, cy: float, rx: float, ry: float, ang: float = 0.0, n: int = 40) -> np.ndarray:
    """``(n, 2)`` points on the ellipse centred at ``(cx, cy)`` with semi-axes ``rx, ry``, rotated by ``ang``
    degrees (face units): the polygons the renderer paints and the truth masks of
    :mod:`~gestalt_xai.data.synthetic.phenotypes` rasterise (which use ``n=32``).

    >>> ellipse(0.0, 0.0, 2.0, 1.0, n=4).round(6).tolist()
    [[2.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [-0.0, -1.0]]
    """
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    a = math.radians(ang)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return np.column_stack([cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)])


def _pts(xy: np.ndarray, z: float | np.ndarray = 0.0) -> np.ndarray:
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    zz = np.broadcast_to(np.asarray(z, np.float64), (len(xy),))
    return np.column_stack([xy, zz])


class _Frame(NamedTuple):
    """The only parts of a face the scene is drawn from (no phenotype changes them)."""

    face_half_w: float
    crown_y: float
    gonion_y: float


@dataclass(frozen=True, eq=False)
class Scene:
    """What a photo's rendering shares with every phenotype of the same identity in the same photo, and with or
    without the mark: background, shirt and hair behind the head already painted, the skin, hair and lip colour
    fields, the skin texture and hair streaks, and the sensor noise. Every random draw of a rendering is made here.

    Make it once with :func:`prepare_scene` and hand it to :func:`render_photo` (``scene=``) to render several
    phenotypes of one photo (counterfactuals) for the price of their painting only; the pixels are those of
    rendering each from scratch. Its arrays are read-only.
    """

    key: tuple
    canvas: np.ndarray
    skin: np.ndarray
    texture: np.ndarray
    streak: np.ndarray
    hair: np.ndarray
    lip: np.ndarray
    noise: np.ndarray


def _scene_key(shape: FaceShape, look: Appearance, photo: PhotoConditions) -> tuple:
    return (_Frame(shape.face_half_w, shape.crown_y, shape.gonion_y), look, photo)


def prepare_scene(shape: FaceShape, look: Appearance, photo: PhotoConditions) -> Scene:
    """The :class:`Scene` of a photo of ``shape``'s identity (only its face width, crown and gonion heights are
    read: no phenotype changes them)."""
    frame, look, photo = key = _scene_key(shape, look, photo)
    ss = SUPERSAMPLE
    pose = photo.pose
    H, W = photo.height * ss, photo.width * ss
    px_u = pose.scale * ss  # super-sampled pixels per face unit
    cv = Canvas(H, W)
    rng_tex = np.random.default_rng([look.texture_seed, 1])
    rng_photo = np.random.default_rng([photo.noise_seed, 2])

    def pp(points3: np.ndarray) -> np.ndarray:
        return project(points3, pose, ss)

    u = px_u  # shorthand for feather widths in face units
    hw = frame.face_half_w
    vol = look.hair_volume
    # the region where the person is: fixed by identity and pose only (never by a phenotype), so the random
    # texture fields drawn inside it are the same with and without any planted feature
    box = np.array([[-(hw + vol + 0.6), frame.crown_y - vol - 0.2], [hw + vol + 0.6, frame.crown_y - vol - 0.2],
                    [hw + vol + 0.6, frame.gonion_y + 2.0], [-(hw + vol + 0.6), frame.gonion_y + 2.0]])
    corners = np.vstack([pp(_pts(box, 0.0)), pp(_pts(box, 1.2))])
    fx0, fy0 = np.floor(corners.min(axis=0)).astype(int)
    fx1, fy1 = np.ceil(corners.max(axis=0)).astype(int)
    froi = (slice(max(fy0, 0), max(min(fy1, H), 1)), slice(max(fx0, 0), max(min(fx1, W), 1)))
    if froi[0].stop <= froi[0].start + 1 or froi[1].stop <= froi[1].start + 1:
        froi = (slice(0, H), slice(0, W))

    def full(a: np.ndarray) -> np.ndarray:
        out = np.zeros((H, W) + a.shape[2:], np.float32)
        out[froi] = a
        return out

    # smooth fields are computed on every second super-sampled pixel and interpolated (4× fewer evaluations)
    rh, rw = froi[0].stop - froi[0].start, froi[1].stop - froi[1].start

    def up(a: np.ndarray) -> np.ndarray:
        return cv2.resize(a, (rw, rh), interpolation=cv2.INTER_LINEAR)

    X, Y = _face_coords(pose, froi, ss, step=2)
    fields, texture_r = _shade_fields(frame, photo, X, Y, rng_tex, px_u / 2)
    shade_r, spec_r = fields
    skin = np.asarray(look.skin, np.float32)
    skin_r = up(_skin_field(skin, shade_r, spec_r, texture_r))
    skin_field = full(skin_r)
    texture_r = up(texture_r)
    texture = full(texture_r)
    shade_r = up(shade_r)
    X, Y = up(X), up(Y)
    L = _light_vector(photo)

    # ---- background: vertical gradient, soft blotches, vignette (computed coarse, then up-sampled)
    bg_a, bg_b = np.asarray(photo.background[0], np.float32), np.asarray(photo.background[1], np.float32)
    h4, w4 = H // 8 + 2, W // 8 + 2
    ys = np.linspace(0, 1, h4, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, w4, dtype=np.float32)[None, :]
    blot = cv2.GaussianBlur(rng_photo.standard_normal((h4, w4)).astype(np.float32), (0, 0), 4.0)
    blot /= blot.std() + 1e-6
    gain = (1.0 + 0.05 * blot) * (1.0 - 0.18 * (xs**2 + (ys * 2 - 1) ** 2))
    bg = (bg_a * (1 - ys[..., None]) + bg_b * ys[..., None]) * gain[..., None]
    cv.img[:] = cv2.resize(bg.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)

    hair = np.asarray(look.hair, np.float32)
    # hair texture: streaks along y, plus shading towards the light
    streak = rng_tex.standard_normal((rh // 2 + 1, rw // 2 + 1)).astype(np.float32)
    streak = cv2.GaussianBlur(streak, (1, 0), sigmaX=0.6, sigmaY=max(1.0, 0.15 * px_u / 2))
    streak = cv2.resize(streak, (rw, rh), interpolation=cv2.INTER_LINEAR)
    streak /= streak.std() + 1e-6
    hair_shade = np.clip(0.55 + 0.6 * np.clip(-(Y - frame.crown_y) / 3.0 * L[1] + X / hw * 0.3 * L[0], -0.5, 0.6),
                         0.3, 1.2)
    hair_field = full(hair[None, None, :] * (hair_shade * (1.0 + 0.18 * streak))[..., None])
    streak = full(streak)

    # ---- shirt and shoulders
    sy = frame.gonion_y + 1.15  # shoulders: identity only
    shoulder = np.array([[-0.75, sy], [-1.9, sy + 0.45], [-2.9, sy + 1.0], [-3.3, sy + 4.0], [3.3, sy + 4.0],
                         [2.9, sy + 1.0], [1.9, sy + 0.45], [0.75, sy]])
    shirt = np.asarray(photo.shirt, np.float32)
    shirt_cov = cv.alpha([pp(_pts(shoulder, 0.0))], feather=0.6)
    if shirt_cov is not None:
        sy_ = np.linspace(1.0, 0.8, shirt_cov[1].shape[0], dtype=np.float32)[:, None, None]
        cv.paint(shirt_cov, np.repeat(shirt * sy_, shirt_cov[1].shape[1], axis=1).astype(np.float32))

    # ---- hair behind the head
    if look.hair_style != "short":
        bottom = frame.gonion_y + (0.15 if look.hair_style == "medium" else 1.5)  # identity only
        back = np.vstack([np.column_stack([(hw + vol + 0.08) * np.cos(a), (frame.crown_y - vol) * np.sin(a)])
                          for a in [np.linspace(0, np.pi, 40)]])
        back = np.vstack([[[hw + vol + 0.02, bottom]], back, [[-(hw + vol + 0.02), bottom]]])
        back_field = hair_field * 0.72
        cv.paint(cv.alpha([pp(_pts(back, -0.3))], feather=0.02 * u), back_field)

    lip = np.asarray(look.lip, np.float32)
    lip_field = full(lip[None, None, :] * np.clip(shade_r, 0, 1.1)[..., None] * texture_r[..., None])
    # the sensor noise: the next draws of the photo's stream, whatever is painted in between
    noise = rng_photo.standard_normal((photo.height, photo.width, 3), dtype=np.float32)
    arrays = (cv.img, skin_field, texture, streak, hair_field, lip_field, noise)
    for arr in arrays:
        arr.flags.writeable = False
    return Scene(key, *arrays)


def render_photo(shape: FaceShape, look: Appearance, photo: PhotoConditions, mark: bool = False,
                 clean: bool = False, scene: Scene | None = None) -> RenderedPhoto:
    """Render one raw photo of a face.

    Parameters
    ----------
    shape:
        Face shape, phenotypes already applied (see :func:`gestalt_xai.data.synthetic.phenotypes.apply_features`).
    look:
        Colours and styles of the identity.
    photo:
        Canvas, pose, light, background and camera nuisance.
    mark:
        Paint the confounder mark (a small dark spot on the image-right cheek).
    clean:
        Also return the photo before sensor noise and JPEG (:attr:`RenderedPhoto.clean`), the image counterfactual
        change masks are computed on (:mod:`~gestalt_xai.data.synthetic.counterfactuals`). It costs nothing extra:
        the same array is computed either way.
    scene:
        The photo's :class:`Scene` (:func:`prepare_scene`), to render several phenotypes of one photo without
        drawing it again; made here when omitted.

    Every random draw (skin and hair texture, background blotches, sensor noise) is made in the :class:`Scene`,
    which depends on the identity (``look.texture_seed``) and the photo (``photo.noise_seed``) only and is drawn
    over a region fixed by the identity and the pose, so a photo rendered with other phenotypes or without the mark
    consumes exactly the same draws: what differs between the two photos is what the phenotypes paint.

    Examples
    --------
    >>> import numpy as np
    >>> from gestalt_xai.data.synthetic.identity import sample_identity, sample_photo
    >>> rng = np.random.default_rng(0)
    >>> shape, look = sample_identity(rng)
    >>> out = render_photo(shape, look, sample_photo(rng))
    >>> out.rgb.dtype, out.landmarks5.shape
    (dtype('uint8'), (5, 2))
    """
    if scene is None:
        scene = prepare_scene(shape, look, photo)
    elif scene.key != _scene_key(shape, look, photo):
        raise ValueError("the scene was prepared for another identity or photo (prepare_scene)")
    ss = SUPERSAMPLE
    g = build_geometry(shape)
    P = g.parts
    pose = photo.pose
    H, W = photo.height * ss, photo.width * ss
    px_u = pose.scale * ss  # super-sampled pixels per face unit
    cv = Canvas(H, W, scene.canvas.copy())
    skin_field, texture, streak, hair_field, lip_field = scene.skin, scene.texture, scene.streak, scene.hair, scene.lip

    def pp(points3: np.ndarray) -> np.ndarray:
        return project(points3, pose, ss)

    def pz(xy: np.ndarray, dz: float = 0.0) -> np.ndarray:
        """Project 2-D face-frame points lying on the face surface (+ dz)."""
        from gestalt_xai.data.synthetic.face_model import surface_z

        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        return pp(_pts(xy, surface_z(shape, xy[:, 0]) + dz))

    u = px_u  # shorthand for feather widths in face units
    hw = shape.face_half_w
    vol = look.hair_volume
    skin = np.asarray(look.skin, np.float32)
    hair = np.asarray(look.hair, np.float32)
    L = _light_vector(photo)
    sy = shape.gonion_y + 1.15  # shoulders: identity only

    # ---- head silhouette (coverage used by the neck shadow and the face)
    head_outline = np.vstack([P["skull"][:, :2], P["contour"][:, :2]])
    head_cov = cv.alpha([pp(_pts(head_outline, 0.0))], feather=0.5)

    # ---- neck with the jaw's cast shadow
    nw_ = 0.78 - 0.06 * (1 - shape.age)
    neck = np.array([[-nw_, 0.6], [nw_, 0.6], [nw_ * 1.05, sy + 0.2], [nw_ * 1.9, sy + 0.65],
                     [-nw_ * 1.9, sy + 0.65], [-nw_ * 1.05, sy + 0.2]])
    neck_cov = cv.alpha([pp(_pts(neck, 0.3))], feather=0.03 * u)
    cv.paint(neck_cov, lambda r: skin_field[r] * np.float32(0.8) ** _SKIN_GAMMA)
    if head_cov is not None and neck_cov is not None:
        (ny_, nx_), na = neck_cov
        dy = int(round(0.16 * u))
        shifted = (slice(max(ny_.start - dy, 0), max(ny_.stop - dy, 1)), nx_)
        sh = cov_in(head_cov, shifted)
        pad = na.shape[0] - sh.shape[0]
        if pad > 0:
            sh = np.vstack([np.zeros((pad, sh.shape[1]), np.float32), sh])
        sh = cv2.GaussianBlur(sh, (0, 0), 0.07 * u)
        cv.multiply(((ny_, nx_), na * sh), (0.55, 0.52, 0.52))

    # ---- ears (behind the head outline)
    for tag in ("l", "r"):
        cv.paint(cv.alpha([pp(P[f"ear_{tag}_outline"])], feather=0.012 * u),
                 lambda r: skin_field[r] * np.array([0.96, 0.88, 0.86], np.float32))
        cv.multiply(cv.alpha([pp(P[f"ear_{tag}_concha"])], feather=0.03 * u), (0.62, 0.58, 0.58), 0.8)
        cv.multiply(cv.alpha([pp(P[f"ear_{tag}_helix"])], feather=0.012 * u, lines=0.025 * u), (0.75, 0.72, 0.72),
                    0.8)

    # ---- head and face skin, darker towards the silhouette
    if head_cov is not None:
        (hy, hx), ha = head_cov
        rim = cv2.GaussianBlur(ha, (0, 0), 0.06 * u)
        face_local = skin_field[hy, hx] * (0.78 + 0.22 * np.clip(rim * 1.6 - 0.6, 0, 1))[..., None]
        cv.paint(head_cov, face_local)

    # ---- cheeks: blush and (phenotype) fullness highlight
    blush = np.array([1.0, 0.80, 0.80], np.float32)
    for side in (-1, 1):
        c = ellipse(side * 0.78, 0.62, 0.30, 0.22)
        cv.multiply(cv.alpha([pz(c)], feather=0.12 * u), blush, 0.10 + 0.25 * look.blush * (1 - 0.6 * look.skin_tone))
        if shape.cheek_full > 0:
            hl = ellipse(side * (0.95 + 0.10 * shape.cheek_full), 0.70, 0.26, 0.30)
            cv.multiply(cv.alpha([pz(hl)], feather=0.10 * u), (1.10, 1.08, 1.07), 0.9 * shape.cheek_full)
            lo = ellipse(side * (1.10 + 0.12 * shape.cheek_full), 1.00, 0.20, 0.22)
            cv.multiply(cv.alpha([pz(lo)], feather=0.08 * u), (0.86, 0.84, 0.84), 0.8 * shape.cheek_full)

    # ---- eye sockets (move with the eyes)
    for tag in ("l", "r"):
        pu = P[f"eye_{tag}_pupil"][0, :2]
        sock = ellipse(pu[0], pu[1] - 0.07, shape.eye_width * 0.62, 0.16)
        cv.multiply(cv.alpha([pz(sock, -0.1)], feather=0.045 * u), (0.80, 0.76, 0.76), 0.55)

    # ---- nose: bridge shading, tip, alae, nostrils, subnasal shadow
    nose_len = shape.nose_tip_y - shape.nasion_y
    tip = P["nose_tip"][0, :2]
    base_tip_y = shape.nose_tip_y  # bridge shading ends relative to the unrotated tip
    dep = shape.bridge_depth
    away = -1 if L[0] > 0 else 1  # side of the nose facing away from the light gets the darker shadow
    for side in (-1, 1):
        bw = shape.bridge_width
        line = np.array([[side * bw * 0.9, shape.nasion_y + 0.08], [side * bw * 1.05, shape.nasion_y + 0.35 * nose_len],
                         [side * bw * 1.25, base_tip_y - 0.18]])
        strength = (0.55 if side == away else 0.28) * dep
        cv.multiply(cv.alpha([pz(line, 0.05)], feather=0.028 * u, lines=0.035 * u), (0.70, 0.65, 0.64), strength)
    ridge = np.array([[0.0, shape.nasion_y + 0.12], [0.0, base_tip_y - 0.12]])
    cv.multiply(cv.alpha([pz(ridge, 0.1)], feather=0.025 * u, lines=0.03 * u), (1.12, 1.10, 1.09), 0.7 * dep)
    nostril_o = 0.35 + 0.65 * shape.nostril_show
    sub_y = P["subnasale"][0, 1]
    nw = shape.nose_width
    tipz = P["nose_tip"][0, 2]
    # shadow under the tip (between the nostrils)
    cv.multiply(cv.alpha([pp(_pts(ellipse(0, sub_y - 0.015, nw * 0.55, 0.045), tipz - 0.12))], feather=0.025 * u),
                (0.72, 0.66, 0.65), 0.7)
    for side, tag in ((-1, "l"), (1, "r")):
        ala = P[f"ala_{tag}"]
        cv.multiply(cv.alpha([pp(ala)], feather=0.012 * u, lines=0.03 * u), (0.66, 0.60, 0.58), 0.75)
        wing = ellipse(side * nw * 0.72, base_tip_y + 0.02, nw * 0.28, 0.09)
        cv.multiply(cv.alpha([pz(wing, 0.08)], feather=0.04 * u), (0.88, 0.84, 0.83), 0.6)
        nh = 0.022 + 0.028 * shape.nostril_show
        nos = ellipse(side * nw * 0.42, sub_y - 0.035 - 0.01 * shape.nostril_show, nw * 0.24, nh, ang=side * 18)
        cv.multiply(cv.alpha([pp(_pts(nos, tipz - 0.1))], feather=0.01 * u), (0.28, 0.22, 0.21), 0.85 * nostril_o)
    cv.multiply(cv.alpha([pp(_pts(ellipse(tip[0], tip[1] - 0.01, 0.07, 0.05), tipz))], feather=0.03 * u),
                (1.15, 1.13, 1.12), 0.8)

    # ---- nasolabial folds (anchored to the identity, not to the mouth)
    age_f = 0.25 + 0.6 * shape.age
    for side in (-1, 1):
        fold = np.array([[side * (nw + 0.06), sub_y - 0.06], [side * (nw + 0.16), sub_y + 0.14],
                         [side * (nw + 0.22), sub_y + 0.30]])
        cv.multiply(cv.alpha([pz(fold, 0.0)], feather=0.03 * u, lines=0.025 * u), (0.84, 0.80, 0.80), 0.5 * age_f)

    # ---- philtrum: columns and groove
    ym = P["mouth_ym"][0, 1]
    top_lip = ym - shape.upper_lip
    pd_ = shape.philtrum_depth
    groove = np.array([[-0.03, sub_y + 0.02], [0.03, sub_y + 0.02], [0.045, top_lip - 0.01], [-0.045, top_lip - 0.01]])
    cv.multiply(cv.alpha([pz(groove, 0.1)], feather=0.02 * u), (0.80, 0.75, 0.74), 0.9 * pd_)
    for side in (-1, 1):
        col = np.array([[side * 0.045, sub_y + 0.01], [side * 0.085, top_lip - 0.01]])
        cv.multiply(cv.alpha([pz(col, 0.1)], feather=0.015 * u, lines=0.025 * u), (1.14, 1.12, 1.11), 0.9 * pd_)

    # ---- lips
    up = np.vstack([P["mouth_upper_outer"][:, :2], P["mouth_stomion"][::-1, :2]])
    lo = np.vstack([P["mouth_stomion"][:, :2], P["mouth_lower_outer"][:, :2]])
    ll = shape.lower_lip
    chin_shadow = ellipse(0.0, ym + ll + 0.07, shape.mouth_half_w * 0.55, 0.06)
    cv.multiply(cv.alpha([pz(chin_shadow, 0.05)], feather=0.03 * u), (0.80, 0.76, 0.75), 0.6)
    cv.paint(cv.alpha([pz(up, 0.05)], feather=0.5), lambda r: lip_field[r] * 0.86)
    cv.paint(cv.alpha([pz(lo, 0.05)], feather=0.5), lip_field)
    cv.multiply(cv.alpha([pz(ellipse(0, ym + ll * 0.45, shape.mouth_half_w * 0.4, ll * 0.22), 0.05)],
                         feather=0.025 * u), (1.16, 1.14, 1.14), 0.7)
    cv.multiply(cv.alpha([pz(P["mouth_stomion"][:, :2], 0.05)], feather=0.008 * u, lines=0.018 * u),
                (0.35, 0.25, 0.25), 0.9)
    for c in P["mouth_corners"][:, :2]:
        cv.multiply(cv.alpha([pz(ellipse(c[0], c[1], 0.025, 0.018), 0.05)], feather=0.01 * u), (0.55, 0.45, 0.45),
                    0.6)

    # ---- chin highlight
    cv.multiply(cv.alpha([pz(ellipse(0.0, shape.chin_y - 0.18, 0.16, 0.09), 0.0)], feather=0.06 * u),
                (1.07, 1.06, 1.05), 0.8)

    # ---- eyes
    iris = np.asarray(look.iris, np.float32)
    sclera = np.array([0.93, 0.91, 0.89], np.float32)
    for tag in ("l", "r"):
        upper, lower = P[f"eye_{tag}_upper"], P[f"eye_{tag}_lower"]
        fissure = np.vstack([upper, lower[::-1]])
        fis_px = pp(fissure)
        fis = cv.alpha([fis_px], feather=0.5)
        if fis is None:
            continue
        cv.paint(fis, sclera * min(1.0, photo.ambient + 0.45))
        pupil = P[f"eye_{tag}_pupil"]
        pc = pp(pupil)[0]
        r = shape.iris_r * px_u * math.cos(math.radians(pose.yaw)) ** 0.5
        iris_cov = cv.alpha([ellipse(pc[0], pc[1], r, r)], feather=0.5)
        if iris_cov is not None:
            roi, ia = iris_cov
            clip = cov_in(fis, roi)
            ia = ia * clip
            yy, xx = np.mgrid[roi[0], roi[1]].astype(np.float32)
            rr = np.sqrt((xx - pc[0]) ** 2 + (yy - pc[1]) ** 2) / max(r, 1.0)
            iris_col = iris[None, None, :] * (0.65 + 0.55 * np.clip(rr, 0, 1) ** 0.8 * (rr < 0.86))[..., None]
            iris_col = iris_col * (1.0 + 0.12 * texture[roi][..., None] - 0.12)
            iris_full = np.zeros((H, W, 3), np.float32)
            iris_full[roi] = iris_col
            cv.paint((roi, ia), iris_full)
            pr = r * 0.40
            pa = cv.alpha([ellipse(pc[0], pc[1], pr, pr)], feather=0.4)
            if pa is not None:
                cv.paint((pa[0], pa[1] * cov_in(fis, pa[0])), (0.03, 0.03, 0.035))
            cl = pc + np.array([0.35 * r * L[0] / (abs(L[0]) + 0.5), -0.35 * r])
            ca = cv.alpha([ellipse(cl[0], cl[1], r * 0.16, r * 0.16)], feather=0.4)
            if ca is not None:
                cv.paint((ca[0], ca[1] * cov_in(fis, ca[0])), (0.97, 0.97, 0.97), 0.85)
        # upper-lid shadow on the eyeball, lashes, lower lid, crease
        lid_shadow = np.vstack([upper[:, :2], upper[::-1, :2] + [0, shape.eye_open * 0.28]])
        sh = cv.alpha([pp(_pts(lid_shadow, upper[0, 2]))], feather=0.02 * u)
        if sh is not None:
            cv.multiply((sh[0], sh[1] * cov_in(fis, sh[0])), (0.62, 0.60, 0.60), 0.8)
        lash_col = np.minimum(hair * 0.6, 0.12)
        cv.paint(cv.alpha([pp(upper)], feather=0.006 * u, lines=0.028 * u), lash_col, 0.95)
        outer_half = upper[len(upper) // 2:]
        cv.paint(cv.alpha([pp(outer_half + [0, -0.012, 0])], feather=0.01 * u, lines=0.03 * u), lash_col, 0.6)
        cv.multiply(cv.alpha([pp(lower)], feather=0.006 * u, lines=0.012 * u), (0.70, 0.62, 0.60), 0.6)
        cv.multiply(cv.alpha([pp(P[f"eye_{tag}_crease"])], feather=0.012 * u, lines=0.014 * u), (0.72, 0.66, 0.65),
                    0.55)
        # caruncle (pink inner corner) unless an epicanthal fold covers it
        ic = P[f"eye_{tag}_inner"][0, :2]
        side = -1 if tag == "l" else 1
        car = ellipse(ic[0] + side * 0.028, ic[1] + 0.004, 0.026, 0.02)
        cv.paint(cv.alpha([pz(car, -0.1)], feather=0.006 * u), skin * np.array([1.0, 0.72, 0.72]) * 0.92, 0.8)
        if shape.epicanthus > 0:
            e = shape.epicanthus
            # a skin fold from the upper lid sweeping down over the inner canthus
            fold = np.array([[ic[0] + side * 0.13, ic[1] - 0.07], [ic[0] + side * 0.04, ic[1] - 0.055],
                             [ic[0] - side * 0.025, ic[1] - 0.005], [ic[0] - side * 0.005, ic[1] + 0.045],
                             [ic[0] + side * (0.03 + 0.06 * e), ic[1] + 0.015]])
            fold_curve = fold[[0, 1, 2, 3]]
            cv.paint(cv.alpha([pz(fold, -0.1)], feather=0.008 * u), skin_field, 0.95 * min(1.0, 0.4 + e))
            cv.multiply(cv.alpha([pz(fold_curve, -0.1)], feather=0.01 * u, lines=0.016 * u), (0.60, 0.54, 0.54),
                        0.85 * min(1.0, 0.3 + e))

    # ---- brows (and synophrys bridge)
    brow_col = np.minimum(np.clip(0.75 * hair + 0.25 * skin * 0.5, 0, 1) * 0.9, skin * 0.45)

    def brow_tex(r: tuple[slice, slice]) -> np.ndarray:
        return (brow_col * (1.0 + 0.25 * streak[r])[..., None]).astype(np.float32)

    brow_op = 0.85 + 0.12 * shape.age
    for tag in ("l", "r"):
        cv.paint(cv.alpha([pz(P[f"brow_{tag}"][:, :2], -0.02)], feather=0.012 * u), brow_tex, brow_op)
    if shape.synophrys > 0:
        bl, br = P["brow_l"], P["brow_r"]
        y_lo = 0.5 * (bl[0, 1] + br[0, 1])
        th = shape.brow_thick * 0.85
        bridge = np.array([[bl[0, 0] - 0.02, y_lo + 0.005], [0, y_lo + 0.02], [br[0, 0] + 0.02, y_lo + 0.005],
                           [br[0, 0] + 0.02, y_lo - th], [0, y_lo - th * 0.8], [bl[0, 0] - 0.02, y_lo - th]])
        cv.paint(cv.alpha([pz(bridge, -0.02)], feather=0.018 * u), brow_tex, brow_op * (0.35 + 0.6 * shape.synophrys))

    # ---- hair on top of the head, down to the hairline and sideburns
    sk = P["skull"][:, :2]
    outer = sk * np.array([(hw + vol) / hw, (abs(shape.crown_y) + vol) / abs(shape.crown_y)])
    yb = -0.15 if look.hair_style == "short" else 0.05
    outer = outer[outer[:, 1] < yb]
    hl = P["hairline"][:, :2]
    cap = np.vstack([[[hw + vol * 0.6, yb]], outer, [[-(hw + vol * 0.6), yb], [-(hw - 0.06), yb]], hl,
                     [[hw - 0.06, yb]]])
    cv.paint(cv.alpha([pp(_pts(cap, 0.0))], feather=0.010 * u), hair_field)

    # ---- confounder mark
    if mark:
        mc = ellipse(MARK_CENTRE[0], MARK_CENTRE[1], MARK_RADIUS, MARK_RADIUS * 0.9)
        cv.paint(cv.alpha([pz(mc, 0.0)], feather=0.012 * u), skin * 0.20, 0.97)

    # ---- camera: down-sample, exposure/white balance, blur, noise, JPEG
    img = cv2.resize(cv.img, (photo.width, photo.height), interpolation=cv2.INTER_AREA)
    # the camera meters on the face: darker skin gets a longer exposure (the background brightens with it)
    metering = 1.0 + 1.0 * max(0.0, look.skin_tone - 0.3)
    img *= np.asarray(photo.white_balance, np.float32) * (photo.exposure * metering)
    if photo.blur_sigma > 0.25:
        img = cv2.GaussianBlur(img, (0, 0), photo.blur_sigma)
    before_noise = img * 255.0
    img = before_noise + scene.noise * np.float32(photo.noise_sigma)
    rgb8 = np.clip(np.round(img), 0, 255).astype(np.uint8)
    jpeg = encode_jpeg(rgb8, photo.jpeg_quality)
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].copy()
    lm5 = project(landmarks5(g), pose)
    lm68 = project(landmarks68(g), pose)
    return RenderedPhoto(rgb=decoded, jpeg=jpeg, landmarks5=lm5, landmarks68=lm68, geometry=g, photo=photo,
                         clean=before_noise if clean else None)
