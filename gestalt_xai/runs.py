"""Run folders: one study = one folder, with a manifest, an error table and resumable work units.

A :class:`Run` owns ``manifest.json`` (configuration, package versions, seeds, model hashes, git commit, stage timings
and peak memory) and ``errors.parquet`` (every per-item failure, never silent). Stages record finished work units in a
:class:`Ledger` (an append-only JSON-lines file flushed to disk after every item), write each output to a temporary
name and rename it, and rebuild their tables from the ledger sorted by item id. A run killed at any point therefore
resumes where it stopped, and a rerun with the same configuration and seed reproduces every output byte for byte;
only the ``timing`` entries of the manifest differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
from pydantic import BaseModel

from gestalt_xai.files import atomic_write_bytes, atomic_write_text, sha256_file, write_parquet
from gestalt_xai.ledger import Ledger, _json_default
from gestalt_xai.provenance import git_commit, package_versions, peak_memory_mb

if TYPE_CHECKING:
    from gestalt_xai.pseudonyms import PseudonymMap

log = logging.getLogger(__name__)

__all__ = [
    "Run",
    "Ledger",
    "Parts",
    "ErrorRow",
    "StageRecord",
    "ERROR_COLUMNS",
    "LAYOUT",
    "RunLayout",
    "RunModel",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_parquet",
    "seed_everything",
    "torch_threads",
    "sha256_file",
]

#: ``key`` holds the failed work unit's structured key (JSON object, sorted keys; "" when the item id says it all)
ERROR_COLUMNS = ["stage", "item_id", "error_kind", "message", "key"]

T = TypeVar("T")


@dataclass(frozen=True)
class RunLayout:
    """Where things live inside a run folder (paths relative to it): the one definition of the folder layout."""

    manifest: str = "manifest.json"
    errors: str = "errors.parquet"
    ledger: str = ".ledger"
    cohort: str = "cohort"
    #: a synthetic cohort's counterfactual renderings (gestalt_xai.data.synthetic.truth), and their aligned crops
    counterfactuals: str = "cohort/counterfactuals"
    aligned: str = "aligned"
    alignments: str = "aligned/alignment.parquet"
    counterfactual_crops: str = "aligned/counterfactuals"
    counterfactual_crop_table: str = "aligned/counterfactuals/counterfactuals.parquet"
    models: str = "models"
    permuted_labels: str = "controls/permuted_labels"  # train's permute_labels control: never read as a run model
    embeddings: str = "embeddings.parquet"
    matching: str = "matching"
    ranks: str = "matching/ranks.parquet"
    maps: str = "maps"
    aggregate: str = "aggregate"
    assess: str = "assess"
    eyetracking: str = "experiments/eyetracking"
    imbalance: str = "experiments/imbalance"
    #: what stays with the analyst: never exported, never in a report (gestalt_xai.pseudonyms)
    pseudonym_secret: str = "private/pseudonym_secret.json"

    def crop(self, image_id: str) -> str:
        """The aligned 112×112 crop of ``image_id``."""
        return f"{self.aligned}/{image_id}.png"

    def counterfactual_crop(self, image_id: str, variant: str) -> str:
        """The aligned crop of one counterfactual rendering of ``image_id``."""
        return f"{self.counterfactual_crops}/{image_id}/{variant}.png"

    def change_mask_crop(self, image_id: str) -> str:
        """The crop-space change masks of ``image_id``'s counterfactuals (one bit per variant)."""
        return f"{self.counterfactual_crops}/{image_id}/change_masks.png"


#: the layout every run folder follows
LAYOUT = RunLayout()


@dataclass(frozen=True)
class RunModel:
    """A model stored in the run (``models/<model_id>.safetensors`` with its ``.json`` description)."""

    model_id: str
    path: Path


