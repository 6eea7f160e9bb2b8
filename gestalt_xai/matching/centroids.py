"""Syndrome centroids: the mean over subjects of each subject's mean L2-normalised embedding.

``centroid(syndrome) = mean_subjects( mean_images_of_subject( f / ‖f‖ ) )`` over the gallery images of that
syndrome, from the embeddings of one model and one TTA slot, so every subject weighs the same however many photos
it has. A subject explained against a gallery it belongs to is left out of its syndrome's centroid (a patient is
never explained against a centroid that contains himself). The centroid is not renormalised: a centroid target
uses its direction. Undiagnosed images (label :data:`~gestalt_xai.data.cohort.UNDIAGNOSED`) never enter a centroid,
whatever gallery is passed: ``unknown`` is no syndrome.

One computation (:func:`_syndrome_sums`: per-subject means and their sum per syndrome) serves both views:
:class:`CentroidBank` (every slot of an ``embeddings.parquet`` table, the own subject dropped in O(D) per query;
the explain stage's centroid targets) and :func:`syndrome_centroids` (one gallery, optionally without one subject,
as a (slots × syndromes × D) array).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gestalt_xai.data.cohort import UNDIAGNOSED
from gestalt_xai.errors import InputError
from gestalt_xai.matching.distances import EmbeddingTable, ModelSlot
from gestalt_xai.matching.protocols import image_meta

__all__ = ["CentroidBank", "SyndromeCentroids", "syndrome_centroids"]


def _normalise_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


@dataclass
class _SyndromeSums:
    total: np.ndarray  # Σ over subjects of the subject mean of normalised embeddings, (D,)
    per_subject: dict[str, np.ndarray] = field(default_factory=dict)

    def centroid(self, exclude_subject: str | None = None) -> np.ndarray | None:
        """The centroid (float64) without ``exclude_subject``; ``None`` if no subject is left."""
        n = len(self.per_subject)
        total = self.total
        if exclude_subject is not None and str(exclude_subject) in self.per_subject:
            total = total - self.per_subject[str(exclude_subject)]
            n -= 1
        if n <= 0:
            return None
        return total / n


def _syndrome_sums(vectors: np.ndarray, meta: pd.DataFrame) -> dict[str, _SyndromeSums]:
    """Per syndrome, the mean L2-normalised row of each subject and their sum.

    ``vectors`` (N, D) and ``meta`` (columns ``syndrome_id``, ``subject_id``) are row-aligned.
    """
    vecs = _normalise_rows(vectors)
    g = meta.reset_index(drop=True)
    sums: dict[str, _SyndromeSums] = {}
    for syndrome, sg in g.groupby("syndrome_id", sort=True):
        subj_means = {
            str(subj): vecs[ss.index.to_numpy()].mean(0) for subj, ss in sg.groupby("subject_id", sort=True)
        }
        sums[str(syndrome)] = _SyndromeSums(total=np.sum(list(subj_means.values()), axis=0), per_subject=subj_means)
    return sums


class CentroidBank:
    """Syndrome centroids per ``(model_id, flip, gray)`` slot with leave-own-subject-out.

    :meth:`reference` drops the query's subject in O(D) from precomputed per-subject sums.

    Parameters
    ----------
    embeddings : the ``embeddings.parquet`` table (``image_id, model_id, flip, gray, embedding``).
    cohort : per-image ``image_id, subject_id, syndrome_id``.
    gallery_ids : image ids that form the gallery (``None`` = every image in ``cohort``).

    >>> emb = pd.DataFrame({"image_id": ["a", "b", "c"], "model_id": "m", "flip": False, "gray": False,
    ...                     "embedding": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]})
    >>> coh = pd.DataFrame({"image_id": ["a", "b", "c"], "subject_id": ["s1", "s2", "s3"], "syndrome_id": "X"})
    >>> bank = CentroidBank(emb, coh)
    >>> np.round(bank.reference("m", (False, False), "X", exclude_subject="s3"), 3).tolist()
    [0.5, 0.5]
    """

    def __init__(
        self, embeddings: pd.DataFrame, cohort: pd.DataFrame, gallery_ids: Iterable[str] | None = None
    ) -> None:
        need = {"image_id", "subject_id", "syndrome_id"}
        if missing := need - set(cohort.columns):
            raise InputError(f"cohort table lacks columns {sorted(missing)}")
        coh = cohort[["image_id", "subject_id", "syndrome_id"]].astype(str).drop_duplicates("image_id")
        coh = coh[coh["syndrome_id"] != UNDIAGNOSED]
        if gallery_ids is not None:
            coh = coh[coh["image_id"].isin({str(i) for i in gallery_ids})]
        table = embeddings.assign(image_id=embeddings["image_id"].astype(str)).merge(coh, on="image_id")
        #: ``(model_id, (flip, gray), syndrome_id)`` → per-subject sums
        self._sums: dict[tuple[str, tuple[bool, bool], str], _SyndromeSums] = {}
        for (model_id, flip, gray), grp in table.groupby(["model_id", "flip", "gray"], sort=True):
            slot = (bool(flip), bool(gray))
            for syndrome, sums in _syndrome_sums(np.stack(grp["embedding"].to_numpy()), grp).items():
                self._sums[(str(model_id), slot, syndrome)] = sums
        self.syndromes: list[str] = sorted({k[2] for k in self._sums})
        self.model_ids: list[str] = sorted({k[0] for k in self._sums})

    def n_subjects(self, model_id: str, slot: tuple[bool, bool], syndrome_id: str) -> int:
        """Gallery subjects of a syndrome in one ``(flip, gray)`` slot of a model."""
        sums = self._sums.get((model_id, slot, str(syndrome_id)))
        return 0 if sums is None else len(sums.per_subject)

    def reference(
        self, model_id: str, slot: tuple[bool, bool], syndrome_id: str, exclude_subject: str | None = None
    ) -> np.ndarray | None:
        """The centroid (float64, not normalised), or ``None`` if no gallery subject is left."""
        sums = self._sums.get((model_id, (bool(slot[0]), bool(slot[1])), str(syndrome_id)))
        return None if sums is None else sums.centroid(exclude_subject)

    def similarities(
        self, model_id: str, slot: tuple[bool, bool], embedding: np.ndarray, exclude_subject: str | None = None
    ) -> dict[str, float]:
        """Cosine similarity of one embedding to every syndrome's centroid (own subject excluded)."""
        f = _normalise_rows(np.asarray(embedding)[None])[0]
        out = {}
        for syn in self.syndromes:
            r = self.reference(model_id, slot, syn, exclude_subject)
            if r is not None:
                out[syn] = float(f @ _normalise_rows(r[None])[0])
        return out


