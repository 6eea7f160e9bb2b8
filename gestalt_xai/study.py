"""The study runner: execute the stages a pipeline file declares, in order, into one run folder.

Every stage is registered here by name with its options class and entry function (imported lazily, so a study that
does not explain does not import captum). All stage options are validated before the first stage starts: a wrong
pipeline file fails at once, naming the field, and no work is done.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gestalt_xai.config import PipelineConfig, StageConfig, load_pipeline, validate_config
from gestalt_xai.errors import ConfigError
from gestalt_xai.runs import Run, seed_everything

log = logging.getLogger(__name__)

__all__ = ["STAGES", "StageSpec", "stage_spec", "run_study", "validate_study"]


@dataclass(frozen=True)
class StageSpec:
    """Where a stage lives: ``module``, its options class and its entry function ``fn(run, cfg)``."""

    module: str
    config: str
    function: str
    summary: str

    def load(self) -> tuple[type[StageConfig], Any]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.function)


#: every stage a pipeline file may name, in pipeline order
STAGES: dict[str, StageSpec] = {
    "synth": StageSpec("gestalt_xai.data.synthetic.cohort", "SynthConfig", "synth_stage",
                       "render the synthetic cohort (planted, HPO-coded phenotypes with ground truth)"),
    "example_photos": StageSpec("gestalt_xai.data.examples", "ExamplePhotosConfig", "example_photos_stage",
                                "copy the real example photos shipped inside installed packages"),
    "align": StageSpec("gestalt_xai.faces.stage", "AlignConfig", "align_stage",
                       "detect and align faces to the ArcFace 112×112 template"),
    "atlas": StageSpec("gestalt_xai.faces.atlas_stage", "AtlasConfig", "atlas_stage",
                       "draw the facial region atlas over an aligned face"),
    "train": StageSpec("gestalt_xai.models.train", "TrainConfig", "train_stage",
                       "train or fine-tune a GestaltMatcher-style model"),
    "embed": StageSpec("gestalt_xai.models.embed", "EmbedConfig", "embed_stage",
                       "embed aligned faces with one model or an ensemble (with test-time augmentation)"),
    "match": StageSpec("gestalt_xai.matching", "MatchConfig", "match_stage",
                       "rank syndromes in the Clinical Face Phenotype Space (GMDB protocols, top-k)"),
    "explain": StageSpec("gestalt_xai.attribution.explain", "ExplainConfig", "explain_stage",
                         "per-patient attribution maps into the map store"),
    "aggregate": StageSpec("gestalt_xai.aggregate.stage", "AggregateConfig", "aggregate_stage",
                           "syndrome-level composites, composite faces, similarity maps, region scores, SpRAy"),
}


def stage_spec(name: str) -> StageSpec:
    """The registered stage ``name`` (a :class:`ConfigError` lists the known ones)."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return STAGES[name]


def validate_study(pipeline: PipelineConfig, where: str = "pipeline") -> list[tuple[str, StageConfig, Any]]:
    """Validate every stage's options (before any work); returns ``(name, options, entry function)`` in order."""
    out = []
    for i, (name, opts) in enumerate(pipeline.stage_items()):
        spec = stage_spec(name)
        cls, fn = spec.load()
        if "seed" in cls.model_fields and "seed" not in opts:
            opts = {**opts, "seed": pipeline.seed}
        out.append((name, validate_config(cls, opts, where=f"{where}: stages[{i}].{name}"), fn))
    return out


def run_study(pipeline_path: str | Path, run_dir: str | Path | None = None) -> Run:
    """Run a pipeline file into ``run_dir`` (default ``runs/<name>``); stages resume where a killed run stopped.

    Examples
    --------
    ``gestalt-xai study run pipelines/demo.yaml --run runs/demo``
    """
    pipeline = load_pipeline(pipeline_path)
    stages = validate_study(pipeline, where=str(pipeline_path))
    run = Run(run_dir or Path("runs") / pipeline.name)
    run.set_study(pipeline.name, pipeline.seed, pipeline.model_dump(mode="json"))
    seed_everything(pipeline.seed)
    counts: dict[str, int] = {}
    for name, cfg, fn in stages:
        counts[name] = counts.get(name, 0) + 1
        # a stage listed twice (e.g. explain with two targets) gets its own manifest entry: explain, explain#2
        run.stage_suffix = "" if counts[name] == 1 else f"#{counts[name]}"
        t0 = time.perf_counter()
        log.info("stage %s%s …", name, run.stage_suffix)
        fn(run, cfg)
        log.info("stage %s done in %.1f s", name, time.perf_counter() - t0)
    run.stage_suffix = ""
    return run
