"""Composite faces: the mean aligned face of a group of subjects, with a privacy guard.

A composite face is the pixel mean of aligned 112×112 crops in template space — each subject's photos averaged
first, then the subjects (one subject counts once). Composites are made per syndrome, for every subject together
(``ALL``), and per stratum (sex, age band, ancestry) when the cohort has those columns.

**Privacy guard.** The average of a handful of faces is nearly identifiable, so a composite face is only rendered
(written, drawn) from at least ``min_subjects`` distinct subjects (default 10). :func:`guarded_background` returns
the face a map is drawn over: the group's own composite when it is large enough, otherwise the all-subjects
composite, and a schematic outline (the region atlas' borders) when even that is too small. Composites below the
threshold are never written to disk.

Streaming: :class:`FaceAccumulator` keeps one float64 sum per group; crops are read one subject at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.errors import InputError
from gestalt_xai.faces.align import CROP_SIZE
from gestalt_xai.progress import progress
from gestalt_xai.runs import ErrorRow, Run

__all__ = [
    "ALL",
    "FaceAccumulator",
    "GuardedFace",
    "age_band",
    "strata_of",
    "stratum_labels",
    "subject_strata",
    "aligned_images",
    "accumulate_faces",
    "composite_faces",
    "guarded_background",
    "schematic_face",
]

log = logging.getLogger(__name__)

#: the group of every subject (all-patients composites)
ALL = "ALL"
#: the stratum of a whole group
WHOLE = "all"


@dataclass
class FaceAccumulator:
    """Sum of subject-mean faces (float64, ``112×112×3``) and the number of subjects."""

    sum: np.ndarray = field(default_factory=lambda: np.zeros((CROP_SIZE, CROP_SIZE, 3), np.float64))
    n_subjects: int = 0
    n_images: int = 0

    def add(self, subject_face: np.ndarray, n_images: int = 1) -> None:
        self.sum += np.asarray(subject_face, np.float64)
        self.n_subjects += 1
        self.n_images += n_images

    def mean(self) -> np.ndarray:
        """The composite face as RGB uint8."""
        return np.clip(np.round(self.sum / max(self.n_subjects, 1)), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class GuardedFace:
    """The background a group's map is drawn over, and where it comes from."""

    face: np.ndarray  # RGB uint8 (112, 112, 3)
    source: str  # "own" | "all-subjects" | "schematic"
    n_subjects: int  # subjects in the group itself
    n_background: int  # subjects averaged in the face drawn

    @property
    def label(self) -> str:
        if self.source == "own":
            return "own composite face"
        if self.source == "all-subjects":
            return f"all-subjects face\n(n={self.n_subjects} < guard)"
        return f"schematic\n(n={self.n_subjects} < guard)"


def age_band(age: float | None, edges: list[float]) -> str | None:
    """Label of the age band ``[edges[i], edges[i+1])`` holding ``age`` (years); the last band is open-ended.

    >>> age_band(3.5, [0, 2, 5, 10, 18])
    '2-5y'
    >>> age_band(40, [0, 2, 5, 10, 18])
    '18+y'
    """
    if age is None or (isinstance(age, float) and np.isnan(age)):
        return None
    a = float(age)
    for lo, hi in zip(edges, [*edges[1:], None], strict=True):
        if a >= lo and (hi is None or a < hi):
            return f"{lo:g}+y" if hi is None else f"{lo:g}-{hi:g}y"
    return None


def strata_of(images: pd.DataFrame, age_edges: list[float]) -> pd.DataFrame:
    """Per subject, its strata: ``subject_id, sex, age_band, ancestry`` (columns the cohort has, else absent).

    A subject's stratum value is the most frequent one over its images (age: the first image's band in sorted
    image order), so a subject counts in one stratum of each kind.
    """
    df = images.copy()
    df["subject_id"] = df["subject_id"].astype(str)
    out = pd.DataFrame({"subject_id": sorted(df["subject_id"].unique())})
    df = df.sort_values(["subject_id", "image_id"], kind="stable")
    for col in ("sex", "ancestry"):
        if col in df.columns and df[col].notna().any():
            vals = df.dropna(subset=[col]).groupby("subject_id")[col].agg(lambda s: s.astype(str).mode().iloc[0])
            out[col] = out["subject_id"].map(vals)
    if "age" in df.columns and pd.to_numeric(df["age"], errors="coerce").notna().any():
        ages = pd.to_numeric(df["age"], errors="coerce")
        first = df.assign(age=ages).dropna(subset=["age"]).groupby("subject_id")["age"].first()
        out["age_band"] = out["subject_id"].map(first).map(lambda a: age_band(a, age_edges))
    return out


def stratum_labels(row: dict[str, Any], kinds: Iterable[str]) -> list[str]:
    """``["sex:F", "age_band:2-5y", …]`` for one subject's strata row (missing values skipped)."""
    out = []
    for kind in kinds:
        v = row.get(kind)
        if v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v) != "":
            out.append(f"{kind}:{v}")
    return out


