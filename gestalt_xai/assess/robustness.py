"""Robustness to the alignment: how far a map moves when the five landmarks move by a couple of pixels.

Face detectors disagree by a few pixels on where the eyes, nose and mouth corners are (MTCNN and RetinaFace by up to
≈ 4.6 crop pixels on the mouth corners: README, "MTCNN's landmark convention"), so an explanation that changes a lot
under such a shift explains the alignment as much as the face. For every image and draw ``d``:

1. **jitter** (:func:`jitter_landmarks`): each photo-space landmark moves independently, each coordinate by
   ``U(−a, a)`` (``a = amplitude``, photo pixels; with ``unit="crop"`` ``a`` is in crop pixels and divided by the
   alignment's scale, so every photo gets the same shift inside the crop). The draws come from a generator seeded by
   the run seed and the image id through SHA-256 (:func:`image_seed`), never by the batch position or Python's
   ``hash()``, so an image's jitter does not depend on the batch it is in;
2. **re-alignment** with the align stage's own functions: :func:`~gestalt_xai.faces.align.estimate_transform` (Umeyama
   similarity onto the ArcFace template) and :func:`~gestalt_xai.faces.align.warp_to_crop` (``cv2.warpAffine``,
   bilinear, black border) on the ORIGINAL photo, loaded as align loads it (:func:`load_jitter_inputs`:
   :func:`~gestalt_xai.data.images.load_image` applies EXIF orientation; align's stored landmarks and matrix are in
   that photo's pixels, also for photos it found upside down, whose landmarks it turned back);
3. **the maps again**: every method recomputed on the jittered crops through the same
   :class:`~gestalt_xai.attribution.score_model.ScoreModel` (targets and references unchanged, row ``i`` of the
   batch's targets for every draw of image ``i``), and the explained score under the jittered crop
   (:func:`~gestalt_xai.attribution.effects.effect_scores`);
4. **back to the original frame** (:func:`to_original_frame`): crop_jit → photo → crop_orig is the forward matrix
   ``M_orig ∘ M_jit⁻¹``; the jittered map is warped with it by the same ``warp_to_crop`` (``cv2.warpAffine``, which
   inverts the forward matrix and samples bilinearly, black = 0 outside). Valid pixels are those whose bilinear
   footprint lies wholly inside the jittered crop (a warped all-ones image ≥ 0.999);
5. **comparison** with the original map on the valid pixels only (:func:`~gestalt_xai.assess.compare.compare_maps`:
   Spearman, SSIM, top-10 % IoU), beside three controls:

   * ``draw 0`` (``control=True``): no jitter; the crop re-cut from the photo and the map recomputed — equal to the
     stored map unless the photo, the crop or the method changed (the re-warp is the identity up to float rounding);
   * ``interp_*`` columns: the original map warped into the jittered frame and back, compared as above — what the
     two bilinear warps alone cost; an exactly shift-equivariant method would reach it;
   * :func:`pair_baseline`: each image's map against another image's map of the same method — what two unrelated
     explanations of faces share (mostly the face's layout).

Which methods move: layer CAMs (Grad-CAM, HiResCAM at ``layer4``: a 7×7 grid, 16 crop pixels per cell, upsampled)
keep their coarse blobs, so a one- or two-pixel shift changes little of their rank order; pixel-gradient maps
(saliency, input×gradient) are dominated by high-frequency, signed texture of the gradient of a strided network
(checkerboard patterns of the stride-2 convolutions, Odena et al., Distill 2016), which is not equivariant to
sub-cell shifts — pixel ranks reshuffle. FullGrad sits between: its input-gradient term is pixel-sharp, its bias
terms are smooth. This is the input-invariance concern of Kindermans et al. (2019, "The (un)reliability of saliency
methods") and the local stability of Alvarez-Melis & Jaakkola (2018, "On the robustness of interpretability
methods"), with the perturbation restricted to one the pipeline really makes: where the alignment puts the face.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from gestalt_xai.assess.metric import metric
from gestalt_xai.attribution.base import build_methods, get_method
from gestalt_xai.attribution.effects import effect_scores
from gestalt_xai.attribution.gradients import DEFAULT_LAYER
from gestalt_xai.faces.align import (
    CROP_SIZE,
    estimate_transform,
    invert_transform,
    row_landmarks,
    row_matrix,
    warp_to_crop,
)

if TYPE_CHECKING:
    from gestalt_xai.attribution.score_model import ScoreModel
    from gestalt_xai.runs import Run

__all__ = ["JITTER_COLUMNS", "METRICS_USED", "image_seed", "jitter_landmarks", "compose", "to_original_frame",
           "load_jitter_inputs", "landmark_jitter", "pair_baseline", "summarise_jitter"]

log = logging.getLogger(__name__)

#: the comparisons made between the original and the re-aligned map (names of :mod:`gestalt_xai.assess.compare`)
METRICS_USED = ("spearman", "ssim", "topk_iou")
#: columns of :func:`landmark_jitter`'s table
JITTER_COLUMNS = ["item", "image_id", "method", "layer", "draw", "max_shift_px", "max_shift_crop_px",
                  "valid_fraction", *METRICS_USED, *(f"interp_{m}" for m in METRICS_USED), "score", "jitter_score"]
#: a pixel is valid when a warped all-ones image is at least this (bilinear footprint wholly inside the source)
_VALID = 0.999


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit seed for one image from the run seed and the image id (SHA-256; stable across processes and
    platforms, unlike Python's salted ``hash()``).

    >>> image_seed(0, "00001") == image_seed(0, "00001"), image_seed(0, "00001") == image_seed(1, "00001")
    (True, False)
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def jitter_landmarks(landmarks: np.ndarray, *, amplitude: float | np.ndarray = 2.0, draws: int = 2,
                     seed: int = 0) -> np.ndarray:
    """``(draws, 5, 2)`` copies of ``landmarks`` ``(5, 2)``, each point moved independently, each coordinate by
    ``U(−amplitude, amplitude)`` pixels (``seed``: the image's seed, :func:`image_seed`).

    >>> lm = np.zeros((5, 2))
    >>> j = jitter_landmarks(lm, amplitude=2.0, draws=3, seed=7)
    >>> j.shape, bool(np.abs(j).max() <= 2.0), np.array_equal(j, jitter_landmarks(lm, draws=3, seed=7))
    ((3, 5, 2), True, True)
    """
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (5, 2):
        raise ValueError(f"landmarks must be (5, 2), got {lm.shape}")
    if draws < 0 or not np.all(np.asarray(amplitude) >= 0):
        raise ValueError(f"draws and amplitude must be ≥ 0, got {draws} and {amplitude}")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)))
    return lm[None] + rng.uniform(-1.0, 1.0, size=(draws, 5, 2)) * float(amplitude)


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2×3 affine ``outer ∘ inner`` (``inner`` applied first).

    >>> M = np.array([[2.0, 0, 1], [0, 2.0, 3]])
    >>> np.allclose(compose(M, invert_transform(M)), np.eye(2, 3))
    True
    """
    outer, inner = np.asarray(outer, np.float64), np.asarray(inner, np.float64)
    return np.hstack([outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2:] + outer[:, 2:]])


