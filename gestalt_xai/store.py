"""Map store: raw signed float32 112×112 maps in compressed chunks plus a Parquet index with provenance.

Layout of ``run/maps/``::

    chunks/<writer>-000001.maps     float32 (n, 112, 112): the maps of one flush, in index order, losslessly
                                    compressed (:func:`encode_chunk`; stores written before hold ``.npy`` chunks,
                                    still read)
    index/<writer>-000001.parquet   one row per map of that chunk (key, chunk, offset, provenance)
    errors/<writer>-000001.parquet  maps refused in that flush (NaN/inf), with the reason
    index.parquet                   consolidated index (:meth:`MapStore.compact`); fragments are folded into it

One map per key ``(image_id, model_id, target, method, layer)`` (``layer`` is ``""`` for input-space methods);
``target`` is a :class:`~gestalt_xai.attribution.targets.TargetKey` written as its string ``kind:ref``
(``centroid:S01``), and the ``target_kind`` column is that key's kind.

* **Append-only and resumable.** A flush writes the chunk first and its index fragment second, each through a
  temporary file and an atomic rename; a map exists only once its index row does. A run killed at any point leaves
  at most an orphan chunk (ignored) and resumes by skipping keys already indexed (:meth:`MapStore.keys`). Keys are
  never overwritten: adding a stored key again is a no-op.
* **Never a non-finite map.** A map with NaN/inf is refused and recorded as an error row (:meth:`MapStore.errors`);
  it is retried on the next run.
* **Provenance** per row: ``model_hash``, ``target_kind``, ``target_value`` (the explained score), ``target_detail``
  and ``method_params`` (JSON: every declared parameter of the method, defaults included, and what the method
  records about its run), plus ``map_min``, ``map_max``, ``map_sum`` of the raw map.
* **Streaming reads.** :meth:`MapStore.iter_maps` filters the index and reads one map at a time from memory-mapped
  chunks, so memory stays flat in cohort size.
* **Compact.** Each map of a chunk is its float32 values split into four byte planes (the same byte of every value
  together: sign and exponent bytes are highly repetitive in attribution maps) and deflated (zlib level 1) on its
  own, behind a table of offsets: lossless, about 30 % smaller than the raw array, a map decoded in about a
  millisecond without touching the others.
* **Deterministic.** Chunk names are sequence numbers, rows carry no timestamps: the same work in the same order
  gives the same bytes.

>>> import tempfile, numpy as np
>>> store = MapStore(tempfile.mkdtemp())
>>> with store.writer() as w:
...     w.add(MapKey("img1", "m", "centroid:S1", "hirescam", "backbone.layer4"), np.ones((112, 112)), target_value=0.5)
...     w.add(MapKey("img1", "m", "centroid:S1", "saliency", ""), np.full((112, 112), np.nan))
True
False
>>> len(store.index()), len(store.errors())
(1, 1)
>>> store.index(target=TargetKey("centroid", "S1"))["target_kind"].tolist()
['centroid']
>>> float(store.load(MapKey("img1", "m", "centroid:S1", "hirescam", "backbone.layer4")).sum())
12544.0
"""

from __future__ import annotations

import json
import mmap
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from gestalt_xai.attribution.targets import TargetKey
from gestalt_xai.errors import InputError
from gestalt_xai.faces.align import CROP_SIZE
from gestalt_xai.runs import atomic_write_bytes, write_parquet

__all__ = ["MapKey", "MapStore", "MapWriter", "TargetKey", "KEY_COLUMNS", "INDEX_COLUMNS", "MAP_SHAPE",
           "decode_chunk", "encode_chunk", "require_maps"]

MAP_SHAPE = (CROP_SIZE, CROP_SIZE)
KEY_COLUMNS = ["image_id", "model_id", "target", "method", "layer"]
PROVENANCE_COLUMNS = ["model_hash", "target_kind", "target_value", "target_detail", "method_params"]
STAT_COLUMNS = ["map_min", "map_max", "map_sum"]
INDEX_COLUMNS = KEY_COLUMNS + ["chunk", "offset"] + PROVENANCE_COLUMNS + STAT_COLUMNS
ERROR_COLUMNS = KEY_COLUMNS + ["error_kind", "message"]
_PART = re.compile(r"^(?P<writer>[A-Za-z0-9_]+)-(?P<n>\d{6})\.(?:maps|npy|parquet)$")
#: first bytes of a compressed chunk; then the number of maps n (uint32), n + 1 byte offsets (uint64) of the
#: deflated maps after the header, and the maps, each its float32 byte planes deflated on its own
CHUNK_MAGIC = b"GXMAPS2\n"
_MAP_BYTES = 4 * MAP_SHAPE[0] * MAP_SHAPE[1]


