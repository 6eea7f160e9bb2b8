"""Distances between embeddings, and ``embeddings.parquet`` as per-slot matrices.

GestaltMatcher-Arc (Hustinx et al., WACV 2023) compares embeddings (one per model × TTA slot) slot by slot with the
cosine distance and averages the slot distance matrices (never the embeddings): :func:`cosine_distances`,
:func:`slotwise_distances` (pure NumPy on float64). :class:`EmbeddingTable` holds the embeddings of one slot
``(model_id, flip, gray)`` (:data:`ModelSlot`) as one matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.errors import InputError

__all__ = ["SLOT_COLUMNS", "EmbeddingTable", "ModelSlot", "cosine_distances", "slotwise_distances"]

#: the columns that identify one TTA slot of one model in ``embeddings.parquet``.
SLOT_COLUMNS: tuple[str, str, str] = ("model_id", "flip", "gray")
#: one TTA slot of one model: ``(model_id, flip, gray)``
ModelSlot = tuple[str, bool, bool]


def cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine distance ``1 − a·b / (‖a‖‖b‖)`` between every row of ``a`` and every row of ``b`` (float64).

    Same values as ``sklearn.metrics.pairwise_distances(a, b, "cosine")`` (which GM-Arc uses), clipped to [0,
    2].

    Parameters
    ----------
    a: (N, D) array.
    b: (M, D) array.

    Returns
    -------
    (N, M) float64 array.

    Examples
    --------
    >>> cosine_distances(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])).round(6)
    array([[0., 1., 2.]])
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"cosine_distances expects (N, D) and (M, D) arrays, got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    if (na == 0).any() or (nb == 0).any():
        raise InputError("cosine distance is undefined for an all-zero embedding")
    sim = (a / na) @ (b / nb).T
    return np.clip(1.0 - sim, 0.0, 2.0)


def slotwise_distances(test: Sequence[np.ndarray], gallery: Sequence[np.ndarray]) -> np.ndarray:
    """Average over slots of the cosine distances of slot ``i`` of the test with slot ``i`` of the gallery.

    This is GM-Arc's ensemble + TTA rule: 3 models × {original, hflip} × {colour, gray} give 12 distance
    matrices that are averaged (never the embeddings). Slots may differ in dimension.

    Parameters
    ----------
    test: S arrays of shape (N, D_s), one per slot.
    gallery: S arrays of shape (M, D_s), in the same slot order.

    Returns
    -------
    (N, M) float64 array.

    Examples
    --------
    >>> t = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]
    >>> g = [np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]])]
    >>> slotwise_distances(t, g)
    array([[0.5]])
    """
    if len(test) != len(gallery) or len(test) == 0:
        raise InputError(
            f"slot-wise distances need the same non-zero number of slots, got {len(test)} and {len(gallery)}"
        )
    total = None
    for t, g in zip(test, gallery, strict=True):
        d = cosine_distances(t, g)
        total = d if total is None else total + d
    assert total is not None
    return total / len(test)


def _as_matrix(values: Iterable[Any]) -> np.ndarray:
    rows = [np.asarray(v, dtype=np.float32) for v in values]
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(rows)


@dataclass
class EmbeddingTable:
    """``embeddings.parquet`` held as one (N, D) float32 matrix per slot ``(model_id, flip, gray)``.

    Build with :meth:`from_frame`; :meth:`matrix` returns a slot's rows for given image ids in that order.
    """

    slots: list[ModelSlot]
    image_ids: dict[ModelSlot, np.ndarray]
    vectors: dict[ModelSlot, np.ndarray]
    _index: dict[ModelSlot, dict[str, int]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> EmbeddingTable:
        """Index a DataFrame with the ``embeddings.parquet`` columns."""
        missing = {"image_id", *SLOT_COLUMNS, "embedding"} - set(df.columns)
        if missing:
            raise InputError(f"embeddings table lacks columns {sorted(missing)}")
        slots: list[ModelSlot] = []
        ids: dict[ModelSlot, np.ndarray] = {}
        vecs: dict[ModelSlot, np.ndarray] = {}
        for key, part in df.groupby(list(SLOT_COLUMNS), sort=True):
            slot = (str(key[0]), bool(key[1]), bool(key[2]))
            part = part.sort_values("image_id", kind="stable")
            slots.append(slot)
            ids[slot] = part["image_id"].astype(str).to_numpy(dtype=object)
            vecs[slot] = _as_matrix(part["embedding"])
        table = cls(slots=slots, image_ids=ids, vectors=vecs)
        table._index = {s: {i: n for n, i in enumerate(ids[s])} for s in slots}
        return table

    def select(self, models: Sequence[str] | None = None, tta: bool = True) -> list[ModelSlot]:
        """Slots of ``models`` (all when None); only the original slot per model unless ``tta``."""
        out = [s for s in self.slots if (models is None or s[0] in models) and (tta or (not s[1] and not s[2]))]
        if models is not None:
            absent = sorted(set(models) - {s[0] for s in self.slots})
            if absent:
                raise InputError(
                    f"no embeddings for model(s) {absent}; embeddings exist for {sorted({s[0] for s in self.slots})}"
                )
        if not out:
            raise InputError("no embedding slots selected")
        return out

    def matrix(self, slot: ModelSlot, image_ids: Sequence[str]) -> np.ndarray:
        """(len(image_ids), D) float32 rows of ``slot`` (raises naming the missing images)."""
        index = self._index[slot]
        rows = [index.get(str(i), -1) for i in image_ids]
        if any(r < 0 for r in rows):
            missing = [str(i) for i, r in zip(image_ids, rows, strict=True) if r < 0]
            raise InputError(
                f"no embedding for {len(missing)} image(s) in slot {slot}, e.g. {missing[:5]}; "
                "run `gestalt-xai embed` first (failed images are listed in errors.parquet)"
            )
        return self.vectors[slot][np.asarray(rows, dtype=np.int64)] if rows else self.vectors[slot][:0]

    def has(self, image_ids: Sequence[str], slots: Sequence[ModelSlot]) -> np.ndarray:
        """Boolean mask: which ``image_ids`` have an embedding in every slot of ``slots``."""
        ok = np.ones(len(image_ids), dtype=bool)
        for s in slots:
            index = self._index[s]
            ok &= np.array([str(i) in index for i in image_ids], dtype=bool)
        return ok
