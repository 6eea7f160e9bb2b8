"""Composite maps: the mean of per-subject maps of a group, streamed from the map store with O(1) maps in memory.

A *composite* summarises the maps of a group of patients (a syndrome, a syndrome within a sex / age band / ancestry
stratum, every patient) for one ``(model, method, layer, target group)`` after a named per-map normalisation.

Order of operations (each subject counts once, however many photos it has):

1. every stored map ``m`` (raw, signed, template space) is normalised on its own: ``v = N(m)``;
2. the normalised maps of one subject are averaged: ``u_s = mean_{i ∈ s} v_i``;
3. the composite is the mean over subjects, ``c = (1/S) Σ_s u_s``, with a consistency map: the per-pixel standard
   deviation over subjects ``σ = sqrt((1/S) Σ_s u_s² − c²)`` and the sign agreement
   ``a = (#{s: u_s > 0} − #{s: u_s < 0}) / S`` ∈ [−1, 1] (±1: every subject's map has the same sign there).

Normalisations (:data:`NORMALISATIONS`), each applied per map before averaging:

==============  ==========================================================================================
``none``        ``v = m`` — raw scores; maps with a large explained score weigh more
``max-abs``     ``v = m / max|m|`` ∈ [−1, 1] — every map weighs the same, sign kept (the default)
``zscore``      ``v = (m − mean(m)) / std(m)`` — per-map standard scores (pixels relative to the map's own mean)
``positive``    ``v = max(m, 0)`` — evidence *for* the target only (raw scale)
==============  ==========================================================================================

Any other name is passed to :func:`gestalt_xai.attribution.postprocess.apply_view` (e.g. ``"relu+max-abs"``,
``"sum-norm"``), so every named view of the toolkit can feed a composite.

In the aggregate stage :class:`GroupComposites` feeds each subject into the composites of its syndrome and of every
subject (``ALL``), whole and — under the first (primary) normalisation — per stratum, and :func:`composite_table`
lays them out as ``aggregate/composites.parquet`` rows with the difference from the ``ALL`` composite
(``minus_all``, the syndrome-specific part of the map).

Streaming: :class:`CompositeAccumulator` keeps running sums (``Σu``, ``Σu²``, sign counts) in float64 — a fixed
number of 112×112 arrays per group — and :func:`stream_subject_maps` hands out one subject's maps at a time from
blocks of at most ``block_maps`` maps, so memory does not grow with the number of patients. Subjects are visited in
sorted order and a subject's images are summed in sorted order, so the result does not depend on the order in
which maps were stored (and ``float64`` sums keep rounding far below float32 resolution).

>>> import numpy as np
>>> acc = CompositeAccumulator()
>>> acc.add(np.ones((112, 112)), n_images=2)
>>> acc.add(-np.ones((112, 112)))
>>> float(acc.mean()[0, 0]), float(acc.sign_agreement()[0, 0]), acc.n_subjects
(0.0, 0.0, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.aggregate.annotate import GROUP_COLS
from gestalt_xai.aggregate.faces import ALL, WHOLE
from gestalt_xai.attribution.postprocess import apply_view
from gestalt_xai.faces.align import CROP_SIZE

__all__ = [
    "NORMALISATIONS",
    "CompositeAccumulator",
    "normalise",
    "is_signed_normalisation",
    "stream_subject_maps",
    "composite_of_maps",
    "stream_composites",
    "subject_mean",
    "GroupComposites",
    "composite_table",
    "with_differences",
    "composite_array",
]

_EPS = 1e-12


#: named per-map normalisations → function (documented in the module docstring)
NORMALISATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda m: np.asarray(apply_view(m, "raw")),
    "max-abs": lambda m: np.asarray(apply_view(m, "max-abs")),
    "zscore": lambda m: np.asarray(apply_view(m, "zscore")),
    "positive": lambda m: np.asarray(apply_view(m, "relu")),
}
_UNSIGNED = {"positive"}


def normalise(m: np.ndarray, name: str) -> np.ndarray:
    """Apply a named normalisation (or any :mod:`~gestalt_xai.attribution.postprocess` view) to one map (float64).

    >>> normalise(np.array([[-2.0, 1.0]]), "max-abs").round(6).tolist()
    [[-1.0, 0.5]]
    >>> normalise(np.array([[-2.0, 1.0]]), "positive").tolist()
    [[0.0, 1.0]]
    """
    arr = np.asarray(m, dtype=np.float64)
    if name in NORMALISATIONS:
        return NORMALISATIONS[name](arr)
    return np.asarray(apply_view(arr, name), dtype=np.float64)


def is_signed_normalisation(name: str, method_signed: bool = True) -> bool:
    """Whether composites under ``name`` can be negative (diverging colours) for a signed or unsigned method."""
    if not method_signed or name in _UNSIGNED:
        return False
    if name in NORMALISATIONS:
        return True
    from gestalt_xai.attribution.postprocess import is_signed_view

    return is_signed_view(name, method_signed)


@dataclass
class CompositeAccumulator:
    """Running per-pixel sums over subjects (float64): ``Σu``, ``Σu²``, ``#(u>0)``, ``#(u<0)``, subject count.

    Holds exactly four 112×112 arrays however many subjects are added (streaming, flat memory).
    """

    shape: tuple[int, int] = (CROP_SIZE, CROP_SIZE)
    n_subjects: int = 0
    n_images: int = 0
    sum: np.ndarray = field(init=False)
    sum_sq: np.ndarray = field(init=False)
    n_pos: np.ndarray = field(init=False)
    n_neg: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.sum = np.zeros(self.shape, np.float64)
        self.sum_sq = np.zeros(self.shape, np.float64)
        self.n_pos = np.zeros(self.shape, np.int32)
        self.n_neg = np.zeros(self.shape, np.int32)

    #: number of full-size arrays held (the streaming tests check it stays constant)
    N_ARRAYS = 4

    def add(self, subject_map: np.ndarray, n_images: int = 1) -> None:
        """Add one subject's (already normalised and image-averaged) map."""
        u = np.asarray(subject_map, dtype=np.float64)
        if u.shape != self.shape:
            raise ValueError(f"expected a {self.shape} map, got {u.shape}")
        self.sum += u
        self.sum_sq += u * u
        self.n_pos += u > 0
        self.n_neg += u < 0
        self.n_subjects += 1
        self.n_images += int(n_images)

    def merge(self, other: CompositeAccumulator) -> None:
        """Fold another accumulator's subjects into this one (disjoint subjects)."""
        self.sum += other.sum
        self.sum_sq += other.sum_sq
        self.n_pos += other.n_pos
        self.n_neg += other.n_neg
        self.n_subjects += other.n_subjects
        self.n_images += other.n_images

    def mean(self) -> np.ndarray:
        """The composite map ``c = Σu / S`` (zeros when empty)."""
        return self.sum / max(self.n_subjects, 1)

    def std(self) -> np.ndarray:
        """Per-pixel standard deviation over subjects (population, ``ddof=0``)."""
        n = max(self.n_subjects, 1)
        return np.sqrt(np.maximum(self.sum_sq / n - (self.sum / n) ** 2, 0.0))

    def sign_agreement(self) -> np.ndarray:
        """``(#(u>0) − #(u<0)) / S`` ∈ [−1, 1]."""
        return (self.n_pos.astype(np.float64) - self.n_neg) / max(self.n_subjects, 1)

    def nbytes(self) -> int:
        return int(self.sum.nbytes + self.sum_sq.nbytes + self.n_pos.nbytes + self.n_neg.nbytes)