def _planes(m: np.ndarray) -> bytes:
    return np.ascontiguousarray(m, dtype="<f4").view(np.uint8).reshape(-1, 4).T.tobytes()


def _unplanes(data: bytes) -> np.ndarray:
    planes = np.frombuffer(data, np.uint8)
    if planes.size != _MAP_BYTES:
        raise InputError(f"a map-store chunk's map holds {planes.size} bytes, not {_MAP_BYTES}")
    return np.ascontiguousarray(planes.reshape(4, -1).T).view("<f4").reshape(MAP_SHAPE)


def encode_chunk(maps: np.ndarray) -> bytes:
    """The bytes of a chunk: each of ``maps`` (``(n, 112, 112)``, stored as little-endian float32) as four byte
    planes, deflated on its own, behind a table of offsets (so one map is read without the others). Same maps →
    same bytes.

    >>> m = np.random.default_rng(0).normal(size=(3, 112, 112)).astype(np.float32)
    >>> np.array_equal(decode_chunk(encode_chunk(m)), m)
    True
    """
    arr = np.asarray(maps).reshape(-1, *MAP_SHAPE)
    parts = [zlib.compress(_planes(m), 1) for m in arr]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype("<u8")
    return CHUNK_MAGIC + struct.pack("<I", len(parts)) + offsets.tobytes() + b"".join(parts)


class _Chunk:
    """A compressed chunk read lazily: ``chunk[i]`` decodes map ``i`` only (the file is memory-mapped)."""

    def __init__(self, data: bytes | memoryview | mmap.mmap, where: str = "chunk") -> None:
        if bytes(data[:len(CHUNK_MAGIC)]) != CHUNK_MAGIC:
            raise InputError(f"{where}: not a map-store chunk (bad header)")
        head = len(CHUNK_MAGIC)
        (self.n,) = struct.unpack("<I", bytes(data[head:head + 4]))
        self._offsets = np.frombuffer(bytes(data[head + 4:head + 4 + 8 * (self.n + 1)]), "<u8")
        self._base = head + 4 + 8 * (self.n + 1)
        self._data, self._where = data, where

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(f"{self._where}: map {i} of {self.n}")
        a, b = self._base + int(self._offsets[i]), self._base + int(self._offsets[i + 1])
        try:
            return _unplanes(zlib.decompress(self._data[a:b]))
        except zlib.error as exc:
            raise InputError(f"{self._where}: map {i} is damaged ({exc})") from None


def decode_chunk(data: bytes) -> np.ndarray:
    """All maps of a chunk written by :func:`encode_chunk`, as float32 ``(n, 112, 112)``."""
    chunk = _Chunk(data)
    return np.stack([chunk[i] for i in range(len(chunk))]) if len(chunk) else np.empty((0, *MAP_SHAPE), np.float32)


class MapKey(NamedTuple):
    """Identity of one stored map (``target``: the string of a :class:`TargetKey`)."""

    image_id: str
    model_id: str
    target: str
    method: str
    layer: str = ""

    @property
    def target_key(self) -> TargetKey:
        return TargetKey.parse(self.target)


def _map_key(key: MapKey | Sequence[Any]) -> MapKey:
    """A key with every field a string (a :class:`TargetKey` is written ``kind:ref``)."""
    return MapKey(*(str(v) for v in key))


@dataclass
class _Pending:
    key: MapKey
    data: np.ndarray
    provenance: dict[str, Any]


def _json(obj: Any) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)


