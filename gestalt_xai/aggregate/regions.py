"""Region scores: how much of a map's positive attribution falls in each facial region of the atlas, and enrichment.

For a map ``m`` and a label map ``L`` (every pixel in exactly one region, :func:`gestalt_xai.faces.regions.
template_atlas`, or the per-image :func:`~gestalt_xai.faces.regions.landmark_atlas` when 68 landmarks are known):

.. math:: \\text{share}_r = \\frac{\\sum_{p \\in r} \\max(m_p, 0)}{\\sum_p \\max(m_p, 0)}, \\qquad
          \\text{area}_r = \\frac{|r|}{112^2}, \\qquad \\text{enrichment}_r = \\frac{\\text{share}_r}{\\text{area}_r}

Shares sum to 1 over the regions (the atlas partitions the crop), and enrichment is 1 everywhere for a flat map:
above 1 the model looks at the region more than its size explains. Shares of *positive* mass (evidence for the
target, Arras et al. 2022 relevance mass) are invariant to a positive rescaling of the map, so they are computed on
the raw stored map whatever normalisation the composites use. A map with no positive pixel has no shares (NaN).

In the aggregate stage every stored map is scored on the template atlas and, when the image's 68 landmarks are
known, on its own landmark atlas (:func:`map_region_rows`); :func:`region_tables` then averages per subject and per
syndrome (and over every subject, group ``ALL``).

Per subject, shares are the mean over the subject's images; per syndrome, the mean over its subjects (each subject
counts once), and the syndrome's enrichment is that mean share over the (mean) area share. Each region carries its
HPO anchor terms (``hpo_face_regions.tsv``, :func:`gestalt_xai.faces.regions.region_table`).

>>> import numpy as np
>>> from gestalt_xai.faces.regions import template_atlas
>>> labels = template_atlas()
>>> share, area = region_shares(np.ones((112, 112)), labels)
>>> bool(np.isclose(share.sum(), 1.0)), bool(np.allclose(share, area))
(True, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gestalt_xai.aggregate.annotate import GROUP_COLS
from gestalt_xai.aggregate.faces import ALL
from gestalt_xai.faces.regions import REGION_GROUP, REGIONS, landmark_atlas, region_table, template_atlas

if TYPE_CHECKING:
    from gestalt_xai.runs import Run

__all__ = [
    "region_shares",
    "region_area_shares",
    "region_info",
    "enrichment",
    "syndrome_region_scores",
    "subject_region_scores",
    "top_regions",
    "map_region_rows",
    "template_landmarks",
    "region_tables",
    "FACE_REGIONS",
]

#: regions that can be "the" region a syndrome is recognised by (the background is not a facial region)
FACE_REGIONS: tuple[str, ...] = tuple(r for r in REGIONS if r != "background")


def region_area_shares(labels: np.ndarray) -> np.ndarray:
    """Share of the crop's pixels per region, in :data:`~gestalt_xai.faces.regions.REGIONS` order."""
    counts = np.bincount(np.asarray(labels, np.int64).ravel(), minlength=len(REGIONS))[: len(REGIONS)]
    return counts / counts.sum()


