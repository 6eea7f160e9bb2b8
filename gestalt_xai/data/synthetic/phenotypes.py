"""The phenotype catalogue: HPO-coded facial features that can be planted into a synthetic face, and syndromes.

Each :class:`Feature` is a controlled change of a few :class:`~.face_model.FaceShape` parameters, scaled by an
effect size (1.0 = clearly visible, as a dysmorphologist would code it), together with the face-frame region it
may change. Its truth mask in a photo is the union of that region with and without the feature (the pixels the
feature is allowed to change), so hyper- and hypotelorism, for example, cover both the old and the new eye positions.

Features outside the ArcFace 112×112 crop (low-set ears, high forehead) are *negative controls*
(``visible_in_crop=False``): a model that sees only the aligned crop cannot use them, so an explanation that
attributes evidence to them is wrong.

A :class:`Syndrome` is 1–4 features with mean effect sizes, per-patient variability and penetrance. Syndromes are
drawn so that features are shared between syndromes but no two syndromes have the same set of visible features:
recognising a syndrome needs the combination, as in real dysmorphology.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import cv2
import numpy as np

from gestalt_xai.data.synthetic.face_model import FaceGeometry, FaceShape, Pose, build_geometry, project, surface_z
from gestalt_xai.data.synthetic.renderer import ellipse

__all__ = [
    "Feature",
    "FeatureEffect",
    "Syndrome",
    "PHENOTYPES",
    "CONFLICTS",
    "apply_features",
    "feature_regions",
    "rasterise_regions",
    "design_syndromes",
    "express",
]

RegionFn = Callable[[FaceGeometry], list[np.ndarray]]


@dataclass(frozen=True)
class Feature:
    """One plantable phenotype.

    Attributes
    ----------
    key: short identifier used in tables (``hypertelorism``).
    hpo_id, hpo_name: the Human Phenotype Ontology term.
    region: toolkit region (see ``hpo_face_regions.tsv``: ``periorbital_eyes_brows``, ``nose``, …).
    visible_in_crop: False for negative controls that fall outside the aligned 112×112 crop.
    description: what the renderer changes at effect 1.0.
    margin: dilation of the truth mask (face units) covering anti-aliasing, feathering and soft shadows.
    """

    key: str
    hpo_id: str
    hpo_name: str
    region: str
    visible_in_crop: bool
    description: str
    apply: Callable[[FaceShape, float], FaceShape]
    regions: RegionFn
    margin: float = 0.05


# ------------------------------------------------------------------------------------------- region polygons
#: points per ellipse of a region polygon (coarser than the renderer's 40; the truth masks were made with 32)
_ELLIPSE_POINTS = 32


def _eyes(g: FaceGeometry) -> list[np.ndarray]:
    s = g.shape
    out = []
    for tag, side in (("l", -1), ("r", 1)):
        pu = g[f"eye_{tag}_pupil"][0]
        # fissure, lids, lashes, crease and the socket shading that moves with the eye
        out.append(ellipse(pu[0], pu[1] - 0.06, s.eye_width * 0.62 + 0.10, 0.24, ang=-side * s.eye_slant,
                           n=_ELLIPSE_POINTS))
    return out


def _inner_canthi(g: FaceGeometry) -> list[np.ndarray]:
    out = []
    for tag, side in (("l", -1), ("r", 1)):
        ic = g[f"eye_{tag}_inner"][0]
        out.append(ellipse(ic[0] + side * 0.045, ic[1] - 0.01, 0.12, 0.09, n=_ELLIPSE_POINTS))
    return out


def _glabella(g: FaceGeometry) -> list[np.ndarray]:
    bl, br = g["brow_l"], g["brow_r"]
    y0 = min(bl[:, 1].min(), br[:, 1].min()) - 0.01
    y1 = max(bl[0, 1], br[0, 1]) + 0.04
    return [np.array([[bl[0, 0] - 0.05, y0], [br[0, 0] + 0.05, y0], [br[0, 0] + 0.05, y1], [bl[0, 0] - 0.05, y1]])]


def _bridge(g: FaceGeometry) -> list[np.ndarray]:
    s = g.shape
    tip_y = s.nose_tip_y
    w0 = s.bridge_width * 0.9 + 0.07
    w1 = s.bridge_width * 1.25 + 0.07
    return [np.array([[-w0, s.nasion_y + 0.03], [w0, s.nasion_y + 0.03], [w1, tip_y - 0.12], [0.0, tip_y - 0.06],
                      [-w1, tip_y - 0.12]])]


def _lower_nose(g: FaceGeometry) -> list[np.ndarray]:
    s = g.shape
    tip_y = g["nose_tip"][0, 1]
    sub_y = g["subnasale"][0, 1]
    w = s.nose_width * 0.80
    return [np.array([[-w, tip_y - 0.10], [w, tip_y - 0.10], [w, sub_y + 0.03], [-w, sub_y + 0.03]])]


def _philtrum(g: FaceGeometry) -> list[np.ndarray]:
    sub_y = g["subnasale"][0, 1]
    top = g["mouth_ym"][0, 1] - g.shape.upper_lip
    return [np.array([[-0.11, sub_y], [0.11, sub_y], [0.13, top + 0.01], [-0.13, top + 0.01]])]


def _upper_lip(g: FaceGeometry) -> list[np.ndarray]:
    top = g["mouth_ym"][0, 1] - g.shape.upper_lip
    # the philtral groove and columns end on the vermilion border, so they move with it
    philtrum_end = np.array([[-0.13, top - 0.08], [0.13, top - 0.08], [0.13, top + 0.01], [-0.13, top + 0.01]])
    return [np.vstack([g["mouth_upper_outer"][:, :2], g["mouth_stomion"][::-1, :2]]), philtrum_end]


def _mouth(g: FaceGeometry) -> list[np.ndarray]:
    up = g["mouth_upper_outer"][:, :2]
    lo = g["mouth_lower_outer"][:, :2]
    ym = g["mouth_ym"][0, 1]
    ll = g.shape.lower_lip
    shadow = ellipse(0.0, ym + ll + 0.07, g.shape.mouth_half_w * 0.55 + 0.03, 0.09, n=_ELLIPSE_POINTS)
    return [np.vstack([up, lo[1:-1]]), shadow]


def _philtrum_and_mouth(g: FaceGeometry) -> list[np.ndarray]:
    return _philtrum(g) + _mouth(g)


def _lower_jaw(g: FaceGeometry) -> list[np.ndarray]:
    s = g.shape
    c = g["contour"][:, :2]
    # the outline is a Catmull-Rom spline (face_model._lower_contour): moving the chin bends it up to the control
    # point at y = 0.80 above the gonion
    keep = c[c[:, 1] > min(0.75, s.gonion_y - 0.25)]
    # the chin/jaw outline plus the cast shadow on the neck below it
    below = keep + [0.0, 0.22]
    return [keep, np.vstack([keep, below[::-1]])]


def _cheeks(g: FaceGeometry) -> list[np.ndarray]:
    s = g.shape
    c = g["contour"][:, :2]
    out = []
    for side in (-1, 1):
        # from ear level down: the spline segment between ear level and the first bulging control point moves too
        band = c[(c[:, 1] > -0.05) & (c[:, 1] < s.gonion_y + 0.15) & (np.sign(c[:, 0]) == side)]
        band = band[np.argsort(band[:, 1])]  # top → bottom along the outline, then back up on the inside
        inner = np.array([[side * 0.60, s.gonion_y + 0.10], [side * 0.60, 0.30]])
        out.append(np.vstack([band, inner]))
        # the outline is a Catmull-Rom spline (face_model._lower_contour): moving the gonion control point bends it
        # down to the chin's control point, and the jaw's cast shadow on the neck moves with it
        jaw = c[(c[:, 1] > s.gonion_y - 0.10) & (c[:, 1] < s.chin_y - 0.07) & (np.sign(c[:, 0]) == side)]
        if len(jaw) > 1:
            out.append(np.vstack([jaw - [0.0, 0.10], (jaw + [0.0, 0.22])[::-1]]))
        # the fullness highlight and the shadow below it (renderer), which reach past the outline onto the background
        cf = s.cheek_full
        out.append(ellipse(side * (0.95 + 0.10 * cf), 0.70, 0.32, 0.36, n=_ELLIPSE_POINTS))
        out.append(ellipse(side * (1.10 + 0.12 * cf), 1.00, 0.26, 0.28, n=_ELLIPSE_POINTS))
    return out


def _ears(g: FaceGeometry) -> list[np.ndarray]:
    return [g["ear_l_outline"][:, :2], g["ear_r_outline"][:, :2]]


def _upper_forehead(g: FaceGeometry) -> list[np.ndarray]:
    hl = g["hairline"][:, :2]
    s = g.shape
    centre = hl[np.abs(hl[:, 0]) < 0.55 * s.face_half_w]
    # the band the hairline moves through (the phenotype only ever raises it, by at most 0.45 × 1.25 u)
    return [np.vstack([centre, (centre - [0.0, 0.6])[::-1]])]


def _scaled(name: str, factor: float) -> Callable[[FaceShape, float], FaceShape]:
    def f(s: FaceShape, e: float) -> FaceShape:
        return replace(s, **{name: getattr(s, name) * (1.0 + factor * e)})

    return f


def _added(name: str, delta: float) -> Callable[[FaceShape, float], FaceShape]:
    def f(s: FaceShape, e: float) -> FaceShape:
        return replace(s, **{name: getattr(s, name) + delta * e})

    return f


def _set_max(name: str) -> Callable[[FaceShape, float], FaceShape]:
    def f(s: FaceShape, e: float) -> FaceShape:
        return replace(s, **{name: max(getattr(s, name), float(np.clip(e, 0.0, 1.2)))})

    return f


def _depressed_bridge(s: FaceShape, e: float) -> FaceShape:
    return replace(s, bridge_depth=s.bridge_depth * max(0.0, 1.0 - 0.85 * e))


def _anteverted(s: FaceShape, e: float) -> FaceShape:
    return replace(s, nostril_show=min(1.0, s.nostril_show + 0.8 * e), tip_up=s.tip_up + e)


def _micrognathia(s: FaceShape, e: float) -> FaceShape:
    return replace(s, chin_y=s.chin_y - 0.20 * e, chin_half_w=s.chin_half_w * (1.0 - 0.25 * e))


def _low_set_ears(s: FaceShape, e: float) -> FaceShape:
    return replace(s, ear_y=s.ear_y + 0.40 * e, ear_tilt=s.ear_tilt + 12.0 * e)


_FEATURES = [
    Feature("hypertelorism", "HP:0000316", "Hypertelorism", "periorbital_eyes_brows", True,
            "pupils 22 % further apart", _scaled("eye_spacing", 0.22), _eyes),
    Feature("hypotelorism", "HP:0000601", "Hypotelorism", "periorbital_eyes_brows", True,
            "pupils 16 % closer together", _scaled("eye_spacing", -0.16), _eyes),
    Feature("upslanted_palpebral_fissures", "HP:0000582", "Upslanted palpebral fissure", "periorbital_eyes_brows",
            True, "palpebral fissures rotated 11° up laterally", _added("eye_slant", 11.0), _eyes),
    Feature("downslanted_palpebral_fissures", "HP:0000494", "Downslanted palpebral fissures",
            "periorbital_eyes_brows", True, "palpebral fissures rotated 13° down laterally",
            _added("eye_slant", -13.0), _eyes),
    Feature("epicanthus", "HP:0000286", "Epicanthus", "periorbital_eyes_brows", True,
            "skin fold over the inner canthus hiding the caruncle", _set_max("epicanthus"), _inner_canthi),
    Feature("synophrys", "HP:0000664", "Synophrys", "periorbital_eyes_brows", True,
            "eyebrows joined across the glabella", _set_max("synophrys"), _glabella),
    Feature("depressed_nasal_bridge", "HP:0005280", "Depressed nasal bridge", "nose", True,
            "flat bridge: side shadows and ridge highlight fade by 85 %", _depressed_bridge, _bridge),
    Feature("wide_nasal_bridge", "HP:0000431", "Wide nasal bridge", "nose", True,
            "bridge side shadows twice as far apart", _scaled("bridge_width", 1.0), _bridge),
    Feature("anteverted_nares", "HP:0000463", "Anteverted nares", "nose", True,
            "upturned tip with nostrils visible from the front", _anteverted, _lower_nose),
    Feature("long_philtrum", "HP:0000343", "Long philtrum", "philtrum", True,
            "philtrum 60 % longer (the mouth sits lower)", _scaled("philtrum_len", 0.6), _philtrum_and_mouth),
    Feature("smooth_philtrum", "HP:0000319", "Smooth philtrum", "philtrum", True,
            "philtral columns and groove absent", _scaled("philtrum_depth", -0.95), _philtrum),
    Feature("thin_upper_lip_vermilion", "HP:0000219", "Thin upper lip vermilion", "mouth_lips", True,
            "upper vermilion 60 % thinner", _scaled("upper_lip", -0.6), _upper_lip),
    Feature("wide_mouth", "HP:0000154", "Wide mouth", "mouth_lips", True,
            "mouth 30 % wider", _scaled("mouth_half_w", 0.30), _mouth),
    Feature("micrognathia", "HP:0000347", "Micrognathia", "chin_mandible", True,
            "chin 0.20 face units higher and 25 % narrower", _micrognathia, _lower_jaw, margin=0.12),
    Feature("full_cheeks", "HP:0000293", "Full cheeks", "midface_cheeks", True,
            "lateral cheeks bulge outwards, with a rounder highlight", _set_max("cheek_full"), _cheeks,
            margin=0.12),
    Feature("low_set_ears", "HP:0000369", "Low-set ears", "ears", False,
            "ears 0.40 face units lower and rotated backwards (outside the aligned crop)", _low_set_ears, _ears),
    Feature("high_forehead", "HP:0000348", "High forehead", "forehead", False,
            "central hairline 0.45 face units higher (outside the aligned crop)",
            _added("hairline_raise", 0.45), _upper_forehead),
]

#: the catalogue, in a fixed order (also the order of the truth tables)
PHENOTYPES: dict[str, Feature] = {f.key: f for f in _FEATURES}

#: features that cannot occur together
CONFLICTS = [
    {"hypertelorism", "hypotelorism"},
    {"upslanted_palpebral_fissures", "downslanted_palpebral_fissures"},
    {"depressed_nasal_bridge", "wide_nasal_bridge"},
    {"long_philtrum", "thin_upper_lip_vermilion"},
]


def apply_features(shape: FaceShape, effects: dict[str, float]) -> FaceShape:
    """The shape with each feature applied at its effect size (catalogue order, so the result is order-free)."""
    unknown = set(effects) - set(PHENOTYPES)
    if unknown:
        raise KeyError(f"unknown phenotype(s): {', '.join(sorted(unknown))}; known: {', '.join(PHENOTYPES)}")
    for key, feat in PHENOTYPES.items():
        if effects.get(key, 0.0) > 0:
            shape = feat.apply(shape, float(effects[key]))
    return shape


def feature_regions(base: FaceShape, effects: dict[str, float]) -> dict[str, tuple[list[np.ndarray], float]]:
    """Face-frame region polygons of each planted feature: union of the region with and without that feature.

    Returns ``{feature: (polygons, margin)}`` for every feature with a positive effect.
    """
    with_all = build_geometry(apply_features(base, effects))
    out: dict[str, tuple[list[np.ndarray], float]] = {}
    for key, e in effects.items():
        if e <= 0:
            continue
        rest = {k: v for k, v in effects.items() if k != key}
        without = build_geometry(apply_features(base, rest))
        feat = PHENOTYPES[key]
        out[key] = (feat.regions(with_all) + feat.regions(without), feat.margin)
    return out


def rasterise_regions(polygons: list[np.ndarray], margin: float, shape: FaceShape, pose: Pose,
                      size: tuple[int, int]) -> np.ndarray:
    """Boolean photo-space mask (``size`` = (H, W)) of face-frame polygons lying on the face surface, dilated."""
    h, w = size
    m = np.zeros((h, w), np.uint8)
    for poly in polygons:
        xy = np.asarray(poly, np.float64)[:, :2]
        pts = project(np.column_stack([xy, surface_z(shape, xy[:, 0])]), pose)
        cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    # + 4 px: camera blur (σ ≤ 1 px) and JPEG ringing spill a change a few pixels beyond the drawn part
    r = int(np.ceil(margin * pose.scale)) + 4
    if r > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        m = cv2.dilate(m, k)
    return m.astype(bool)


# ------------------------------------------------------------------------------------------------- syndromes
@dataclass(frozen=True)
class FeatureEffect:
    """A feature of a syndrome: mean effect size, per-patient standard deviation and penetrance."""

    feature: str
    effect: float
    sd: float
    penetrance: float


@dataclass(frozen=True)
class Syndrome:
    """A synthetic syndrome: an id, a name and its features."""

    syndrome_id: str
    name: str
    features: tuple[FeatureEffect, ...]

    @property
    def feature_keys(self) -> tuple[str, ...]:
        return tuple(f.feature for f in self.features)


def _conflicts(keys: set[str]) -> bool:
    return any(len(keys & c) > 1 for c in CONFLICTS)


def design_syndromes(n: int, rng: np.random.Generator, min_features: int = 1, max_features: int = 4,
                     negative_control_rate: float = 0.35) -> list[Syndrome]:
    """Draw ``n`` syndromes with distinct visible-feature sets, sharing features between them.

    Every syndrome has at least one visible feature; a fraction of syndromes also carries a negative-control
    feature (invisible in the crop). Features are drawn with a preference for ones already in use, so most
    features are shared and a syndrome is identified by its combination.
    """
    visible = [k for k, f in PHENOTYPES.items() if f.visible_in_crop]
    hidden = [k for k, f in PHENOTYPES.items() if not f.visible_in_crop]
    used: dict[str, int] = {k: 0 for k in visible}
    seen: set[frozenset[str]] = set()
    out: list[Syndrome] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 10_000:
            raise ValueError(f"cannot draw {n} distinct syndromes from {len(visible)} visible features")
        k = int(rng.integers(max(1, min_features), max_features + 1))
        n_vis = k
        extra_hidden = rng.random() < negative_control_rate and k >= 2
        if extra_hidden:
            n_vis = k - 1
        # mild preference for features already in use (so syndromes share features), none for over-used ones
        weights = np.array([1.0 if used[v] == 0 else 1.6 if used[v] <= 2 else 0.5 for v in visible])
        keys: set[str] = set()
        for key in rng.choice(visible, size=len(visible), replace=False, p=weights / weights.sum()):
            if len(keys) == n_vis:
                break
            if not _conflicts(keys | {str(key)}):
                keys.add(str(key))
        if len(keys) < n_vis or frozenset(keys) in seen:
            continue
        seen.add(frozenset(keys))
        for key in keys:
            used[key] += 1
        all_keys = sorted(keys, key=list(PHENOTYPES).index)
        if extra_hidden:
            all_keys.append(str(rng.choice(hidden)))
        feats = tuple(FeatureEffect(key, effect=round(float(rng.uniform(0.75, 1.0)), 3),
                                    sd=round(float(rng.uniform(0.08, 0.18)), 3),
                                    penetrance=round(float(rng.uniform(0.8, 1.0)), 3)) for key in all_keys)
        sid = f"S{len(out) + 1:02d}"
        name = "Synthetic syndrome " + sid[1:] + " (" + ", ".join(PHENOTYPES[f.feature].hpo_name.lower()
                                                                   for f in feats) + ")"
        out.append(Syndrome(sid, name, feats))
    return out


def express(syndrome: Syndrome | None, rng: np.random.Generator) -> dict[str, float]:
    """One patient's feature effects: each feature present with its penetrance, its strength varying around the
    syndrome's mean. At least one visible feature is always expressed (a patient is diagnosed from something).
    """
    if syndrome is None:
        return {}
    effects: dict[str, float] = {}
    draws = [(f, rng.random(), rng.normal(f.effect, f.sd)) for f in syndrome.features]
    for f, p, e in draws:
        if p < f.penetrance:
            effects[f.feature] = round(float(np.clip(e, 0.35, 1.25)), 4)
    if not any(PHENOTYPES[k].visible_in_crop for k in effects):
        vis = [(f, e) for f, _, e in draws if PHENOTYPES[f.feature].visible_in_crop]
        f, e = vis[0]
        effects[f.feature] = round(float(np.clip(e, 0.35, 1.25)), 4)
    return {k: effects[k] for k in PHENOTYPES if k in effects}
