"""Ground truth of a synthetic cohort: how it is stored under ``<cohort>/truth/`` and read back.

Layout::

    truth/images.parquet      one row per photo: ids, syndrome, canvas size, true 5 and 68 landmarks (photo
                              pixels, flattened x0, y0, x1, y1, …), pose, light and camera nuisance, identity summary,
                              whether the confounder mark is present
    truth/features.parquet    one row per planted feature per photo: image_id, subject_id, syndrome_id, feature,
                              hpo_id, hpo_name, region, effect, visible_in_crop, mask_bit, mask_px, crop_fraction
    truth/masks/<image_id>.png  8-bit mask image in photo space; bit ``mask_bit`` of the feature table is that
                              feature's mask, bit 6 the face (hull of the 68 landmarks), bit 7 the confounder mark
    truth/catalogue.parquet   the phenotype catalogue; truth/syndromes.json the syndrome definitions and config

``crop_fraction`` is the share of a feature's mask that lands inside the 112×112 ArcFace crop cut with the *true*
landmarks; negative controls (``visible_in_crop`` False) have it near 0. A feature's mask is its *region*: every pixel
the feature may change.

Counterfactual renderings (:mod:`~gestalt_xai.data.synthetic.counterfactuals`; by default of the test photos) lie
beside the truth, outside every cohort table, so no gallery, centroid or training set ever sees them::

    counterfactuals/counterfactuals.parquet   one row per rendering: image_id, variant, feature (feature key, "all"
                              or "mark"), change ("remove" | "add"), path (relative to the cohort folder), change_px
                              (pixels of its change mask), mask_bit (its bit in the change-mask image)
    counterfactuals/images/<image_id>/<variant>.jpg   the photo with the identical identity, pose, light, camera,
                              noise and JPEG draws and one change: ``without_<feature>`` (that planted feature removed),
                              ``without_all_features``, ``without_mark`` (marked photos) or ``with_mark`` (unmarked
                              photos of a cohort with a confounder)
    counterfactuals/change_masks/<image_id>.png   8-bit photo-space image: bit ``mask_bit`` is the variant's *change
                              mask*, the pixels it changes (|factual − counterfactual| above
                              :data:`~gestalt_xai.data.synthetic.counterfactuals.CHANGE_THRESHOLD` before sensor noise
                              and JPEG): the feature's ``mask_bit`` of ``features.parquet`` for ``without_<feature>``,
                              bit 6 for ``without_all_features``, bit 7 for the mark

A change mask lies inside the feature's region mask (the confounder mask for the mark) and is usually much smaller:
the pixels a feature actually changes, not those it may change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from gestalt_xai.errors import InputError

__all__ = ["FACE_BIT", "CONFOUNDER_BIT", "ALL_FEATURES_BIT", "COUNTERFACTUAL_COLUMNS", "COUNTERFACTUALS_DIR",
           "TruthTables", "load_truth", "load_masks", "load_counterfactuals", "load_change_masks", "encode_mask_bits",
           "pack_mask_bits", "decode_mask_bits"]

FACE_BIT = 6
CONFOUNDER_BIT = 7
MAX_FEATURE_BITS = 6
#: bit of ``without_all_features`` in a change-mask image (the mark's is :data:`CONFOUNDER_BIT`)
ALL_FEATURES_BIT = FACE_BIT
#: the counterfactuals' folder inside the cohort folder, and the columns of its table
COUNTERFACTUALS_DIR = "counterfactuals"
COUNTERFACTUAL_COLUMNS = ["image_id", "variant", "feature", "change", "path", "change_px", "mask_bit"]


@dataclass
class TruthTables:
    """The truth tables of a synthetic cohort."""

    root: Path
    images: pd.DataFrame
    features: pd.DataFrame
    catalogue: pd.DataFrame
    syndromes: dict
    #: ``counterfactuals/counterfactuals.parquet`` (empty when the cohort has none)
    counterfactuals: pd.DataFrame

    def landmarks5(self, image_id: str) -> np.ndarray:
        """True ``(5, 2)`` landmarks of one photo (pupils, nose tip, mouth corners; image-left first)."""
        row = self.images.loc[self.images["image_id"] == str(image_id)]
        if row.empty:
            raise InputError(f"image {image_id!r} is not in {self.root / 'images.parquet'}")
        return np.asarray(row.iloc[0]["landmarks5"], np.float64).reshape(5, 2)

    def landmarks68(self, image_id: str) -> np.ndarray:
        """True ``(68, 2)`` iBUG landmarks of one photo."""
        row = self.images.loc[self.images["image_id"] == str(image_id)]
        if row.empty:
            raise InputError(f"image {image_id!r} is not in {self.root / 'images.parquet'}")
        return np.asarray(row.iloc[0]["landmarks68"], np.float64).reshape(68, 2)

    def masks(self, image_id: str) -> dict[str, np.ndarray]:
        """Photo-space boolean masks of one photo: each planted feature, ``face`` and ``confounder``."""
        return load_masks(self.root.parent, image_id, self.features)

    def change_masks(self, image_id: str) -> dict[str, np.ndarray]:
        """Photo-space change masks of one photo's counterfactuals: ``{variant: bool (H, W)}``."""
        return load_change_masks(self.root.parent, image_id, self.counterfactuals)


