"""The aggregate stage: syndrome-level pictures from the map store → ``run/aggregate/``.

Reads ``run/maps/`` (map store), ``run/cohort/`` (subjects, syndromes, sex/age/ancestry), ``run/aligned/`` (crops,
alignment) and, for synthetic cohorts, ``run/cohort/truth/``. One streaming pass over the maps per method (one
subject's maps in memory at a time) feeds the composites, the per-map region scores and the SpRAy features; a
second pass forms the SpRAy cluster composites. Outputs::

    aggregate/composites.parquet     one row per composite: group (syndrome | ALL), stratum (all | sex:F | …),
                                     model_id, method, layer, target_group, normalisation, n_subjects, n_images,
                                     mean, std, sign_agreement, minus_all (difference from the ALL composite);
                                     maps as list<float32> of 112·112 (row-major; :func:`composite_array`)
    aggregate/region_maps.parquet    per map × atlas × region: share of positive mass, area share, enrichment
    aggregate/region_subjects.parquet  per subject (images averaged), with HPO anchors
    aggregate/region_syndromes.parquet per syndrome (subjects averaged; group ALL too), rank 1 = top facial region
    aggregate/planted_hits.parquet   synthetic cohorts: does each syndrome's top region hold a planted feature?
    aggregate/faces.parquet          composite faces: group, stratum, n_subjects, rendered (privacy guard)
    aggregate/faces/<group>__<stratum>.png   composite faces with ≥ min_subjects subjects only
    aggregate/spray.parquet, spray_members.parquet   SpRAy analyses and cluster memberships (+ cue check)
    aggregate/pairs.parquet          image pairs with pair maps in both directions
    aggregate/figures/…              composite grids, difference grids, generic maps, composite faces, region
                                     heatmaps, SpRAy, pair and patient × syndrome similarity figures (PNG + SVG)

Every output is rebuilt from the map store on each run (deterministic: the same store gives the same bytes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from gestalt_xai.aggregate.annotate import OWN_TARGET_GROUPS, annotate_index
from gestalt_xai.aggregate.composite import (
    CompositeAccumulator,
    normalise,
    stream_subject_maps,
    subject_mean,
)
from gestalt_xai.aggregate.faces import ALL, WHOLE, strata_of, stratum_labels
from gestalt_xai.aggregate.regions import (
    region_shares,
    subject_region_scores,
    syndrome_region_scores,
    top_regions,
)
from gestalt_xai.aggregate.spray import downsample, spray_cluster
from gestalt_xai.attribution.base import UNSIGNED_METHODS
from gestalt_xai.config import StageConfig
from gestalt_xai.errors import InputError
from gestalt_xai.faces.regions import REGION_GROUP, REGIONS, landmark_atlas, template_atlas

log = logging.getLogger(__name__)

__all__ = ["AggregateConfig", "aggregate_stage", "composite_array", "load_composites", "GROUP_COLS",
           "UNSIGNED_METHODS"]

#: the columns (besides syndrome/stratum and normalisation) that identify a composite
GROUP_COLS = ["model_id", "method", "layer", "target_group"]
STRATA = ("sex", "age_band", "ancestry")


class AggregateConfig(StageConfig):
    """Options of ``gestalt-xai aggregate``."""

    methods: list[str] | None = Field(None, description="methods to aggregate (default: every method in the store)")
    models: list[str] | None = Field(None, description="model ids (default: all in the store)")
    targets: list[Literal["centroid", "logit", "pair"]] | None = Field(
        None, description="target kinds to aggregate (default: all)")
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
    quiet: bool = False

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
def composite_array(row: pd.Series | dict[str, Any], column: str = "mean") -> np.ndarray | None:
    """A composite's map from a ``composites.parquet`` row as ``(112, 112)`` float32 (``None`` when null)."""
    v = row[column]
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return np.asarray(v, np.float32).reshape(112, 112)


def load_composites(run: Any) -> pd.DataFrame:
    """``run/aggregate/composites.parquet``."""
    path = Path(getattr(run, "path", run)) / "aggregate" / "composites.parquet"
    if not path.exists():
        raise InputError(f"{path} not found: run `gestalt-xai aggregate --run …` first")
    return pd.read_parquet(path)


def _flat(a: np.ndarray | None) -> list[float] | None:
    return None if a is None else np.asarray(a, np.float32).ravel()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "-" for c in str(name))