class MapStore:
    """A map store rooted at ``root`` (``run/maps``); see the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for sub in ("chunks", "index", "errors"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._index_cache: pd.DataFrame | None = None

    # ---- index ------------------------------------------------------------------------------------------
    def _fragments(self, sub: str) -> list[Path]:
        return sorted(p for p in (self.root / sub).glob("*.parquet") if _PART.match(p.name))

    def index(self, **filters: Any) -> pd.DataFrame:
        """The index (one row per stored map), optionally filtered: ``index(method="hirescam", image_id=[…])``.

        A filter value may be a scalar or a collection of accepted values.
        """
        if self._index_cache is None:
            frames = []
            if (self.root / "index.parquet").exists():
                frames.append(pd.read_parquet(self.root / "index.parquet"))
            frames += [pd.read_parquet(p) for p in self._fragments("index")]
            frames = [f for f in frames if len(f)]
            if frames:
                df = pd.concat(frames, ignore_index=True)
                # a crash between compact()'s write and its fragment deletion leaves duplicates: keep the first
                df = df.drop_duplicates(KEY_COLUMNS, keep="first").reset_index(drop=True)
            else:
                df = pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in INDEX_COLUMNS})
            self._index_cache = df
        df = self._index_cache
        for col, val in filters.items():
            if col not in df.columns:
                raise ValueError(f"unknown index column {col!r}; columns: {list(df.columns)}")
            if isinstance(val, TargetKey):
                val = str(val)
            elif not (isinstance(val, str | int | float | bool) or val is None):
                val = [str(v) if isinstance(v, TargetKey) else v for v in val]
            if isinstance(val, str | int | float | bool) or val is None:
                df = df[df[col] == val]
            else:
                df = df[df[col].isin(list(val))]
        return df

    def keys(self) -> set[MapKey]:
        """Keys of every stored map."""
        idx = self.index()
        return {MapKey(*row) for row in idx[KEY_COLUMNS].itertuples(index=False, name=None)}

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and _map_key(key) in self.keys()

    def __len__(self) -> int:
        return len(self.index())

    def errors(self) -> pd.DataFrame:
        """Maps refused so far (NaN/inf …), one row per attempt; keys stored later are dropped."""
        frames = [pd.read_parquet(p) for p in self._fragments("errors")]
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype="string") for c in ERROR_COLUMNS})
        err = pd.concat(frames, ignore_index=True)
        stored = self.keys()
        keep = [MapKey(*r) not in stored for r in err[KEY_COLUMNS].itertuples(index=False, name=None)]
        return err[keep].reset_index(drop=True)

    # ---- reading ----------------------------------------------------------------------------------------
    def _chunk_path(self, name: str) -> Path:
        path = self.root / "chunks" / f"{name}.maps"
        return path if path.exists() else self.root / "chunks" / f"{name}.npy"

    def _chunk(self, name: str) -> Any:
        """A chunk's maps, indexable by offset: a compressed chunk memory-mapped and decoded one map at a time, or a
        memory-mapped ``.npy`` chunk of an older store."""
        path = self._chunk_path(name)
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r")
        with open(path, "rb") as f:
            return _Chunk(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), str(path))

    def iter_maps(self, rows: pd.DataFrame | None = None,
                  **filters: Any) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        """Yield ``(index row as dict, map)`` for the selected rows, one chunk in memory at a time.

        ``rows`` is a subset of :meth:`index` (default: ``index(**filters)``); maps come in chunk order.
        """
        sel = self.index(**filters) if rows is None else rows
        for chunk, grp in sel.groupby("chunk", sort=True):
            arr = self._chunk(str(chunk))
            for row in grp.sort_values("offset").to_dict("records"):
                yield row, np.array(arr[int(row["offset"])], dtype=np.float32)

    def load(self, key: MapKey | Sequence[str]) -> np.ndarray:
        """One map by key; :class:`~gestalt_xai.errors.InputError` if it is not stored."""
        k = _map_key(key)
        sel = self.index(**dict(zip(KEY_COLUMNS, astuple_key(k), strict=True)))
        if not len(sel):
            raise InputError(f"map {k} is not in the store {self.root}")
        row = sel.iloc[0]
        return np.array(self._chunk(str(row["chunk"]))[int(row["offset"])], dtype=np.float32)

    def load_many(self, rows: pd.DataFrame) -> np.ndarray:
        """Maps of ``rows`` stacked in the order of ``rows``: ``(len(rows), 112, 112)``."""
        out = np.empty((len(rows), *MAP_SHAPE), np.float32)
        pos = {i: n for n, i in enumerate(rows.index)}
        for chunk, grp in rows.groupby("chunk", sort=True):
            arr = self._chunk(str(chunk))
            for i, off in zip(grp.index, grp["offset"], strict=True):
                out[pos[i]] = arr[int(off)]
        return out

    # ---- writing ----------------------------------------------------------------------------------------
    def writer(self, writer_id: str = "w0", chunk_maps: int = 512) -> MapWriter:
        """A :class:`MapWriter` (use as a context manager); ``writer_id`` separates parallel writers' files."""
        return MapWriter(self, writer_id, chunk_maps)

    def _next_number(self, writer_id: str) -> int:
        n = 0
        for sub in ("chunks", "index", "errors"):
            for p in (self.root / sub).iterdir():
                m = _PART.match(p.name)
                if m and m.group("writer") == writer_id:
                    n = max(n, int(m.group("n")))
        return n + 1

    def _invalidate(self) -> None:
        self._index_cache = None

    def absorb(self, other: MapStore, writer_id: str = "w0") -> int:
        """Append the flushes of another store (a shard's, written by its own writers) as this store's next
        flushes of ``writer_id``, in the other's flush order; returns the maps added.

        Each flush of ``other`` becomes one flush here (its chunk's bytes copied, its index fragment re-pointed at
        the new chunk name, its error rows kept), so absorbing shards in a fixed order gives exactly the files one
        writer would have written flushing the same batches in that order. Keys already stored here are dropped
        from the index fragment (their maps stay unreferenced in the copied chunk); a flush whose keys are all
        stored already is skipped.
        """
        names = sorted({p.stem for sub in ("chunks", "index", "errors") for p in (other.root / sub).iterdir()
                        if _PART.match(p.name)}, key=lambda n: (n.rsplit("-", 1)[0], int(n.rsplit("-", 1)[1])))
        known = self.keys()
        added = 0
        for name in names:
            index_path, chunk_path = other.root / "index" / f"{name}.parquet", other._chunk_path(name)
            errors_path = other.root / "errors" / f"{name}.parquet"
            rows = pd.read_parquet(index_path) if index_path.exists() and chunk_path.exists() else None
            if rows is not None:
                fresh = [MapKey(*r) not in known for r in rows[KEY_COLUMNS].itertuples(index=False, name=None)]
                rows = rows[fresh]
            if (rows is None or not len(rows)) and not errors_path.exists():
                continue
            new = f"{writer_id}-{self._next_number(writer_id):06d}"
            if rows is not None and len(rows):
                atomic_write_bytes(self.root / "chunks" / f"{new}{chunk_path.suffix}", chunk_path.read_bytes())
                rows = rows.assign(chunk=new).astype({c: _dtype(c) for c in INDEX_COLUMNS})
                write_parquet(rows.reset_index(drop=True), self.root / "index" / f"{new}.parquet")
                known |= {MapKey(*r) for r in rows[KEY_COLUMNS].itertuples(index=False, name=None)}
                added += len(rows)
            if errors_path.exists():
                atomic_write_bytes(self.root / "errors" / f"{new}.parquet", errors_path.read_bytes())
            self._invalidate()
        return added

    def compact(self) -> None:
        """Fold the index fragments into ``index.parquet`` (atomic), then delete the fragments."""
        frags = self._fragments("index")
        if not frags:
            return
        self._invalidate()
        df = self.index().sort_values(["chunk", "offset"], kind="stable").reset_index(drop=True)
        write_parquet(df, self.root / "index.parquet")
        for p in frags:
            p.unlink()
        self._invalidate()


