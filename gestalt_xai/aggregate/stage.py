"""The aggregate stage: syndrome-level pictures from the map store → ``run/aggregate/``.

Reads ``run/maps/`` (map store), ``run/cohort/`` (subjects, syndromes, sex/age/ancestry), ``run/aligned/`` (crops,
alignment) and, for synthetic cohorts, ``run/cohort/truth/``. One streaming pass over the maps per method (one
subject's maps in memory at a time) feeds the composites, the per-map region scores and the SpRAy features; a
second pass forms the SpRAy cluster composites. Every table is per model id: a random-model control
(:func:`~gestalt_xai.models.declaration.random_controls`) has its own rows in the region scores and SpRAy, a chance
reference labelled as a control in the summary lines, but no composites (so no composite figures): a control is there
to be compared with, not pictured. Checks of the maps against a synthetic cohort's truth — the planted-region table,
the localisation metrics against region and change masks, contrastivity and the confounder (Clever Hans) check — are
the assess stage's (:mod:`gestalt_xai.assess.planted`, :mod:`gestalt_xai.assess.localisation_run`); they read this
stage's ``region_syndromes.parquet`` and ``spray.parquet``. Outputs::

    aggregate/composites.parquet     one row per composite: group (syndrome | ALL), stratum (all | sex:F | …),
                                     model_id, method, layer, target_group, normalisation, n_subjects, n_images,
                                     mean, std, sign_agreement (the difference from the ALL composite,
                                     minus_all, is derived from the means: load_composites adds it);
                                     maps as list<float32> of 112·112 (row-major; :func:`composite_array`)
    aggregate/region_maps.parquet    per map × atlas × region: share of positive mass, area share, enrichment
    aggregate/region_subjects.parquet  per subject (images averaged), with HPO anchors
    aggregate/region_syndromes.parquet per syndrome (subjects averaged; group ALL too), rank 1 = top facial region
    aggregate/faces.parquet          composite faces: group, stratum, n_subjects, rendered (privacy guard)
    aggregate/faces/<group>__<stratum>.png   composite faces with ≥ min_subjects subjects only
    aggregate/spray.parquet, spray_members.parquet   SpRAy analyses and cluster memberships; on a confounded
                                     synthetic syndrome each cluster's relevance mass on the cue
                                     (:func:`gestalt_xai.assess.planted.check_cue`)
    aggregate/pairs.parquet          image pairs with pair maps in both directions
    aggregate/figures/…              composite grids, difference grids, generic maps, composite faces, region
                                     heatmaps, SpRAy, pair and patient × syndrome similarity figures (PNG + SVG)

Every output is rebuilt from the map store on each run (deterministic: the same store gives the same bytes).

Undiagnosed patients (no syndrome, :data:`~gestalt_xai.data.cohort.UNDIAGNOSED`) take no part: their maps, the pair
maps of gallery faces explained against them, and their crops enter no composite (neither a syndrome's nor ``ALL``),
no region score, no SpRAy run, no composite face and no pair table. Their maps stay in the map store (with the
explain stage's overlay figures); the count left out is ``results.n_undiagnosed_maps``.

The stage only orders the work: each step lives with its concept (:mod:`.composite`, :mod:`.regions`,
:mod:`.spray`, :mod:`.faces`, :mod:`.similarity`; figures: :mod:`.report` and :mod:`gestalt_xai.viz`); what it reads
of a synthetic cohort's truth (planted regions for figures, the control syndrome, the confounder cue for SpRAy) comes
from :mod:`gestalt_xai.assess.planted`. A truth folder that exists but cannot be read is an error row (and a warning
naming the file); the run goes on without what needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from gestalt_xai.aggregate.annotate import GROUP_COLS, annotate_index
from gestalt_xai.aggregate.composite import (
    GroupComposites,
    composite_array,
    composite_table,
    normalise,
    stream_subject_maps,
    subject_mean,
    with_differences,
)
from gestalt_xai.aggregate.faces import WHOLE, composite_faces, strata_of, subject_strata
from gestalt_xai.aggregate.regions import map_region_rows, region_tables, template_landmarks
from gestalt_xai.aggregate.similarity import pair_table
from gestalt_xai.aggregate.spray import downsample, spray_syndromes, spray_table
from gestalt_xai.assess import planted
from gestalt_xai.attribution.base import UNSIGNED_METHODS
from gestalt_xai.config import StageConfig
from gestalt_xai.errors import InputError
from gestalt_xai.faces.regions import template_atlas
from gestalt_xai.models.declaration import random_controls
from gestalt_xai.progress import progress
from gestalt_xai.runs import LAYOUT, ErrorRow, Run, write_parquet
from gestalt_xai.stages import StageResult, stage
from gestalt_xai.store import require_maps

log = logging.getLogger(__name__)

__all__ = ["AggregateConfig", "aggregate_stage", "composite_array", "load_composites", "GROUP_COLS",
           "UNSIGNED_METHODS"]

STRATA = ("sex", "age_band", "ancestry")


class AggregateConfig(StageConfig):
    """Options of ``gestalt-xai aggregate``."""

    methods: list[str] | None = Field(None, description="methods to aggregate (default: every method in the store)")
    models: list[str] | None = Field(None, description="model ids (default: all in the store)")
    targets: list[str] | None = Field(None, description="target kinds to aggregate (default: all; "
                                                         "gestalt_xai.attribution.available_target_kinds())")
    target_groups: list[str] | None = Field(
        None, description="target groups to aggregate (default: all): centroid:own, logit:own, pair:same-syndrome, "
                          "pair:other-syndrome, or centroid:<id> for maps towards a fixed other syndrome (e.g. a "
                          "patient's first suggestion)")
    normalisations: list[str] = Field(
        default_factory=lambda: ["max-abs", "none", "zscore", "positive"],
        description="per-map normalisations for composites (none, max-abs, zscore, positive, or a postprocess "
                    "view); the first one is used for strata, SpRAy and figures")
    min_subjects: int = Field(10, ge=1, description="privacy guard: fewest distinct subjects a composite face "
                                                    "is rendered from")
    strata: list[Literal["sex", "age_band", "ancestry"]] = Field(
        default_factory=lambda: list(STRATA), description="breakdowns (used when the cohort has the column)")
    age_bands: list[float] = Field(default_factory=lambda: [0.0, 2.0, 5.0, 10.0, 18.0],
                                   description="lower edges of the age bands in years (last band open-ended)")
    landmark_regions: bool = Field(True, description="also score per-image landmark regions when 68 landmarks "
                                                     "are known (alignment.parquet or synthetic truth)")
    spray_size: int = Field(20, ge=4, le=112, description="SpRAy: maps downsampled to size × size")
    spray_neighbors: int | None = Field(None, ge=1, description="SpRAy: k of the kNN graph (default ≈ √n)")
    spray_max_clusters: int = Field(6, ge=2)
    spray_min_subjects: int = Field(8, ge=3, description="SpRAy runs on syndromes with at least this many subjects")
    control_id: str | None = Field(None, description="syndrome id of unaffected controls (default: the synthetic "
                                                     "cohort's, if any)")
    pair_figures: int = Field(4, ge=0, description="pairs drawn with both similarity directions")
    patient_figures: int = Field(4, ge=0, description="patients drawn against their syndrome (centroid + nearest)")
    nearest: int = Field(3, ge=1, description="nearest gallery images per patient × syndrome figure")
    block_maps: int = Field(256, ge=1, description="maps read per streaming block (memory bound)")
    figures: bool = Field(True, description="draw figures (tables are always written)")
    figure_formats: list[Literal["png", "svg", "pdf"]] = Field(
        default_factory=lambda: ["png", "svg"], min_length=1, description="file formats of every figure")
    figure_smoothing: float = Field(1.5, ge=0, description="Gaussian sigma (px) applied to input-space (pixel-level) "
                                                           "maps in figures only; 0 = off")
    seed: int = 0

    @field_validator("targets")
    @classmethod
    def _known_kinds(cls, v: list[str] | None) -> list[str] | None:
        from gestalt_xai.attribution.target_kinds import available_target_kinds

        if v is not None and (unknown := sorted(set(v) - set(available_target_kinds()))):
            raise ValueError(f"unknown target kinds {unknown}; registered: {available_target_kinds()}")
        return v

    @field_validator("normalisations")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one normalisation")
        for name in v:
            try:
                normalise(np.ones((2, 2)), name)
            except ValueError as exc:
                raise ValueError(f"unknown normalisation {name!r} ({exc}); use none, max-abs, zscore, positive "
                                 "or a postprocess view") from None
        if len(set(v)) != len(v):
            raise ValueError(f"normalisations repeat: {v}")
        return v


# ------------------------------------------------------------------------------------------------ helpers
def load_composites(run: Run) -> pd.DataFrame:
    """``run/aggregate/composites.parquet``, with each syndrome composite's difference from the all-subjects one
    (``minus_all``, derived from the stored means: :func:`~gestalt_xai.aggregate.composite.with_differences`)."""
    path = run.path / LAYOUT.aggregate / "composites.parquet"
    if not path.exists():
        raise InputError(f"{path} not found: run `gestalt-xai aggregate --run …` first")
    return with_differences(pd.read_parquet(path))


def _annotated_maps(run: Run, index: pd.DataFrame, images: pd.DataFrame, cfg: AggregateConfig,
                    errors: list[ErrorRow]) -> pd.DataFrame:
    """The store's index joined with the cohort and filtered by the options; maps of unknown images → errors."""
    rows, missing = annotate_index(index, images)
    errors += [ErrorRow(r["image_id"], "input", "map of an image that is not in the cohort table; skipped",
                        key={k: r[k] for k in ("model_id", "target", "method", "layer")})
               for r in missing.to_dict("records")]
    if cfg.methods is not None:
        unknown = sorted(set(cfg.methods) - set(rows["method"]))
        if unknown:
            raise InputError(f"methods {unknown} have no maps in {run.path / 'maps'}; stored: "
                             f"{sorted(set(rows['method']))}")
        rows = rows[rows["method"].isin(cfg.methods)]
    if cfg.models is not None:
        rows = rows[rows["model_id"].isin(cfg.models)]
    if cfg.targets is not None:
        rows = rows[rows["target_kind"].isin(cfg.targets)]
    if cfg.target_groups is not None:
        rows = rows[rows["target_group"].isin(cfg.target_groups)]
    if not len(rows):
        raise InputError("no maps left after the methods/models/targets/target_groups filters")
    return rows


