"""The ``eyetrack`` stage: do clinicians look where the model looks?

Reads an eye-tracking study (or simulates one on a synthetic cohort), brings every fixation into the model's aligned
crop, and scores the run's explanation maps against each observer's fixations beside a face prior, a centre bias,
chance and the inter-observer ceiling (:mod:`~gestalt_xai.experiments.eyetracking.analysis`). Writes under
``experiments/eyetracking/``::

    fixations.parquet     every fixation read: pseudonymised participant, group, image, photo and crop coordinates,
                          in_crop, kept (after the filters) and the filter that dropped it
    reading.parquet       per recording (R01, R02, … : file names often carry participant ids): format, fixations
                          read, malformed rows and their line numbers; errors.parquet names the files
    offcrop.parquet       per observer × image: fixations and dwell time outside the 112×112 crop
    scores.parquet        per observer × image × map × metric (the unit every summary starts from)
    observers.parquet     per observer × map × metric: mean over images, with their prior and ceiling
    images.parquet        per group × image × map × metric: mean and SD over observers
    summary_table.parquet per group × map × metric (and per syndrome, per answer correctness): means over observers
                          with bootstrap intervals
    probes.parquet        planted-features vs eyes-only probe maps on syndromes whose features lie away from the eyes
    regions.parquet       per group × region: dwell share beside each method's attribution share
    summary.md, figures/  the summary (every number beside prior and ceiling) and the figures
    private/participants_key.csv, private/recordings_key.csv   raw participant id → pseudonym, recording label →
                          file: for the analyst only, never exported

With no ``data`` folder the stage simulates a study on the run's synthetic cohort
(:mod:`~gestalt_xai.experiments.eyetracking.simulate`) into ``experiments/eyetracking/simulated/`` and reads it back
through the same readers; every output then says *simulated*.

Per-image scores are resumable parts (:class:`~gestalt_xai.runs.Parts`): an interrupted run resumes without
rescoring finished images.
"""

from __future__ import annotations

import glob
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from gestalt_xai.aggregate.composite import normalise
from gestalt_xai.config import StageConfig
from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.experiments.eyetracking import analysis as an
from gestalt_xai.experiments.eyetracking import fixmaps
from gestalt_xai.experiments.eyetracking.simulate import SimulationConfig
from gestalt_xai.faces.align import row_matrix
from gestalt_xai.runs import LAYOUT, ErrorRow, Parts, Run, atomic_write_bytes, write_parquet
from gestalt_xai.stages import StageResult, stage

log = logging.getLogger(__name__)

__all__ = ["EyetrackConfig", "SourceOptions", "FilterOptions", "eyetrack_stage"]

FORMATS = ("generic_csv", "eyelink_asc", "eyelink_dataviewer", "tobii_tsv", "pupil_core")


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceOptions(_Options):
    """One set of recordings: a format and a file or glob pattern (relative to ``data``)."""

    format: Literal["generic_csv", "eyelink_asc", "eyelink_dataviewer", "tobii_tsv", "pupil_core"]
    path: str = Field(description="file or glob pattern, relative to the data folder")
    options: dict[str, Any] = Field(default_factory=dict, description="reader options (formats.read_fixations)")


class FilterOptions(_Options):
    """Which fixations count (Holmqvist et al., *Eye Tracking*, OUP 2011, ch. 5)."""

    drop_first: bool = Field(True, description="drop each trial's first fixation (where the fixation cross was)")
    min_duration_ms: float = Field(80.0, ge=0, description="drop shorter fixations (60–100 ms is usual)")
    max_duration_ms: float | None = Field(None, gt=0, description="drop longer fixations (none by default)")


