"""Fixations in the model's space: into the aligned crop, filtered, and turned into fixation density maps.

The model sees a 112×112 crop cut from the photo by a similarity transform (``aligned/alignment.parquet``'s 2×3
``matrix``, photo → crop). A fixation at photo pixel ``(x, y)`` lands at ``M · (x, y, 1)`` in the crop
(:func:`to_crop`); ears and most of the forehead fall outside it, so every analysis reports the off-crop share per
observer and image (:func:`offcrop_shares`) and uses the in-crop fixations only.

**Fixation density** (:func:`fixation_density`): a sum of isotropic Gaussians, one per fixation, of standard
deviation ``σ = sigma_deg ×`` the fixation's crop pixels per degree of visual angle (≈ 1° models the fovea and the
tracker's error; Le Meur & Baccino, Behav. Res. Methods 2013), evaluated exactly on the crop grid (separable:
``Σ_i w_i g_y,i ⊗ g_x,i``) and normalised to sum to 1. Weights are 1 per fixation (``count``) or its duration
(``duration``). Crop pixels per degree = the display's photo pixels per degree × the alignment's scale
(``sqrt |det M|``); where the data carry no display geometry a fixed ``fallback_sigma_px`` is used (reported).

**Filters** (:func:`filter_fixations`, documented in the stage's options): drop each trial's first fixation (it
lands where the previous fixation cross was, not where the observer chose to look), fixations shorter than
``min_duration_ms`` (60–100 ms: Holmqvist et al., *Eye Tracking*, OUP 2011) and, optionally, longer than
``max_duration_ms``. Every dropped fixation is counted by reason.

**Baselines** in aligned space (Kümmerer et al., ECCV 2018; Judd et al., MIT tech. report 2012):

* :func:`face_prior` — the mean fixation density of the *other* images (each image's all-observer density), so a
  face-shaped blob gets its due credit and no more;
* :func:`centre_bias` — an isotropic Gaussian at the crop centre;
* :func:`loo_densities` — the leave-one-observer-out density of an image: the inter-observer ceiling a map can reach
  for that observer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from gestalt_xai.faces.align import CROP_SIZE, transform_points

__all__ = ["to_crop", "offcrop_shares", "filter_fixations", "gaussian_density", "fixation_density", "face_prior",
           "centre_bias", "observer_densities", "loo_densities", "crop_scale"]


def crop_scale(matrix: np.ndarray) -> float:
    """Crop pixels per photo pixel of a 2×3 similarity transform: ``sqrt |det M[:, :2]|``."""
    m = np.asarray(matrix, np.float64).reshape(2, 3)
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def to_crop(fixations: pd.DataFrame, matrices: Mapping[str, np.ndarray], size: int = CROP_SIZE) -> pd.DataFrame:
    """The fixations with their crop coordinates: ``cx, cy`` (crop pixels, floats), ``in_crop`` (inside the
    ``size × size`` crop) and ``crop_px_per_degree`` (NaN where the display geometry is unknown).

    ``matrices`` maps image ids to their photo → crop matrices; fixations on an image without one (not aligned) get
    NaN coordinates and ``in_crop`` False, and are reported by the caller.

    >>> fix = pd.DataFrame({"image_id": ["a", "a"], "x": [10.0, 500.0], "y": [20.0, 20.0],
    ...                     "photo_px_per_degree": [40.0, 40.0]})
    >>> M = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])
    >>> to_crop(fix, {"a": M})[["cx", "cy", "in_crop", "crop_px_per_degree"]].values.tolist()
    [[5.0, 10.0, True, 20.0], [250.0, 10.0, False, 20.0]]
    """
    out = fixations.copy()
    cx = np.full(len(out), np.nan)
    cy = np.full(len(out), np.nan)
    scale = np.full(len(out), np.nan)
    ids = out["image_id"].astype(str).to_numpy()
    for image_id in np.unique(ids):
        m = matrices.get(image_id)
        if m is None:
            continue
        rows = ids == image_id
        pts = transform_points(out.loc[rows, ["x", "y"]].to_numpy(np.float64), np.asarray(m).reshape(2, 3))
        cx[rows], cy[rows] = pts[:, 0], pts[:, 1]
        scale[rows] = crop_scale(m)
    out["cx"], out["cy"] = cx, cy
    # a pixel's centre is at its integer coordinate: a fixation belongs to pixel (round x, round y) of the grid
    out["in_crop"] = (cx >= -0.5) & (cx < size - 0.5) & (cy >= -0.5) & (cy < size - 0.5)
    ppd = out["photo_px_per_degree"].to_numpy(np.float64) if "photo_px_per_degree" in out else np.nan
    out["crop_px_per_degree"] = ppd * scale
    return out


def offcrop_shares(fixations: pd.DataFrame, by: tuple[str, ...] = ("participant", "image_id")) -> pd.DataFrame:
    """Per ``by`` group: fixations, those outside the crop, their share, and the share of dwell time outside it."""
    f = fixations.assign(off=~fixations["in_crop"].astype(bool),
                         off_ms=np.where(fixations["in_crop"].astype(bool), 0.0, fixations["duration_ms"]))
    g = f.groupby(list(by), sort=True)
    out = g.agg(fixations=("off", "size"), off_crop=("off", "sum"), dwell_ms=("duration_ms", "sum"),
                off_crop_ms=("off_ms", "sum")).reset_index()
    out["off_crop_share"] = out["off_crop"] / out["fixations"]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["off_crop_dwell_share"] = out["off_crop_ms"] / out["dwell_ms"]
    return out


def filter_fixations(fixations: pd.DataFrame, *, drop_first: bool = True, min_duration_ms: float = 80.0,
                     max_duration_ms: float | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """The fixations kept, and how many each rule dropped (``first``, ``short``, ``long``; a fixation is counted
    under the first rule that drops it).

    >>> fix = pd.DataFrame({"fixation": [0, 1, 2, 3], "duration_ms": [300.0, 50.0, 200.0, 5000.0]})
    >>> kept, dropped = filter_fixations(fix, max_duration_ms=2000)
    >>> kept["fixation"].tolist(), dropped
    ([2], {'first': 1, 'short': 1, 'long': 1})
    """
    first = fixations["fixation"].to_numpy() == 0 if drop_first else np.zeros(len(fixations), bool)
    dur = fixations["duration_ms"].to_numpy(np.float64)
    short = ~first & (dur < min_duration_ms)
    long = ~first & ~short & (dur > max_duration_ms) if max_duration_ms is not None else np.zeros(len(dur), bool)
    keep = ~(first | short | long)
    return (fixations[keep].reset_index(drop=True),
            {"first": int(first.sum()), "short": int(short.sum()), "long": int(long.sum())})


def gaussian_density(xs: np.ndarray, ys: np.ndarray, sigma: np.ndarray | float, weights: np.ndarray | None = None,
                     size: int = CROP_SIZE, normalise: bool = True) -> np.ndarray | None:
    """``Σ_i w_i N((x, y); (xs_i, ys_i), σ_i² I)`` on the ``size × size`` pixel grid (pixel centres at integer
    coordinates), normalised to sum to 1 (``normalise``; else the plain sum, for adding up); None without fixations
    (or, normalised, without mass on the grid).

    >>> d = gaussian_density(np.array([55.0]), np.array([40.0]), 3.0)
    >>> round(float(d.sum()), 6), np.unravel_index(d.argmax(), d.shape)
    (1.0, (np.int64(40), np.int64(55)))
    """
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if not len(xs):
        return None
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), xs.shape)
    w = np.ones_like(xs) if weights is None else np.asarray(weights, np.float64)
    grid = np.arange(size, dtype=np.float64)
    gx = np.exp(-0.5 * ((grid[None, :] - xs[:, None]) / sigma[:, None]) ** 2)
    gy = np.exp(-0.5 * ((grid[None, :] - ys[:, None]) / sigma[:, None]) ** 2)
    # the 2-D Gaussian's normalisation (2πσ²)⁻¹ matters when σ differs between fixations
    dens = (gy * (w / (2 * np.pi * sigma**2))[:, None]).T @ gx
    if not normalise:
        return dens
    total = dens.sum()
    return dens / total if total > 0 else None


def fixation_density(fixations: pd.DataFrame, *, sigma_deg: float = 1.0, fallback_sigma_px: float = 6.0,
                     weight: str = "count", size: int = CROP_SIZE, normalise: bool = True) -> np.ndarray | None:
    """The fixation density of the in-crop fixations of ``fixations`` (crop coordinates from :func:`to_crop`): σ
    per fixation from its display geometry (``sigma_deg`` degrees), else ``fallback_sigma_px`` crop pixels;
    weighted by ``count`` or ``duration``; ``normalise`` as :func:`gaussian_density`."""
    f = fixations[fixations["in_crop"].astype(bool)]
    if not len(f):
        return None
    sigma = (f["crop_px_per_degree"].to_numpy(np.float64) * sigma_deg)
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, fallback_sigma_px)
    if weight not in ("count", "duration"):
        raise ValueError(f"weight must be 'count' or 'duration', got {weight!r}")
    w = f["duration_ms"].to_numpy(np.float64) if weight == "duration" else None
    return gaussian_density(f["cx"].to_numpy(), f["cy"].to_numpy(), sigma, w, size, normalise)


def face_prior(densities: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image, the mean of the *other* images' fixation densities (leave-one-image-out face prior); an image is
    left out when no other image has a density.

    >>> d = {"a": np.array([[1.0, 0.0]]), "b": np.array([[0.0, 1.0]]), "c": np.array([[0.5, 0.5]])}
    >>> face_prior(d)["a"].tolist()
    [[0.25, 0.75]]
    """
    ids = sorted(densities)
    if len(ids) < 2:
        return {}
    # summed afresh per image (not total − own, whose rounding leaves tiny negative values where a density is 0)
    return {i: np.sum([densities[j] for j in ids if j != i], axis=0) / (len(ids) - 1) for i in ids}


