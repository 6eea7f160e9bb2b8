"""Clinical Face Phenotype Space: gallery, distances, syndrome ranking, top-k and the GM-Arc protocols.

GestaltMatcher-Arc (Hustinx et al., WACV 2023) matches a test photo against a *gallery* of photos with known
disorders: embeddings (one per model × TTA slot) are compared slot by slot with the cosine distance, the slot
distance matrices are averaged, gallery images are sorted by that distance and each disorder is kept at its
first (nearest) occurrence. A disorder's *rank* is its position in that de-duplicated list. Top-k (k = 1, 5,
10, 30) is averaged per disorder (macro), not per image (REFERENCE §2).

Layout of the functions, from arrays to a run:

* :func:`cosine_distances`, :func:`slotwise_distances` — pure NumPy on float64.
* :func:`syndrome_distances`, :func:`syndrome_ranks`, :func:`ranked_syndromes`, :func:`topk_accuracy` —
  ranking.
* :class:`EmbeddingTable` — ``embeddings.parquet`` as per-slot matrices; :func:`load_embeddings`.
* :func:`frequent_protocol`, :func:`rare_protocol`, :func:`unified_protocols` — which images are test and
  gallery.
* :func:`evaluate_protocol` — ranks per test image + macro top-k per split; :func:`summary_table`.
* :func:`syndrome_centroids` — mean L2-normalised gallery embedding per syndrome (centroid attribution
  targets).
* :func:`read_gmarc_encodings`, :func:`compare_embeddings` — GM-Arc gallery encodings (a pickle: opt-in only).
* :class:`MatchConfig` + :func:`match_stage` — the ``gestalt-xai match`` stage (writes ``run/matching/``).

**Ties.** GM-Arc sorts with ``np.argsort`` (quicksort, not stable), so tied distances come out in an arbitrary
order. Here the ranking is a function of each syndrome's nearest distance only, and ties are resolved
deterministically, independent of gallery order: ``ties="id"`` (default) orders tied syndromes by syndrome id
(string order), ``"pessimistic"`` puts the true syndrome after every syndrome tied with it, ``"optimistic"``
before them. Exact float equality is used; duplicated photos give identical distances, so their ties are real.

**A test syndrome absent from the gallery** (it has no gallery image) has no rank (``NaN`` / null in tables).
It counts as a miss at every k and stays in the macro average, since the gallery could not have found it; such
test images are flagged with ``in_gallery = False`` and counted in the summary's ``n_test_absent``.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from gestalt_xai.config import StageConfig
from gestalt_xai.errors import ConfigError, InputError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KS",
    "SLOT_COLUMNS",
    "EmbeddingTable",
    "MatchConfig",
    "ProtocolSplit",
    "Protocol",
    "SyndromeCentroids",
    "compare_embeddings",
    "cosine_distances",
    "evaluate_protocol",
    "cohort_protocols",
    "frequent_protocol",
    "load_embeddings",
    "match_stage",
    "print_summary",
    "rank_table",
    "ranked_syndromes",
    "rare_protocol",
    "read_gmarc_encodings",
    "slotwise_distances",
    "summary_table",
    "syndrome_centroids",
    "syndrome_distances",
    "syndrome_ranks",
    "topk_accuracy",
    "unified_protocols",
]

#: GM-Arc's top-k cut-offs.
DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 30)
#: the columns that identify one TTA slot of one model in ``embeddings.parquet``.
SLOT_COLUMNS: tuple[str, str, str] = ("model_id", "flip", "gray")
#: how many ranked syndromes each row of the rank table keeps.
TOP_LIST = 30

Ties = Literal["id", "pessimistic", "optimistic"]
Slot = tuple[str, bool, bool]


# -------------------------------------------------------------------------------------------------- distances
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


# ---------------------------------------------------------------------------------------------------- ranking
def syndrome_distances(distances: np.ndarray, gallery_syndromes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each syndrome's nearest-image distance: the de-duplication step of GM-Arc's ranking.

    Parameters
    ----------
    distances: (N, M) distances test → gallery.
    gallery_syndromes: M syndrome ids of the gallery images.

    Returns
    -------
    syndromes: (C,) sorted unique syndrome ids of the gallery.
    nearest: (N, C) distance of each test image to the nearest gallery image of each syndrome.
    """
    distances = np.asarray(distances, dtype=np.float64)
    labels = np.asarray([str(s) for s in gallery_syndromes], dtype=object)
    if distances.ndim != 2 or distances.shape[1] != len(labels):
        raise InputError(f"distances of shape {distances.shape} do not match {len(labels)} gallery syndromes")
    syndromes, inverse = np.unique(labels.astype(str), return_inverse=True)
    nearest = np.full((distances.shape[0], len(syndromes)), np.inf)
    for c in range(len(syndromes)):
        nearest[:, c] = distances[:, inverse == c].min(axis=1) if distances.shape[0] else np.inf
    return syndromes.astype(object), nearest


