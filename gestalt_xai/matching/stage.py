"""The ``gestalt-xai match`` stage: every GM-Arc protocol on the run's embeddings, written to ``run/matching/``;
undiagnosed patients ranked against the unified gallery (``matching/suggestions.parquet``).

:func:`summary_table` is GM-Arc's table (one row per protocol: gallery/test sizes, macro top-k % ± sd over splits);
:func:`summary_lines` writes it in GM-Arc's layout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from gestalt_xai.config import StageConfig
from gestalt_xai.matching.distances import EmbeddingTable
from gestalt_xai.matching.gmarc import compare_embeddings, read_gmarc_encodings
from gestalt_xai.matching.protocols import (
    Protocol,
    ProtocolSplit,
    check_subject_disjoint,
    cohort_protocols,
    evaluate_protocol,
    image_meta,
    suggestion_table,
    unified_gallery,
)
from gestalt_xai.matching.ranking import DEFAULT_KS, Ties
from gestalt_xai.runs import LAYOUT, Run
from gestalt_xai.stages import StageResult, stage

log = logging.getLogger(__name__)

__all__ = ["MatchConfig", "match_stage", "summary_lines", "summary_table"]


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


def summary_lines(summary: pd.DataFrame, ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """The summary in GM-Arc's layout (Test set | Gallery set | Gallery | Test | Top-1 …), as Markdown table lines.

    >>> t = pd.DataFrame([{"test_set": "frequent", "gallery_set": "frequent", "n_gallery": 9.0, "n_test": 3.0,
    ...                    "top1": 66.67, "top5": 100.0}])
    >>> print("\\n".join(summary_lines(t, ks=(1, 5))))
    Matching, macro top-k in %:
    | Test set | Gallery set | Gallery | Test | Top-1 | Top-5 |
    |---|---|---|---|---|---|
    | frequent | frequent | 9 | 3 | 66.67 | 100.00 |
    """
    header = ["Test set", "Gallery set", "Gallery", "Test", *[f"Top-{k}" for k in ks]]
    lines = ["Matching, macro top-k in %:", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in summary.iterrows():
        cells = [str(r["test_set"]), str(r["gallery_set"]), f"{r['n_gallery']:.0f}", f"{r['n_test']:.0f}"]
        cells += [("—" if np.isnan(r[f"top{k}"]) else f"{r[f'top{k}']:.2f}") for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


class MatchConfig(StageConfig):
    """Options of ``gestalt-xai match``."""

    models: list[str] | None = Field(None, description="model ids to ensemble (default: every model embedded except "
                                                       "random-model controls)")
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


def _default_models(run: Run, table: EmbeddingTable) -> list[str] | None:
    """Every embedded model except random-model controls (:func:`~gestalt_xai.models.declaration.random_controls`):
    a control is a baseline for explanations, never a member of the matched ensemble unless named in ``models``."""
    from gestalt_xai.models.declaration import random_controls

    controls = set(random_controls(run))
    embedded = sorted({s[0] for s in table.slots})
    keep = [m for m in embedded if m not in controls]
    if len(keep) < len(embedded):
        log.info("match: random-model control(s) %s left out of the default ensemble", sorted(controls & set(embedded)))
    return keep or None


@stage("match", options=MatchConfig, order=60,
       summary="rank syndromes in the Clinical Face Phenotype Space (GMDB protocols, top-k)",
       reads=(LAYOUT.embeddings, LAYOUT.cohort), writes=(LAYOUT.matching,), aliases={"models": "--model"},
       example="gestalt-xai match --run runs/demo")
def match_stage(run: Run, cfg: MatchConfig) -> StageResult:
    """Match test images against galleries under the GM-Arc protocols; write ``run/matching/``.

    Writes ``matching/ranks.parquet`` (one row per protocol, split and test image), ``matching/splits.parquet``
    (macro top-k per split), ``matching/summary.parquet`` (GM-Arc's table) and, with ``gallery_encodings``,
    ``matching/gmarc_agreement.parquet``; the summary lines show GM-Arc's table.

    Every undiagnosed patient (no syndrome; in no protocol) is ranked against the unified gallery (frequent + rare
    gallery images, :func:`~gestalt_xai.matching.protocols.unified_gallery`) with the same ranking:
    ``matching/suggestions.parquet`` holds its first 30 syndromes (``image_id, rank, syndrome_id, distance``).
    """
    from gestalt_xai.runs import write_parquet

    emb = run.embeddings()
    table = EmbeddingTable.from_frame(emb)
    slots = table.select(_default_models(run, table) if cfg.models is None else cfg.models, cfg.tta)
    cohort = run.cohort()
    images = image_meta(cohort.images)
    out_dir = run.dir(LAYOUT.matching)

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
            check_subject_disjoint(images, sp.test_image_ids, sp.gallery_image_ids, f"{p.name} split {sp.split}")
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

    # undiagnosed patients: suggestions from the unified gallery, ranked as every protocol ranks
    undiagnosed = sorted(set(run.image_table().query("undiagnosed")["image_id"]) & keep)
    gallery = [i for i in unified_gallery(cohort) if i in keep]
    suggestions = suggestion_table(table, images, undiagnosed, gallery, slots, gallery_table)
    write_parquet(suggestions, out_dir / "suggestions.parquet")
    lines = summary_lines(summary, cfg.ks)
    if undiagnosed:
        n_patients = images.loc[images["image_id"].isin(undiagnosed), "subject_id"].nunique()
        lines.append(f"{len(undiagnosed)} photo(s) of {n_patients} undiagnosed patient(s) ranked against the unified "
                     f"gallery ({len(gallery)} images): {run.relative(out_dir / 'suggestions.parquet')}")
    if dropped:
        # alignment and embedding failures are already in errors.parquet (align/embed stages)
        log.warning(
            "match: %d cohort image(s) have no embedding in every selected slot and are left out",
            len(dropped),
        )
    return StageResult(items=int(len(ranks)), extra={"n_without_embedding": len(dropped),
                                                     "n_undiagnosed": len(undiagnosed),
                                                     "slots": [list(s) for s in slots]},
                       outputs={"ranks": out_dir / "ranks.parquet", "summary": out_dir / "summary.parquet",
                                "suggestions": out_dir / "suggestions.parquet"},
                       summary=lines)