def _truth(run: Any) -> Any | None:
    try:
        from gestalt_xai.data.synthetic.truth import load_truth

        return load_truth(run.path)
    except Exception:  # no synthetic truth: a real cohort
        return None


def _landmark_table(run: Any, truth: Any | None) -> dict[str, np.ndarray]:
    """Per image, 68 landmarks in template space (alignment.parquet, else synthetic truth through the matrix)."""
    from gestalt_xai.faces.align import load_alignments, row_matrix, transform_points

    try:
        al = load_alignments(run)
    except Exception:
        return {}
    truth_lm = {}
    if truth is not None and "landmarks68" in truth.images.columns:
        truth_lm = dict(zip(truth.images["image_id"].astype(str), truth.images["landmarks68"], strict=True))
    out = {}
    for row in al.to_dict("records"):
        lm = row.get("landmarks68")
        if lm is None or (not isinstance(lm, (list, np.ndarray))) or len(lm) != 136:
            lm = truth_lm.get(str(row["image_id"]))
        if lm is None or row.get("matrix") is None:
            continue
        out[str(row["image_id"])] = transform_points(np.asarray(lm, np.float64).reshape(68, 2), row_matrix(row))
    return out


def _planted_regions(truth: Any | None) -> dict[str, set[str]]:
    """Syndrome → atlas regions of its planted, in-crop features (via the toolkit region groups)."""
    if truth is None:
        return {}
    feats = truth.features
    feats = feats[feats["visible_in_crop"].astype(bool)]
    by_group: dict[str, set[str]] = {}
    for region, group in REGION_GROUP.items():
        if group:
            by_group.setdefault(group, set()).add(region)
    out: dict[str, set[str]] = {}
    for syn, grp in feats.groupby("syndrome_id"):
        regions: set[str] = set()
        for g in grp["region"].astype(str).unique():
            regions |= by_group.get(g, set())
        out[str(syn)] = regions
    return out


def _control_id(cfg: AggregateConfig, truth: Any | None, syndromes: set[str]) -> str | None:
    if cfg.control_id is not None:
        return cfg.control_id
    if truth is not None:
        cid = truth.syndromes.get("control_id")
        if cid in syndromes:
            return str(cid)
    return None


# ------------------------------------------------------------------------------------------- the main pass
class _Pass:
    """State of the streaming pass of one method: accumulators, region rows, SpRAy features."""

    def __init__(self, cfg: AggregateConfig, strata: pd.DataFrame, kinds: list[str], landmarks: dict[str, np.ndarray]):
        self.cfg = cfg
        self.primary = cfg.normalisations[0]
        self.strata = strata.set_index("subject_id") if len(strata) else strata
        self.kinds = kinds
        self.landmarks = landmarks
        self.acc: dict[tuple[Any, ...], CompositeAccumulator] = {}
        self.region_rows: list[dict[str, Any]] = []
        self.features: dict[tuple[Any, ...], list[tuple[str, np.ndarray]]] = {}
        self.atlas = template_atlas()

    def _regions(self, row: dict[str, Any], m: np.ndarray) -> None:
        atlases = [("template", self.atlas)]
        if self.cfg.landmark_regions and row["image_id"] in self.landmarks:
            atlases.append(("landmarks", landmark_atlas(self.landmarks[row["image_id"]])))
        for name, labels in atlases:
            share, area = region_shares(m, labels)
            pos = float(np.maximum(m, 0).sum())
            for r, region in enumerate(REGIONS):
                self.region_rows.append({
                    "image_id": row["image_id"], "subject_id": row["subject_id"], "syndrome_id": row["syndrome_id"],
                    **{c: row[c] for c in GROUP_COLS}, "target": row["target"], "atlas": name, "region": region,
                    "share": float(share[r]), "area_share": float(area[r]), "positive_mass": pos})

    def add_subject(self, key: tuple[Any, ...], subject: str, items: list[tuple[dict[str, Any], np.ndarray]]) -> None:
        syndrome = str(items[0][0]["syndrome_id"])
        for row, m in items:
            self._regions(row, m)
        labels = [WHOLE]
        if len(self.strata) and subject in self.strata.index:
            labels += stratum_labels(self.strata.loc[subject].to_dict(), self.kinds)
        for norm in self.cfg.normalisations:
            u, n = subject_mean((m for _, m in items), norm)
            for group in (syndrome, ALL):
                for lab in (labels if norm == self.primary else [WHOLE]):
                    self.acc.setdefault((group, lab, *key, norm), CompositeAccumulator()).add(u, n)
            if norm == self.primary:
                self.features.setdefault((syndrome, *key), []).append((subject, downsample(u, self.cfg.spray_size)))


