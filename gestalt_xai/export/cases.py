"""The cases of a questionnaire from a run, and their images: the aligned face and each blinded map, as plain PNGs.

Patient cases (``cases.unit: patient``) show one test photo's aligned face and that patient's own maps of the
compared methods, towards the patient's own diagnosis (the map store's maps of target group ``centroid:own``, else
``logit:own``, :data:`~gestalt_xai.aggregate.annotate.OWN_TARGET_GROUPS`). A photo is a case only when it is a
diagnosed test photo with such a map of every compared method; one photo per subject is shown (the first by image
id), so no patient is rated twice. Showing a patient's face to raters needs the patient's consent for that use: the
selection rule does not check it, the study coordinator does (or lists the consented photos with ``select: listed``).

Syndrome cases (``cases.unit: syndrome``) show a syndrome's composite face (the mean aligned face of its subjects,
written by the aggregate stage only from ``min_subjects`` subjects on, :mod:`gestalt_xai.aggregate.faces`) and the
syndrome's composite maps of the compared methods (``aggregate/composites.parquet``, whole group, the questionnaire's
normalisation, targets explaining each patient towards its own syndrome). A syndrome is a case only when its face was
rendered, it has at least ``cases.min_subjects`` subjects and a composite for every compared method.

Images are re-encoded from arrays (so nothing of an input file's metadata survives) and written without text chunks
(:func:`gestalt_xai.data.images.encode_png`, :func:`gestalt_xai.viz.save_figure`); their file names carry the case's
pseudonym and the map's letter only (``<pseudonym>_face.png``, ``<pseudonym>_map_a.png``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gestalt_xai.aggregate.annotate import OWN_TARGET_GROUPS, annotate_index
from gestalt_xai.aggregate.composite import composite_array
from gestalt_xai.aggregate.faces import ALL, WHOLE
from gestalt_xai.attribution.base import UNSIGNED_METHODS
from gestalt_xai.errors import InputError
from gestalt_xai.export.questionnaire_def import QuestionnaireDef

__all__ = ["Case", "case_image_names", "patient_cases", "render_case_images", "select_patients", "select_syndromes",
           "syndrome_cases"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One case as the exports see it: its pseudonym, the aligned face (RGB uint8) and method → map (112×112)."""

    pseudonym: str
    face: np.ndarray = field(repr=False)
    maps: Mapping[str, np.ndarray] = field(repr=False)


def select_syndromes(q: QuestionnaireDef, composites: pd.DataFrame, faces: pd.DataFrame) -> list[str]:
    """The syndromes shown, by the questionnaire's selection rule (``largest``: most subjects first, ties by id;
    ``random``: drawn with the seed; ``listed``; ``all``), among the eligible ones (module docstring).

    ``composites``: rows of ``aggregate/composites.parquet``; ``faces``: ``aggregate/faces.parquet``.
    """
    sel, methods = q.cases, set(q.maps.methods)
    rows = _syndrome_rows(q, composites)
    have = rows.groupby("group")["method"].agg(set)
    complete = {g for g, m in have.items() if methods <= m}
    shown = faces[(faces["stratum"] == WHOLE) & faces["rendered"] & (faces["n_subjects"] >= sel.min_subjects)]
    size = shown.set_index("group")["n_subjects"]
    eligible = sorted(g for g in complete if g in size.index and g != ALL)
    if sel.select == "listed":
        bad = [i for i in sel.ids if i not in eligible]
        if bad:
            raise InputError(f"listed syndromes {bad} have no rendered composite face with ≥ {sel.min_subjects} "
                             f"subjects or lack a composite of one of {sorted(methods)}")
        return list(sel.ids)
    if not eligible:
        raise InputError(f"no syndrome has a rendered composite face with ≥ {sel.min_subjects} subjects and "
                         f"composites of every method {sorted(methods)}: run the aggregate stage with these methods")
    if sel.select == "all":
        return eligible
    n = min(sel.n, len(eligible))
    if n < sel.n:
        log.warning("only %d eligible syndromes for the %d cases asked", n, sel.n)
    if sel.select == "largest":
        return sorted(eligible, key=lambda g: (-int(size[g]), g))[:n]
    rng = np.random.default_rng(q.seed)
    return [eligible[i] for i in sorted(rng.choice(len(eligible), size=n, replace=False))]


