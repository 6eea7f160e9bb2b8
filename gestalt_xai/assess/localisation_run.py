"""The localisation tables of a run, for the assess stage: one streaming pass over a selection of stored maps.

:func:`localisation_tables` reads each selected map once (one subject's maps in memory at a time,
:func:`~gestalt_xai.aggregate.composite.stream_subject_maps`) and feeds

* the :class:`~gestalt_xai.assess.localisation.Localiser` with both mask kinds of a synthetic photo: ``region``
  (:func:`~gestalt_xai.assess.planted.region_mask_source`) and ``change``
  (:func:`~gestalt_xai.assess.localisation.change_mask_source` of the run's counterfactual crops), then the per-patient
  Δscore-rank agreement and the summary (:mod:`.localisation`);
* the contrastivity rows (:func:`contrast_rows`): for each image, model, method and layer with maps towards two
  syndromes of one target kind (``centroid:A`` and ``centroid:B``, ``logit:A`` and ``logit:B``), their
  :func:`~gestalt_xai.assess.localisation.contrastivity` on the two syndromes' planted regions on this patient's face.
  A syndrome's planted regions are the atlas regions of its in-crop planted features
  (:func:`~gestalt_xai.assess.planted.planted_regions`), drawn on the image's own landmark atlas
  (:func:`~gestalt_xai.faces.regions.landmark_atlas` of its 68 landmarks brought into the crop, the template atlas
  when none are known). Region masks, not change masks: the other syndrome's features are absent from the photo, so
  no counterfactual removes them, but the regions they would occupy are on every face; and one construction for both
  syndromes, so neither gets tighter masks. Regions both syndromes have are dropped from both; a pair is scored when
  each keeps a region in the face. A ``contrast:X-Y`` map (the score of X minus that of Y) is scored as map A = R
  and map B = −R: the contrast Y − X for methods linear in the score.

Tables (``dict`` keys): ``localisation``, ``localisation_patients``, ``localisation_summary``, ``contrastivity``
(per image, model, method, layer, target kind and pair of targets: ``target_a, target_b, syndrome_a, syndrome_b,
regions_a, regions_b, area_a, area_b, mass_own_a, mass_other_a, mass_own_b, mass_other_b, contrastive,
target_sensitive``) and ``contrastivity_summary`` (per model, method, layer and target kind: the shares contrastive
and target-sensitive with Wilson 95 % intervals). A random-model control has its own rows; summary lines print it
beside its trained model.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.assess import planted
from gestalt_xai.assess.localisation import (
    Localiser,
    MaskSource,
    change_mask_source,
    contrastivity,
    face_region,
    localisation_summary,
    model_label,
    rank_correlations,
    wilson_interval,
)
from gestalt_xai.data.synthetic.truth import TruthTables
from gestalt_xai.runs import ErrorRow, Run

__all__ = ["CONTRAST_KINDS", "localisation_tables", "run_change_source", "contrast_rows", "contrastivity_summary"]

log = logging.getLogger(__name__)

#: target kinds whose maps towards two syndromes are paired for contrastivity (``contrast`` maps are scored alone)
CONTRAST_KINDS = ("centroid", "logit")
_MAP_GROUP = ["model_id", "method", "layer"]
CONTRAST_KEY = ["image_id", "subject_id", "syndrome_id", *_MAP_GROUP, "target_kind", "target_a", "target_b"]
_CONTRAST_VALUES = ["area_a", "area_b", "mass_own_a", "mass_other_a", "mass_own_b", "mass_other_b", "contrastive",
                    "target_sensitive"]


def run_change_source(run: Run, image_ids: set[str], errors: list[ErrorRow]) -> MaskSource | None:
    """The ``change`` mask source of ``run`` for ``image_ids`` (``None`` without counterfactuals, costing nothing); a
    counterfactual listed in the cohort whose crop is missing is an error row."""
    from gestalt_xai.data.synthetic.truth import load_counterfactuals
    from gestalt_xai.runs import LAYOUT

    listed = load_counterfactuals(run.path / LAYOUT.cohort)[["image_id", "variant"]].astype(str)
    if not len(listed):
        return None
    have_crops = (run.path / LAYOUT.counterfactual_crop_table).exists()
    variants = run.counterfactuals() if have_crops else listed.iloc[:0].assign(feature="", change="")
    listed = listed[listed["image_id"].isin(image_ids)]
    have = set(zip(variants["image_id"].astype(str), variants["variant"].astype(str), strict=True))
    for image_id, variant in sorted(set(zip(listed["image_id"], listed["variant"], strict=True)) - have):
        errors.append(ErrorRow(image_id, "input", f"counterfactual {variant!r} has no aligned crop (run the align "
                                                  "stage); its localisation and effect are missing",
                               {"variant": variant}))
    if not len(variants):
        return None
    return change_mask_source(variants[variants["image_id"].astype(str).isin(image_ids)], run.change_masks)


def _exclusive(labels: np.ndarray, regions_a: set[str], regions_b: set[str]) -> tuple[np.ndarray, np.ndarray]:
    from gestalt_xai.faces.regions import LABEL

    def mask(names: set[str]) -> np.ndarray:
        return np.isin(labels, [LABEL[n] for n in sorted(names)])

    return mask(regions_a - regions_b), mask(regions_b - regions_a)


def contrast_rows(items: list[tuple[Mapping[str, Any], np.ndarray]], labels: Mapping[str, np.ndarray],
                  regions: Mapping[str, set[str]]) -> list[dict[str, Any]]:
    """Contrastivity rows of one subject's maps of one model, method and layer (module docstring).

    ``items`` are ``(annotated index row, map)``; ``labels`` image id → its atlas label map (crop space); ``regions``
    syndrome → atlas regions of its planted in-crop features. Pairs of syndromes without a region of their own in the
    face are skipped.
    """
    from gestalt_xai.attribution.contrast import parse_contrast_ref

    face = face_region()
    out = []
    by_image: dict[str, list[tuple[Mapping[str, Any], np.ndarray]]] = {}
    for row, m in items:
        by_image.setdefault(str(row["image_id"]), []).append((row, m))
    for image_id, group in sorted(by_image.items()):
        atlas = labels.get(image_id)
        if atlas is None:
            continue
        pairs = []
        for kind in CONTRAST_KINDS:
            maps = {str(r["target_ref"]): (str(r["target"]), m) for r, m in group if r["target_kind"] == kind
                    and str(r["target_ref"]) in regions}
            for a, b in itertools.combinations(sorted(maps), 2):
                pairs.append((kind, a, b, maps[a], maps[b]))
        for r, m in group:
            if r["target_kind"] == "contrast":
                a, b = parse_contrast_ref(str(r["target_ref"]))
                if a in regions and b in regions:
                    pairs.append(("contrast", a, b, (str(r["target"]), m), ("", -m)))
        row0 = group[0][0]
        for kind, a, b, (target_a, map_a), (target_b, map_b) in pairs:
            own_a, own_b = _exclusive(atlas, regions[a], regions[b])
            if not ((own_a & face).any() and (own_b & face).any()):
                continue
            scores = contrastivity(map_a, map_b, own_a, own_b, face)
            out.append({"image_id": image_id, "subject_id": str(row0["subject_id"]),
                        "syndrome_id": str(row0["syndrome_id"]), **{c: str(row0[c]) for c in _MAP_GROUP},
                        "target_kind": kind, "target_a": target_a, "target_b": target_b, "syndrome_a": a,
                        "syndrome_b": b, "regions_a": ";".join(sorted(regions[a] - regions[b])),
                        "regions_b": ";".join(sorted(regions[b] - regions[a])),
                        **{k: float(v) for k, v in scores.items()}})
    return out


def contrastivity_summary(table: pd.DataFrame, controls: Mapping[str, str | None]
                          ) -> tuple[pd.DataFrame, list[str]]:
    """Per model, method, layer and target kind: ``n_pairs`` (scored; ``n_unscored``: a map without positive mass in
    the face, e.g. −R of an unsigned method's contrast map), ``n_contrastive`` / ``share_contrastive`` and
    ``n_target_sensitive`` / ``share_target_sensitive`` with Wilson 95 % intervals, mean masses; one summary line
    each (a random-model control labelled as such)."""
    if not len(table):
        return pd.DataFrame(), []
    key = [*_MAP_GROUP, "target_kind"]
    out = table.groupby(key, sort=True).agg(
        n_pairs=("contrastive", "count"), n_unscored=("contrastive", lambda v: int(v.isna().sum())),
        n_contrastive=("contrastive", "sum"),
        n_target_sensitive=("target_sensitive", "sum"), mass_own_a=("mass_own_a", "mean"),
        mass_other_a=("mass_other_a", "mean"), mass_own_b=("mass_own_b", "mean"),
        mass_other_b=("mass_other_b", "mean")).reset_index()
    lines = []
    for what in ("contrastive", "target_sensitive"):
        out[f"n_{what}"] = out[f"n_{what}"].astype(np.int64)
        out[f"share_{what}"] = out[f"n_{what}"] / out["n_pairs"].where(out["n_pairs"] > 0)
        out[f"{what}_ci_low"], out[f"{what}_ci_high"] = wilson_interval(out[f"n_{what}"].to_numpy(),
                                                                        out["n_pairs"].to_numpy())
    for r in out.to_dict("records"):
        layer = f" [{r['layer']}]" if r["layer"] else ""
        head = (f"assess: contrastivity {r['method']}{layer} ({model_label(r['model_id'], controls)}, "
                f"{r['target_kind']} pairs): ")
        if not r["n_pairs"]:
            lines.append(head + f"no pair scored ({r['n_unscored']} maps without positive mass in the face)")
            continue
        lines.append(head + f"both maps favour their own syndrome's regions in {r['n_contrastive']}/{r['n_pairs']} "
                     f"pairs ({r['share_contrastive']:.0%}, 95 % CI {r['contrastive_ci_low']:.0%}–"
                     f"{r['contrastive_ci_high']:.0%}); target-sensitive (FunnyBirds) in "
                     f"{r['n_target_sensitive']}/{r['n_pairs']} ({r['share_target_sensitive']:.0%})")
    return out, lines


def _atlases(run: Run, truth: TruthTables | None, image_ids: set[str]) -> dict[str, np.ndarray]:
    """Image → its landmark atlas in crop space (the template atlas when its landmarks are unknown)."""
    from gestalt_xai.aggregate.regions import template_landmarks
    from gestalt_xai.faces.regions import landmark_atlas, template_atlas

    landmarks = template_landmarks(run, planted.truth_landmarks(truth))
    return {i: landmark_atlas(landmarks[i]) if i in landmarks else template_atlas() for i in sorted(image_ids)}


def localisation_tables(run: Run, store: Any, rows: pd.DataFrame, *, truth: TruthTables | None = None,
                        errors: list[ErrorRow] | None = None, tolerance_px: int = 0, block_maps: int = 256
                        ) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The localisation tables (module docstring) of the maps ``rows`` (a subset of ``store.index()``, any target
    kinds; undiagnosed patients welcome: their maps enter the contrastivity rows).

    ``truth`` defaults to the run's (:func:`~gestalt_xai.assess.planted.read_truth`); problems (unreadable truth or
    masks, counterfactuals without crops, maps of images not in the cohort) are appended to ``errors``. Returns
    ``(tables, summary lines)``; every table is empty for a real cohort without counterfactuals.
    """
    from gestalt_xai.aggregate.annotate import annotate_index
    from gestalt_xai.aggregate.composite import stream_subject_maps
    from gestalt_xai.attribution.effects import load_effects
    from gestalt_xai.models.declaration import random_controls

    t0 = time.perf_counter()
    errors = [] if errors is None else errors
    truth = planted._truth(run, truth, errors)
    annotated, missing = annotate_index(rows, run.image_table())
    errors += [ErrorRow(r["image_id"], "input", "map of an image that is not in the cohort table; not assessed",
                        key={k: r[k] for k in ("model_id", "target", "method", "layer")})
               for r in missing.to_dict("records")]
    image_ids = set(annotated["image_id"])
    sources: dict[str, MaskSource] = {}
    if truth is not None:
        sources["region"] = planted.region_mask_source(run, truth)
    change = run_change_source(run, image_ids, errors)
    if change is not None:
        sources["change"] = change
    localiser = Localiser(sources, planted.confounded_syndrome(truth), errors, tolerance_px) if sources else None
    regions = planted.planted_regions(truth)
    pairable = annotated[annotated["target_kind"].isin([*CONTRAST_KINDS, "contrast"])]
    atlases = _atlases(run, truth, set(pairable["image_id"])) if regions and len(pairable) else {}
    contrast: list[dict[str, Any]] = []
    n_maps = 0
    pending: tuple[tuple[Any, ...], list[tuple[Mapping[str, Any], np.ndarray]]] = ((), [])
    # grouped by target too (one map per image and key); a subject's targets of one model, method and layer come
    # one after the other, and are paired once all have come
    wanted = annotated if localiser is not None or atlases else annotated.iloc[:0]  # a real cohort: nothing to read
    for key, subject, items in stream_subject_maps(store, wanted, [*_MAP_GROUP, "target"], block_maps):
        n_maps += len(items)
        if localiser is not None:
            for row, m in items:
                localiser.add(row, m)
        if atlases:
            if pending[0] != (subject, *key[:-1]):
                contrast += contrast_rows(pending[1], atlases, regions)
                pending = ((subject, *key[:-1]), [])
            pending[1].extend(items)
    contrast += contrast_rows(pending[1], atlases, regions)
    controls = random_controls(run)
    features = localiser.table() if localiser is not None else pd.DataFrame()
    patients = rank_correlations(features, load_effects(run)) if len(features) else pd.DataFrame()
    summary, lines = localisation_summary(features, patients, controls, planted.confounded_syndrome(truth))
    contrast_table = pd.DataFrame(contrast, columns=[*CONTRAST_KEY, "syndrome_a", "syndrome_b", "regions_a",
                                                     "regions_b", *_CONTRAST_VALUES])
    contrast_table = contrast_table.sort_values(CONTRAST_KEY, kind="stable").reset_index(drop=True).astype(
        {"contrastive": "boolean", "target_sensitive": "boolean"})
    contrast_summary, contrast_lines = contrastivity_summary(contrast_table, controls)
    log.info("assess: localisation of %d maps (%d rows, %d contrast pairs) in %.2f s", n_maps, len(features),
             len(contrast_table), time.perf_counter() - t0)
    return {"localisation": features, "localisation_patients": patients, "localisation_summary": summary,
            "contrastivity": contrast_table, "contrastivity_summary": contrast_summary}, lines + contrast_lines
