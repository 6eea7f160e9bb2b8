"""Similarity maps: both directions of a pair, and a patient against a syndrome (centroid and nearest gallery images).

A pair target ``pair:<B>`` stored with image ``A`` explains ``cos(f_A, f_B)`` as a function of **A's pixels**, with
B's embedding as the fixed reference: the map lives on A's face. The other direction, stored with image ``B`` and
target ``pair:<A>``, lives on B's face. :func:`pair_maps` returns them as ``(map on A, map on B)`` and checks the
recorded reference (``target_detail["partner"]``) against the one asked for, so swapping the two directions is an
error, not a silently wrong figure.

For a patient and a syndrome, :func:`patient_syndrome_maps` gathers the map towards the syndrome centroid
(``centroid:<S>``) and the maps towards the syndrome's nearest gallery images (``pair:<g>`` rows whose detail names
syndrome ``S``, nearest first), with each gallery image's reverse map (``g`` explained against the patient) when
stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.attribution.targets import TargetKey, split_targets
from gestalt_xai.errors import InputError
from gestalt_xai.store import MapKey

__all__ = ["PairMaps", "pair_maps", "pair_table", "patient_syndrome_maps", "PatientSyndromeMaps", "pair_target",
           "partner_of"]


def pair_target(reference_image: str) -> str:
    """The stored target string of a map explained against ``reference_image``: ``pair:<image>``."""
    return str(TargetKey("pair", str(reference_image)))


def partner_of(target: str | TargetKey) -> str | None:
    """The reference image of a ``pair:<image>`` target (``None`` for other targets)."""
    key = TargetKey.parse(target)
    return key.ref if key.kind == "pair" else None


def _pair_rows(index: pd.DataFrame) -> pd.DataFrame:
    """Rows of pair targets, with their partner image in ``reference``."""
    parts = split_targets(index["target"])
    return index[parts["target_kind"] == "pair"].assign(reference=parts["target_ref"])


def _detail(row: dict[str, Any] | pd.Series) -> dict[str, Any]:
    raw = row.get("target_detail", "") if hasattr(row, "get") else ""
    if not raw or not isinstance(raw, str):
        return {}
    try:
        out = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return out if isinstance(out, dict) else {}


@dataclass
class PairMaps:
    """The two directions of a pair: ``map_a`` on A's face (reference B) and ``map_b`` on B's face (reference A)."""

    image_a: str
    image_b: str
    map_a: np.ndarray | None
    map_b: np.ndarray | None
    score_a: float = float("nan")  # cos(f_A, f_B) as explained on A (its stored target value)
    score_b: float = float("nan")


def _load_checked(store: Any, image: str, reference: str, model_id: str, method: str,
                  layer: str) -> tuple[np.ndarray | None, float]:
    rows = store.index(image_id=image, model_id=model_id, target=pair_target(reference), method=method,
                       layer=layer)
    if not len(rows):
        return None, float("nan")
    row = rows.iloc[0]
    partner = _detail(row).get("partner")
    if partner is not None and str(partner) != str(reference):
        raise InputError(f"map of {image} with target pair:{reference} records partner {partner!r}: the map store "
                         "is inconsistent (a pair map stored under the wrong reference)")
    m = store.load(MapKey(image, model_id, pair_target(reference), method, layer))
    return m, float(row.get("target_value", float("nan")))


def pair_maps(store: Any, image_a: str, image_b: str, *, model_id: str, method: str, layer: str = "") -> PairMaps:
    """Both directions of the pair ``(A, B)``: A's map towards B (on A) and B's map towards A (on B).

    ``pair_maps(store, B, A)`` returns the same two maps with the roles swapped. A missing direction is ``None``.
    """
    a, b = str(image_a), str(image_b)
    map_a, score_a = _load_checked(store, a, b, model_id, method, layer)
    map_b, score_b = _load_checked(store, b, a, model_id, method, layer)
    return PairMaps(a, b, map_a, map_b, score_a, score_b)


def pair_table(index: pd.DataFrame, images: pd.DataFrame | None = None) -> pd.DataFrame:
    """Unordered pairs with pair maps, one row per ``(pair, model, method, layer)``.

    Columns ``image_a, image_b`` (``a < b``), ``model_id, method, layer``, ``has_a`` (A explained towards B),
    ``has_b``, ``score_a``, ``score_b`` and, when ``images`` is given, ``syndrome_a, syndrome_b``.
    """
    pairs = _pair_rows(index)
    cols = ["image_a", "image_b", "model_id", "method", "layer", "has_a", "has_b", "score_a", "score_b"]
    if not len(pairs):
        return pd.DataFrame(columns=cols)
    pairs["image_id"] = pairs["image_id"].astype(str)
    pairs["image_a"] = np.where(pairs["image_id"] < pairs["reference"], pairs["image_id"], pairs["reference"])
    pairs["image_b"] = np.where(pairs["image_id"] < pairs["reference"], pairs["reference"], pairs["image_id"])
    pairs["is_a"] = pairs["image_id"] == pairs["image_a"]
    keys = ["image_a", "image_b", "model_id", "method", "layer"]
    a = pairs[pairs["is_a"]][[*keys, "target_value"]].rename(columns={"target_value": "score_a"})
    b = pairs[~pairs["is_a"]][[*keys, "target_value"]].rename(columns={"target_value": "score_b"})
    out = a.merge(b, on=keys, how="outer")
    out["has_a"] = out["score_a"].notna()
    out["has_b"] = out["score_b"].notna()
    out = out[cols].sort_values(keys, kind="stable").reset_index(drop=True)
    if images is not None:
        syn = images.assign(image_id=images["image_id"].astype(str)).set_index("image_id")["syndrome_id"].astype(str)
        out["syndrome_a"] = out["image_a"].map(syn)
        out["syndrome_b"] = out["image_b"].map(syn)
    return out


@dataclass
class PatientSyndromeMaps:
    """A patient's maps towards a syndrome: the centroid map and maps towards nearest gallery images."""

    image_id: str
    syndrome_id: str
    centroid: np.ndarray | None
    centroid_score: float
    #: (gallery image, distance, map on the patient towards it, map on the gallery image towards the patient)
    neighbours: list[tuple[str, float, np.ndarray, np.ndarray | None]] = field(default_factory=list)