def syndrome_ranks(
    distances: np.ndarray, gallery_syndromes: Sequence[str], test_syndromes: Sequence[str], ties: Ties = "id"
) -> np.ndarray:
    """1-based rank of each test image's true syndrome among the gallery's syndromes (``NaN`` if absent).

    The rank is the position of the true syndrome in the list of syndromes ordered by their nearest gallery
    image (GM-Arc's de-duplicated list). See the module docstring for ``ties``.

    Examples
    --------
    Two gallery images of ``A`` (one near), one of ``B`` tied with the near ``A``, one of ``C``:

    >>> d = np.array([[0.1, 0.9, 0.1, 0.5]])
    >>> g = ["A", "A", "B", "C"]
    >>> syndrome_ranks(d, g, ["B"]), syndrome_ranks(d, g, ["B"], ties="optimistic")
    (array([2.]), array([1.]))
    >>> syndrome_ranks(d, g, ["Z"])
    array([nan])
    """
    if ties not in ("id", "pessimistic", "optimistic"):
        raise ConfigError(f"ties must be 'id', 'pessimistic' or 'optimistic', got {ties!r}")
    syndromes, nearest = syndrome_distances(distances, gallery_syndromes)
    test = np.asarray([str(s) for s in test_syndromes], dtype=object)
    if len(test) != nearest.shape[0]:
        raise InputError(f"{len(test)} test syndromes for {nearest.shape[0]} rows of distances")
    col = {s: i for i, s in enumerate(syndromes)}
    ranks = np.full(len(test), np.nan)
    for i, s in enumerate(test):
        c = col.get(s)
        if c is None:
            continue
        row = nearest[i]
        own = row[c]
        closer = int((row < own).sum())
        tied = row == own
        if ties == "id":
            n_tied_before = int(tied[:c].sum())  # syndromes are sorted, so columns before c have smaller ids
        elif ties == "pessimistic":
            n_tied_before = int(tied.sum()) - 1
        else:
            n_tied_before = 0
        ranks[i] = 1 + closer + n_tied_before
    return ranks


def ranked_syndromes(
    distances: np.ndarray, gallery_syndromes: Sequence[str], n: int | None = TOP_LIST
) -> tuple[list[list[str]], list[list[float]]]:
    """The de-duplicated syndrome list per test image (nearest first; ties by syndrome id), cut to ``n``.

    Returns the syndrome ids and their nearest distances, one list per test image. Position ``r − 1`` of the
    list holds the syndrome of rank ``r`` under ``ties="id"``.
    """
    syndromes, nearest = syndrome_distances(distances, gallery_syndromes)
    out_s: list[list[str]] = []
    out_d: list[list[float]] = []
    for row in nearest:
        # lexsort: last key is primary — distance first, then column index (= syndrome id order)
        order = np.lexsort((np.arange(len(row)), row))[: (n if n is not None else len(row))]
        out_s.append([str(syndromes[j]) for j in order])
        out_d.append([float(row[j]) for j in order])
    return out_s, out_d