def pack_mask_bits(layers: dict[int, np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """One ``uint8`` image of ``size`` (H, W) whose bit ``b`` is the boolean mask ``layers[b]``.

    >>> pack_mask_bits({0: np.array([[True, False]]), 7: np.array([[True, True]])}, (1, 2)).tolist()
    [[129, 128]]
    """
    img = np.zeros(size, np.uint8)
    for bit, m in layers.items():
        if not 0 <= bit < 8:
            raise ValueError(f"mask bit {bit} does not fit in 8 bits")
        img |= np.asarray(m, bool).astype(np.uint8) << bit
    return img


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_mask_bits(masks: list[np.ndarray], face: np.ndarray | None, confounder: np.ndarray | None,
                     size: tuple[int, int] | None = None) -> bytes:
    """Pack up to six feature masks (bits 0–5), the face mask (bit 6) and the confounder mask (bit 7) into one 8-bit
    PNG; counterfactual change masks use the same layout (bit 6 then holds ``without_all_features``)."""
    if len(masks) > MAX_FEATURE_BITS:
        raise ValueError(f"at most {MAX_FEATURE_BITS} feature masks fit in one mask image, got {len(masks)}")
    layers = dict(enumerate(masks))
    layers.update({b: m for b, m in ((FACE_BIT, face), (CONFOUNDER_BIT, confounder)) if m is not None})
    if size is None:
        size = next(iter(layers.values())).shape[:2]
    return _png(pack_mask_bits(layers, size))


def decode_mask_bits(path: str | Path) -> np.ndarray:
    """Read a packed mask PNG as a ``uint8`` array."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"{path}: cannot read the mask image")
    return img


def load_masks(cohort_dir: str | Path, image_id: str, features: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
    """Boolean photo-space masks of one photo: ``{feature: mask, "face": …, "confounder": …}``.

    Parameters
    ----------
    cohort_dir:
        The cohort folder (``<run>/cohort``) holding ``truth/``.
    features:
        The feature table (read from ``truth/features.parquet`` when omitted).
    """
    root = Path(cohort_dir) / "truth"
    bits = decode_mask_bits(root / "masks" / f"{image_id}.png")
    if features is None:
        features = pd.read_parquet(root / "features.parquet")
    out: dict[str, np.ndarray] = {}
    for row in features.loc[features["image_id"] == str(image_id)].itertuples():
        out[str(row.feature)] = (bits >> int(row.mask_bit)) & 1 == 1
    out["face"] = (bits >> FACE_BIT) & 1 == 1
    out["confounder"] = (bits >> CONFOUNDER_BIT) & 1 == 1
    return out


def load_counterfactuals(cohort_dir: str | Path) -> pd.DataFrame:
    """The counterfactual table of a cohort folder (``counterfactuals/counterfactuals.parquet``; empty with its
    columns when the cohort has no counterfactuals)."""
    path = Path(cohort_dir) / COUNTERFACTUALS_DIR / "counterfactuals.parquet"
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("change_px", "mask_bit") else object)
                             for c in COUNTERFACTUAL_COLUMNS})
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise InputError(f"{path}: unreadable counterfactual table ({exc})") from None
    missing = set(COUNTERFACTUAL_COLUMNS) - set(table.columns)
    if missing:
        raise InputError(f"{path}: missing columns {', '.join(sorted(missing))}")
    return table.astype({"image_id": str})


def load_change_masks(cohort_dir: str | Path, image_id: str,
                      table: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
    """Photo-space change masks of one photo's counterfactuals, ``{variant: bool (H, W)}`` (module docstring)."""
    table = load_counterfactuals(cohort_dir) if table is None else table
    rows = table[table["image_id"] == str(image_id)]
    if rows.empty:
        return {}
    bits = decode_mask_bits(Path(cohort_dir) / COUNTERFACTUALS_DIR / "change_masks" / f"{image_id}.png")
    return {str(r.variant): (bits >> int(r.mask_bit)) & 1 == 1 for r in rows.itertuples()}


def load_truth(path: str | Path) -> TruthTables:
    """Read the truth of a synthetic cohort from a run folder, its ``cohort/`` folder or the ``truth/`` folder."""
    p = Path(path)
    for cand in (p / "cohort" / "truth", p / "truth", p):
        if (cand / "images.parquet").exists() and (cand / "features.parquet").exists():
            return TruthTables(root=cand, images=pd.read_parquet(cand / "images.parquet"),
                               features=pd.read_parquet(cand / "features.parquet"),
                               catalogue=pd.read_parquet(cand / "catalogue.parquet"),
                               syndromes=json.loads((cand / "syndromes.json").read_text(encoding="utf-8")),
                               counterfactuals=load_counterfactuals(cand.parent))
    raise InputError(f"no synthetic-cohort truth under {p} (expected cohort/truth/images.parquet); "
                     "run `gestalt-xai synth` first")
