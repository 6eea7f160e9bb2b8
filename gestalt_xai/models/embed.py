"""The embed stage: every aligned crop through every model (and TTA slot) → ``run/embeddings.parquet``.

One row per (image, model, TTA slot)::

    image_id  str              model_id  str         flip  bool        gray  bool
    embedding list<float32>    (512-d, the BN1d output; not normalised)
    logits    list<float32>    classifier outputs in the model's class order, or null (embedding-only members,
                               e.g. GM-Arc's ``glint360k_r100.onnx``)

sorted by ``image_id, model_id, flip, gray``. TTA slots follow GM-Arc (``lib/encode.py``): {original, hflip} ×
{colour, 3-channel gray}; without TTA only ``flip = gray = False``.

Work is split into units of ``chunk_size`` images per model; each finished unit is written to
``run/.embed_parts/<model_id>/<unit>.parquet`` and recorded in the stage ledger, so an interrupted run resumes
with the next unit. A unit's name is a hash of the model's weights, the TTA setting and its image ids, so a
changed model or image set recomputes exactly what changed. The final table is rebuilt from the parts with a
fixed schema, so a rerun writes the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from gestalt_xai.config import StageConfig
from gestalt_xai.data.aligned import read_crop
from gestalt_xai.errors import GestaltXAIError, InputError, error_kind
from gestalt_xai.models.declaration import ModelDeclarations, load_declared, models_field, resolve_models
from gestalt_xai.runs import LAYOUT, Run
from gestalt_xai.stages import StageResult, stage

log = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_SCHEMA",
    "EmbedConfig",
    "embed_stage",
    "embedding_table",
    "write_embeddings",
]

#: Arrow schema of ``embeddings.parquet``.
EMBEDDING_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("model_id", pa.string()),
        ("flip", pa.bool_()),
        ("gray", pa.bool_()),
        ("embedding", pa.list_(pa.float32())),
        ("logits", pa.list_(pa.float32())),
    ]
)


class EmbedConfig(StageConfig):
    """Options of ``gestalt-xai embed``."""

    models: ModelDeclarations = models_field()
    tta: bool = Field(True, description="4 TTA slots {orig, hflip} x {colour, gray} (GM-Arc); off: 1 slot")
    batch_size: int = Field(16, ge=1, description="images per forward (8-16 is fastest per image on a 2-core CPU)")
    chunk_size: int = Field(256, ge=1, description="images per resumable work unit")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    threads: int | None = Field(None, ge=1, description="torch CPU threads while embedding (default: torch's)")


def embedding_table(rows: dict[str, list[Any]]) -> pa.Table:
    """Columns → Arrow table with :data:`EMBEDDING_SCHEMA`, sorted by image_id, model_id, flip, gray."""
    table = pa.table(rows, schema=EMBEDDING_SCHEMA)
    return table.sort_by(
        [("image_id", "ascending"), ("model_id", "ascending"), ("flip", "ascending"), ("gray", "ascending")]
    )


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_embeddings(table: pa.Table, path: Path) -> None:
    """Atomically write an embeddings table (same table → same bytes)."""
    from gestalt_xai.runs import atomic_write_bytes

    atomic_write_bytes(path, _table_bytes(table.cast(EMBEDDING_SCHEMA)))


def _encode_chunk(
    model: Any, run: Run, model_id: str, image_ids: list[str], cfg: EmbedConfig, device: Any
) -> tuple[pa.Table, list[tuple[str, str, str]]]:
    from gestalt_xai.models.gestaltmatcher import encode

    crops, ok_ids, errors = [], [], []
    for i in image_ids:
        try:
            crops.append(read_crop(run.crop_path(i)))
            ok_ids.append(i)
        except GestaltXAIError as exc:
            errors.append((i, error_kind(exc), str(exc)))
    rows: dict[str, list[Any]] = {c: [] for c in EMBEDDING_SCHEMA.names}
    if ok_ids:
        enc = encode(model, np.stack(crops), tta=cfg.tta, batch_size=cfg.batch_size, device=device)
        for s, (flip, gray) in enumerate(enc.slots):
            for n, image_id in enumerate(ok_ids):
                rows["image_id"].append(image_id)
                rows["model_id"].append(model_id)
                rows["flip"].append(bool(flip))
                rows["gray"].append(bool(gray))
                rows["embedding"].append(enc.embeddings[s, n])
                rows["logits"].append(enc.logits[s, n] if enc.logits is not None else None)
    return embedding_table(rows), errors


@stage("embed", options=EmbedConfig, order=50,
       summary="embed aligned faces with one model or an ensemble (with test-time augmentation)",
       reads=(LAYOUT.alignments, LAYOUT.models), writes=(LAYOUT.embeddings,), aliases={"models": "--model"},
       example="gestalt-xai embed --run runs/demo --model s1_r50.pth --model glint360k_r100.onnx",
       tiny_options={"tta": False})
def embed_stage(run: Run, cfg: EmbedConfig) -> StageResult:
    """Embed every aligned crop with every model into ``run/embeddings.parquet`` (resumable; GM-Arc TTA slots).

    Unreadable crops become rows of ``errors.parquet``.
    """
    import torch

    from gestalt_xai.progress import progress
    from gestalt_xai.runs import ErrorRow, atomic_write_bytes, torch_threads

    with torch_threads(cfg.threads):
        models = {m.model_id: m for m in resolve_models(run, cfg.models)}
        image_ids = run.aligned_ids()
        if not image_ids:
            raise InputError(f"no aligned crops in {run.path / LAYOUT.aligned}: run the align stage first")
        device = torch.device(
            "cuda"
            if cfg.device == "auto" and torch.cuda.is_available()
            else ("cpu" if cfg.device == "auto" else cfg.device)
        )
        ledger = run.ledger()
        done = ledger.done()
        parts_root = run.path / ".embed_parts"
        chunks = [image_ids[i : i + cfg.chunk_size] for i in range(0, len(image_ids), cfg.chunk_size)]
        units: list[tuple[str, str, list[str]]] = []  # (unit id, model_id, image ids)
        shas: dict[str, str] = {}
        for model_id, declared in models.items():
            sha = shas[model_id] = declared.sha256()
            # what changes the numbers: the weights, how they are read and fed, TTA, batching, device
            how = [declared.spec.format, declared.spec.channel_order]
            for ids in chunks:
                key = hashlib.sha256(
                    json.dumps([model_id, sha, *how, cfg.tta, cfg.batch_size, str(device), ids]).encode()
                )
                units.append((f"{model_id}/{key.hexdigest()[:20]}", model_id, ids))
        todo = [u for u in units if u[0] not in done or not (parts_root / f"{u[0]}.parquet").exists()]
        log.info(
            "embed: %d models x %d images; %d of %d work units to do",
            len(models),
            len(image_ids),
            len(todo),
            len(units),
        )
        loaded: dict[str, Any] = {}
        errors: dict[str, tuple[str, str, str]] = {}
        for unit_id, model_id, ids in progress(todo, "embed", total=len(todo)):
            if model_id not in loaded:
                loaded.clear()  # one model in memory at a time
                loaded[model_id] = load_declared(models[model_id], device)
            table, errs = _encode_chunk(loaded[model_id], run, model_id, ids, cfg, device)
            atomic_write_bytes(parts_root / f"{unit_id}.parquet", _table_bytes(table))
            for e in errs:
                errors[e[0]] = e
            ledger.add(unit_id, {"model_id": model_id, "n_images": len(ids), "errors": [list(e) for e in errs]})
        # rebuild from the ledger: errors of units finished in earlier runs too
        records = ledger.done()
        for unit_id, _, _ in units:
            for e in records.get(unit_id, {}).get("errors", []):
                errors[e[0]] = (e[0], e[1], e[2])
        tables = [pq.read_table(parts_root / f"{u[0]}.parquet", schema=EMBEDDING_SCHEMA) for u in units]
        final = embedding_table({c: [] for c in EMBEDDING_SCHEMA.names}) if not tables else pa.concat_tables(tables)
        final = final.sort_by(
            [
                ("image_id", "ascending"),
                ("model_id", "ascending"),
                ("flip", "ascending"),
                ("gray", "ascending"),
            ]
        ).combine_chunks()
        out = run.path / LAYOUT.embeddings
        write_embeddings(final, out)
        run.write_errors(ErrorRow(i, k, m) for i, k, m in sorted(errors.values()))
        for model_id, declared in models.items():
            info = {"path": run.relative(declared.path), "tta": cfg.tta, **declared.info()}
            if declared.lookup_table is not None:
                info["lookup_table"] = run.relative(declared.lookup_table)
            known = run.manifest.get("models", {}).get(model_id)
            if known is None or known.get("sha256") != shas[model_id]:
                run.record_model(model_id, shas[model_id], info)
        extra = {"models": list(models), "n_images": len(image_ids), "tta": cfg.tta, "n_rows": final.num_rows}
        return StageResult(items=len(image_ids) * len(models), outputs={"embeddings": out}, extra=extra,
                           summary=[f"{len(image_ids)} images × {len(models)} model(s) → {run.relative(out)}"])