def _composite_rows(acc: dict[tuple[Any, ...], CompositeAccumulator]) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(acc):
        a = acc[key]
        group, stratum, model_id, method, layer, tgroup, norm = key
        rows.append({"group": group, "stratum": stratum, "model_id": model_id, "method": method, "layer": layer,
                     "target_group": tgroup, "normalisation": norm, "n_subjects": a.n_subjects,
                     "n_images": a.n_images, "mean": _flat(a.mean()), "std": _flat(a.std()),
                     "sign_agreement": _flat(a.sign_agreement())})
    return rows


def _add_differences(comp: pd.DataFrame) -> pd.DataFrame:
    keys = ["stratum", *GROUP_COLS, "normalisation"]
    ref = {tuple(r[k] for k in keys): r["mean"] for r in comp[comp["group"] == ALL].to_dict("records")}
    diffs = []
    for r in comp.to_dict("records"):
        base = ref.get(tuple(r[k] for k in keys))
        if r["group"] == ALL or base is None:
            diffs.append(None)
        else:
            diffs.append((np.asarray(r["mean"], np.float32) - np.asarray(base, np.float32)).astype(np.float32))
    comp = comp.copy()
    comp["minus_all"] = diffs
    return comp


# ------------------------------------------------------------------------------------------------ SpRAy
def _cue_mask(run: Any, truth: Any, syndrome: str) -> tuple[np.ndarray | None, set[str]]:
    """Template-space mask of the confounder cue (mean over the syndrome's marked photos, ≥ 0.25) and the
    subjects with at least one marked photo."""
    from gestalt_xai.data.synthetic.truth import load_masks
    from gestalt_xai.faces.align import load_alignments, row_matrix, warp_photo_to_crop

    imgs = truth.images
    marked = imgs[(imgs["syndrome_id"].astype(str) == syndrome) & imgs["confounder"].astype(bool)]
    subjects = set(marked["subject_id"].astype(str))
    if not len(marked):
        return None, subjects
    al = load_alignments(run).set_index("image_id")
    total, n = np.zeros((112, 112), np.float64), 0
    for image_id in marked["image_id"].astype(str):
        if image_id not in al.index:
            continue
        mask = load_masks(run.path / "cohort", image_id, truth.features)["confounder"]
        total += warp_photo_to_crop(mask.astype(np.float32), row_matrix(al.loc[image_id]))
        n += 1
    if not n:
        return None, subjects
    return (total / n) >= 0.25, subjects