def _without_undiagnosed(index: pd.DataFrame, images: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The map index without undiagnosed patients' maps and pair maps explained against one (module docstring),
    and how many rows were left out."""
    from gestalt_xai.attribution.targets import split_targets

    undiagnosed = set(images.loc[images["undiagnosed"], "image_id"].astype(str))
    if not undiagnosed or not len(index):
        return index, 0
    parts = split_targets(index["target"])
    drop = index["image_id"].astype(str).isin(undiagnosed) | (
        (parts["target_kind"] == "pair") & parts["target_ref"].isin(undiagnosed))
    if drop.all():
        raise InputError("every map in the store belongs to an undiagnosed patient (or is explained against one): "
                         "composites are per syndrome, so there is nothing to aggregate; the maps stay in maps/ "
                         "with their overlay figures")
    return index[~drop].reset_index(drop=True), int(drop.sum())


def _stream_method(store: Any, rows: pd.DataFrame, cfg: AggregateConfig, strata: dict[str, list[str]],
                   landmarks: dict[str, np.ndarray], controls: Collection[str] = ()
                   ) -> tuple[GroupComposites, pd.DataFrame, dict[tuple[Any, ...], list[tuple[str, np.ndarray]]]]:
    """One streaming pass over one method's maps (one subject in memory at a time): its composites, per-map region
    rows and SpRAy features. Maps of the random ``controls`` feed the checks only (region rows, SpRAy): no
    composite, so no composite figure."""
    composites = GroupComposites(cfg.normalisations)
    region_rows: list[dict[str, Any]] = []
    features: dict[tuple[Any, ...], list[tuple[str, np.ndarray]]] = {}
    template = template_atlas()
    for key, subject, items in stream_subject_maps(store, rows, GROUP_COLS, cfg.block_maps):
        syndrome = str(items[0][0]["syndrome_id"])
        for row, m in items:
            region_rows += map_region_rows(row, m, template, landmarks.get(row["image_id"]))
        if key[0] in controls:
            u, _ = subject_mean([m for _, m in items], cfg.normalisations[0])
        else:
            u = composites.add_subject(key, syndrome, strata.get(subject, [WHOLE]), [m for _, m in items])
        features.setdefault((syndrome, *key), []).append((subject, downsample(u, cfg.spray_size)))
    return composites, pd.DataFrame(region_rows), features


# ------------------------------------------------------------------------------------------------ the stage
@stage("aggregate", options=AggregateConfig, order=80,
       summary="syndrome-level composites, composite faces, similarity maps, region scores, SpRAy",
       reads=(LAYOUT.maps, LAYOUT.cohort, LAYOUT.alignments), writes=(LAYOUT.aggregate,),
       aliases={"normalisations": "--normalisation"},
       example="gestalt-xai aggregate --run runs/demo --methods hirescam,occlusion --normalisation max-abs",
       tiny_options={"min_subjects": 2, "normalisations": ["max-abs"], "figure_formats": ["png"],
                     "pair_figures": 1, "patient_figures": 1})
def aggregate_stage(run: Run, cfg: AggregateConfig) -> StageResult:
    """Run the aggregate stage on ``run``; see the module docstring for what it writes.

    The result's ``extra["results"]`` (also in the manifest) holds counts, ``min_subjects`` and the SpRAy analyses
    of a confounded synthetic syndrome with their cue check (:func:`gestalt_xai.assess.planted.report_spray`); its
    summary lines say the same in words.
    """
    from gestalt_xai.aggregate.report import FigureInputs, draw_all

    out = run.dir(LAYOUT.aggregate)
    errors: list[ErrorRow] = []
    summary: dict[str, Any] = {"min_subjects": cfg.min_subjects}
    store, index = require_maps(run)
    cohort = run.cohort()
    images = run.image_table()
    index, summary["n_undiagnosed_maps"] = _without_undiagnosed(index, images)
    if summary["n_undiagnosed_maps"]:
        log.info("aggregate: %d maps of (or against) undiagnosed patients left out", summary["n_undiagnosed_maps"])
    images = images[~images["undiagnosed"]].reset_index(drop=True)
    rows = _annotated_maps(run, index, images, cfg, errors)

    # ---- what the synthetic cohort's truth says (nothing for a real cohort)
    truth, truth_errors = planted.read_truth(run)
    errors += truth_errors
    planted_at = planted.planted_regions(truth)
    control = planted.control_syndrome(truth, set(images["syndrome_id"].astype(str)), cfg.control_id)
    cue, cue_errors = planted.confounder_cue(run, truth)
    errors += cue_errors

    strata_table = strata_of(images, cfg.age_bands)
    strata = subject_strata(strata_table, [k for k in cfg.strata if k in strata_table.columns])
    landmarks = template_landmarks(run, planted.truth_landmarks(truth)) if cfg.landmark_regions else {}
    controls = random_controls(run)

    # ---- one streaming pass per method: composites, region scores, SpRAy features; then SpRAy
    composites, region_frames = [], []
    spray_rows, spray_members, spray_results = [], [], {}
    for method in progress(sorted(rows["method"].unique()), "aggregate: methods"):
        part = rows[rows["method"] == method]
        comp_part, regions_part, features = _stream_method(store, part, cfg, strata, landmarks, controls)
        composites.append(comp_part)
        region_frames.append(regions_part)
        a, m, r = spray_syndromes(store, part, features, normalisation=cfg.normalisations[0],
                                  n_neighbors=cfg.spray_neighbors, max_clusters=cfg.spray_max_clusters,
                                  min_subjects=cfg.spray_min_subjects, seed=cfg.seed, block_maps=cfg.block_maps,
                                  marked=cue.marked)
        planted.check_cue(a, r, cue)
        spray_rows += a
        spray_members += m
        spray_results.update(r)
    comp = composite_table(composites)
    write_parquet(comp.drop(columns="minus_all"), out / "composites.parquet")  # derived: load_composites adds it
    per_map = pd.concat(region_frames, ignore_index=True)
    per_subject, per_syn = region_tables(per_map)
    write_parquet(per_map, out / "region_maps.parquet")
    write_parquet(per_subject, out / "region_subjects.parquet")
    write_parquet(per_syn, out / "region_syndromes.parquet")
    write_parquet(spray_table(spray_rows), out / "spray.parquet")
    write_parquet(pd.DataFrame(spray_members), out / "spray_members.parquet")

    summary["spray"], spray_lines = planted.report_spray(spray_rows, cue.syndrome, controls)

    # ---- composite faces (privacy guard), pairs and figures
    faces, face_table = composite_faces(run, images, strata, cfg.min_subjects, out / "faces", errors)
    write_parquet(face_table, out / "faces.parquet")
    pairs = pair_table(index, images)
    write_parquet(pairs, out / "pairs.parquet")
    if cfg.figures:
        draw_all(run, cfg, FigureInputs(
            store=store, rows=rows, composites=comp, region_syndromes=per_syn, faces=faces, spray=spray_rows,
            spray_results=spray_results, spray_members=spray_members, pairs=pairs,
            names=_syndrome_names(cohort.syndromes), planted=planted_at, control=control, confounded=cue.syndrome))

    run.write_errors(errors)
    summary.update(n_maps=int(len(rows)), n_composites=int(len(comp)), n_subjects=int(rows["subject_id"].nunique()),
                   control_id=control, confounded_syndrome=cue.syndrome)
    return StageResult(items=int(len(rows)), extra={"results": summary}, outputs={"aggregate": out},
                       summary=spray_lines)


def _syndrome_names(syndromes: pd.DataFrame) -> dict[str, str]:
    if "syndrome_name" not in syndromes.columns:
        return {}
    return dict(zip(syndromes["syndrome_id"].astype(str), syndromes["syndrome_name"], strict=True))
