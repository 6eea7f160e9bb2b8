"""A tiny explain-ready run shared by the attribution test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch


def make_tiny_run(root: Path, model: bool = True):
    """3 syndromes × 2 subjects × 2 random images; one subject per syndrome in test; one r18/0.125 model with a
    classifier (classes A, B, C); crops, cohort and TTA embeddings. Builds in a few seconds. Without ``model``: the
    crops and the cohort only (no model, no embeddings)."""
    from gestalt_xai.data.cohort import Cohort, save_run_cohort
    from gestalt_xai.data.images import save_png
    from gestalt_xai.models.checkpoints import save_model
    from gestalt_xai.models.embed import EmbedConfig, embed_stage
    from gestalt_xai.models.gestaltmatcher import build_gestaltmatcher
    from gestalt_xai.runs import Run, write_parquet

    run = Run(root)
    rng = np.random.default_rng(0)
    rows, splits = [], []
    for syn in ("A", "B", "C"):
        for subj in (0, 1):
            for img in (0, 1):
                image_id = f"{syn}{subj}{img}"
                rows.append({"image_id": image_id, "subject_id": f"s{syn}{subj}", "syndrome_id": syn,
                             "path": str(root / "aligned" / f"{image_id}.png")})
                splits.append({"image_id": image_id, "set": "test" if subj == 0 else "train", "split": 0})
                save_png(run.path / "aligned" / f"{image_id}.png",
                         rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8))
    images = pd.DataFrame(rows)
    write_parquet(pd.DataFrame({"image_id": images["image_id"], "ok": True}),
                  run.path / "aligned" / "alignment.parquet")
    save_run_cohort(run, Cohort(images=images, syndromes=pd.DataFrame({"syndrome_id": ["A", "B", "C"]}),
                                splits=pd.DataFrame(splits), lookup=["A", "B", "C"]))
    if not model:
        return run
    torch.manual_seed(0)
    save_model(build_gestaltmatcher("r18", width=0.125, num_classes=3, syndrome_ids=["A", "B", "C"]).eval(),
               run.path / "models" / "clf.safetensors")
    embed_stage(run, EmbedConfig(threads=1, tta=True))
    return run


def explain_maps(run, cfg):  # noqa: ANN001, ANN201
    """Run the explain stage and return the run's map store (what most attribution tests look at)."""
    from gestalt_xai.attribution.explain import explain_stage
    from gestalt_xai.runs import Run

    explain_stage(run, cfg)
    return (run if isinstance(run, Run) else Run(run)).map_store()
