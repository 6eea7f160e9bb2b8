"""The ``atlas`` stage: draw the region atlas (and its HPO anchors) for a run, as a figure and a table."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field

from gestalt_xai.config import StageConfig
from gestalt_xai.data.images import load_image
from gestalt_xai.errors import InputError
from gestalt_xai.faces.regions import atlas_figure, region_table, template_atlas
from gestalt_xai.runs import LAYOUT, Run, write_parquet
from gestalt_xai.stages import StageResult, stage

__all__ = ["AtlasConfig", "atlas_stage"]


class AtlasConfig(StageConfig):
    """Options of the ``atlas`` stage."""

    image_id: str | None = Field(None, description="face to draw on (default: the first aligned image)")


@stage("atlas", options=AtlasConfig, order=30, summary="draw the facial region atlas over an aligned face",
       reads=(LAYOUT.alignments,), writes=(f"{LAYOUT.aligned}/atlas.png", f"{LAYOUT.aligned}/regions.parquet"),
       example="gestalt-xai atlas --run runs/demo")
def atlas_stage(run: Run, cfg: AtlasConfig) -> StageResult:
    """Write ``aligned/atlas.png`` (atlas over an aligned face) and ``aligned/regions.parquet`` (areas, HPO anchors)."""
    aligned = run.aligned_ids()
    if not aligned:
        raise InputError("no aligned image in this run to draw the atlas on")
    image_id = cfg.image_id or aligned[0]
    if image_id not in set(aligned):
        raise InputError(f"image {image_id!r} is not among the aligned images of {run.path}")
    face = load_image(run.crop_path(image_id))
    fig_path = run.path / LAYOUT.aligned / "atlas.png"
    atlas_figure(face, path=fig_path, title=f"Region atlas over {image_id}")
    labels = template_atlas()
    area = np.bincount(labels.ravel(), minlength=len(region_table())) / labels.size
    table = pd.DataFrame([{"region": r.name, "label": r.label, "group": r.group or "",
                           "hpo_ids": list(r.hpo_ids), "hpo_names": list(r.hpo_names),
                           "area_share": float(area[r.label])} for r in region_table()])
    table_path = run.path / LAYOUT.aligned / "regions.parquet"
    write_parquet(table, table_path)
    return StageResult(items=1, outputs={"atlas": fig_path, "regions": table_path})