def _spray(run: Any, cfg: AggregateConfig, store: Any, rows: pd.DataFrame,
           features: dict[tuple[Any, ...], list[tuple[str, np.ndarray]]], truth: Any | None,
           confounded: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[tuple[Any, ...], Any]]:
    """SpRAy per (syndrome, model, method, layer, own target group); cluster composites in a second pass."""
    analyses, members = [], []
    results: dict[tuple[Any, ...], Any] = {}
    cue: tuple[np.ndarray | None, set[str]] = (None, set())
    if truth is not None and confounded is not None:
        try:
            cue = _cue_mask(run, truth, confounded)
        except Exception as exc:  # the check is a report: say why it is missing
            log.warning("SpRAy: confounder mask unavailable: %s", exc)
    for key in sorted(features):
        syndrome, model_id, method, layer, tgroup = key
        if tgroup not in OWN_TARGET_GROUPS or len(features[key]) < cfg.spray_min_subjects:
            continue
        subjects = [s for s, _ in features[key]]
        x = np.stack([f for _, f in features[key]])
        res = spray_cluster(x, cfg.spray_neighbors, cfg.spray_max_clusters, seed=cfg.seed)
        results[key] = (res, subjects)
        for s, c, e in zip(subjects, res.labels, res.embedding, strict=True):
            members.append({"syndrome_id": syndrome, "model_id": model_id, "method": method, "layer": layer,
                            "target_group": tgroup, "subject_id": s, "cluster": int(c), "embedding_x": float(e[0]),
                            "embedding_y": float(e[1]),
                            "confounded": (s in cue[1]) if syndrome == confounded else None})
        analyses.append({"syndrome_id": syndrome, "model_id": model_id, "method": method, "layer": layer,
                         "target_group": tgroup, "normalisation": cfg.normalisations[0], "n_subjects": len(subjects),
                         "n_neighbors": res.n_neighbors, "n_clusters": res.n_clusters,
                         "cluster_sizes": res.sizes, "eigenvalues": [float(v) for v in res.eigenvalues],
                         "confounded_syndrome": syndrome == confounded})
    # second pass: full-resolution composites per cluster (streamed, one accumulator per cluster)
    cluster_acc: dict[tuple[Any, ...], CompositeAccumulator] = {}
    member_of = {(m["syndrome_id"], m["model_id"], m["method"], m["layer"], m["target_group"], m["subject_id"]):
                 m["cluster"] for m in members}
    wanted = rows[rows["syndrome_id"].isin({k[0] for k in results})]
    for key, subject, items in stream_subject_maps(store, wanted, GROUP_COLS, cfg.block_maps):
        syndrome = str(items[0][0]["syndrome_id"])
        c = member_of.get((syndrome, *key, subject))
        if c is None:
            continue
        u, n = subject_mean((m for _, m in items), cfg.normalisations[0])
        cluster_acc.setdefault((syndrome, *key, c), CompositeAccumulator()).add(u, n)
    for a in analyses:
        key = (a["syndrome_id"], a["model_id"], a["method"], a["layer"], a["target_group"])
        means = {c: cluster_acc[(*key, c)].mean() for c in range(a["n_clusters"]) if (*key, c) in cluster_acc}
        a["cluster_means"] = means
        mask, marked = cue
        if a["confounded_syndrome"] and mask is not None and mask.any():
            area = float(mask.mean())
            res, subjects = results[key]
            rows_c = []
            for c, m in means.items():
                pos = np.maximum(m, 0)
                share = float(pos[mask].sum() / pos.sum()) if pos.sum() > 0 else float("nan")
                frac = float(np.mean([s in marked for s, lab in zip(subjects, res.labels, strict=True) if lab == c]))
                rows_c.append({"cluster": c, "cue_share": share, "cue_enrichment": share / area if area else np.nan,
                               "marked_fraction": frac, "n": int((res.labels == c).sum())})
            a["cue"] = rows_c
            a["cue_area_share"] = area
            a["cue_mask"] = mask
            best = max(rows_c, key=lambda r: -1 if np.isnan(r["cue_share"]) else r["cue_share"])
            others = [r["cue_enrichment"] for r in rows_c if r["cluster"] != best["cluster"]]
            a["cue_cluster"] = best["cluster"]
            a["splits_on_cue"] = bool(a["n_clusters"] >= 2 and best["cue_enrichment"] >= 2.0
                                      and (not others or best["cue_enrichment"] >= 1.5 * max(others)))
    return analyses, members, results