class EyetrackConfig(StageConfig):
    """Options of ``gestalt-xai eyetrack``."""

    data: str | None = Field(None, description="folder of a study: stimuli.csv, display.csv, participants.csv, "
                                               "answers.csv (optional) and the recordings in `sources`; none: "
                                               "simulate one on the run's synthetic cohort")
    sources: list[SourceOptions] = Field(default_factory=list, description="recordings of the study (with data)")
    simulate: SimulationConfig = Field(default_factory=SimulationConfig,
                                       description="the simulated study (without data)")
    models: list[str] | None = Field(None, description="model ids (default: every model with maps; random-weight "
                                                        "controls are reported as controls)")
    methods: list[str] | None = Field(None, description="methods (default: every method in the store)")
    targets: list[str] = Field(default_factory=lambda: ["centroid"], description="target kinds compared")
    normalisation: str = Field("positive", description="map normalisation before scoring (aggregate's names)")
    filters: FilterOptions = Field(default_factory=FilterOptions)
    sigma_deg: float = Field(1.0, gt=0, description="fixation-map Gaussian σ in degrees of visual angle")
    fallback_sigma_px: float = Field(6.0, gt=0, description="σ in crop pixels where no display geometry is known")
    weight: Literal["count", "duration"] = Field("count", description="fixation-map weights")
    centre_sigma: float = Field(0.25, gt=0, le=2, description="centre-bias σ as a fraction of the crop side")
    references: Literal["group", "all"] = Field(
        "group", description="whose fixations make an observer's face prior and ceiling: the other observers of "
                             "their group (clinicians are compared with clinicians), or every other observer")
    top_k: float = Field(0.1, gt=0, le=1, description="fraction of pixels for the top-k IoU")
    borji_splits: int = Field(100, ge=1, description="random negative sets of AUC-Borji")
    uniform_mix: float = Field(0.01, gt=0, lt=1, description="uniform share mixed into a map for information gain")
    probes: bool = Field(True, description="planted-features and eyes-only probe maps (synthetic cohorts)")
    figures: bool = True
    figure_formats: list[Literal["png", "svg", "pdf"]] = Field(default_factory=lambda: ["png"], min_length=1)
    seed: int = 0


#: options that change no number (a rerun with another value reuses the scored images)
_PRESENTATION = ("figures", "figure_formats")


# ------------------------------------------------------------------------------------------------ reading
def _study(run: Run, cfg: EyetrackConfig, out: Path) -> tuple[Path, list[SourceOptions], bool]:
    """The study folder, its sources and whether it is simulated; checks paths before any work."""
    if cfg.data is None:
        from gestalt_xai.experiments.eyetracking.simulate import simulate_study

        if not (run.path / "cohort" / "truth").is_dir():
            raise ConfigError("eyetrack.data: no study folder given and the run has no synthetic cohort to simulate "
                              "observers on; set data to a folder with stimuli.csv and the recordings")
        folder = out / "simulated"
        simulate_study(run, folder, cfg.simulate)
        sources = [SourceOptions(format="eyelink_asc", path="*.asc"), SourceOptions(format="tobii_tsv", path="*.tsv")]
        return folder, [s for s in sources if glob.glob(str(folder / s.path))], True
    folder = Path(cfg.data.replace("{run}", str(run.path)))
    folder = folder if folder.is_absolute() else run.path / folder
    if not (folder / "stimuli.csv").is_file():
        raise ConfigError(f"eyetrack.data: {folder / 'stimuli.csv'} not found (the stimulus table)")
    if not cfg.sources:
        raise ConfigError("eyetrack.sources: a study folder needs at least one source (format and path)")
    for i, src in enumerate(cfg.sources):
        if not glob.glob(str(folder / src.path)):
            raise ConfigError(f"eyetrack.sources[{i}].path: nothing matches {folder / src.path}")
    return folder, list(cfg.sources), False


def _read_table(path: Path, reader: Any, required: bool) -> pd.DataFrame | None:
    if not path.is_file():
        if required:
            raise InputError(f"{path}: not found")
        return None
    return reader(path)