def region_shares(map_: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(share, area)`` per region for one raw map: positive-mass shares (NaN without positive mass) and areas."""
    pos = np.maximum(np.asarray(map_, np.float64), 0.0).ravel()
    lab = np.asarray(labels, np.int64).ravel()
    mass = np.bincount(lab, weights=pos, minlength=len(REGIONS))[: len(REGIONS)]
    total = mass.sum()
    share = mass / total if total > 0 else np.full(len(REGIONS), np.nan)
    return share, region_area_shares(labels)


def enrichment(share: np.ndarray, area: np.ndarray) -> np.ndarray:
    """``share / area`` (NaN where a region has no area)."""
    share = np.asarray(share, np.float64)
    area = np.asarray(area, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area > 0, share / np.where(area > 0, area, 1.0), np.nan)


@cache
def _info() -> pd.DataFrame:
    rows = []
    for reg in region_table():
        rows.append({"region": reg.name, "region_group": reg.group or "", "hpo_ids": ";".join(reg.hpo_ids),
                     "hpo_names": ";".join(reg.hpo_names)})
    area = region_area_shares(template_atlas())
    df = pd.DataFrame(rows)
    df["template_area_share"] = area
    return df


def region_info() -> pd.DataFrame:
    """One row per atlas region: ``region, region_group, hpo_ids, hpo_names, template_area_share``."""
    return _info().copy()


def _weighted_mean_frame(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean share and area per ``by`` + region, ignoring maps without positive mass (NaN shares)."""
    ok = df[df["share"].notna()]
    agg = ok.groupby([*by, "region"], sort=True, dropna=False).agg(
        share=("share", "mean"), area_share=("area_share", "mean"), n=("share", "size")).reset_index()
    return agg


def subject_region_scores(per_map: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per-subject region scores: the mean over a subject's images of the per-map shares (and areas).

    ``per_map`` has one row per (map, atlas, region) with ``subject_id``, ``share``, ``area_share`` and ``keys``
    (e.g. ``syndrome_id, model_id, method, layer, target_group, atlas``). Returns ``keys + subject_id + region,
    share, area_share, enrichment, n_images`` with HPO anchors.
    """
    agg = _weighted_mean_frame(per_map, [*keys, "subject_id"]).rename(columns={"n": "n_images"})
    agg["enrichment"] = enrichment(agg["share"].to_numpy(), agg["area_share"].to_numpy())
    return agg.merge(_info()[["region", "region_group", "hpo_ids", "hpo_names"]], on="region", how="left")


def syndrome_region_scores(per_subject: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per-syndrome region scores from per-subject ones: mean over subjects (each subject once) and enrichment.

    Adds ``rank`` (1 = highest enrichment among the facial regions, background excluded) and ``n_subjects``.
    """
    agg = per_subject.groupby([*keys, "region"], sort=True, dropna=False).agg(
        share=("share", "mean"), area_share=("area_share", "mean"),
        n_subjects=("subject_id", "nunique")).reset_index()
    agg["enrichment"] = enrichment(agg["share"].to_numpy(), agg["area_share"].to_numpy())
    agg["log2_enrichment"] = np.log2(np.maximum(agg["enrichment"].to_numpy(np.float64), 1e-6))
    face = agg["region"].isin(FACE_REGIONS)
    agg["rank"] = np.nan
    agg.loc[face, "rank"] = agg[face].groupby(keys, sort=False, dropna=False)["enrichment"].rank(
        ascending=False, method="first")
    agg = agg.merge(_info()[["region", "region_group", "hpo_ids", "hpo_names"]], on="region", how="left")
    return agg


def top_regions(per_syndrome: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The highest-enrichment facial region per ``keys`` (rank 1), with its region group and HPO anchors."""
    top = per_syndrome[per_syndrome["rank"] == 1]
    return top.sort_values(keys, kind="stable").reset_index(drop=True)


def group_of(region: str) -> str | None:
    """Toolkit region group (``hpo_face_regions.tsv``) of an atlas region."""
    return REGION_GROUP.get(region)


def template_landmarks(run: Run, photo_landmarks: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Per aligned image, its 68 landmarks in template space, for the landmark atlas.

    The landmarks (photo pixels) are ``aligned/alignment.parquet``'s ``landmarks68``, else ``photo_landmarks[image]``
    (e.g. a synthetic cohort's true ones, :func:`gestalt_xai.assess.planted.truth_landmarks`), brought into the crop
    by the image's alignment matrix. Empty when the run has no alignment table.
    """
    from gestalt_xai.faces.align import row_matrix, transform_points
    from gestalt_xai.runs import LAYOUT

    if not (run.path / LAYOUT.alignments).exists():  # maps imported with their crops: template atlas only
        return {}
    al = run.alignments(aligned_only=True)
    photo_landmarks = photo_landmarks or {}
    out = {}
    for row in al.to_dict("records"):
        lm = row.get("landmarks68")
        if lm is None or (not isinstance(lm, (list, np.ndarray))) or len(lm) != 136:
            lm = photo_landmarks.get(str(row["image_id"]))
        if lm is None or row.get("matrix") is None:
            continue
        out[str(row["image_id"])] = transform_points(np.asarray(lm, np.float64).reshape(68, 2), row_matrix(row))
    return out


def map_region_rows(row: dict[str, Any], map_: np.ndarray, template: np.ndarray,
                    landmarks68: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The ``aggregate/region_maps.parquet`` rows of one stored map: per atlas × region its share, area share and
    the map's positive mass.

    ``row`` is the map's annotated index row (:func:`gestalt_xai.aggregate.annotate.annotate_index`); the map is
    scored on ``template`` (atlas ``"template"``) and, when ``landmarks68`` (template space) are given, on the
    image's own :func:`~gestalt_xai.faces.regions.landmark_atlas` (atlas ``"landmarks"``).
    """
    atlases = [("template", template)]
    if landmarks68 is not None:
        atlases.append(("landmarks", landmark_atlas(landmarks68)))
    out = []
    pos = float(np.maximum(map_, 0).sum())
    for name, labels in atlases:
        share, area = region_shares(map_, labels)
        for r, region in enumerate(REGIONS):
            out.append({"image_id": row["image_id"], "subject_id": row["subject_id"], "syndrome_id": row["syndrome_id"],
                        **{c: row[c] for c in GROUP_COLS}, "target": row["target"], "atlas": name, "region": region,
                        "share": float(share[r]), "area_share": float(area[r]), "positive_mass": pos})
    return out


def region_tables(per_map: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per subject, per syndrome)`` region scores from :func:`map_region_rows` rows, keyed by syndrome,
    :data:`~gestalt_xai.aggregate.annotate.GROUP_COLS` and atlas; the per-syndrome table also holds every subject
    together as syndrome ``ALL``."""
    keys = ["syndrome_id", *GROUP_COLS, "atlas"]
    per_subject = subject_region_scores(per_map, keys)
    per_syn = syndrome_region_scores(per_subject, keys)
    everyone = syndrome_region_scores(per_subject.assign(syndrome_id=ALL), keys)
    return per_subject, pd.concat([per_syn, everyone], ignore_index=True)