# ---------------------------------------------------------------------------------------------- seeds and progress
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's legacy and torch's global generators (code should still prefer explicit generators)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU threads (a process-wide setting, so it is restored); ``None``: unchanged."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class ErrorRow:
    """One per-item failure, as stored in ``errors.parquet`` (the stage instance that writes it fills ``stage``).

    ``item_id`` names the input that failed (an image id, a file); ``key`` the work unit when one input has several
    (e.g. ``{"model_id": "m", "target": "centroid:S01", "method": "gradcam"}``), stored as a JSON object.
    """

    item_id: str
    error_kind: str
    message: str
    key: Mapping[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, str]:
        """The row as ``errors.parquet`` stores it (without the stage column)."""
        key = json.dumps(dict(self.key), sort_keys=True, default=str) if self.key else ""
        return {"item_id": str(self.item_id), "error_kind": self.error_kind, "message": self.message, "key": key}


@dataclass
class StageRecord:
    """What a stage reports about itself while it runs; written to the manifest when the stage ends."""

    name: str
    n_items: int = 0
    n_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- Run
class Run:
    """A study folder (``runs/<name>/``) with its manifest, error table and per-stage subfolders.

    Parameters
    ----------
    path:
        The run folder; created if missing. An existing folder is reopened and its manifest kept.

    Examples
    --------
    >>> import tempfile
    >>> run = Run(tempfile.mkdtemp())
    >>> with run.stage("demo", {"size": 3}, seed=0) as st:
    ...     st.n_items = 2
    >>> run.manifest["stages"]["demo"]["n_items"]
    2
    """

    MANIFEST = LAYOUT.manifest
    ERRORS = LAYOUT.errors

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self._manifest = self._read_manifest()
        #: the stage instance running now (set by :meth:`stage`): it keys ledgers and error rows
        self._active: str | None = None
        self._cache: dict[str, tuple[Any, Any]] = {}
        if not (self.path / self.ERRORS).exists():
            write_parquet(pd.DataFrame({c: pd.Series(dtype="string") for c in ERROR_COLUMNS}), self.path / self.ERRORS)

    # -- folders -------------------------------------------------------------------------------------------
    def dir(self, name: str) -> Path:
        """Return (and create) the subfolder ``name`` of the run."""
        d = self.path / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def relative(self, path: str | Path) -> str:
        """``path`` relative to the run folder when it lies inside it (POSIX separators), else absolute."""
        p = Path(path)
        p = p if p.is_absolute() else Path.cwd() / p
        try:
            return p.resolve().relative_to(self.path).as_posix()
        except ValueError:
            return str(p.resolve())

    def shorten(self, text: str) -> str:
        """``text`` (e.g. an error message) with paths inside the run written relative to it."""
        return text.replace(f"{self.path}{os.sep}", "")

    def resolve(self, stored: str | Path) -> Path:
        """The absolute path of a path stored by :meth:`relative`."""
        p = Path(stored)
        return p if p.is_absolute() else self.path / p

    @property
    def active_stage(self) -> str:
        """The id of the stage instance running now (``align``, ``explain#2`` …)."""
        if self._active is None:
            raise RuntimeError("no stage is running: call the stage's entry function (it opens run.stage)")
        return self._active

    def ledger(self, config: BaseModel | dict[str, Any] | None = None, ignore: tuple[str, ...] = (),
               instance: str | None = None) -> Ledger:
        """The work-unit ledger of the running stage instance (``.ledger/<instance>.jsonl``; ``instance`` names
        another one, e.g. to inspect a finished run).

        With ``config``, finished items count as done only if they were made with the same options (fields named
        in ``ignore``, such as worker counts, do not matter), so a rerun with changed options recomputes them.
        """
        fp = None
        if config is not None:
            data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
            data = {k: v for k, v in data.items() if k not in ignore}
            fp = hashlib.sha256(json.dumps(data, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]
        name = (instance or self.active_stage).replace("#", "-")
        return Ledger(self.path / LAYOUT.ledger / f"{name}.jsonl", fingerprint=fp)

    # -- tables the stages hand each other (typed, cached while the files are unchanged; treat as read-only) ------
    def _cached(self, name: str, files: Iterable[Path], load: Any) -> Any:
        signature = []
        for f in files:
            try:
                st = f.stat()
                signature.append((str(f), st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                signature.append((str(f), None, None))
        hit = self._cache.get(name)
        if hit is not None and hit[0] == signature:
            return hit[1]
        value = load()
        self._cache[name] = (signature, value)
        return value

    def _require(self, rel: str, producer: str) -> Path:
        path = self.path / rel
        if not path.exists():
            from gestalt_xai.errors import InputError

            raise InputError(f"{path} not found: run the {producer} stage on this run first "
                             f"(`gestalt-xai {producer} --run {self.path}`)")
        return path

    def cohort(self) -> Any:
        """The run's :class:`~gestalt_xai.data.cohort.Cohort` (string ids; image paths absolute)."""
        from gestalt_xai.data.cohort import COHORT_FILES, load_run_cohort

        self._require(f"{LAYOUT.cohort}/images.parquet", "align")
        files = [self.path / LAYOUT.cohort / f for f in COHORT_FILES]
        cohort = self._cached("cohort", files, lambda: load_run_cohort(self))
        return dataclasses.replace(cohort, images=cohort.images.copy(), syndromes=cohort.syndromes.copy(),
                                   splits=cohort.splits.copy(), lookup=list(cohort.lookup or []) or cohort.lookup)

    def alignments(self, aligned_only: bool = False) -> pd.DataFrame:
        """``aligned/alignment.parquet``: one row per photo, or with ``aligned_only`` the aligned images' rows.

        An image is *aligned* when its row is ``ok`` and its crop exists: the one definition every stage uses.
        """
        path = self._require(LAYOUT.alignments, "align")
        table = self._cached("alignments", [path], lambda: pd.read_parquet(path).astype({"image_id": str})).copy()
        if aligned_only:
            keep = table["ok"].astype(bool) & np.array([self.crop_path(i).is_file() for i in table["image_id"]], bool)
            table = table[keep].reset_index(drop=True)
        return table

    def crop_path(self, image_id: str) -> Path:
        """Path of the aligned crop of ``image_id``."""
        return self.path / LAYOUT.crop(image_id)

    def aligned_ids(self) -> list[str]:
        """The aligned images' ids, sorted (see :meth:`alignments`); in a run whose crops were made elsewhere (no
        alignment table, e.g. maps imported with their crops) every crop in ``aligned/``."""
        if not (self.path / LAYOUT.alignments).exists():
            return sorted(p.stem for p in (self.path / LAYOUT.aligned).glob("*.png"))
        return sorted(self.alignments(aligned_only=True)["image_id"])

    def crops(self, image_ids: Iterable[str]) -> np.ndarray:
        """Aligned crops as an ``(N, 112, 112, 3)`` RGB uint8 array, in the given order."""
        from gestalt_xai.data.aligned import load_crops

        return load_crops(self, list(image_ids))

    def counterfactuals(self) -> pd.DataFrame:
        """The counterfactual renderings with an aligned crop: ``cohort/counterfactuals/counterfactuals.parquet``'s
        columns (:mod:`~gestalt_xai.data.synthetic.truth`) plus ``crop_path`` (absolute) and ``change_px_crop``."""
        table = pd.concat(self._counterfactual_groups().values()) if self._counterfactual_groups() else \
            self._counterfactual_table().iloc[:0]
        return table[table["crop_path"].map(os.path.isfile).astype(bool)].reset_index(drop=True)

    def _counterfactual_table(self) -> pd.DataFrame:
        path = self._require(LAYOUT.counterfactual_crop_table, "align")

        def load() -> pd.DataFrame:
            table = pd.read_parquet(path).astype({"image_id": str})
            return table.assign(crop_path=[str(self.path / LAYOUT.counterfactual_crop(i, v))
                                           for i, v in zip(table["image_id"], table["variant"], strict=True)])

        return self._cached("counterfactuals", [path], load)

    def _counterfactual_groups(self) -> dict[str, pd.DataFrame]:
        """The crop table's rows per image (cached with it): per-image look-ups cost no scan of the whole table."""
        path = self.path / LAYOUT.counterfactual_crop_table
        return self._cached("counterfactual_groups", [path], lambda: {
            str(i): g for i, g in self._counterfactual_table().groupby("image_id", sort=True)})

    def _counterfactual_rows(self, image_id: str) -> pd.DataFrame:
        rows = self._counterfactual_groups().get(str(image_id))
        if rows is None:
            return self._counterfactual_table().iloc[:0]
        return rows[rows["crop_path"].map(os.path.isfile).astype(bool)]

    def counterfactual_crops(self, image_id: str) -> dict[str, np.ndarray]:
        """``{variant: uint8 (112, 112, 3)}``: the aligned crops of ``image_id``'s counterfactuals."""
        from gestalt_xai.data.aligned import read_crop

        rows = self._counterfactual_rows(image_id)
        return {v: read_crop(Path(p)) for v, p in zip(rows["variant"], rows["crop_path"], strict=True)}

    def change_masks(self, image_id: str) -> dict[str, np.ndarray]:
        """``{variant: bool (112, 112)}``: the crop-space change masks of ``image_id``'s counterfactuals."""
        from gestalt_xai.data.synthetic.truth import decode_mask_bits

        rows = self._counterfactual_rows(image_id)
        bits = decode_mask_bits(self.path / LAYOUT.change_mask_crop(image_id)) if len(rows) else None
        return {v: (bits >> int(b)) & 1 == 1 for v, b in zip(rows["variant"], rows["mask_bit"], strict=True)}

    def embeddings(self) -> pd.DataFrame:
        """``embeddings.parquet`` (image_id, model_id, flip, gray, embedding, logits; string ids)."""
        path = self._require(LAYOUT.embeddings, "embed")

        def load() -> pd.DataFrame:
            table = pd.read_parquet(path)
            return table.assign(image_id=table["image_id"].astype(str), model_id=table["model_id"].astype(str))

        return self._cached("embeddings", [path], load).copy()

    def models(self) -> list[RunModel]:
        """The models stored in the run, sorted by id (the one model discovery)."""
        return [RunModel(p.stem, p) for p in sorted((self.path / LAYOUT.models).glob("*.safetensors"))]

    def ranks(self) -> pd.DataFrame:
        """``matching/ranks.parquet``: each test image's rank of every syndrome per protocol (match stage)."""
        path = self._require(LAYOUT.ranks, "match")
        return self._cached("ranks", [path], lambda: pd.read_parquet(path)).copy()

    def map_store(self) -> Any:
        """The map store ``maps/`` (:class:`~gestalt_xai.store.MapStore`)."""
        from gestalt_xai.store import MapStore

        return MapStore(self.path / LAYOUT.maps)

    def image_table(self) -> pd.DataFrame:
        """One row per cohort image: ids, optional metadata (sex, age, ancestry), ``sets`` (the protocol sets it
        belongs to, comma-joined and sorted), ``test`` / ``gallery`` (in a test / gallery set of the protocol),
        ``undiagnosed`` (no diagnosis: never test nor gallery) and ``aligned``; joined once and shared by the
        stages."""
        from gestalt_xai.data.cohort import GALLERY_SETS, TEST_SETS, UNDIAGNOSED

        cohort = self.cohort()
        files = [self.path / LAYOUT.cohort / "images.parquet", self.path / LAYOUT.cohort / "splits.parquet",
                 self.path / LAYOUT.alignments]

        def load() -> pd.DataFrame:
            table = cohort.images.drop(columns=["path"], errors="ignore").copy()
            sets = (cohort.splits.groupby(cohort.splits["image_id"].astype(str))["set"]
                    .agg(lambda s: ",".join(sorted(set(s)))) if len(cohort.splits) else pd.Series(dtype=str))
            table["sets"] = [sets.get(i, "") for i in table["image_id"]]
            member = table["sets"].str.split(",")
            table["undiagnosed"] = table["syndrome_id"].astype(str) == UNDIAGNOSED
            table["test"] = member.map(lambda s: any(x in TEST_SETS for x in s)) & ~table["undiagnosed"]
            table["gallery"] = member.map(lambda s: any(x in GALLERY_SETS for x in s)) & ~table["undiagnosed"]
            table["aligned"] = table["image_id"].isin(set(self.aligned_ids()))
            return table.sort_values("image_id", kind="stable").reset_index(drop=True)

        return self._cached("image_table", files, load).copy()

    def pseudonyms(self, seed: int | None = None) -> PseudonymMap:
        """The run's salted pseudonym mapping (:class:`~gestalt_xai.pseudonyms.PseudonymMap`), one per run.

        Created on first use from the study seed (``seed`` when no study is recorded, else 0) unless
        :meth:`set_pseudonym_secret` stored a random one; see :mod:`gestalt_xai.pseudonyms` for what each protects.
        """
        from gestalt_xai.pseudonyms import load_or_create

        study_seed = self._manifest.get("study", {}).get("seed")
        chosen = study_seed if isinstance(study_seed, int) else seed if seed is not None else 0
        return load_or_create(self.path / LAYOUT.pseudonym_secret, chosen)

    def set_pseudonym_secret(self, secret: str | None = None, *, replace: bool = False) -> PseudonymMap:
        """Give the run a user-set pseudonym secret (``None``: random): :func:`gestalt_xai.pseudonyms.set_secret`."""
        from gestalt_xai.pseudonyms import set_secret

        return set_secret(self.path / LAYOUT.pseudonym_secret, secret, replace=replace)

    # -- manifest ------------------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as last written."""
        return json.loads(json.dumps(self._manifest))

    def _read_manifest(self) -> dict[str, Any]:
        p = self.path / self.MANIFEST
        if p.exists():
            return json.loads(p.read_text(encoding="utf-8"))
        return {"stages": {}, "models": {}}

    def _write_manifest(self) -> None:
        m = self._manifest
        m["gestalt_xai_version"] = package_versions()["gestalt-xai"]
        m["packages"] = package_versions()
        m["python"] = sys.version.split()[0]
        m["platform"] = f"{platform.system()}-{platform.machine()}"
        m["git_commit"] = git_commit()
        text = json.dumps(m, indent=2, sort_keys=True, default=_json_default) + "\n"
        atomic_write_text(self.path / self.MANIFEST, text)

    def set_study(self, name: str, seed: int, config: dict[str, Any], **facts: Any) -> None:
        """Record the pipeline (study) definition this run follows (``facts``: e.g. the variables and overrides)."""
        self._manifest["study"] = {"name": name, "seed": seed, "config": config, **facts}
        self._write_manifest()

    def record(self, key: str, value: Any) -> None:
        """Record ``value`` under the manifest's top-level ``key`` (e.g. the study runner's ``measurements``)."""
        self._manifest[key] = value
        self._write_manifest()

    def update_stage(self, instance: str, **fields: Any) -> None:
        """Set fields of a stage instance's manifest entry (created if missing; ``None`` removes a field)."""
        entry = self._manifest.setdefault("stages", {}).setdefault(instance, {"stage": instance.split("#")[0]})
        entry.update(fields)
        for key in [k for k, v in fields.items() if v is None]:
            del entry[key]
        self._write_manifest()

    def record_model(self, model_id: str, sha256: str, info: dict[str, Any] | None = None) -> None:
        """Record a model's content hash and description under ``manifest["models"][model_id]``."""
        self._manifest.setdefault("models", {})[model_id] = {"sha256": sha256, **(info or {})}
        self._write_manifest()

    @contextlib.contextmanager
    def stage(self, name: str, cfg: BaseModel | dict[str, Any] | None = None,
              seed: int | None = None, kind: str | None = None) -> Iterator[StageRecord]:
        """Context manager around one stage: records options, seed, counts, timings and peak memory.

        The stage's entry is written as ``running`` first, then ``done`` or ``failed`` (with the error message), so an
        interrupted run is visible in the manifest.
        """
        config = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg or {})
        if self._active is not None:
            raise RuntimeError(f"stage {name!r} started while {self._active!r} is running")
        if seed is None and isinstance(config.get("seed"), int):
            seed = config["seed"]
        record = StageRecord(name=name)
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"stage": kind or name.split("#")[0], "config": config, "seed": seed,
                                 "status": "running",
                                 "timing": {"started": started.isoformat(timespec="seconds")}}
        self._manifest.setdefault("stages", {})[name] = entry
        self._write_manifest()
        status, message = "done", None
        self._active = name
        try:
            yield record
        except BaseException as exc:
            status, message = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._active = None
            entry.update({"status": status, "n_items": record.n_items, "n_errors": record.n_errors, **record.extra})
            if message:
                entry["error"] = message
            entry["timing"] = {
                "started": started.isoformat(timespec="seconds"),
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - t0, 3),
                "peak_memory_mb": peak_memory_mb(),
            }
            self._write_manifest()

    # -- errors --------------------------------------------------------------------------------------------
    def errors(self) -> pd.DataFrame:
        """All per-item failures recorded so far."""
        return pd.read_parquet(self.path / self.ERRORS)

    def error_count(self, stage: str) -> int:
        """Number of error rows of one stage instance."""
        return int((self.errors()["stage"] == stage).sum())

    def write_errors(self, rows: Iterable[ErrorRow]) -> None:
        """Replace the running stage instance's rows of ``errors.parquet`` with ``rows`` (sorted, so reruns give
        the same bytes); other instances' rows, e.g. the first ``explain``'s when ``explain#2`` runs, are kept."""
        stage = self.active_stage
        new = pd.DataFrame([{**r.as_record(), "stage": stage} for r in rows], columns=ERROR_COLUMNS)
        new["message"] = [self.shorten(m) for m in new["message"]]
        old = self.errors().reindex(columns=ERROR_COLUMNS).fillna("")
        table = pd.concat([old[old["stage"] != stage], new], ignore_index=True)
        table = table.astype("string").sort_values(["stage", "item_id", "key"], kind="stable").reset_index(drop=True)
        write_parquet(table, self.path / self.ERRORS)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