def _syndrome_rows(q: QuestionnaireDef, composites: pd.DataFrame) -> pd.DataFrame:
    c = composites
    keep = ((c["stratum"] == WHOLE) & (c["normalisation"] == q.maps.normalisation)
            & c["target_group"].isin(OWN_TARGET_GROUPS) & c["method"].isin(q.maps.methods))
    if q.maps.model is not None:
        keep &= c["model_id"] == q.maps.model
    rows = c[keep]
    if len(rows) and q.maps.model is None:
        rows = rows[rows["model_id"] == sorted(rows["model_id"])[0]]
    return rows


def syndrome_cases(q: QuestionnaireDef, composites: pd.DataFrame, faces: pd.DataFrame, face_of: object,
                   pseudonym_of: object) -> list[Case]:
    """The syndrome cases of ``q``: ``face_of(syndrome)`` gives the composite face (RGB uint8), ``pseudonym_of(
    syndrome)`` its pseudonym (:meth:`~gestalt_xai.pseudonyms.PseudonymMap.pseudonym` with kind ``syndrome``).
    Where a method has maps for several own-diagnosis targets, the first in :data:`OWN_TARGET_GROUPS` order is used.
    """
    rows = _syndrome_rows(q, composites)
    order = {t: i for i, t in enumerate(OWN_TARGET_GROUPS)}
    cases = []
    for group in select_syndromes(q, composites, faces):
        maps = {}
        for method in q.maps.methods:
            r = rows[(rows["group"] == group) & (rows["method"] == method)]
            r = r.iloc[np.argsort([order[t] for t in r["target_group"]], kind="stable")]
            maps[method] = composite_array(r.iloc[0])
        cases.append(Case(pseudonym_of(group), np.asarray(face_of(group), np.uint8), maps))  # type: ignore[operator]
    return cases