def stream_subject_maps(
    store: Any, rows: pd.DataFrame, group_cols: list[str], block_maps: int = 256
) -> Iterator[tuple[tuple[Any, ...], str, list[tuple[dict[str, Any], np.ndarray]]]]:
    """Yield ``(group key, subject_id, [(row, map), …])`` one subject at a time, in sorted order.

    ``rows`` is a subset of the store index with a ``subject_id`` column (and the ``group_cols``). Rows are sorted by
    ``(subject_id, *group_cols, image_id)`` and read in blocks of whole subjects of at most ``block_maps`` maps
    (one subject with more maps than that forms its own block), so memory stays bounded by the block size, not by
    the number of patients.
    """
    if not len(rows):
        return
    order = ["subject_id", *group_cols, "image_id"]
    rows = rows.sort_values(order, kind="stable")
    subjects = rows["subject_id"].to_numpy()
    # block boundaries on subject changes
    starts = np.flatnonzero(np.r_[True, subjects[1:] != subjects[:-1]])
    ends = np.r_[starts[1:], len(rows)]
    block: list[tuple[int, int]] = []
    size = 0

    def flush(parts: list[tuple[int, int]]) -> Iterator[Any]:
        if not parts:
            return
        sel = rows.iloc[parts[0][0]: parts[-1][1]]
        loaded = {(r["image_id"], *(r[c] for c in group_cols)): m for r, m in store.iter_maps(sel)}
        for a, b in parts:
            sub = sel.iloc[a - parts[0][0]: b - parts[0][0]]
            subj = str(sub["subject_id"].iloc[0])
            for key, grp in sub.groupby(group_cols, sort=True, dropna=False):
                key = key if isinstance(key, tuple) else (key,)
                items = []
                for r in grp.sort_values("image_id", kind="stable").to_dict("records"):
                    items.append((r, loaded[(r["image_id"], *(r[c] for c in group_cols))]))
                yield key, subj, items

    for a, b in zip(starts, ends, strict=True):
        if block and size + (b - a) > block_maps:
            yield from flush(block)
            block, size = [], 0
        block.append((int(a), int(b)))
        size += int(b - a)
    yield from flush(block)