# ------------------------------------------------------------------------------------------------ the stage
def aggregate_stage(run: Any, cfg: AggregateConfig | None = None) -> dict[str, Any]:
    """Run the aggregate stage on ``run`` (a :class:`~gestalt_xai.runs.Run` or folder); returns a summary.

    The summary (also in the manifest) holds counts, ``min_subjects`` and, for synthetic cohorts, per method the
    share of syndromes whose highest-enrichment region is a planted feature's region, and the SpRAy cue check.
    """
    from gestalt_xai.data.cohort import load_run_cohort
    from gestalt_xai.runs import ErrorRow, Run, progress, write_parquet
    from gestalt_xai.store import MapStore

    cfg = cfg or AggregateConfig()
    run = run if isinstance(run, Run) else Run(run)
    out = run.dir("aggregate")
    errors: list[dict[str, str]] = []
    summary: dict[str, Any] = {"min_subjects": cfg.min_subjects}
    with run.stage("aggregate", cfg, seed=cfg.seed) as record:
        if not (run.path / "maps").exists():
            raise InputError(f"{run.path / 'maps'} not found: run `gestalt-xai explain --run {run.path}` first")
        store = MapStore(run.path / "maps")
        index = store.index()
        if not len(index):
            raise InputError(f"the map store {run.path / 'maps'} is empty: run `gestalt-xai explain` first")
        cohort = load_run_cohort(run)
        images = cohort.images.copy()
        rows, missing = annotate_index(index, images)
        errors += [{"item_id": f"{r['image_id']}|{r['target']}|{r['method']}", "error_kind": "input",
                    "message": "map of an image that is not in the cohort table; skipped"}
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
        if not len(rows):
            raise InputError("no maps left after the methods/models/targets filters")
        truth = _truth(run)
        planted = _planted_regions(truth)
        control = _control_id(cfg, truth, set(images["syndrome_id"].astype(str)))
        confounded = None
        if truth is not None and truth.syndromes.get("config", {}).get("confounder"):
            confounded = str(truth.syndromes["config"]["confounder"]["syndrome"])
        strata = strata_of(images, cfg.age_bands)
        kinds = [k for k in cfg.strata if k in strata.columns]
        landmarks = _landmark_table(run, truth) if cfg.landmark_regions else {}
        names = {}
        if "syndrome_name" in cohort.syndromes.columns:
            names = dict(zip(cohort.syndromes["syndrome_id"].astype(str), cohort.syndromes["syndrome_name"],
                             strict=True))

        # ---- streaming pass per method: composites, region scores, SpRAy features
        comp_frames, region_frames = [], []
        spray_rows, spray_members, spray_results = [], [], {}
        for method in progress(sorted(rows["method"].unique()), "aggregate: methods"):
            part = rows[rows["method"] == method]
            state = _Pass(cfg, strata, kinds, landmarks)
            for key, subject, items in stream_subject_maps(store, part, GROUP_COLS, cfg.block_maps):
                state.add_subject(key, subject, items)
            comp_frames.append(pd.DataFrame(_composite_rows(state.acc)))
            region_frames.append(pd.DataFrame(state.region_rows))
            a, m, r = _spray(run, cfg, store, part, state.features, truth, confounded)
            spray_rows += a
            spray_members += m
            spray_results.update(r)
            del state
        comp = _add_differences(pd.concat(comp_frames, ignore_index=True))
        write_parquet(comp, out / "composites.parquet")

        # ---- region tables
        per_map = pd.concat(region_frames, ignore_index=True)
        write_parquet(per_map, out / "region_maps.parquet")
        rkeys = ["syndrome_id", *GROUP_COLS, "atlas"]
        per_subject = subject_region_scores(per_map, rkeys)
        write_parquet(per_subject, out / "region_subjects.parquet")
        per_syn = syndrome_region_scores(per_subject, rkeys)
        everyone = syndrome_region_scores(per_subject.assign(syndrome_id=ALL), rkeys)
        per_syn = pd.concat([per_syn, everyone], ignore_index=True)
        write_parquet(per_syn, out / "region_syndromes.parquet")
        hits = _planted_hits(per_syn, planted, control)
        if len(hits):
            write_parquet(hits, out / "planted_hits.parquet")
        summary["planted_hits"] = _report_hits(hits, cfg.quiet)

        # ---- SpRAy tables
        spray_table = pd.DataFrame([{k: v for k, v in a.items() if k not in ("cluster_means", "cue", "cue_mask")}
                                    | {"cue": json.dumps(a.get("cue"), sort_keys=True) if a.get("cue") else None}
                                    for a in spray_rows])
        write_parquet(spray_table, out / "spray.parquet")
        write_parquet(pd.DataFrame(spray_members), out / "spray_members.parquet")
        summary["spray"] = _report_spray(spray_rows, confounded, cfg.quiet)

        # ---- composite faces (privacy guard) and pairs
        from gestalt_xai.aggregate.faces import accumulate_faces

        aligned = images[images["image_id"].astype(str).isin(_aligned_ids(run))]
        faces = accumulate_faces(run, aligned, strata, kinds, errors)
        face_rows = []
        for (group, stratum), acc in sorted(faces.items()):
            rendered = acc.n_subjects >= cfg.min_subjects
            if rendered:
                from gestalt_xai.data.images import save_png

                save_png(out / "faces" / f"{_safe(group)}__{_safe(stratum)}.png", acc.mean())
            face_rows.append({"group": group, "stratum": stratum, "n_subjects": acc.n_subjects,
                              "n_images": acc.n_images, "rendered": rendered, "min_subjects": cfg.min_subjects})
        write_parquet(pd.DataFrame(face_rows), out / "faces.parquet")
        from gestalt_xai.aggregate.similarity import pair_table

        pairs = pair_table(index, images)
        write_parquet(pairs, out / "pairs.parquet")

        if cfg.figures:
            from gestalt_xai.viz import FIGURE_FORMATS
            from gestalt_xai.aggregate.report import draw_all

            token = FIGURE_FORMATS.set(tuple(cfg.figure_formats))
            try:
                draw_all(run, cfg, store, comp, per_syn, faces, planted, control, spray_rows, spray_results,
                         spray_members, pairs, rows, names, confounded)
            finally:
                FIGURE_FORMATS.reset(token)
        run.write_errors("aggregate", [ErrorRow("aggregate", e["item_id"], e["error_kind"], e["message"])
                                       for e in errors])
        record.n_items = int(len(rows))
        record.n_errors = len(errors)
        summary.update(n_maps=int(len(rows)), n_composites=int(len(comp)), n_subjects=int(rows["subject_id"].nunique()),
                       control_id=control, confounded_syndrome=confounded)
        record.extra.update({"summary": summary})
    return summary


def _aligned_ids(run: Any) -> set[str]:
    d = run.path / "aligned"
    return {p.stem for p in d.glob("*.png")} if d.exists() else set()


def _planted_hits(per_syn: pd.DataFrame, planted: dict[str, set[str]], control: str | None) -> pd.DataFrame:
    """Per syndrome × method: is the top facial region (template atlas, own target) a planted feature's region?"""
    if not planted:
        return pd.DataFrame()
    sel = per_syn[(per_syn["atlas"] == "template") & per_syn["target_group"].isin(OWN_TARGET_GROUPS)
                  & (per_syn["syndrome_id"] != ALL) & (per_syn["syndrome_id"] != (control or ""))]
    top = top_regions(sel, ["syndrome_id", *GROUP_COLS, "atlas"])
    rows = []
    for r in top.to_dict("records"):
        regions = planted.get(r["syndrome_id"], set())
        if not regions:
            continue  # no in-crop planted feature: nothing to hit
        rows.append({"syndrome_id": r["syndrome_id"], **{c: r[c] for c in GROUP_COLS}, "top_region": r["region"],
                     "top_group": r["region_group"], "top_enrichment": r["enrichment"],
                     "planted_regions": ";".join(sorted(regions)), "hit": r["region"] in regions})
    return pd.DataFrame(rows)


def _echo(text: str, quiet: bool) -> None:
    if quiet:
        log.info(text)
    else:
        print(text, flush=True)  # the stage's reported result, shown once (not also as a log line)


def _report_hits(hits: pd.DataFrame, quiet: bool) -> list[dict[str, Any]]:
    if not len(hits):
        return []
    out = []
    # chance: the top region drawn uniformly from the face regions of the atlas (background excluded)
    n_face_regions = len(REGIONS) - 1
    for key, grp in hits.groupby(GROUP_COLS, sort=True):
        d = dict(zip(GROUP_COLS, key, strict=True))
        share = float(grp["hit"].mean())
        chance = float(grp["planted_regions"].map(lambda r: len(r.split(";")) / n_face_regions).mean())
        d.update(share=share, n_syndromes=len(grp), n_hits=int(grp["hit"].sum()), chance=chance)
        out.append(d)
        layer = f" [{d['layer']}]" if d["layer"] else ""
        _echo(f"aggregate: {d['method']}{layer} ({d['model_id']}, {d['target_group']}): top-enrichment region is a "
              f"planted feature's region for {d['n_hits']}/{d['n_syndromes']} syndromes ({share:.0%}; chance "
              f"{chance:.0%})", quiet)
    return out


def _report_spray(analyses: list[dict[str, Any]], confounded: str | None, quiet: bool) -> list[dict[str, Any]]:
    out = []
    for a in analyses:
        if not a.get("confounded_syndrome"):
            continue
        d = {k: a.get(k) for k in ("syndrome_id", "model_id", "method", "layer", "target_group", "n_subjects",
                                   "n_clusters", "cluster_sizes", "cue_cluster", "splits_on_cue")}
        d["cue"] = a.get("cue")
        out.append(d)
        if a.get("cue"):
            best = next(c for c in a["cue"] if c["cluster"] == a["cue_cluster"])
            _echo(f"aggregate: SpRAy {a['method']} on confounded {confounded}: {a['n_clusters']} cluster(s) "
                  f"{a['cluster_sizes']}; cluster {best['cluster']} puts {best['cue_share']:.0%} of its positive "
                  f"mass on the cue (enrichment {best['cue_enrichment']:.1f}, {best['marked_fraction']:.0%} of its "
                  f"subjects carry the mark) → splits on the cue: {'yes' if a['splits_on_cue'] else 'no'}", quiet)
        else:
            _echo(f"aggregate: SpRAy {a['method']} on confounded {confounded}: {a['n_clusters']} cluster(s) "
                  f"{a['cluster_sizes']} (no cue mask to check against)", quiet)
    return out

