"""The ``atlas`` stage: draw the region atlas (and its HPO anchors) for a run, as a figure and a table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.config import StageConfig
from gestalt_xai.data.images import load_image
from gestalt_xai.errors import InputError
from gestalt_xai.faces.align import load_alignments
from gestalt_xai.faces.regions import atlas_figure, region_table, template_atlas
from gestalt_xai.runs import Run, write_parquet

__all__ = ["AtlasConfig", "atlas_stage"]


class AtlasConfig(StageConfig):
    """Options of the ``atlas`` stage."""

    image_id: str | None = None  # face to draw on (default: the first aligned image)


@dataclass
class AtlasResult:
    figure: Path
    table: Path


def atlas_stage(run: Run, cfg: AtlasConfig) -> AtlasResult:
    """Write ``aligned/atlas.png`` (atlas over an aligned face) and ``aligned/regions.parquet`` (areas, HPO anchors)."""
    with run.stage("atlas", cfg) as st:
        ok = load_alignments(run)
        if ok.empty:
            raise InputError("no aligned image in this run to draw the atlas on")
        image_id = cfg.image_id or str(ok["image_id"].iloc[0])
        if image_id not in set(ok["image_id"]):
            raise InputError(f"image {image_id!r} is not among the aligned images of {run.path}")
        face = load_image(run.path / "aligned" / f"{image_id}.png")
        fig_path = run.path / "aligned" / "atlas.png"
        atlas_figure(face, path=fig_path, title=f"Region atlas over {image_id}")
        labels = template_atlas()
        area = np.bincount(labels.ravel(), minlength=len(region_table())) / labels.size
        table = pd.DataFrame([{"region": r.name, "label": r.label, "group": r.group or "",
                               "hpo_ids": list(r.hpo_ids), "hpo_names": list(r.hpo_names),
                               "area_share": float(area[r.label])} for r in region_table()])
        write_parquet(table, run.path / "aligned" / "regions.parquet")
        st.n_items = 1
    return AtlasResult(fig_path, run.path / "aligned" / "regions.parquet")