def read_study(run: Run, folder: Path, sources: list[SourceOptions], errors: list[ErrorRow]
               ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame | None]]:
    """Every source's fixations (photo pixels), the per-file reading report, and the study's tables."""
    from gestalt_xai.experiments.eyetracking import formats

    tables = {"stimuli": formats.read_stimuli(folder / "stimuli.csv"),
              "display": _read_table(folder / "display.csv", formats.read_display, False),
              "participants": _read_table(folder / "participants.csv", pd.read_csv, False),
              "answers": _read_table(folder / "answers.csv", pd.read_csv, False)}
    al = run.alignments()
    sizes = {str(r.image_id): (int(r.photo_width), int(r.photo_height)) for r in al.itertuples()}
    frames, report = [], []
    for src in sources:
        for path in sorted(glob.glob(str(folder / src.path))):
            name = Path(path).name
            try:
                result = formats.read_fixations(path, src.format, stimuli=tables["stimuli"],
                                                display=tables["display"], photo_sizes=sizes, **src.options)
            except InputError as exc:
                errors.append(ErrorRow(name, "unreadable_recording", str(exc)))
                report.append({"file": name, "format": src.format, "fixations": 0, "malformed": 0, "lines": "",
                               "readable": False})
                continue
            bad = result.problems
            if len(bad):
                lines = ", ".join(str(v) for v in bad["line"].head(20))
                more = f" (+{len(bad) - 20} more)" if len(bad) > 20 else ""
                errors.append(ErrorRow(name, "malformed_rows",
                                       f"{name}: {len(bad)} malformed row(s) skipped at line(s) {lines}{more}: "
                                       f"{bad['reason'].iloc[0]}"))
            frames.append(result.fixations)
            report.append({"file": name, "format": src.format, "fixations": len(result.fixations),
                           "malformed": len(bad), "lines": ", ".join(str(v) for v in bad["line"]), "readable": True})
    fix = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else None
    if fix is None:
        raise InputError(f"{folder}: no fixation could be read from any recording")
    report_table = pd.DataFrame(report)
    width = max(2, len(str(len(report_table))))
    report_table.insert(0, "recording", [f"R{i + 1:0{width}d}" for i in range(len(report_table))])
    return fix, report_table, tables