def topk_accuracy(
    ranks: np.ndarray, test_syndromes: Sequence[str], ks: Sequence[int] = DEFAULT_KS, macro: bool = True
) -> dict[int, float]:
    """Top-k accuracy: macro (mean over syndromes of the per-syndrome hit rate, GM-Arc) or micro (per image).

    A ``NaN`` rank (syndrome absent from the gallery) is a miss.

    Examples
    --------
    >>> topk_accuracy(np.array([1, 3, 1, 1]), ["A", "A", "B", "B"], ks=(1, 5))
    {1: 0.75, 5: 1.0}
    >>> topk_accuracy(np.array([1, 3, 1, 1]), ["A", "A", "A", "B"], ks=(1,))
    {1: 0.8333333333333333}
    >>> topk_accuracy(np.array([1, 3, 1, 1]), ["A", "A", "A", "B"], ks=(1,), macro=False)
    {1: 0.75}
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    labels = pd.Series([str(s) for s in test_syndromes], dtype=object)
    if len(labels) != len(ranks):
        raise InputError(f"{len(ranks)} ranks for {len(labels)} test syndromes")
    if len(ranks) == 0:
        return {int(k): float("nan") for k in ks}
    out: dict[int, float] = {}
    for k in ks:
        hit = pd.Series(np.nan_to_num(ranks, nan=np.inf) <= k, dtype=float)
        out[int(k)] = float(hit.groupby(labels.values).mean().mean()) if macro else float(hit.mean())
    return out


# ------------------------------------------------------------------------------------------------- embeddings
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

    slots: list[Slot]
    image_ids: dict[Slot, np.ndarray]
    vectors: dict[Slot, np.ndarray]
    _index: dict[Slot, dict[str, int]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> EmbeddingTable:
        """Index a DataFrame with the ``embeddings.parquet`` columns."""
        missing = {"image_id", *SLOT_COLUMNS, "embedding"} - set(df.columns)
        if missing:
            raise InputError(f"embeddings table lacks columns {sorted(missing)}")
        slots: list[Slot] = []
        ids: dict[Slot, np.ndarray] = {}
        vecs: dict[Slot, np.ndarray] = {}
        for key, part in df.groupby(list(SLOT_COLUMNS), sort=True):
            slot = (str(key[0]), bool(key[1]), bool(key[2]))
            part = part.sort_values("image_id", kind="stable")
            slots.append(slot)
            ids[slot] = part["image_id"].astype(str).to_numpy(dtype=object)
            vecs[slot] = _as_matrix(part["embedding"])
        table = cls(slots=slots, image_ids=ids, vectors=vecs)
        table._index = {s: {i: n for n, i in enumerate(ids[s])} for s in slots}
        return table

    def select(self, models: Sequence[str] | None = None, tta: bool = True) -> list[Slot]:
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

    def matrix(self, slot: Slot, image_ids: Sequence[str]) -> np.ndarray:
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

    def has(self, image_ids: Sequence[str], slots: Sequence[Slot]) -> np.ndarray:
        """Boolean mask: which ``image_ids`` have an embedding in every slot of ``slots``."""
        ok = np.ones(len(image_ids), dtype=bool)
        for s in slots:
            index = self._index[s]
            ok &= np.array([str(i) in index for i in image_ids], dtype=bool)
        return ok


def load_embeddings(run: Any) -> pd.DataFrame:
    """Read ``run/embeddings.parquet`` (columns image_id, model_id, flip, gray, embedding, logits).

    ``run`` is a :class:`gestalt_xai.runs.Run` or a run folder path.
    """
    root = Path(getattr(run, "path", run))
    path = root / "embeddings.parquet"
    if not path.exists():
        raise InputError(f"{path} not found: run `gestalt-xai embed --run {root}` first")
    return pd.read_parquet(path)


# -------------------------------------------------------------------------------------------------- centroids
@dataclass
class SyndromeCentroids:
    """Per-syndrome centroids, one per slot.

    ``vectors[s, c]`` is the centroid of ``syndromes[c]`` in slot ``slots[s]``: the mean over subjects of the
    per-subject mean of L2-normalised embeddings (not renormalised; a centroid target uses its direction).
    """

    syndromes: list[str]
    slots: list[Slot]
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
    gallery_image_ids: which images form the gallery.
    exclude_subject: leave this subject's images out (a test subject explained against a gallery it belongs to).
    models, tta: restrict the slots (default: every slot present).

    Returns
    -------
    :class:`SyndromeCentroids` (syndromes sorted by id; a syndrome whose only subject is excluded is dropped).
    """
    table = emb_df if isinstance(emb_df, EmbeddingTable) else EmbeddingTable.from_frame(emb_df)
    slots = table.select(models, tta)
    meta = _image_meta(cohort_images_df)
    gal = meta[meta["image_id"].isin({str(i) for i in gallery_image_ids})]
    if exclude_subject is not None:
        gal = gal[gal["subject_id"] != str(exclude_subject)]
    gal = gal.sort_values("image_id", kind="stable")
    if gal.empty:
        raise InputError("the gallery is empty (after excluding the subject)")
    syndromes = sorted(gal["syndrome_id"].unique())
    vectors = []
    for slot in slots:
        x = table.matrix(slot, list(gal["image_id"])).astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        frame = pd.DataFrame(x)
        per_subject = frame.groupby([gal["syndrome_id"].to_numpy(), gal["subject_id"].to_numpy()]).mean()
        per_syndrome = per_subject.groupby(level=0).mean().loc[syndromes]
        vectors.append(per_syndrome.to_numpy(dtype=np.float32))
    n_subj = gal.groupby("syndrome_id")["subject_id"].nunique()
    return SyndromeCentroids(
        syndromes=[str(s) for s in syndromes],
        slots=list(slots),
        vectors=np.stack(vectors),
        n_subjects={str(k): int(v) for k, v in n_subj.items()},
    )