def subject_mean(maps: Iterable[np.ndarray], normalisation: str) -> tuple[np.ndarray, int]:
    """Mean of a subject's normalised maps (float64) and the number of maps."""
    total: np.ndarray | None = None
    n = 0
    for m in maps:
        v = normalise(m, normalisation)
        total = v if total is None else total + v
        n += 1
    if total is None:
        raise ValueError("a subject with no maps")
    return total / n, n


def composite_of_maps(maps: Iterable[np.ndarray], subjects: Iterable[str] | None = None,
                      normalisation: str = "max-abs") -> CompositeAccumulator:
    """Composite of in-memory maps (tests, notebooks): ``subjects`` gives each map's subject (default: one each).

    >>> m = np.random.default_rng(0).normal(size=(112, 112))
    >>> acc = composite_of_maps([m, m, m], normalisation="none")
    >>> bool(np.allclose(acc.mean(), m))
    True
    """
    maps = list(maps)
    subj = [str(i) for i in range(len(maps))] if subjects is None else [str(s) for s in subjects]
    if len(subj) != len(maps):
        raise ValueError(f"{len(subj)} subject ids for {len(maps)} maps")
    acc = CompositeAccumulator()
    by_subject: dict[str, list[int]] = {}
    for i, s in enumerate(subj):
        by_subject.setdefault(s, []).append(i)
    for s in sorted(by_subject):
        u, n = subject_mean((maps[i] for i in by_subject[s]), normalisation)
        acc.add(u, n_images=n)
    return acc


def stream_composites(store: Any, rows: pd.DataFrame, normalisation: str = "max-abs",
                      group_cols: list[str] | None = None, block_maps: int = 256
                      ) -> dict[tuple[Any, ...], CompositeAccumulator]:
    """Composites of ``rows`` (store index rows with ``subject_id``) per ``group_cols`` values, streamed.

    One accumulator per group; a subject's maps of one group are averaged first (see the module docstring).
    """
    cols = list(group_cols or [])
    if not cols:
        rows = rows.assign(_group="all")
        cols = ["_group"]
    out: dict[tuple[Any, ...], CompositeAccumulator] = {}
    for key, _subject, items in stream_subject_maps(store, rows, cols, block_maps):
        u, n = subject_mean((m for _, m in items), normalisation)
        out.setdefault(key, CompositeAccumulator()).add(u, n)
    return out


