"""GestaltMatcher-Arc's evaluation protocols: which images are test and gallery, and their ranks and top-k.

:func:`frequent_protocol`, :func:`rare_protocol` and :func:`unified_protocols` read a cohort's split table
(``image_id, set, split``); :func:`evaluate_protocol` ranks every test image of every split against its gallery
(slot-wise distances, :mod:`~.ranking`) and gives the rows of ``matching/ranks.parquet`` (:func:`rank_table`) and
the macro top-k per split. A test image whose syndrome has no gallery image is flagged ``in_gallery = False``.

Undiagnosed patients (split set ``undiagnosed``, :data:`~gestalt_xai.data.cohort.UNDIAGNOSED`) are in no protocol;
:func:`suggestion_table` ranks them against :func:`unified_gallery` (every frequent and rare gallery image, as
GM-Arc's unified protocol does for a new patient), with the same ranking (:func:`~.ranking.ranked_syndromes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.errors import InputError
from gestalt_xai.matching.distances import EmbeddingTable, ModelSlot, slotwise_distances
from gestalt_xai.matching.ranking import DEFAULT_KS, TOP_LIST, Ties, ranked_syndromes, syndrome_ranks, topk_accuracy

__all__ = [
    "Protocol",
    "ProtocolSplit",
    "check_subject_disjoint",
    "cohort_protocols",
    "evaluate_protocol",
    "frequent_protocol",
    "image_meta",
    "rank_table",
    "rare_protocol",
    "suggestion_table",
    "unified_gallery",
    "unified_protocols",
]

#: columns of ``matching/suggestions.parquet``
SUGGESTION_COLUMNS = ["image_id", "rank", "syndrome_id", "distance"]


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


def image_meta(images: pd.DataFrame) -> pd.DataFrame:
    """The cohort image table with string ``image_id``, ``subject_id``, ``syndrome_id`` (raises if one lacks)."""
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


def unified_gallery(splits: Any) -> list[str]:
    """Every gallery image of GM-Arc's unified protocol: the frequent gallery and the rare gallery of every split
    (each rare subject is in the gallery of all but one split, so every diagnosed rare subject is in it)."""
    freq = frequent_protocol(splits)
    rare = rare_protocol(splits)
    return sorted(set(freq.splits[0].gallery_image_ids).union(*(s.gallery_image_ids for s in rare.splits)))


def cohort_protocols(splits: Any) -> dict[str, Protocol]:
    """The four GM-Arc protocols: ``frequent``, ``rare``, ``frequent_unified``, ``rare_unified``."""
    freq = frequent_protocol(splits)
    rare = rare_protocol(splits)
    return {p.name: p for p in [freq, rare, *unified_protocols(freq, rare)]}


def check_subject_disjoint(meta: pd.DataFrame, test: Sequence[str], gallery: Sequence[str], where: str) -> None:
    """Raise if a subject has images on both sides (splits are by subject, never by image)."""
    subj = meta.set_index("image_id")["subject_id"]
    shared = set(subj.reindex(list(test)).dropna()) & set(subj.reindex(list(gallery)).dropna())
    if shared:
        raise InputError(
            f"{where} protocol: subject(s) {sorted(shared)[:5]} appear in both test and gallery; "
            "splits must be by subject, never by image"
        )


def evaluate_protocol(
    table: EmbeddingTable,
    images: pd.DataFrame,
    protocol: Protocol,
    slots: Sequence[ModelSlot],
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
    meta = image_meta(images).set_index("image_id")
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


def suggestion_table(
    table: EmbeddingTable,
    images: pd.DataFrame,
    query_ids: Sequence[str],
    gallery_ids: Sequence[str],
    slots: Sequence[ModelSlot],
    gallery_table: EmbeddingTable | None = None,
    n: int = TOP_LIST,
) -> pd.DataFrame:
    """The syndromes suggested for each query image (e.g. an undiagnosed patient): ranked against one gallery.

    Slot-wise cosine distances to ``gallery_ids`` (embeddings from ``gallery_table`` when given), de-duplicated to
    each syndrome's nearest image and ordered as :func:`~.ranking.ranked_syndromes` orders them (the ranking every
    protocol uses). Returns the long table ``image_id, rank, syndrome_id, distance`` (first ``n`` per image, rank
    1 = nearest); empty when there is no query or no gallery image.
    """
    meta = image_meta(images).set_index("image_id")
    query, gallery = list(query_ids), list(gallery_ids)
    if not query or not gallery:
        return pd.DataFrame({"image_id": pd.Series(dtype=object), "rank": pd.Series(dtype="int64"),
                             "syndrome_id": pd.Series(dtype=object), "distance": pd.Series(dtype="float64")})
    gtable = gallery_table or table
    dist = slotwise_distances([table.matrix(s, query) for s in slots], [gtable.matrix(s, gallery) for s in slots])
    top_s, top_d = ranked_syndromes(dist, meta.loc[gallery, "syndrome_id"].tolist(), n=n)
    rows = [(image_id, rank, syndrome, distance)
            for image_id, syndromes, distances in zip(query, top_s, top_d, strict=True)
            for rank, (syndrome, distance) in enumerate(zip(syndromes, distances, strict=True), start=1)]
    out = pd.DataFrame(rows, columns=SUGGESTION_COLUMNS)
    return out.astype({"image_id": object, "rank": "int64", "syndrome_id": object, "distance": "float64"})