# -------------------------------------------------------------------------------------------------- protocols
@dataclass
class ProtocolSplit:
    """One evaluation: which images are tested against which gallery."""

    split: int
    test_image_ids: list[str]
    gallery_image_ids: list[str]


@dataclass
class Protocol:
    """A GM-Arc evaluation protocol: a name, the test and gallery set names, and its splits (1 or 10)."""

    name: str
    test_set: str
    gallery_set: str
    splits: list[ProtocolSplit]


def _image_meta(images: pd.DataFrame) -> pd.DataFrame:
    missing = {"image_id", "subject_id", "syndrome_id"} - set(images.columns)
    if missing:
        raise InputError(f"cohort image table lacks columns {sorted(missing)}")
    out = images.copy()
    for c in ("image_id", "subject_id", "syndrome_id"):
        out[c] = out[c].astype(str).astype(object)
    return out


def _split_table(splits: Any) -> pd.DataFrame:
    """The long split table (``image_id, set, split``) of a ``Cohort`` or a frame."""
    table = getattr(splits, "splits", splits)
    missing = {"image_id", "set", "split"} - set(table.columns)
    if missing:
        raise InputError(f"split table lacks columns {sorted(missing)} (expected image_id, set, split)")
    out = table[["image_id", "set", "split"]].copy()
    out["image_id"] = out["image_id"].astype(str).astype(object)
    out["set"] = out["set"].astype(str).astype(object)
    out["split"] = pd.to_numeric(out["split"], errors="coerce").fillna(-1).astype(int)
    return out


def _ids(table: pd.DataFrame, set_name: str, split: int | None = None) -> list[str]:
    sel = table["set"] == set_name
    if split is not None:
        sel &= table["split"] == split
    return sorted(set(table.loc[sel, "image_id"]))


def frequent_protocol(splits: Any) -> Protocol:
    """Frequent test images (``frequent_test``) against ``frequent_gallery`` (= train + val).

    ``splits`` is a :class:`~gestalt_xai.data.cohort.Cohort` or its long split table (``image_id, set,
    split``). When the table has no ``frequent_*`` sets, ``test`` and ``train`` + ``val`` are used.
    """
    t = _split_table(splits)
    test = _ids(t, "frequent_test") or _ids(t, "test")
    gallery = _ids(t, "frequent_gallery") or sorted(set(_ids(t, "train")) | set(_ids(t, "val")))
    return Protocol("frequent", "frequent", "frequent", [ProtocolSplit(0, test, gallery)])


def rare_protocol(splits: Any) -> Protocol:
    """Rare disorders, one evaluation per split: ``rare_test`` of split k against ``rare_gallery`` of split k.

    GMDB defines 10 splits, each holding out one subject per rare disorder
    (:func:`gestalt_xai.data.cohort.gmdb_splits`
    draws them for other cohorts). A cohort without rare disorders gives a protocol without splits.
    """
    t = _split_table(splits)
    ks = sorted(set(t.loc[t["set"].isin(["rare_test", "rare_gallery"]), "split"]))
    return Protocol(
        "rare",
        "rare",
        "rare",
        [ProtocolSplit(int(k), _ids(t, "rare_test", k), _ids(t, "rare_gallery", k)) for k in ks],
    )


def unified_protocols(frequent: Protocol, rare: Protocol) -> list[Protocol]:
    """GM-Arc's unified gallery (frequent + split k's rare gallery); frequent and rare tests."""
    fgal = frequent.splits[0].gallery_image_ids
    ftest = frequent.splits[0].test_image_ids
    f_uni = [ProtocolSplit(s.split, list(ftest), sorted(set(fgal) | set(s.gallery_image_ids))) for s in rare.splits]
    r_uni = [
        ProtocolSplit(s.split, list(s.test_image_ids), sorted(set(fgal) | set(s.gallery_image_ids)))
        for s in rare.splits
    ]
    if not rare.splits:
        f_uni = [ProtocolSplit(0, list(ftest), list(fgal))]
    return [
        Protocol("frequent_unified", "frequent", "frequent+rare", f_uni),
        Protocol("rare_unified", "rare", "frequent+rare", r_uni),
    ]


def cohort_protocols(splits: Any) -> dict[str, Protocol]:
    """The four GM-Arc protocols: ``frequent``, ``rare``, ``frequent_unified``, ``rare_unified``."""
    freq = frequent_protocol(splits)
    rare = rare_protocol(splits)
    return {p.name: p for p in [freq, rare, *unified_protocols(freq, rare)]}