class GroupComposites:
    """The composites of one streaming pass, one :class:`CompositeAccumulator` per
    ``(group, stratum, model_id, method, layer, target_group, normalisation)``.

    Parameters
    ----------
    normalisations : per-map normalisations; the first (primary) one also feeds the strata composites.
    """

    def __init__(self, normalisations: Sequence[str]):
        self.normalisations = list(normalisations)
        self.accumulators: dict[tuple[Any, ...], CompositeAccumulator] = {}

    def add_subject(self, key: tuple[Any, ...], syndrome: str, strata: Sequence[str],
                    maps: Sequence[np.ndarray]) -> np.ndarray:
        """Add one subject's maps of one ``key`` (:data:`~gestalt_xai.aggregate.annotate.GROUP_COLS` values).

        The subject counts in its ``syndrome`` and in ``ALL``, whole and in each of its ``strata`` labels
        (:func:`gestalt_xai.aggregate.faces.subject_strata`, ``"all"`` first). Returns the subject's mean map under
        the primary normalisation (the SpRAy feature of :mod:`gestalt_xai.aggregate.spray`).
        """
        primary = self.normalisations[0]
        primary_mean = None
        for norm in self.normalisations:
            u, n = subject_mean(maps, norm)
            for group in (syndrome, ALL):
                for label in (strata if norm == primary else [WHOLE]):
                    self.accumulators.setdefault((group, label, *key, norm), CompositeAccumulator()).add(u, n)
            if norm == primary:
                primary_mean = u
        assert primary_mean is not None
        return primary_mean


def _flat(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a, np.float32).ravel()


def composite_table(composites: Iterable[GroupComposites]) -> pd.DataFrame:
    """The rows of ``aggregate/composites.parquet`` (sorted by key within each pass) with ``minus_all``
    (:func:`with_differences`)."""
    rows = []
    for part in composites:
        for key in sorted(part.accumulators):
            a = part.accumulators[key]
            group, stratum, model_id, method, layer, tgroup, norm = key
            rows.append({"group": group, "stratum": stratum, "model_id": model_id, "method": method, "layer": layer,
                         "target_group": tgroup, "normalisation": norm, "n_subjects": a.n_subjects,
                         "n_images": a.n_images, "mean": _flat(a.mean()), "std": _flat(a.std()),
                         "sign_agreement": _flat(a.sign_agreement())})
    return with_differences(pd.DataFrame(rows))


def with_differences(comp: pd.DataFrame) -> pd.DataFrame:
    """``comp`` with ``minus_all``: each syndrome composite minus the ``ALL`` composite of the same stratum, key and
    normalisation (``None`` for ``ALL`` itself). It is derived from the stored means, so ``composites.parquet`` does
    not store it (a quarter of the run folder's largest table); :func:`gestalt_xai.aggregate.stage.load_composites`
    adds it back."""
    comp = comp.copy()
    keys = ["stratum", *GROUP_COLS, "normalisation"]
    ref = {tuple(r[k] for k in keys): r["mean"] for r in comp[comp["group"] == ALL].to_dict("records")}
    diffs = []
    for r in comp.to_dict("records"):
        base = ref.get(tuple(r[k] for k in keys))
        if r["group"] == ALL or base is None:
            diffs.append(None)
        else:
            diffs.append((np.asarray(r["mean"], np.float32) - np.asarray(base, np.float32)).astype(np.float32))
    comp["minus_all"] = diffs
    return comp


def composite_array(row: pd.Series | dict[str, Any], column: str = "mean") -> np.ndarray | None:
    """A composite's map from a ``composites.parquet`` row as ``(112, 112)`` float32 (``None`` when null).

    >>> composite_array({"mean": [0.5] * 112 * 112}).shape
    (112, 112)
    """
    v = row[column]
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return np.asarray(v, np.float32).reshape(CROP_SIZE, CROP_SIZE)
