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
landmarks; negative controls (``visible_in_crop`` False) have it near 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from gestalt_xai.errors import InputError

__all__ = ["FACE_BIT", "CONFOUNDER_BIT", "TruthTables", "load_truth", "load_masks", "encode_mask_bits",
           "decode_mask_bits"]

FACE_BIT = 6
CONFOUNDER_BIT = 7
MAX_FEATURE_BITS = 6


@dataclass
class TruthTables:
    """The truth tables of a synthetic cohort."""

    root: Path
    images: pd.DataFrame
    features: pd.DataFrame
    catalogue: pd.DataFrame
    syndromes: dict

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


def encode_mask_bits(masks: list[np.ndarray], face: np.ndarray, confounder: np.ndarray | None) -> bytes:
    """Pack up to six feature masks, the face mask and the confounder mask into one 8-bit PNG."""
    if len(masks) > MAX_FEATURE_BITS:
        raise ValueError(f"at most {MAX_FEATURE_BITS} feature masks fit in one mask image, got {len(masks)}")
    img = face.astype(np.uint8) << FACE_BIT
    for bit, m in enumerate(masks):
        img |= m.astype(np.uint8) << bit
    if confounder is not None:
        img |= confounder.astype(np.uint8) << CONFOUNDER_BIT
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


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


def load_truth(path: str | Path) -> TruthTables:
    """Read the truth of a synthetic cohort from a run folder, its ``cohort/`` folder or the ``truth/`` folder."""
    p = Path(path)
    for cand in (p / "cohort" / "truth", p / "truth", p):
        if (cand / "images.parquet").exists() and (cand / "features.parquet").exists():
            return TruthTables(root=cand, images=pd.read_parquet(cand / "images.parquet"),
                               features=pd.read_parquet(cand / "features.parquet"),
                               catalogue=pd.read_parquet(cand / "catalogue.parquet"),
                               syndromes=json.loads((cand / "syndromes.json").read_text(encoding="utf-8")))
    raise InputError(f"no synthetic-cohort truth under {p} (expected cohort/truth/images.parquet); "
                     "run `gestalt-xai synth` first")