def pseudonymise(fix: pd.DataFrame, participants: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Participants renamed ``P01``, ``P02``, … in the order of their raw ids (so no output carries a raw id), with
    their ``group`` (``participants.csv``; ``all`` when the study has none). Returns the fixations and the key."""
    raw = sorted(fix["participant"].astype(str).unique())
    width = max(2, len(str(len(raw))))
    key = pd.DataFrame({"participant": raw, "pseudonym": [f"P{i + 1:0{width}d}" for i in range(len(raw))]})
    group = {p: "all" for p in raw}
    if participants is not None and "participant" in participants.columns and "group" in participants.columns:
        known = dict(zip(participants["participant"].astype(str), participants["group"].astype(str), strict=True))
        group.update({p: known[p] for p in raw if p in known})
    key["group"] = key["participant"].map(group)
    mapping = dict(zip(key["participant"], key["pseudonym"], strict=True))
    out = fix.assign(group=fix["participant"].astype(str).map(group),
                     participant=fix["participant"].astype(str).map(mapping))
    return out.drop(columns=["source"], errors="ignore"), key


# ------------------------------------------------------------------------------------------------ maps
def _store_maps(run: Run, index: pd.DataFrame, image_ids: list[str], cfg: EyetrackConfig
                ) -> tuple[dict[str, dict[str, np.ndarray]], pd.DataFrame]:
    """Per image, its normalised explanation maps by label (``method``, or ``method [model]`` for another model),
    the mean of a kind's targets when there are several; and the labels' table (label, model_id, method, kind).
    ``index`` is the store's index as :func:`check_map_filters` returned it."""
    from gestalt_xai.models.declaration import random_controls

    if not len(index):
        return {}, pd.DataFrame(columns=["map", "model_id", "method", "kind"])
    rows = index[index["image_id"].astype(str).isin(set(image_ids)) & index["target_kind"].isin(cfg.targets)]
    for field, wanted in (("model_id", cfg.models), ("method", cfg.methods)):
        if wanted is not None:
            rows = rows[rows[field].isin(wanted)]
    controls = set(random_controls(run))
    trained = sorted(set(rows["model_id"]) - controls)
    main = trained[0] if trained else None
    rows = rows.sort_values(["image_id", "model_id", "method", "target_kind", "target"], kind="stable")
    arrays = run.map_store().load_many(rows.reset_index(drop=True)) if len(rows) else np.empty((0, 112, 112))
    sums: dict[tuple[str, str], list[np.ndarray]] = {}
    labels = {}
    for (_, r), m in zip(rows.iterrows(), arrays, strict=True):
        model, method = str(r["model_id"]), str(r["method"])
        label = method if model == main else f"{method} [{model}]"
        kind = "control" if model in controls else "method"
        labels[label] = {"map": label, "model_id": model, "method": method, "kind": kind}
        sums.setdefault((str(r["image_id"]), label), []).append(normalise(m, cfg.normalisation))
    out: dict[str, dict[str, np.ndarray]] = {}
    for (image_id, label), maps in sums.items():
        out.setdefault(image_id, {})[label] = np.mean(maps, axis=0)
    return out, pd.DataFrame(list(labels.values()))


def check_map_filters(run: Run, cfg: EyetrackConfig) -> pd.DataFrame:
    """The map store's index, after checking that the models, methods and target kinds asked for have maps (a
    :class:`ConfigError` naming the option otherwise, before any work); empty without a map store (only the
    baselines and probes are scored then)."""
    index = run.map_store().index() if (run.path / LAYOUT.maps).exists() else pd.DataFrame()
    if not len(index):
        if cfg.models or cfg.methods:
            raise ConfigError("eyetrack.models / eyetrack.methods: the run has no maps (run `gestalt-xai explain`)")
        return index
    for option, field, wanted in (("models", "model_id", cfg.models), ("methods", "method", cfg.methods),
                                  ("targets", "target_kind", cfg.targets)):
        unknown = sorted(set(wanted or ()) - set(index[field]))
        if unknown:
            raise ConfigError(f"eyetrack.{option}: {unknown} have no maps; stored: {sorted(set(index[field]))}")
    return index


def _atlases(run: Run, truth: Any, image_ids: list[str]) -> dict[str, np.ndarray]:
    """Per image, its landmark atlas when 68 landmarks are known, else the template atlas."""
    from gestalt_xai.aggregate.regions import template_landmarks
    from gestalt_xai.assess.planted import truth_landmarks
    from gestalt_xai.faces.regions import landmark_atlas, template_atlas

    lms = template_landmarks(run, truth_landmarks(truth))
    tpl = template_atlas()
    return {i: landmark_atlas(lms[i]) if i in lms else tpl for i in image_ids}


def _probes(run: Run, truth: Any, image_ids: list[str], atlases: dict[str, np.ndarray], matrices: dict[str, Any],
            sigma: float) -> dict[str, dict[str, np.ndarray]]:
    """Per image: ``planted_features`` (its planted, crop-visible feature regions) and ``eyes_only`` (the atlas's
    periorbital regions), each blurred with the fixation maps' σ and normalised to sum 1."""
    from scipy.ndimage import gaussian_filter

    from gestalt_xai.data.synthetic.truth import load_masks
    from gestalt_xai.faces.align import warp_photo_to_crop
    from gestalt_xai.faces.regions import LABEL

    feats = truth.features[truth.features["visible_in_crop"].astype(bool)]
    out: dict[str, dict[str, np.ndarray]] = {}
    for image_id in image_ids:
        own = feats[feats["image_id"].astype(str) == image_id]
        if not len(own) or image_id not in matrices:
            continue
        masks = load_masks(run.path / LAYOUT.cohort, image_id, own)
        union = np.any([masks[f] for f in own["feature"].astype(str)], axis=0)
        planted = warp_photo_to_crop(union, matrices[image_id]).astype(np.float64)
        eyes = np.isin(atlases[image_id], [LABEL["periorbital_left"], LABEL["periorbital_right"]]).astype(np.float64)
        maps = {}
        for name, m in (("planted_features", planted), ("eyes_only", eyes)):
            blurred = gaussian_filter(m, sigma, mode="constant")
            if blurred.sum() > 0:
                maps[name] = blurred / blurred.sum()
        out[image_id] = maps
    return out


def away_from_eyes(truth: Any) -> set[str]:
    """Syndromes none of whose crop-visible planted features is in the periorbital (eyes and brows) group."""
    feats = truth.features[truth.features["visible_in_crop"].astype(bool)]
    by_syn = feats.groupby(feats["syndrome_id"].astype(str))["region"].agg(set)
    return {s for s, regions in by_syn.items() if "periorbital_eyes_brows" not in regions}


# ------------------------------------------------------------------------------------------------ densities
def _image_fixations(kept: pd.DataFrame, cfg: EyetrackConfig) -> tuple[dict[str, an.ImageFixations], dict[str, Any]]:
    """Per image: observers' own densities, and per observer the ceiling (the other observers of their reference
    set on this image) and the face prior (the reference set's density on the other images); the shuffled
    negatives (every in-crop fixation on the other images)."""
    kw = {"sigma_deg": cfg.sigma_deg, "fallback_sigma_px": cfg.fallback_sigma_px, "weight": cfg.weight}
    inside = kept[kept["in_crop"].astype(bool)]
    sets = inside["group"].astype(str) if cfg.references == "group" else pd.Series("all", index=inside.index)
    gx, gy = inside["cx"].to_numpy() + 0.5, inside["cy"].to_numpy() + 0.5
    ids = inside["image_id"].astype(str).to_numpy()
    out: dict[str, an.ImageFixations] = {}
    for image_id, g in inside.groupby("image_id", sort=True):
        other = ids != str(image_id)
        out[str(image_id)] = an.ImageFixations(str(image_id), g, {}, {}, {}, (gx[other], gy[other]))
    for _, members in inside.groupby(sets, sort=True):
        by_image = {str(i): g for i, g in members.groupby("image_id", sort=True)}
        density = {i: d for i, g in by_image.items() if (d := fixmaps.fixation_density(g, **kw)) is not None}
        prior = fixmaps.face_prior(density)
        for image_id, g in by_image.items():
            own, loo = fixmaps.observer_densities(g, **kw)  # an observer's own density is in one set only
            out[image_id].own.update(own)
            out[image_id].loo.update(loo)
            if image_id in prior:
                out[image_id].prior.update({o: prior[image_id] for o in g["participant"].astype(str).unique()})
    sig = inside["crop_px_per_degree"].to_numpy(np.float64) * cfg.sigma_deg
    sig = sig[np.isfinite(sig) & (sig > 0)]
    return out, {"sigma_px": float(np.median(sig)) if len(sig) else cfg.fallback_sigma_px,
                 "sigma_from_geometry": bool(len(sig))}


# ------------------------------------------------------------------------------------------------ the stage
@stage("eyetrack", options=EyetrackConfig, order=95,
       summary="clinicians' fixations vs the model's maps, beside a face prior and the inter-observer ceiling",
       reads=(LAYOUT.aligned, LAYOUT.maps, LAYOUT.cohort), writes=(LAYOUT.eyetracking,),
       example="gestalt-xai eyetrack --run runs/demo --set data=/path/study",
       tiny_options={"simulate": {"observers": {"expert": 3, "non_clinician": 3}, "images_per_syndrome": 1},
                     "borji_splits": 10})
def eyetrack_stage(run: Run, cfg: EyetrackConfig) -> StageResult:
    """Run the eye-tracking comparison on ``run``; see the module docstring for what it writes."""
    from gestalt_xai.assess.planted import read_truth
    from gestalt_xai.experiments.eyetracking import report

    out = run.dir(LAYOUT.eyetracking)
    timings: dict[str, float] = {}
    errors: list[ErrorRow] = []
    t0 = time.perf_counter()
    index = check_map_filters(run, cfg)
    folder, sources, simulated = _study(run, cfg, out)
    raw, reading, tables = read_study(run, folder, sources, errors)
    people = tables["participants"]
    if people is not None and "simulated" in people.columns:  # a simulated study read back from its folder
        simulated = simulated or bool(people["simulated"].astype(str).str.lower().isin(["true", "1"]).any())
    fix, key = pseudonymise(raw, tables["participants"])
    al = run.alignments(aligned_only=True)
    matrices = {str(r["image_id"]): row_matrix(r) for r in al.to_dict("records")}
    unaligned = sorted(set(fix["image_id"].astype(str)) - set(matrices))
    for image_id in unaligned:
        errors.append(ErrorRow(image_id, "not_aligned", f"image {image_id} has fixations but no aligned "
                                                                     "crop: its fixations are not scored"))
    fix = fixmaps.to_crop(fix[~fix["image_id"].astype(str).isin(unaligned)], matrices)
    kept, dropped = fixmaps.filter_fixations(fix.assign(_row=fix.index), drop_first=cfg.filters.drop_first,
                                             min_duration_ms=cfg.filters.min_duration_ms,
                                             max_duration_ms=cfg.filters.max_duration_ms)
    fix["kept"] = fix.index.isin(kept.pop("_row"))
    timings["read"] = time.perf_counter() - t0

    # ---- maps and densities
    t0 = time.perf_counter()
    images = run.image_table()
    syndrome = dict(zip(images["image_id"].astype(str), images["syndrome_id"].astype(str), strict=True))
    per_image, geometry = _image_fixations(kept, cfg)
    image_ids = sorted(per_image)
    maps, labels = _store_maps(run, index, image_ids, cfg)
    truth, truth_errors = read_truth(run)
    errors += truth_errors
    atlases = _atlases(run, truth, image_ids)
    probes = _probes(run, truth, image_ids, atlases, matrices, geometry["sigma_px"]) \
        if cfg.probes and truth is not None else {}
    centre = fixmaps.centre_bias(sigma_fraction=cfg.centre_sigma)
    uniform = np.full(centre.shape, 1.0 / centre.size)
    timings["maps"] = time.perf_counter() - t0

    # ---- scores, per image (resumable)
    t0 = time.perf_counter()
    parts = Parts(run, cfg, out / "parts", ignore=_PRESENTATION)
    for image_id in image_ids:
        candidates = {**maps.get(image_id, {}), **probes.get(image_id, {}), "centre_bias": centre, "uniform": uniform}
        parts.get("scores", image_id, lambda i=image_id, c=candidates: an.score_image(
            per_image[i], c, seed=cfg.seed, k=cfg.top_k, borji_splits=cfg.borji_splits,
            uniform_mix=cfg.uniform_mix).assign(image_id=i))
    scores = parts.table("scores", image_ids)
    group_of = dict(zip(key["pseudonym"], key["group"], strict=True))
    scores["group"] = scores["participant"].map(group_of)
    scores["syndrome_id"] = scores["image_id"].map(syndrome)
    kinds = _kinds(labels)
    scores["kind"] = scores["map"].map(kinds)
    timings["scores"] = time.perf_counter() - t0

    # ---- tables
    t0 = time.perf_counter()
    per_obs = an.relative_scores(an.observer_means(scores))
    per_obs["kind"] = per_obs["map"].map(kinds)
    summary = an.group_summary(per_obs, seed=cfg.seed).assign(breakdown="group")
    everyone = an.group_summary(per_obs.assign(group="all observers"), seed=cfg.seed).assign(breakdown="group")
    by_syn = an.group_summary(an.relative_scores(an.observer_means(
        scores, ("group", "participant", "syndrome_id", "map", "metric"))), ("group", "syndrome_id", "map", "metric"),
        seed=cfg.seed).assign(breakdown="syndrome")
    by_answer = _by_answer(scores, tables["answers"], key, syndrome, cfg)
    image_table = (scores.groupby(["group", "image_id", "syndrome_id", "map", "metric"], sort=True)["value"]
                   .agg(mean="mean", sd="std", n_observers="count").reset_index())
    table = pd.concat([t for t in (summary, everyone, by_syn, by_answer) if len(t)], ignore_index=True)
    table["kind"] = table["map"].map(kinds)
    away = away_from_eyes(truth) if truth is not None else set()
    probe_table = an.probe_contrast(scores, away, seed=cfg.seed) if probes else pd.DataFrame()
    dwell = an.region_dwell(kept, atlases, _regions())
    dwell["group"] = dwell["participant"].map(group_of)
    regions = report.region_table(dwell, maps, atlases)
    offcrop = fixmaps.offcrop_shares(fix)
    offcrop["group"] = offcrop["participant"].map(group_of)
    timings["tables"] = time.perf_counter() - t0

    # ---- write
    simulated_col = {"simulated": simulated}
    written = {"fixations": fix, "reading": reading.drop(columns="file"), "offcrop": offcrop, "scores": scores,
               "observers": per_obs, "images": image_table, "summary_table": table, "probes": probe_table,
               "regions": regions}
    for name, frame in written.items():
        if len(frame):
            write_parquet(frame.assign(**simulated_col), out / f"{name}.parquet")
    private = out / "private"
    private.mkdir(exist_ok=True)
    atomic_write_bytes(private / "participants_key.csv", key.to_csv(index=False).encode("utf-8"))
    atomic_write_bytes(private / "recordings_key.csv",
                       reading[["recording", "file"]].to_csv(index=False).encode("utf-8"))
    facts = {"simulated": simulated, "observers": int(key.shape[0]), "groups": key["group"].value_counts().to_dict(),
             "images": len(image_ids), "fixations_read": int(len(fix)), "fixations_kept": int(len(kept)),
             "dropped": dropped, "off_crop_share": float((~fix["in_crop"]).mean()) if len(fix) else float("nan"),
             "malformed_rows": int(reading["malformed"].sum()) if len(reading) else 0, **geometry,
             "away_from_eyes": sorted(away), "reused_images": parts.reused}
    text, lines = report.summary_markdown(cfg, facts, table, probe_table, regions, offcrop)
    atomic_write_bytes(out / "summary.md", text.encode("utf-8"))
    if cfg.figures:
        t0 = time.perf_counter()
        from gestalt_xai.experiments.eyetracking import figures

        figures.draw(run, out / "figures", kept, per_obs, maps, probes, per_image, probe_table, away, simulated,
                     tuple(cfg.figure_formats))
        timings["figures"] = time.perf_counter() - t0
    run.write_errors(errors)
    facts["timings"] = {k: round(v, 2) for k, v in timings.items()}
    return StageResult(items=int(len(scores)), outputs={"eyetracking": out, "summary": out / "summary.md"},
                       summary=lines, extra={"results": facts})


def _kinds(labels: pd.DataFrame) -> dict[str, str]:
    kinds = {"face_prior": "baseline", "centre_bias": "baseline", "uniform": "baseline", "ceiling": "ceiling",
             "planted_features": "probe", "eyes_only": "probe"}
    kinds.update(dict(zip(labels["map"], labels["kind"], strict=True)) if len(labels) else {})
    return kinds


def _regions() -> tuple[str, ...]:
    from gestalt_xai.faces.regions import REGIONS

    return REGIONS


def _by_answer(scores: pd.DataFrame, answers: pd.DataFrame | None, key: pd.DataFrame, syndrome: dict[str, str],
               cfg: EyetrackConfig) -> pd.DataFrame:
    """Per group × answer (correct / incorrect) × map × metric, when the study has answers."""
    if answers is None or not {"participant", "image_id", "answer"} <= set(answers.columns):
        return pd.DataFrame()
    mapping = dict(zip(key["participant"], key["pseudonym"], strict=True))
    a = answers.assign(participant=answers["participant"].astype(str).map(mapping),
                       image_id=answers["image_id"].astype(str))
    a["answer_correct"] = a["answer"].astype(str) == a["image_id"].map(syndrome)
    s = scores.merge(a[["participant", "image_id", "answer_correct"]], on=["participant", "image_id"], how="inner")
    if not len(s):
        return pd.DataFrame()
    s["answer"] = np.where(s["answer_correct"], "correct", "incorrect")
    rel = an.relative_scores(an.observer_means(s, ("group", "answer", "participant", "map", "metric")))
    return an.group_summary(rel, ("group", "answer", "map", "metric"), seed=cfg.seed).assign(breakdown="answer")