def astuple_key(k: MapKey) -> tuple[str, ...]:
    return tuple(k)


def _dtype(col: str) -> str:
    if col == "offset":
        return "int64"
    if col in ("target_value", *STAT_COLUMNS):
        return "float64"
    return "string"


class MapWriter(AbstractContextManager["MapWriter"]):
    """Buffers maps and flushes them as one chunk + one index fragment (at ``chunk_maps`` maps and on exit)."""

    def __init__(self, store: MapStore, writer_id: str = "w0", chunk_maps: int = 512) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", writer_id):
            raise ValueError(f"writer_id must be alphanumeric/underscore, got {writer_id!r}")
        self.store = store
        self.writer_id = writer_id
        self.chunk_maps = chunk_maps
        self._pending: list[_Pending] = []
        self._errors: list[dict[str, Any]] = []
        self._known = store.keys()
        self.n_stored = 0
        self.n_refused = 0

    def done(self, key: MapKey | Sequence[str]) -> bool:
        """Whether ``key`` is stored already (or waiting in this writer's buffer)."""
        return _map_key(key) in self._known

    def add(self, key: MapKey | Sequence[Any], data: np.ndarray | Any, *, model_hash: str = "",
            target_kind: str | None = None, target_value: float = float("nan"), target_detail: Any = "",
            method_params: Any = "") -> bool:
        """Queue one map; returns ``False`` (and records an error row) when it is not finite, ``True`` otherwise.

        ``data`` must be 112×112 (a torch tensor or array); it is stored as float32, unmodified. The key's target must
        be ``kind:ref`` (a :class:`TargetKey` or its string); ``target_kind``, if given, must be that kind.
        """
        k = _map_key(key)
        kind = k.target_key.kind
        if target_kind is not None and target_kind != kind:
            raise ValueError(f"map {k}: target_kind {target_kind!r} is not the kind of its target {k.target!r}")
        if hasattr(data, "detach"):
            data = data.detach().cpu().numpy()
        arr = np.asarray(data, dtype=np.float32)
        if arr.shape != MAP_SHAPE:
            raise ValueError(f"map {k} has shape {arr.shape}, expected {MAP_SHAPE}")
        if k in self._known:
            return True
        if not np.isfinite(arr).all():
            n_bad = int((~np.isfinite(arr)).sum())
            self._errors.append({**k._asdict(), "error_kind": "non_finite_map",
                                 "message": f"{n_bad} NaN/inf values; map not stored (method params: "
                                            f"{_json(method_params)})"})
            self.n_refused += 1
            return False
        prov = {"model_hash": model_hash, "target_kind": kind, "target_value": float(target_value),
                "target_detail": _json(target_detail), "method_params": _json(method_params)}
        self._pending.append(_Pending(k, arr, prov))
        self._known.add(k)
        if len(self._pending) >= self.chunk_maps:
            self.flush()
        return True

    def flush(self) -> None:
        """Write buffered maps (chunk, then index fragment) and buffered error rows."""
        if not self._pending and not self._errors:
            return
        n = self.store._next_number(self.writer_id)
        name = f"{self.writer_id}-{n:06d}"
        if self._pending:
            stack = np.stack([p.data for p in self._pending])
            atomic_write_bytes(self.store.root / "chunks" / f"{name}.maps", encode_chunk(stack))
            rows = []
            for off, p in enumerate(self._pending):
                rows.append({**p.key._asdict(), "chunk": name, "offset": off, **p.provenance,
                             "map_min": float(p.data.min()), "map_max": float(p.data.max()),
                             "map_sum": float(p.data.astype(np.float64).sum())})
            df = pd.DataFrame(rows, columns=INDEX_COLUMNS).astype({c: _dtype(c) for c in INDEX_COLUMNS})
            write_parquet(df, self.store.root / "index" / f"{name}.parquet")
            self.n_stored += len(self._pending)
            self._pending.clear()
        if self._errors:
            err = pd.DataFrame(self._errors, columns=ERROR_COLUMNS).astype("string")
            write_parquet(err, self.store.root / "errors" / f"{name}.parquet")
            self._errors.clear()
        self.store._invalidate()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # maps already added are complete, whatever happens after: keep them
        self.flush()


def iter_keys(rows: Iterable[Sequence[str]]) -> list[MapKey]:
    """Rows of key values → :class:`MapKey` list."""
    return [MapKey(*r) for r in rows]


def require_maps(run: Any) -> tuple[MapStore, pd.DataFrame]:
    """A run's map store and its index, for the stages that read maps; an :class:`InputError` saying to run the
    explain stage when the store is missing or empty."""
    from gestalt_xai.runs import LAYOUT

    if not (run.path / LAYOUT.maps).exists():
        raise InputError(f"{run.path / LAYOUT.maps} not found: run `gestalt-xai explain --run {run.path}` first")
    store = run.map_store()
    index = store.index()
    if not len(index):
        raise InputError(f"the map store {run.path / LAYOUT.maps} is empty: run `gestalt-xai explain` first")
    return store, index