def _patient_rows(q: QuestionnaireDef, index: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Map rows towards each patient's own diagnosis of the compared methods: one per image and method (the first
    own-target group in :data:`OWN_TARGET_GROUPS` order, then the first layer), for one model."""
    rows, _ = annotate_index(index, images)
    rows = rows[rows["target_group"].isin(OWN_TARGET_GROUPS) & rows["method"].isin(q.maps.methods)]
    if q.maps.model is not None:
        rows = rows[rows["model_id"] == q.maps.model]
    elif len(rows):
        rows = rows[rows["model_id"] == sorted(rows["model_id"])[0]]
    order = rows["target_group"].map({t: i for i, t in enumerate(OWN_TARGET_GROUPS)})
    rows = rows.assign(_order=order).sort_values(["image_id", "method", "_order", "layer"], kind="stable")
    return rows.drop_duplicates(["image_id", "method"]).drop(columns="_order").reset_index(drop=True)


def select_patients(q: QuestionnaireDef, rows: pd.DataFrame, images: pd.DataFrame,
                    ranks: pd.DataFrame | None = None) -> list[str]:
    """The test photos shown, by the selection rule (``largest``: one photo per syndrome in turn, syndromes with most
    subjects first, until ``n``; ``random``: drawn with the seed; ``listed``; ``all``), among the eligible ones
    (module docstring). ``rows``: :func:`_patient_rows`; ``images``: :meth:`~gestalt_xai.runs.Run.image_table`;
    ``ranks``: the match stage's ranks, needed for ``only_correct`` (top-1 right in every protocol it was tested in).
    """
    sel = q.cases
    img = images.assign(image_id=images["image_id"].astype(str), subject_id=images["subject_id"].astype(str))
    img = img[img["test"].astype(bool) & ~img["undiagnosed"].astype(bool)]
    have = rows.groupby("image_id")["method"].agg(set)
    complete = {i for i, m in have.items() if set(q.maps.methods) <= m}
    img = img[img["image_id"].isin(complete)]
    if sel.only_correct:
        if ranks is None:
            raise InputError("cases.only_correct needs the match stage's ranks: run `gestalt-xai match` first")
        right = ranks.assign(image_id=ranks["image_id"].astype(str)).groupby("image_id")["rank"].max() == 1
        img = img[img["image_id"].map(right).fillna(False).astype(bool)]
    if sel.select == "listed":
        bad = [i for i in sel.ids if i not in set(img["image_id"])]
        if bad:
            raise InputError(f"{len(bad)} listed patients are not diagnosed test photos with a map of every method "
                             f"{sorted(q.maps.methods)}{' ranked first correctly' if sel.only_correct else ''}")
        return list(sel.ids)
    img = img.sort_values("image_id", kind="stable").drop_duplicates("subject_id")
    if img.empty:
        raise InputError(f"no diagnosed test photo has maps of every method {sorted(q.maps.methods)} towards its "
                         "own diagnosis: run the explain stage on the test photos with these methods")
    if sel.select == "all":
        return sorted(img["image_id"])
    n = min(sel.n, len(img))
    if n < sel.n:
        log.warning("only %d eligible patients for the %d cases asked", n, sel.n)
    if sel.select == "random":
        ids = sorted(img["image_id"])
        rng = np.random.default_rng(q.seed)
        return [ids[i] for i in sorted(rng.choice(len(ids), size=n, replace=False))]
    size = images.groupby(images["syndrome_id"].astype(str))["subject_id"].nunique()
    img = img.assign(_turn=img.groupby("syndrome_id").cumcount(), _size=img["syndrome_id"].astype(str).map(size))
    img = img.sort_values(["_turn", "_size", "syndrome_id", "image_id"], ascending=[True, False, True, True],
                          kind="stable")
    return list(img["image_id"][:n])


def patient_cases(q: QuestionnaireDef, index: pd.DataFrame, images: pd.DataFrame, load_maps: object,
                  face_of: object, pseudonym_of: object, ranks: pd.DataFrame | None = None) -> list[Case]:
    """The patient cases of ``q``: ``index`` the map store's index, ``load_maps(rows)`` the maps of index rows
    (:meth:`~gestalt_xai.store.MapStore.load_many`), ``face_of(image_id)`` the aligned face, ``pseudonym_of(
    image_id)`` its pseudonym (kind ``case``); see :func:`select_patients`."""
    rows = _patient_rows(q, index, images)
    cases = []
    for image_id in select_patients(q, rows, images, ranks):
        mine = rows[rows["image_id"] == image_id].set_index("method").loc[list(q.maps.methods)].reset_index()
        arrays = np.asarray(load_maps(mine), np.float32)  # type: ignore[operator]
        maps = dict(zip(mine["method"], arrays, strict=True))
        cases.append(Case(pseudonym_of(image_id), np.asarray(face_of(image_id), np.uint8), maps))  # type: ignore
    return cases


def case_image_names(pseudonym: str, labels: list[str]) -> dict[str, str]:
    """``face`` and each letter → the image file name (pseudonym and letter only)."""
    return {"face": f"{pseudonym}_face.png", **{lab: f"{pseudonym}_map_{lab.lower()}.png" for lab in labels}}


def _map_png(face: np.ndarray, map_: np.ndarray, signed: bool) -> bytes:
    from gestalt_xai.viz import _plt, draw_map, figure_bytes, shared_scale

    plt = _plt()
    fig = plt.figure(figsize=(2.4, 2.4))
    ax = fig.add_axes((0, 0, 1, 1))
    draw_map(ax, face, map_, signed=signed, vmax=shared_scale([map_], signed))
    ax.set_axis_off()
    data = figure_bytes(fig, "png", dpi=120)
    plt.close(fig)
    return data


def render_case_images(case: Case, key: pd.DataFrame) -> dict[str, bytes]:
    """The PNG files of one case: ``{file name: bytes}`` for the face and each of its blinded maps (``key``: the
    blinding key, :func:`~gestalt_xai.export.blinding.blinding_key`). Same inputs → same bytes."""
    from gestalt_xai.data.images import encode_png

    mine = key[key["pseudonym"] == case.pseudonym]
    if not len(mine):
        raise ValueError(f"case {case.pseudonym} is not in the blinding key")
    names = case_image_names(case.pseudonym, list(mine["label"]))
    out = {names["face"]: encode_png(case.face)}
    for label, method in zip(mine["label"], mine["method"], strict=True):
        out[names[label]] = _map_png(case.face, case.maps[method], method not in UNSIGNED_METHODS)
    return out