def _check_subject_disjoint(meta: pd.DataFrame, test: Sequence[str], gallery: Sequence[str], where: str) -> None:
    subj = meta.set_index("image_id")["subject_id"]
    shared = set(subj.reindex(list(test)).dropna()) & set(subj.reindex(list(gallery)).dropna())
    if shared:
        raise InputError(
            f"{where} protocol: subject(s) {sorted(shared)[:5]} appear in both test and gallery; "
            "splits must be by subject, never by image"
        )


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate_protocol(
    table: EmbeddingTable,
    images: pd.DataFrame,
    protocol: Protocol,
    slots: Sequence[Slot],
    ks: Sequence[int] = DEFAULT_KS,
    ties: Ties = "id",
    gallery_table: EmbeddingTable | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rank every test image of every split of ``protocol``.

    Parameters
    ----------
    table: embeddings of the test (and gallery) images.
    images: cohort image table (image_id, subject_id, syndrome_id).
    slots: slots to average over (slot-wise distances).
    gallery_table: take gallery embeddings from here instead (e.g. imported GM-Arc encodings).

    Returns
    -------
    ranks: one row per (split, test image) — see :func:`rank_table`.
    per_split: macro top-k per split (columns ``split, n_test, n_gallery, n_test_absent, top1 …``).
    """
    meta = _image_meta(images).set_index("image_id")
    gtable = gallery_table or table
    rank_frames = []
    split_rows = []
    for sp in protocol.splits:
        test_ids = [i for i in sp.test_image_ids]
        gal_ids = [i for i in sp.gallery_image_ids]
        test_syn = meta.loc[test_ids, "syndrome_id"].tolist() if test_ids else []
        gal_syn = meta.loc[gal_ids, "syndrome_id"].tolist() if gal_ids else []
        row: dict[str, Any] = {"split": sp.split, "n_test": len(test_ids), "n_gallery": len(gal_ids)}
        if not test_ids or not gal_ids:
            ranks = np.full(len(test_ids), np.nan)
            top_s: list[list[str]] = [[] for _ in test_ids]
            top_d: list[list[float]] = [[] for _ in test_ids]
        else:
            dist = slotwise_distances(
                [table.matrix(s, test_ids) for s in slots], [gtable.matrix(s, gal_ids) for s in slots]
            )
            ranks = syndrome_ranks(dist, gal_syn, test_syn, ties=ties)
            top_s, top_d = ranked_syndromes(dist, gal_syn, n=TOP_LIST)
        acc = topk_accuracy(ranks, test_syn, ks) if test_ids else {int(k): float("nan") for k in ks}
        row["n_test_absent"] = int(np.isnan(ranks).sum())
        row.update({f"top{k}": v for k, v in acc.items()})
        split_rows.append(row)
        rank_frames.append(
            rank_table(
                protocol.name,
                sp.split,
                test_ids,
                meta.loc[test_ids, "subject_id"].tolist() if test_ids else [],
                test_syn,
                ranks,
                top_s,
                top_d,
            )
        )
    ranks_df = (
        pd.concat(rank_frames, ignore_index=True)
        if rank_frames
        else rank_table(protocol.name, 0, [], [], [], np.zeros(0), [], [])
    )
    per_split = pd.DataFrame(split_rows)
    per_split.insert(0, "protocol", protocol.name)
    return ranks_df, per_split


def rank_table(
    protocol: str,
    split: int,
    image_ids: Sequence[str],
    subject_ids: Sequence[str],
    syndromes: Sequence[str],
    ranks: np.ndarray,
    top_syndromes: Sequence[Sequence[str]],
    top_distances: Sequence[Sequence[float]],
) -> pd.DataFrame:
    """Rows of ``matching/ranks.parquet``: protocol, split, image_id, subject_id, syndrome_id, rank (nullable
    int), in_gallery, top_syndromes (first 30, nearest first), top_distances."""
    r = pd.array([None if np.isnan(x) else int(x) for x in ranks], dtype="Int64")
    return pd.DataFrame(
        {
            "protocol": pd.Series([protocol] * len(image_ids), dtype=object),
            "split": pd.Series([int(split)] * len(image_ids), dtype="int64"),
            "image_id": pd.Series(list(image_ids), dtype=object),
            "subject_id": pd.Series(list(subject_ids), dtype=object),
            "syndrome_id": pd.Series(list(syndromes), dtype=object),
            "rank": r,
            "in_gallery": pd.Series(~np.isnan(np.asarray(ranks, dtype=float)), dtype=bool),
            "top_syndromes": pd.Series([list(x) for x in top_syndromes], dtype=object),
            "top_distances": pd.Series([list(map(float, x)) for x in top_distances], dtype=object),
        }
    )


def summary_table(
    per_split: pd.DataFrame, protocols: Sequence[Protocol], ks: Sequence[int] = DEFAULT_KS
) -> pd.DataFrame:
    """One row per protocol (GM-Arc): mean gallery/test size, mean (± sd over splits) macro top-k %."""
    rows = []
    for p in protocols:
        part = per_split[per_split["protocol"] == p.name]
        if part.empty:
            continue
        row: dict[str, Any] = {
            "protocol": p.name,
            "test_set": p.test_set,
            "gallery_set": p.gallery_set,
            "n_splits": len(part),
            "n_gallery": float(part["n_gallery"].mean()),
            "n_test": float(part["n_test"].mean()),
            "n_test_absent": float(part["n_test_absent"].mean()),
        }
        for k in ks:
            vals = part[f"top{k}"].astype(float) * 100.0
            row[f"top{k}"] = float(vals.mean())
            row[f"top{k}_sd"] = float(vals.std(ddof=0)) if len(vals) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def print_summary(
    summary: pd.DataFrame, ks: Sequence[int] = DEFAULT_KS, title: str = "Matching (macro top-k, %)"
) -> None:
    """Print the summary in GM-Arc's layout (Test set | Gallery | Test | Top-1 | Top-5 | Top-10 | Top-30)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("Test set", "Gallery set", "Gallery", "Test"):
        t.add_column(col, justify="left" if "set" in col else "right")
    for k in ks:
        t.add_column(f"Top-{k}", justify="right")
    for _, r in summary.iterrows():
        cells = [str(r["test_set"]), str(r["gallery_set"]), f"{r['n_gallery']:.0f}", f"{r['n_test']:.0f}"]
        cells += [("—" if np.isnan(r[f"top{k}"]) else f"{r[f'top{k}']:.2f}") for k in ks]
        t.add_row(*cells)
    console = Console(stderr=False)
    if not console.is_terminal:
        console = Console(stderr=False, width=120)  # logs and captured output: no wrapping at 80 columns
    console.print(t)


# ----------------------------------------------------------------------------------- GM-Arc gallery encodings
_PICKLE_MODULE_PREFIXES = ("pandas.", "numpy.")
_PICKLE_MODULES = {"pandas", "numpy", "copyreg", "_codecs", "collections", "datetime"}
#: pandas ≥ 3 pickles Arrow-backed string columns through these pyarrow helpers
_PICKLE_PYARROW = {
    ("pyarrow.lib", "_restore_array"),
    ("pyarrow.lib", "py_buffer"),
    ("pyarrow.lib", "type_for_alias"),
}
_PICKLE_BUILTINS = {
    "list",
    "dict",
    "tuple",
    "set",
    "frozenset",
    "int",
    "float",
    "complex",
    "str",
    "bytes",
    "bytearray",
    "bool",
    "slice",
    "range",
    "object",
}


def _restricted_unpickler(fh: Any) -> pickle.Unpickler:
    """An unpickler resolving only pandas/NumPy/builtin container classes (defence in depth only)."""
    try:
        from pandas.compat.pickle_compat import (
            Unpickler as Base,  # maps classes moved between pandas versions
        )
    except ImportError:  # pragma: no cover - older/newer pandas
        Base = pickle.Unpickler  # type: ignore[misc,assignment]

    class Restricted(Base):  # type: ignore[misc,valid-type]
        def find_class(self, module: str, name: str) -> Any:
            ok = (
                module in _PICKLE_MODULES
                or module.startswith(_PICKLE_MODULE_PREFIXES)
                or (module, name) in _PICKLE_PYARROW
                or (module == "builtins" and name in _PICKLE_BUILTINS)
            )
            if not ok:
                raise InputError(
                    f"refusing to unpickle {module}.{name}: GM-Arc encodings contain only a pandas "
                    "DataFrame of lists/arrays"
                )
            return super().find_class(module, name)

    return Restricted(fh)


def read_gmarc_encodings(path: str | Path, trust_pickle: bool = False) -> pd.DataFrame:
    """Read GM-Arc gallery encodings into the ``embeddings.parquet`` schema.

    GM-Arc stores encodings as a pickled DataFrame (``GMDB_gallery_encodings_<version>.pkl``) with one row per
    image and slot: ``img_name`` (``<image_id>_<suffix>``; GM-Arc takes the part before the first ``_``),
    ``model`` (``m0``, ``m1`` …), ``flip``, ``gray`` (0/1), ``class_conf`` (logits, ``[0]`` for the ONNX
    member) and ``representations``. A ``.csv`` export (``;``-separated, JSON lists) is read without any
    opt-in.

    Unpickling can execute code embedded in the file, so a pickle is read only with ``trust_pickle=True``
    (``--trust-pickle``), and then through a restricted unpickler.

    Returns
    -------
    DataFrame with image_id, model_id (GM-Arc's model name), flip, gray, embedding, logits (None for ``[0]``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GM-Arc encodings file not found: {path}")
    if path.suffix.lower() == ".csv":
        raw = pd.read_csv(path, delimiter=";")
        raw["representations"] = raw["representations"].map(json.loads)
        raw["class_conf"] = raw["class_conf"].map(json.loads)
    else:
        if not trust_pickle:
            raise InputError(
                f"{path} is a Python pickle: loading it can execute arbitrary code hidden in the file. "
                "Pass trust_pickle=True (CLI: --trust-pickle) only for a file from a source you trust, "
                "or convert it to CSV (img_name;model;flip;gray;class_conf;representations) elsewhere."
            )
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            raw = _restricted_unpickler(io.BytesIO(data)).load()
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: not a readable GM-Arc encodings pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, pd.DataFrame):
        raise InputError(f"{path}: expected a pandas DataFrame, got {type(raw).__name__}")
    need = {"img_name", "model", "flip", "gray", "class_conf", "representations"}
    if need - set(raw.columns):
        raise InputError(
            f"{path}: GM-Arc encodings lack columns {sorted(need - set(raw.columns))} "
            f"(found {sorted(map(str, raw.columns))})"
        )

    def logits(v: Any) -> list[float] | None:
        arr = np.asarray(v, dtype=np.float32).ravel()
        return None if arr.size <= 1 else arr.tolist()

    out = pd.DataFrame(
        {
            "image_id": raw["img_name"].astype(str).str.split("_").str[0].astype(object),
            "model_id": raw["model"].astype(str).astype(object),
            "flip": raw["flip"].astype(int).astype(bool),
            "gray": raw["gray"].astype(int).astype(bool),
            "embedding": [np.asarray(v, dtype=np.float32).ravel() for v in raw["representations"]],
            "logits": [logits(v) for v in raw["class_conf"]],
        }
    )
    out = out.drop_duplicates(subset=["image_id", "model_id", "flip", "gray"], keep="first")
    return out.sort_values(["image_id", "model_id", "flip", "gray"], kind="stable").reset_index(drop=True)


def compare_embeddings(ours: pd.DataFrame, theirs: pd.DataFrame) -> pd.DataFrame:
    """Agreement of our embeddings with GM-Arc's for the images both have, for every pair of models.

    Returns one row per (our model, their model, flip, gray) with ``n_images``, the median and minimum cosine
    similarity and the median relative L2 difference ``‖a − b‖/‖b‖``. The matching model pair shows cosine ≈
    1.
    """
    a = EmbeddingTable.from_frame(ours)
    b = EmbeddingTable.from_frame(theirs)
    rows = []
    for sa in a.slots:
        for sb in b.slots:
            if sa[1:] != sb[1:]:
                continue
            common = sorted(set(a.image_ids[sa]) & set(b.image_ids[sb]))
            if not common:
                continue
            x = a.matrix(sa, common).astype(np.float64)
            y = b.matrix(sb, common).astype(np.float64)
            if x.shape[1] != y.shape[1]:
                continue
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            rel = np.linalg.norm(x - y, axis=1) / np.linalg.norm(y, axis=1)
            rows.append(
                {
                    "our_model": sa[0],
                    "their_model": sb[0],
                    "flip": sa[1],
                    "gray": sa[2],
                    "n_images": len(common),
                    "cosine_median": float(np.median(cos)),
                    "cosine_min": float(cos.min()),
                    "rel_diff_median": float(np.median(rel)),
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "our_model",
            "their_model",
            "flip",
            "gray",
            "n_images",
            "cosine_median",
            "cosine_min",
            "rel_diff_median",
        ],
    )


# ------------------------------------------------------------------------------------------------------ stage
class MatchConfig(StageConfig):
    """Options of ``gestalt-xai match``."""

    models: list[str] | None = Field(None, description="model ids to ensemble (default: every model embedded)")
    tta: bool = Field(True, description="average over the flip/gray TTA slots present (GM-Arc: on)")
    ks: list[int] = Field(default_factory=lambda: list(DEFAULT_KS), description="top-k cut-offs")
    ties: Ties = Field("id", description="tie rule for equal distances: id | pessimistic | optimistic")
    protocols: list[Literal["frequent", "rare", "frequent_unified", "rare_unified"]] = Field(
        default_factory=lambda: ["frequent", "rare", "frequent_unified", "rare_unified"]
    )
    gallery_encodings: Path | None = Field(
        None, description="GM-Arc gallery encodings (.pkl or .csv) to use as the gallery's embeddings"
    )
    gallery_model_map: dict[str, str] | None = Field(
        None,
        description="GM-Arc model name → our model id (e.g. {m0: s1_r50}); needed to use their encodings",
    )
    trust_pickle: bool = Field(False, description="allow reading a pickled encodings file (executes code)")
    quiet: bool = False


def _restrict(p: Protocol, keep: set[str]) -> Protocol:
    return Protocol(
        p.name,
        p.test_set,
        p.gallery_set,
        [
            ProtocolSplit(
                s.split,
                [i for i in s.test_image_ids if i in keep],
                [i for i in s.gallery_image_ids if i in keep],
            )
            for s in p.splits
        ],
    )


def match_stage(run: Any, cfg: MatchConfig | None = None) -> pd.DataFrame:
    """Match test images against galleries under the GM-Arc protocols; write ``run/matching/``.

    Writes ``matching/ranks.parquet`` (one row per protocol, split and test image),
    ``matching/splits.parquet``
    (macro top-k per split), ``matching/summary.parquet`` (GM-Arc's table) and, with ``gallery_encodings``,
    ``matching/gmarc_agreement.parquet``; prints the summary. Returns the summary table.
    """
    from gestalt_xai.runs import write_parquet

    cfg = cfg or MatchConfig()
    with run.stage("match", cfg) as st:
        emb = load_embeddings(run)
        table = EmbeddingTable.from_frame(emb)
        slots = table.select(cfg.models, cfg.tta)
        from gestalt_xai.data.cohort import load_run_cohort

        cohort = load_run_cohort(run)
        images = _image_meta(cohort.images)
        out_dir = run.dir("matching")

        gallery_table = None
        if cfg.gallery_encodings is not None:
            theirs = read_gmarc_encodings(cfg.gallery_encodings, trust_pickle=cfg.trust_pickle)
            write_parquet(compare_embeddings(emb, theirs), out_dir / "gmarc_agreement.parquet")
            if cfg.gallery_model_map:
                theirs = theirs[theirs["model_id"].isin(cfg.gallery_model_map)].copy()
                theirs["model_id"] = theirs["model_id"].map(cfg.gallery_model_map)
                gallery_table = EmbeddingTable.from_frame(
                    pd.concat([theirs, emb[~emb["image_id"].isin(set(theirs["image_id"]))]], ignore_index=True)
                )
            else:
                log.warning("gallery_encodings given without gallery_model_map: only the agreement table is written")

        # only images embedded in every selected slot take part; the others are recorded as errors
        usable = (gallery_table or table).has(list(images["image_id"]), slots) & table.has(
            list(images["image_id"]), slots
        )
        dropped = images.loc[~usable, "image_id"].tolist()
        images = images[usable]

        all_protocols = cohort_protocols(cohort)
        keep = set(images["image_id"])
        chosen = [_restrict(all_protocols[n], keep) for n in cfg.protocols]
        for p in chosen:
            for sp in p.splits:
                _check_subject_disjoint(images, sp.test_image_ids, sp.gallery_image_ids, f"{p.name} split {sp.split}")
        rank_frames, split_frames = [], []
        for p in chosen:
            r, s = evaluate_protocol(table, images, p, slots, cfg.ks, cfg.ties, gallery_table)
            rank_frames.append(r)
            split_frames.append(s)
        ranks = pd.concat(rank_frames, ignore_index=True)
        per_split = pd.concat(split_frames, ignore_index=True)
        summary = summary_table(per_split, chosen, cfg.ks)
        summary.insert(3, "models", ",".join(sorted({s[0] for s in slots})))
        summary.insert(4, "n_slots", len(slots))
        write_parquet(ranks, out_dir / "ranks.parquet")
        write_parquet(per_split, out_dir / "splits.parquet")
        write_parquet(summary, out_dir / "summary.parquet")
        if dropped:
            # alignment and embedding failures are already in errors.parquet (align/embed stages)
            log.warning(
                "match: %d cohort image(s) have no embedding in every selected slot and are left out",
                len(dropped),
            )
        st.n_items = int(len(ranks))
        st.extra["n_without_embedding"] = len(dropped)
        st.extra["slots"] = [list(s) for s in slots]
        if not cfg.quiet:
            print_summary(summary, cfg.ks)
    return summary