@dataclass
class SyndromeCentroids:
    """Per-syndrome centroids, one per slot.

    ``vectors[s, c]`` is the centroid of ``syndromes[c]`` in slot ``slots[s]`` (float32).
    """

    syndromes: list[str]
    slots: list[ModelSlot]
    vectors: np.ndarray  # (S, C, D) float32
    n_subjects: dict[str, int]

    def get(self, syndrome_id: str, model_id: str, flip: bool = False, gray: bool = False) -> np.ndarray:
        """The (D,) centroid of one syndrome in one slot."""
        try:
            s = self.slots.index((str(model_id), bool(flip), bool(gray)))
            c = self.syndromes.index(str(syndrome_id))
        except ValueError:
            raise InputError(
                f"no centroid for syndrome {syndrome_id!r} in slot ({model_id}, flip={flip}, "
                f"gray={gray}); syndromes: {self.syndromes}, slots: {self.slots}"
            ) from None
        return self.vectors[s, c]

    def as_dict(self) -> dict[tuple[str, str, bool, bool], np.ndarray]:
        """``{(syndrome_id, model_id, flip, gray): (D,) centroid}``."""
        return {
            (syn, *slot): self.vectors[s, c]
            for s, slot in enumerate(self.slots)
            for c, syn in enumerate(self.syndromes)
        }


def syndrome_centroids(
    emb_df: pd.DataFrame | EmbeddingTable,
    cohort_images_df: pd.DataFrame,
    gallery_image_ids: Sequence[str],
    exclude_subject: str | None = None,
    models: Sequence[str] | None = None,
    tta: bool = True,
) -> SyndromeCentroids:
    """Centroid of every syndrome in the gallery: mean L2-normalised embedding, averaged per subject first.

    Parameters
    ----------
    emb_df: ``embeddings.parquet`` as a DataFrame (or an :class:`EmbeddingTable`).
    cohort_images_df: cohort image table with ``image_id``, ``subject_id``, ``syndrome_id``.
    gallery_image_ids: which images form the gallery (each must have an embedding in every selected slot).
    exclude_subject: leave this subject's images out (a test subject explained against a gallery it belongs to).
    models, tta: restrict the slots (default: every slot present).

    Returns
    -------
    :class:`SyndromeCentroids` (syndromes sorted by id; a syndrome whose only subject is excluded is dropped).
    """
    table = emb_df if isinstance(emb_df, EmbeddingTable) else EmbeddingTable.from_frame(emb_df)
    slots = table.select(models, tta)
    meta = image_meta(cohort_images_df)
    gal = meta[meta["image_id"].isin({str(i) for i in gallery_image_ids}) & (meta["syndrome_id"] != UNDIAGNOSED)]
    if exclude_subject is not None:
        gal = gal[gal["subject_id"] != str(exclude_subject)]
    gal = gal.sort_values("image_id", kind="stable")
    if gal.empty:
        raise InputError("the gallery is empty (after excluding the subject)")
    vectors = []
    for slot in slots:
        sums = _syndrome_sums(table.matrix(slot, list(gal["image_id"])), gal)
        vectors.append(np.stack([s.centroid() for s in sums.values()]).astype(np.float32))
    return SyndromeCentroids(
        syndromes=list(sums),
        slots=list(slots),
        vectors=np.stack(vectors),
        n_subjects={syn: len(s.per_subject) for syn, s in sums.items()},
    )