def centre_bias(size: int = CROP_SIZE, sigma_fraction: float = 0.25) -> np.ndarray:
    """An isotropic Gaussian density at the crop centre, σ = ``sigma_fraction × size``."""
    c = (size - 1) / 2
    out = gaussian_density(np.array([c]), np.array([c]), sigma_fraction * size, size=size)
    assert out is not None
    return out


def observer_densities(fixations: pd.DataFrame, observer_col: str = "participant", **density_kw: object
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """For one image's fixations: per observer, ``(own density, leave-one-observer-out density)`` — the other
    observers' fixations together, the inter-observer ceiling (Wilming et al., PLoS ONE 2011). Each observer's
    Gaussians are summed once and the others' sums added (not all − own, whose rounding leaves tiny negative values
    where a density is 0). An observer alone on the image gets no leave-one-out density."""
    sums = {}
    for obs, part in fixations.groupby(fixations[observer_col].astype(str), sort=True):
        d = fixation_density(part, normalise=False, **density_kw)  # type: ignore[arg-type]
        if d is not None and d.sum() > 0:
            sums[str(obs)] = d
    own = {o: d / d.sum() for o, d in sums.items()}
    loo = {}
    for obs in sums:
        others = [sums[o] for o in sums if o != obs]
        total = np.sum(others, axis=0) if others else None
        if total is not None and total.sum() > 0:
            loo[obs] = total / total.sum()
    return own, loo


def loo_densities(fixations: pd.DataFrame, observer_col: str = "participant", **density_kw: object
                  ) -> dict[str, np.ndarray]:
    """Per observer, the leave-one-observer-out density of one image (:func:`observer_densities`)."""
    return observer_densities(fixations, observer_col, **density_kw)[1]