class Parts:
    """Resumable per-unit result tables of one stage: ``<root>/<family>/<key>.parquet``, each recorded in the
    stage's ledger under its options' fingerprint (``ignore``: options that change no number), so an interrupted
    run resumes without recomputing finished units and a rerun with other options recomputes them."""

    def __init__(self, run: Run, cfg: BaseModel, root: str | Path, ignore: tuple[str, ...] = ()) -> None:
        self.root = Path(root)
        self.ledger = run.ledger(cfg, ignore=ignore)
        self.done = set(self.ledger.done())
        self.reused = 0
        self.seconds: dict[str, float] = {}

    def get(self, family: str, key: str, compute: Callable[[], pd.DataFrame]) -> None:
        """Compute and store the family's table for unit ``key`` unless a finished one is recorded."""
        item = f"{family}/{key}"
        path = self.root / family / f"{key}.parquet"
        if item in self.done and path.exists():
            self.reused += 1
            return
        t0 = time.perf_counter()
        table = compute()
        self.seconds[family] = self.seconds.get(family, 0.0) + time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(table, path)
        self.ledger.add(item, {"rows": int(len(table))})

    def table(self, family: str, keys: Iterable[str]) -> pd.DataFrame:
        """The family's parts of the units ``keys`` (this run's units only), concatenated in key order."""
        frames = [pd.read_parquet(p) for k in sorted(set(keys))
                  if (p := self.root / family / f"{k}.parquet").exists()]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
