"""Syndrome ranking and top-k accuracy (GestaltMatcher-Arc's rule).

Gallery images are sorted by their distance to a test image and each disorder is kept at its first (nearest)
occurrence; a disorder's *rank* is its position in that de-duplicated list. Top-k (k = 1, 5, 10, 30) is averaged per
disorder (macro), not per image (Hustinx et al., WACV 2023).

**Ties.** GM-Arc sorts with ``np.argsort`` (quicksort, not stable), so tied distances come out in an arbitrary
order. Here the ranking is a function of each syndrome's nearest distance only, and ties are resolved
deterministically, independent of gallery order: ``ties="id"`` (default) orders tied syndromes by syndrome id
(string order), ``"pessimistic"`` puts the true syndrome after every syndrome tied with it, ``"optimistic"``
before them. Exact float equality is used; duplicated photos give identical distances, so their ties are real.

**A test syndrome absent from the gallery** (it has no gallery image) has no rank (``NaN``). It counts as a miss at
every k and stays in the macro average, since the gallery could not have found it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from gestalt_xai.errors import ConfigError, InputError

__all__ = [
    "DEFAULT_KS",
    "TOP_LIST",
    "Ties",
    "ranked_syndromes",
    "syndrome_distances",
    "syndrome_ranks",
    "topk_accuracy",
]

#: GM-Arc's top-k cut-offs.
DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 30)
#: how many ranked syndromes each row of the rank table keeps.
TOP_LIST = 30

Ties = Literal["id", "pessimistic", "optimistic"]


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
