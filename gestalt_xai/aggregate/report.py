"""Draw every figure of the aggregate stage from its tables (called by :func:`~gestalt_xai.aggregate.stage.
aggregate_stage`); figures go to ``run/aggregate/figures/``.

Which face a map is drawn over always goes through :func:`~gestalt_xai.aggregate.faces.guarded_background`, so no
figure shows a composite face of fewer than ``min_subjects`` subjects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gestalt_xai.aggregate.annotate import OWN_TARGET_GROUPS
from gestalt_xai.aggregate.composite import composite_array, is_signed_normalisation, normalise
from gestalt_xai.aggregate.faces import ALL, WHOLE, FaceAccumulator, guarded_background
from gestalt_xai.attribution.base import UNSIGNED_METHODS
from gestalt_xai.faces.align import CROP_SIZE
from gestalt_xai.viz import (
    FIGURE_FORMATS,
    composite_grid,
    faces_figure,
    pair_figure,
    patient_syndrome_figure,
    region_heatmap,
    spray_figure,
)
from gestalt_xai.viz import file_stem as _safe

if TYPE_CHECKING:
    from gestalt_xai.runs import Run

log = logging.getLogger(__name__)

__all__ = ["FigureInputs", "draw_all"]


def _col(method: str, layer: str) -> str:
    return method if not layer else f"{method} · {layer.split('.')[-1]}"


def _file_col(method: str, layer: str) -> str:
    return _safe(method if not layer else f"{method}_{layer.split('.')[-1]}")


def _smooth(m: np.ndarray | None, layer: str, sigma: float) -> np.ndarray | None:
    """Input-space (pixel-level) maps are Gaussian-smoothed for display only (tables keep the raw composites)."""
    if m is None or layer or sigma <= 0:
        return m
    import cv2

    return cv2.GaussianBlur(np.asarray(m, np.float32), (0, 0), sigma)


@dataclass
class FigureInputs:
    """What the aggregate stage hands its figures: its tables and what the truth says (empty for a real cohort)."""

    store: Any  # the map store (pair and patient figures read their maps)
    rows: pd.DataFrame  # the annotated map index (:func:`~gestalt_xai.aggregate.annotate.annotate_index`)
    composites: pd.DataFrame  # aggregate/composites.parquet
    region_syndromes: pd.DataFrame  # aggregate/region_syndromes.parquet
    faces: dict[tuple[str, str], FaceAccumulator]  # composite faces by (group, stratum)
    spray: list[dict[str, Any]]  # SpRAy analyses (with cluster maps and the cue check)
    spray_results: dict[tuple[Any, ...], Any]  # key → (SprayResult, subjects)
    spray_members: list[dict[str, Any]]
    pairs: pd.DataFrame  # aggregate/pairs.parquet
    names: dict[str, str]  # syndrome id → name
    planted: dict[str, set[str]]  # syndrome → atlas regions of its planted features
    control: str | None  # syndrome id of controls
    confounded: str | None  # syndrome carrying the confounder cue


def draw_all(run: Run, cfg: Any, inputs: FigureInputs) -> None:
    """All figures (see the module docstring) in ``cfg.figure_formats`` (an :class:`AggregateConfig
    <gestalt_xai.aggregate.stage.AggregateConfig>`)."""
    token = FIGURE_FORMATS.set(tuple(cfg.figure_formats))
    try:
        _draw_all(run, cfg, inputs)
    finally:
        FIGURE_FORMATS.reset(token)


def _draw_all(run: Run, cfg: Any, t: FigureInputs) -> None:
    store, comp, per_syn, faces, planted, control = t.store, t.composites, t.region_syndromes, t.faces, t.planted, \
        t.control
    spray_rows, spray_results, spray_members = t.spray, t.spray_results, t.spray_members
    pairs, rows, names, confounded = t.pairs, t.rows, t.names, t.confounded
    from gestalt_xai.progress import progress

    fig_dir = run.dir("aggregate") / "figures"
    norm = cfg.normalisations[0]
    guard = cfg.min_subjects
    bg_cache: dict[tuple[str, str], Any] = {}

    def bg(group: str, stratum: str = WHOLE) -> Any:
        if (group, stratum) not in bg_cache:
            bg_cache[(group, stratum)] = guarded_background(faces, group, stratum, guard)
        return bg_cache[(group, stratum)]

    def label(s: str) -> str:
        if s == ALL:
            return "all subjects"
        if control is not None and s == control:
            return f"{s} controls"
        return s

    prim = comp[comp["normalisation"] == norm]
    jobs = []
    for (model_id, tgroup), part in prim.groupby(["model_id", "target_group"], sort=True):
        if tgroup not in OWN_TARGET_GROUPS:
            continue
        jobs.append((model_id, tgroup, part))
    for model_id, tgroup, part in progress(jobs, "aggregate: figures"):
        whole = part[part["stratum"] == WHOLE]
        col_keys = sorted({(m, ly) for m, ly in zip(whole["method"], whole["layer"], strict=True)})
        cols = [_col(m, ly) for m, ly in col_keys]
        signed = {_col(m, ly): is_signed_normalisation(norm, m not in UNSIGNED_METHODS) for m, ly in col_keys}
        syndromes = sorted(set(whole["group"]) - {ALL})
        if control in syndromes:
            syndromes = [control] + [s for s in syndromes if s != control]
        cells, diffs = {}, {}
        for r in whole.to_dict("records"):
            c = _col(r["method"], r["layer"])
            sm = cfg.figure_smoothing
            cells[(r["group"], c)] = (_smooth(composite_array(r), r["layer"], sm), int(r["n_subjects"]))
            diff = composite_array(r, "minus_all")
            if r["group"] != ALL and diff is not None:
                diffs[(r["group"], c)] = (_smooth(diff, r["layer"], sm), int(r["n_subjects"]))
        row_names = syndromes + [ALL]
        backgrounds = {g: bg(g).face for g in row_names}
        stem = f"{_safe(model_id)}__{_safe(tgroup)}__{_safe(norm)}"
        what = f"{tgroup} maps, {norm} per map, subjects averaged"
        labels = {g: label(g) for g in row_names}
        composite_grid(cells, row_names, cols, backgrounds, signed, fig_dir / f"composites__{stem}.png",
                       f"Composite maps per syndrome × method — model {model_id}, {what}\n"
                       f"drawn over the syndrome's composite face when ≥ {guard} subjects, else the all-subjects face",
                       row_labels=labels, colorbar_label=f"mean ({norm})")
        if diffs:
            composite_grid(diffs, syndromes, cols, backgrounds, {c: True for c in cols},
                           fig_dir / f"differences__{stem}.png",
                           f"Syndrome composite minus the all-subjects composite (generic map) — model {model_id}, "
                           f"{what}\nred: the model looks here more for this syndrome than in general",
                           row_labels=labels, colorbar_label="difference")
        # generic maps and their breakdowns by stratum
        strata_rows = [WHOLE] + sorted(set(part.loc[part["group"] == ALL, "stratum"]) - {WHOLE})
        gcells = {}
        for r in part[part["group"] == ALL].to_dict("records"):
            gcells[(r["stratum"], _col(r["method"], r["layer"]))] = (
                _smooth(composite_array(r), r["layer"], cfg.figure_smoothing), int(r["n_subjects"]))
        composite_grid(gcells, strata_rows, cols, {s: bg(ALL, s).face for s in strata_rows}, signed,
                       fig_dir / f"generic__{stem}.png",
                       f"Generic maps: all subjects together, and by stratum — model {model_id}, {what}",
                       row_labels={s: "all subjects" if s == WHOLE else s.replace("_", " ") for s in strata_rows},
                       colorbar_label=f"mean ({norm})")
        # composite faces with the composite map of each method
        for k_col, (m, ly) in enumerate(col_keys):
            c = _col(m, ly)
            panels = []
            for g in row_names:
                cell = cells.get((g, c))
                b = bg(g)
                title = f"{label(g)}" + (f"\n{names.get(g, '')[:22]}" if names.get(g) and g != ALL else "")
                panels.append((f"{title}\nn={b.n_subjects}", b.face, cell[0] if cell else None, b.label))
            faces_figure(panels, signed[c], fig_dir / f"composite_faces__{stem}__{_file_col(m, ly)}.png",
                         f"Composite faces with the {c} composite map — model {model_id}, {tgroup}, {norm}; "
                         f"faces from < {guard} subjects are replaced by the all-subjects face",
                         colorbar_label=f"mean ({norm})")
            # breakdown of every group that has strata (first method only: one set of figures per stratum)
            for g in (row_names if k_col == 0 else []):
                strata = sorted(set(part.loc[(part["group"] == g) & (part["method"] == m) & (part["layer"] == ly),
                                             "stratum"]) - {WHOLE})
                if not strata:
                    continue
                sp = []
                for s in [WHOLE, *strata]:
                    sel = part[(part["group"] == g) & (part["stratum"] == s) & (part["method"] == m)
                               & (part["layer"] == ly)]
                    if not len(sel):
                        continue
                    b = bg(g, s)
                    sp.append((f"{'all' if s == WHOLE else s.replace('_', ' ')}\nn={b.n_subjects}", b.face,
                               _smooth(composite_array(sel.iloc[0]), ly, cfg.figure_smoothing), b.label))
                faces_figure(sp, signed[c], fig_dir / "strata" / f"{_safe(g)}__{stem}__{_file_col(m, ly)}.png",
                             f"{label(g)} by sex / age band / ancestry — {c}, {tgroup}, {norm}",
                             colorbar_label=f"mean ({norm})")
    # region heatmaps
    reg = per_syn[(per_syn["atlas"] == "template") & per_syn["target_group"].isin(OWN_TARGET_GROUPS)]
    for (model_id, method, layer, tgroup), part in reg.groupby(["model_id", "method", "layer", "target_group"],
                                                               sort=True):
        part = part[part["syndrome_id"] != ALL]
        if not len(part):
            continue
        path = fig_dir / f"regions__{_safe(model_id)}__{_safe(tgroup)}__{_file_col(method, layer)}.png"
        region_heatmap(part, path, f"Region enrichment of positive attribution — {_col(method, layer)}, model "
                       f"{model_id}, {tgroup}", planted=planted or None,
                       row_labels={s: label(s) for s in part["syndrome_id"]})
    _draw_spray(run, cfg, fig_dir, spray_rows, spray_results, spray_members, faces, bg, rows, confounded)
    _draw_similarity(run, cfg, store, fig_dir, pairs, rows)


def _draw_spray(run: Run, cfg: Any, fig_dir: Any, spray_rows: list[dict[str, Any]],
                spray_results: dict[tuple[Any, ...], Any], spray_members: list[dict[str, Any]],
                faces: dict[tuple[str, str], FaceAccumulator], bg: Any, rows: pd.DataFrame,
                confounded: str | None) -> None:
    from gestalt_xai.data.aligned import load_crops

    norm = cfg.normalisations[0]
    members = pd.DataFrame(spray_members)
    crops_of = rows.drop_duplicates("image_id").groupby("subject_id")["image_id"].agg(sorted).to_dict()
    for a in spray_rows:
        if a["n_clusters"] < 2 and not a.get("confounded_syndrome"):
            continue
        key = (a["syndrome_id"], a["model_id"], a["method"], a["layer"], a["target_group"])
        res, subjects = spray_results[key]
        sel = members[(members["syndrome_id"] == key[0]) & (members["model_id"] == key[1])
                      & (members["method"] == key[2]) & (members["layer"] == key[3])
                      & (members["target_group"] == key[4])]
        panels = []
        cue = {c["cluster"]: c for c in a.get("cue") or []}
        for c in range(a["n_clusters"]):
            subj = sorted(sel.loc[sel["cluster"] == c, "subject_id"])
            if len(subj) >= cfg.min_subjects:
                acc = FaceAccumulator()
                for s in subj:
                    try:
                        acc.add(load_crops(run, crops_of.get(s, [])).astype(np.float64).mean(0))
                    except Exception:  # a missing crop only thins the composite face
                        continue
                face = acc.mean() if acc.n_subjects >= cfg.min_subjects else bg(ALL).face
                src = f"cluster face n={acc.n_subjects}" if acc.n_subjects >= cfg.min_subjects else "all-subjects face"
            else:
                face, src = bg(ALL).face, f"all-subjects face (n={len(subj)} < {cfg.min_subjects})"
            caption = f"n={len(subj)}; {src}"
            if c in cue:
                caption += f"\ncue share {cue[c]['cue_share']:.0%}, marked {cue[c]['marked_fraction']:.0%}"
            panels.append((face, _smooth(a["cluster_means"].get(c, np.zeros((CROP_SIZE, CROP_SIZE))), key[3],
                                         cfg.figure_smoothing), caption))
        marker = None
        if a.get("confounded_syndrome"):
            conf = dict(zip(sel["subject_id"], sel["confounded"], strict=True))
            marker = np.array([bool(conf.get(s)) for s in subjects])
        title = (f"SpRAy {key[0]} — {_col(key[2], key[3])}, model {key[1]}, {key[4]}, {norm}; "
                 f"{a['n_subjects']} subjects")
        if a.get("confounded_syndrome") and "splits_on_cue" in a:
            title += f"\nconfounded syndrome: splits into a cluster on the cue: {'yes' if a['splits_on_cue'] else 'no'}"
        spray_figure(res, panels, is_signed_normalisation(norm, key[2] not in UNSIGNED_METHODS),
                     fig_dir / "spray" / f"{_safe(key[0])}__{_safe(key[1])}__{_file_col(key[2], key[3])}.png",
                     title, marker=marker, marker_label="photo carries the cue", cue_mask=a.get("cue_mask"))


def _draw_similarity(run: Run, cfg: Any, store: Any, fig_dir: Any, pairs: pd.DataFrame, rows: pd.DataFrame) -> None:
    from gestalt_xai.aggregate.similarity import pair_maps, patient_syndrome_maps
    from gestalt_xai.data.aligned import load_crops

    norm = cfg.normalisations[0]
    if not len(pairs):
        return
    syn = rows.drop_duplicates("image_id").set_index("image_id")["syndrome_id"]

    def face(image_id: str) -> np.ndarray | None:
        try:
            return load_crops(run, [image_id])[0]
        except Exception:
            return None

    def view(m: np.ndarray | None, layer: str) -> np.ndarray | None:
        return None if m is None else _smooth(normalise(m, norm), layer, cfg.figure_smoothing)

    both = pairs[pairs["has_a"] & pairs["has_b"]]
    chosen = both.drop_duplicates(["image_a", "image_b"]).head(cfg.pair_figures)
    for p in chosen.to_dict("records"):
        a, b = p["image_a"], p["image_b"]
        fa, fb = face(a), face(b)
        if fa is None or fb is None:
            continue
        sub = both[(both["image_a"] == a) & (both["image_b"] == b) & (both["model_id"] == p["model_id"])]
        panel_rows = []
        for r in sub.sort_values(["method", "layer"]).to_dict("records"):
            pm = pair_maps(store, a, b, model_id=r["model_id"], method=r["method"], layer=r["layer"])
            panel_rows.append((_col(r["method"], r["layer"]), view(pm.map_a, r["layer"]), view(pm.map_b, r["layer"]),
                               is_signed_normalisation(norm, r["method"] not in UNSIGNED_METHODS)))
        pair_figure(fa, fb, panel_rows, fig_dir / "similarity" / f"pair__{_safe(a)}__{_safe(b)}.png",
                    f"Similarity maps of a pair (model {p['model_id']}, {norm}); cos(A,B) = {p['score_a']:.3f}\n"
                    "each map explains the similarity on its own face, with the other image as the reference",
                    f"{a} ({syn.get(a, '?')})", f"{b} ({syn.get(b, '?')})")
    # a patient against a syndrome: centroid + nearest gallery images
    pr = rows[rows["target_kind"] == "pair"]
    done = 0
    for image_id in sorted(pr["image_id"].unique()):
        if done >= cfg.patient_figures:
            break
        part = pr[pr["image_id"] == image_id]
        model_id, method, layer = part.sort_values(["model_id", "method", "layer"]).iloc[0][
            ["model_id", "method", "layer"]]
        target_syn = str(syn.get(image_id, ""))
        psm = patient_syndrome_maps(store, image_id, target_syn, model_id=model_id, method=method, layer=layer,
                                    k=cfg.nearest)
        if psm.centroid is None and not psm.neighbours:
            continue
        fp = face(image_id)
        if fp is None:
            continue
        neigh = []
        for gid, dist, m_p, m_g in psm.neighbours:
            fg = face(gid)
            if fg is not None:
                neigh.append((f"distance {dist:.3f}", gid, view(m_p, layer), fg, view(m_g, layer)))
        patient_syndrome_figure(fp, view(psm.centroid, layer), neigh,
                                is_signed_normalisation(norm, method not in UNSIGNED_METHODS),
                                fig_dir / "similarity" / f"patient__{_safe(image_id)}__{_safe(target_syn)}.png",
                                f"Patient {image_id} against syndrome {target_syn} — {_col(method, layer)}, model "
                                f"{model_id}, {norm}")
        done += 1