def _rewarp(maps: np.ndarray, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps ``(N, H, W)`` in the crop frames of photo→crop matrices ``src`` ``(N, 2, 3)`` → the frames of ``dst``;
    with the valid masks (pixels whose bilinear footprint lies inside the source crop)."""
    maps = np.asarray(maps, np.float32)
    out = np.empty_like(maps)
    valid = np.empty(maps.shape, bool)
    ones = np.ones(maps.shape[1:], np.float32)
    for n in range(len(maps)):
        forward = compose(dst[n], invert_transform(src[n]))  # crop_src → photo → crop_dst
        out[n] = warp_to_crop(maps[n], forward, maps.shape[1])
        valid[n] = warp_to_crop(ones, forward, maps.shape[1]) >= _VALID
    return out, valid


def to_original_frame(maps: np.ndarray, m_orig: np.ndarray, m_jit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps ``(N, H, W)`` computed on jittered crops, warped into their original crops' frame.

    ``m_orig``, ``m_jit``: ``(N, 2, 3)`` photo→crop matrices of the original and the jittered crops. The forward
    matrix crop_jit → crop_orig is ``m_orig ∘ m_jit⁻¹``, warped with align's
    :func:`~gestalt_xai.faces.align.warp_to_crop` (``cv2.warpAffine``, bilinear, 0 outside). Returns the maps
    (float32) and the valid masks (bool: pixels that came from inside the jittered crop).

    >>> M = np.array([[[0.5, 0, 10], [0, 0.5, 4]]])
    >>> m = np.random.default_rng(0).random((1, 112, 112))
    >>> back, valid = to_original_frame(m, M, M)
    >>> bool(valid.all()), bool(np.allclose(back, m, atol=1e-6))
    (True, True)
    """
    return _rewarp(maps, np.asarray(m_jit, np.float64), np.asarray(m_orig, np.float64))


def load_jitter_inputs(run: Run, image_ids: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """``(photos, landmarks (B, 5, 2), matrices (B, 2, 3))`` of aligned images, in the order of ``image_ids``.

    Photos are read from the run's cohort paths with align's loader (:func:`~gestalt_xai.data.images.load_image`:
    EXIF orientation applied, 8-bit RGB, the align stage's ``max_pixels``); landmarks and matrices are
    ``alignment.parquet``'s, in that photo's pixels. Whole photos are held: call it per batch on large photos.
    """
    from gestalt_xai.data.images import DEFAULT_MAX_PIXELS, load_image
    from gestalt_xai.errors import InputError

    align_cfg = run.manifest.get("stages", {}).get("align", {}).get("config", {}) or {}
    max_pixels = int(align_cfg.get("max_pixels") or DEFAULT_MAX_PIXELS)
    rows = run.alignments(aligned_only=True).set_index("image_id")
    paths = run.cohort().images.astype({"image_id": str}).set_index("image_id")["path"]
    photos, landmarks, matrices = [], [], []
    for image_id in map(str, image_ids):
        if image_id not in rows.index or image_id not in paths.index:
            raise InputError(f"{image_id}: not an aligned image of {run.path}")
        row = rows.loc[image_id]
        photos.append(load_image(paths[image_id], max_pixels=max_pixels))
        landmarks.append(row_landmarks(row))
        matrices.append(row_matrix(row))
    return photos, np.asarray(landmarks, np.float64).reshape(-1, 5, 2), np.asarray(matrices).reshape(-1, 2, 3)


def _original_maps(maps: Mapping[Any, np.ndarray], methods: Sequence[str],
                   layers: Sequence[str]) -> dict[tuple[str, str], np.ndarray]:
    """``{(method, layer): (B, H, W)}``; a plain method name is the map at its only layer (or no layer)."""
    out: dict[tuple[str, str], np.ndarray] = {}
    for key, value in maps.items():
        method, layer = key if isinstance(key, tuple) else (key, None)
        if method not in methods:
            continue
        if layer is None:
            layer = (layers[0] if len(layers) == 1 else None) if method in get_method(method).layer_methods else ""
            if layer is None:
                raise ValueError(f"maps[{method!r}] is ambiguous with layers {list(layers)}: key it (method, layer)")
        out[(method, layer)] = np.asarray(value, np.float32)
    if missing := sorted(set(methods) - {m for m, _ in out}):
        raise ValueError(f"no original map for {missing}: give maps[method] for every method recomputed")
    return out


@metric("landmark_jitter", family="robustness", direction="higher",
        reference="Alvarez-Melis & Jaakkola, 'On the robustness of interpretability methods', WHI@ICML 2018; "
                  "Kindermans et al., 'The (un)reliability of saliency methods', 2019")
def landmark_jitter(score_model: ScoreModel, photos: Sequence[np.ndarray], landmarks: np.ndarray,
                    matrices: np.ndarray, maps: Mapping[Any, np.ndarray], *, methods: Sequence[str] | None = None,
                    method_params: Mapping[str, Mapping[str, Any]] | None = None,
                    layers: Sequence[str] | None = None, image_ids: Sequence[str], amplitude: float = 2.0,
                    draws: int = 2, seed: int = 0, unit: Literal["photo", "crop"] = "photo", control: bool = True,
                    batch_size: int = 32, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Similarity of each method's map to itself under re-alignment from jittered landmarks (module docstring).

    Parameters
    ----------
    score_model : the batch's ScoreModel, targets one row per image (as the maps were computed).
    photos : ``B`` original photos ``(H, W, 3)`` uint8 RGB, as :func:`load_jitter_inputs` loads them.
    landmarks, matrices : ``(B, 5, 2)`` photo-space landmarks and ``(B, 2, 3)`` photo→crop matrices of align.
    maps : the original maps ``(B, 112, 112)``, raw and signed, keyed by method name (a layer method at its only
        layer) or by ``(method, layer)``.
    methods : the methods recomputed (default: every method in ``maps``); ``method_params`` their parameters.
    layers : layers of layer methods (default: Grad-CAM's ``backbone.layer4``).
    image_ids : ``B`` ids, which seed each image's jitter (:func:`image_seed`).
    amplitude, draws, seed, unit : ``draws`` jitters of each image, ``U(−amplitude, amplitude)`` per coordinate, in
        photo pixels or (``unit="crop"``) crop pixels.
    control : add ``draw 0``: no jitter, recomputed (the noise floor of the whole path).

    Returns
    -------
    :data:`JITTER_COLUMNS`: one row per image × method × layer × draw; ``max_shift_px`` the largest Euclidean
    landmark displacement applied (photo pixels; ``max_shift_crop_px`` times the alignment scale), ``valid_fraction``
    the share of the crop compared, ``score`` / ``jitter_score`` the explained score of the original / jittered crop.
    """
    n = len(photos)
    landmarks = np.asarray(landmarks, np.float64).reshape(n, 5, 2)
    matrices = np.asarray(matrices, np.float64).reshape(n, 2, 3)
    image_ids = [str(i) for i in image_ids]
    if len(image_ids) != n:
        raise ValueError(f"{len(image_ids)} image ids for {n} photos")
    if unit not in ("photo", "crop"):
        raise ValueError(f"unit must be 'photo' or 'crop', not {unit!r}")
    layers = list(layers or [DEFAULT_LAYER])
    methods = list(methods or dict.fromkeys(k[0] if isinstance(k, tuple) else k for k in maps))
    originals = _original_maps(maps, methods, layers)
    for key, arr in originals.items():
        if arr.shape != (n, CROP_SIZE, CROP_SIZE):
            raise ValueError(f"maps{key}: expected ({n}, {CROP_SIZE}, {CROP_SIZE}), got {arr.shape}")
    scale = np.sqrt(np.abs(np.linalg.det(matrices[:, :, :2])))

    # every (image, draw): jittered landmarks → matrix → crop cut from the original photo
    owner, draw_of, m_jit, shift, crops = [], [], [], [], []
    first = 0 if control else 1
    for i in range(n):
        a = amplitude / scale[i] if unit == "crop" else amplitude
        jittered = jitter_landmarks(landmarks[i], amplitude=a, draws=draws, seed=image_seed(seed, image_ids[i]))
        for d, lm in enumerate(np.concatenate([landmarks[i][None], jittered])[first:], start=first):
            M = estimate_transform(lm)
            owner.append(i)
            draw_of.append(d)
            m_jit.append(M)
            shift.append(float(np.linalg.norm(lm - landmarks[i], axis=1).max()))
            crops.append(warp_to_crop(photos[i], M))
    owner_a, m_jit_a, crops_a = np.asarray(owner), np.asarray(m_jit), np.stack(crops)
    originals_crops = np.stack([warp_to_crop(p, m) for p, m in zip(photos, matrices, strict=True)])
    scores, jit_scores = effect_scores(score_model, originals_crops, crops_a, owner, batch_size=batch_size,
                                       device=device)

    # every method on the jittered crops, through the same score model (row owner[k]'s target)
    from gestalt_xai.assess.compare import compare_maps
    from gestalt_xai.models.gestaltmatcher import preprocess

    new: dict[tuple[str, str], np.ndarray] = {}
    for inst, names in build_methods(methods, method_params or {}):
        for a in range(0, len(crops_a), batch_size):
            rows = owner[a: a + batch_size]
            x = preprocess(crops_a[a: a + batch_size], channel_order="RGB", device=device)
            for mm in inst.attribute(score_model.select(rows), x, names, layers):
                key = (mm.method, mm.layer)
                if key not in originals:
                    continue
                new.setdefault(key, np.empty((len(crops_a), CROP_SIZE, CROP_SIZE), np.float32))[a: a + len(rows)] = \
                    mm.maps.detach().cpu().float().numpy()
    if missing := sorted(set(originals) - set(new)):
        raise ValueError(f"the methods returned no map for {missing}; check layers {layers}")

    # one mask per (image, draw), shared by every method: valid after the warp back, and for the interpolation-only
    # control (the original map there and back) valid both ways
    m_orig, k = matrices[owner_a], len(owner_a)
    ones = np.ones((k, CROP_SIZE, CROP_SIZE), np.float32)
    valid_there = _rewarp(ones, m_orig, m_jit_a)[1]
    mask = to_original_frame(valid_there.astype(np.float32), m_orig, m_jit_a)[0] >= _VALID
    keys = list(new)
    a, b = [], []
    for key in keys:
        original = originals[key][owner_a]
        round_trip = to_original_frame(_rewarp(original, m_orig, m_jit_a)[0], m_orig, m_jit_a)[0]
        a += [original, original]
        b += [to_original_frame(new[key], m_orig, m_jit_a)[0], round_trip]
    # one call: pairs sharing a mask (the methods and the control of one image and draw) are compared together
    values = compare_maps(np.concatenate(a), np.concatenate(b), metrics=METRICS_USED,
                          mask=np.tile(mask, (2 * len(keys), 1, 1)))
    frames: list[pd.DataFrame] = []
    for j, (method, layer) in enumerate(keys):
        moved, interp = slice(2 * j * k, (2 * j + 1) * k), slice((2 * j + 1) * k, (2 * j + 2) * k)
        frames.append(pd.DataFrame({
            "item": owner_a, "image_id": [image_ids[i] for i in owner], "method": method, "layer": layer,
            "draw": draw_of, "max_shift_px": shift, "max_shift_crop_px": np.asarray(shift) * scale[owner_a],
            "valid_fraction": mask.reshape(k, -1).mean(1),
            **{m: np.asarray(values[m][moved], np.float64) for m in METRICS_USED},
            **{f"interp_{m}": np.asarray(values[m][interp], np.float64) for m in METRICS_USED},
            "score": scores[owner_a], "jitter_score": jit_scores}))
    table = pd.concat(frames, ignore_index=True)[JITTER_COLUMNS]
    log.info("landmark jitter: %d images × %d draws (+%d control) × %d maps", n, draws, int(control), len(new))
    return table.sort_values(["item", "method", "layer", "draw"], kind="stable").reset_index(drop=True)


def pair_baseline(maps: Mapping[Any, np.ndarray], image_ids: Sequence[str], *, seed: int = 0,
                  layers: Sequence[str] | None = None) -> pd.DataFrame:
    """Each image's map against another image's map of the same method: the similarity of unrelated explanations.

    The partner of each image is the next image in the order of :func:`image_seed` (a seeded random cycle over the
    given ids that does not depend on their order). Returns ``item, image_id, partner_id, method, layer`` and the
    :data:`METRICS_USED` columns; empty for fewer than two images.
    """
    from gestalt_xai.assess.compare import compare_maps

    ids = [str(i) for i in image_ids]
    methods = list(dict.fromkeys(k[0] if isinstance(k, tuple) else k for k in maps))
    originals = _original_maps(maps, methods, list(layers or [DEFAULT_LAYER]))
    cols = ["item", "image_id", "partner_id", "method", "layer", *METRICS_USED]
    if len(ids) < 2:
        return pd.DataFrame(columns=cols)
    cycle = sorted(range(len(ids)), key=lambda i: image_seed(seed, ids[i]))
    partner = np.empty(len(ids), np.int64)
    partner[cycle] = np.roll(cycle, -1)
    frames = []
    for (method, layer), arr in originals.items():
        values = compare_maps(arr, arr[partner], metrics=METRICS_USED)
        frames.append(pd.DataFrame({"item": np.arange(len(ids)), "image_id": ids,
                                    "partner_id": [ids[j] for j in partner], "method": method, "layer": layer,
                                    **{m: np.asarray(values[m], np.float64) for m in METRICS_USED}}))
    return pd.concat(frames, ignore_index=True)[cols]


def summarise_jitter(table: pd.DataFrame, baseline: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per method and layer: medians and interquartile ranges of the jittered draws (``draw ≥ 1``) beside the
    controls — ``control_*`` (draw 0), ``interp_*`` (the warps alone), ``pair_*`` (:func:`pair_baseline`) — the
    median landmark shift and the median absolute score change. With a baseline, ``moved_<metric>`` places the
    median between the two reference points: ``(interp − jittered) / (interp − pair)``, 0 when the map moves no
    more than the warps alone move it, 1 when it is as far from itself as from another face's map (a method whose
    maps all look alike has a high ``pair`` value, and a high raw similarity means little). Sorted from the least
    to the most moved (median Spearman, descending)."""
    def q(s: pd.Series, p: float) -> float:
        return float(np.nanquantile(s, p)) if s.notna().any() else float("nan")

    rows = []
    for (method, layer), g in table.groupby(["method", "layer"], sort=True):
        jit, ctl = g[g["draw"] >= 1], g[g["draw"] == 0]
        row: dict[str, Any] = {"method": method, "layer": layer, "n_images": int(g["image_id"].nunique()),
                               "n_draws": int(len(jit)), "median_shift_px": q(jit["max_shift_px"], 0.5),
                               "median_abs_dscore": q((jit["jitter_score"] - jit["score"]).abs(), 0.5)}
        for m in METRICS_USED:
            row |= {f"{m}_median": q(jit[m], 0.5), f"{m}_q25": q(jit[m], 0.25), f"{m}_q75": q(jit[m], 0.75),
                    f"interp_{m}_median": q(jit[f"interp_{m}"], 0.5), f"control_{m}_median": q(ctl[m], 0.5)}
            if baseline is not None and len(baseline):
                b = baseline[(baseline["method"] == method) & (baseline["layer"] == layer)]
                row[f"pair_{m}_median"] = q(b[m], 0.5)
                floor, unrelated = row[f"interp_{m}_median"], row[f"pair_{m}_median"]
                row[f"moved_{m}"] = (floor - row[f"{m}_median"]) / (floor - unrelated) if floor != unrelated \
                    else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values("spearman_median", ascending=False, kind="stable").reset_index(drop=True) if len(out) \
        else out