def subject_strata(strata: pd.DataFrame, kinds: Iterable[str]) -> dict[str, list[str]]:
    """Per subject, the strata it counts in: ``{"S01_p00": ["all", "sex:F", "age_band:2-5y"], …}``.

    ``strata`` is :func:`strata_of`'s table; ``"all"`` (the whole group) comes first.

    >>> subject_strata(pd.DataFrame({"subject_id": ["a"], "sex": ["F"]}), ["sex", "ancestry"])
    {'a': ['all', 'sex:F']}
    """
    kinds = list(kinds)
    return {str(row["subject_id"]): [WHOLE, *stratum_labels(row, kinds)] for row in strata.to_dict("records")}


def aligned_images(run: Run, images: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``images`` that are aligned (:meth:`~gestalt_xai.runs.Run.aligned_ids`)."""
    return images[images["image_id"].astype(str).isin(run.aligned_ids())]


def accumulate_faces(run: Run, images: pd.DataFrame, strata: Mapping[str, list[str]],
                     errors: list[ErrorRow] | None = None
                     ) -> dict[tuple[str, str], FaceAccumulator]:
    """Composite-face accumulators keyed ``(group, stratum)``: every syndrome and ``ALL``, ``"all"`` and strata.

    ``strata`` maps a subject to the strata it counts in (:func:`subject_strata`; subjects missing there count in
    ``"all"`` only). Crops are read from ``run/aligned`` one subject at a time; a missing crop is skipped (and
    reported in ``errors``).
    """
    from gestalt_xai.data.aligned import load_crops

    acc: dict[tuple[str, str], FaceAccumulator] = {}
    table = images.assign(subject_id=images["subject_id"].astype(str), image_id=images["image_id"].astype(str),
                          syndrome_id=images["syndrome_id"].astype(str))
    groups = list(table.groupby("subject_id", sort=True))
    for subject, part in progress(groups, "aggregate: composite faces"):
        crops = []
        for image_id in sorted(part["image_id"]):
            try:
                crops.append(load_crops(run, [image_id])[0].astype(np.float64))
            except InputError as exc:
                if errors is not None:
                    errors.append(ErrorRow(image_id, exc.kind, str(exc)))
        if not crops:
            continue
        face = np.mean(crops, axis=0)
        syndrome = str(part["syndrome_id"].iloc[0])
        for group in (syndrome, ALL):
            for label in strata.get(str(subject), [WHOLE]):
                acc.setdefault((group, label), FaceAccumulator()).add(face, len(crops))
    return acc


def composite_faces(run: Run, images: pd.DataFrame, strata: Mapping[str, list[str]], min_subjects: int,
                    out_dir: Path, errors: list[ErrorRow] | None = None
                    ) -> tuple[dict[tuple[str, str], FaceAccumulator], pd.DataFrame]:
    """The composite faces of the aligned images, and the table of ``aggregate/faces.parquet``.

    Faces of at least ``min_subjects`` subjects are written to ``out_dir/<group>__<stratum>.png`` (the privacy
    guard, module docstring); the table lists every ``(group, stratum)`` with ``rendered`` saying which.
    """
    from gestalt_xai.data.images import save_png
    from gestalt_xai.viz import file_stem

    faces = accumulate_faces(run, aligned_images(run, images), strata, errors)
    rows = []
    for (group, stratum), acc in sorted(faces.items()):
        rendered = acc.n_subjects >= min_subjects
        if rendered:
            save_png(out_dir / f"{file_stem(group)}__{file_stem(stratum)}.png", acc.mean())
        rows.append({"group": group, "stratum": stratum, "n_subjects": acc.n_subjects, "n_images": acc.n_images,
                     "rendered": rendered, "min_subjects": min_subjects})
    return faces, pd.DataFrame(rows)


def schematic_face() -> np.ndarray:
    """A neutral light-gray template with the atlas' region borders: the background when no composite may be shown."""
    import cv2

    from gestalt_xai.faces.regions import template_atlas

    labels = template_atlas()
    edges = cv2.Canny(labels.astype(np.uint8) * 10, 1, 1) > 0
    face = np.full((CROP_SIZE, CROP_SIZE, 3), 225, np.uint8)
    face[labels != labels.max()] = 200  # the face oval a little darker than the background
    face[edges] = 120
    return face


def guarded_background(faces: dict[tuple[str, str], FaceAccumulator], group: str, stratum: str,
                       min_subjects: int) -> GuardedFace:
    """The face a ``(group, stratum)`` map is drawn over, respecting the privacy guard (module docstring)."""
    own = faces.get((group, stratum))
    n = own.n_subjects if own else 0
    if own is not None and n >= min_subjects:
        return GuardedFace(own.mean(), "own", n, n)
    everyone = faces.get((ALL, WHOLE))
    if everyone is not None and everyone.n_subjects >= min_subjects:
        return GuardedFace(everyone.mean(), "all-subjects", n, everyone.n_subjects)
    return GuardedFace(schematic_face(), "schematic", n, 0)