def patient_syndrome_maps(store: Any, image_id: str, syndrome_id: str, *, model_id: str, method: str,
                          layer: str = "", k: int = 3) -> PatientSyndromeMaps:
    """The maps of ``image_id`` towards syndrome ``syndrome_id`` (module docstring); nearest ``k`` gallery images."""
    image_id, syndrome_id = str(image_id), str(syndrome_id)
    centroid_key = MapKey(image_id, model_id, str(TargetKey("centroid", syndrome_id)), method, layer)
    rows = store.index(**centroid_key._asdict())
    centroid, score = None, float("nan")
    if len(rows):
        centroid = store.load(centroid_key)
        score = float(rows.iloc[0]["target_value"])
    pairs = _pair_rows(store.index(image_id=image_id, model_id=model_id, method=method, layer=layer))
    found = []
    for row in pairs.to_dict("records"):
        d = _detail(row)
        if str(d.get("syndrome_id", "")) != syndrome_id:
            continue
        found.append((float(d.get("distance", np.nan)), str(row["reference"])))
    found.sort(key=lambda t: (np.inf if np.isnan(t[0]) else t[0], t[1]))
    out = PatientSyndromeMaps(image_id, syndrome_id, centroid, score)
    for dist, gallery in found[:k]:
        both = pair_maps(store, image_id, gallery, model_id=model_id, method=method, layer=layer)
        if both.map_a is not None:
            out.neighbours.append((gallery, dist, both.map_a, both.map_b))
    return out
