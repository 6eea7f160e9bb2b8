"""The study runner: execute the stages a pipeline file declares, in order, into one run folder.

Stages come from the registry (:mod:`gestalt_xai.stages`). All stage options are validated before the first stage
starts: a wrong pipeline file fails at once, naming the field, and no work is done. A stage listed twice runs as two
*instances* with their own ids: the pipeline item's ``id:`` if it has one, otherwise ``explain``, ``explain#2``, … by
position. The id keys the instance's ledger, fingerprint, error rows and manifest entry, so two instances never reset
or overwrite each other::

    stages:
      - explain: {methods: [gradcam]}                 # instance "explain"
      - explain: {id: occlusion, methods: [occlusion]} # instance "occlusion"

The pipeline's ``seed`` is handed to every stage whose options have a ``seed`` and leave it unset, and its ``models``
(:mod:`gestalt_xai.models.declaration`) to every stage whose options declare models and leave them unset (stages
that select maps or embeddings by model id keep their own ``models``).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gestalt_xai.config import PipelineConfig, StageConfig, load_pipeline
from gestalt_xai.errors import ConfigError
from gestalt_xai.models.declaration import declares_models
from gestalt_xai.runs import Run, seed_everything
from gestalt_xai.stages import STAGES, Stage, get_stage, load_stages

log = logging.getLogger(__name__)

__all__ = ["STAGES", "StageInstance", "plan_study", "run_study", "study_status"]

_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_#.-]*$")


@dataclass(frozen=True)
class StageInstance:
    """One step of a pipeline: a stage, its validated options and its instance id."""

    id: str
    stage: Stage
    options: StageConfig


def plan_study(pipeline: PipelineConfig, where: str = "pipeline") -> list[StageInstance]:
    """Validate every stage's options (before any work) and give each step its instance id."""
    plan: list[StageInstance] = []
    counts: dict[str, int] = {}
    for i, (name, opts) in enumerate(pipeline.stage_items()):
        try:
            spec = get_stage(name)
        except ConfigError as exc:  # name the file and the item
            raise ConfigError(f"{where}: stages[{i}]: {exc}") from None
        given_id = opts.pop("id", None)
        if "seed" in spec.options.model_fields and "seed" not in opts:
            opts = {**opts, "seed": pipeline.seed}
        if pipeline.models is not None and declares_models(spec.options) and "models" not in opts:
            opts = {**opts, "models": pipeline.models}
        options = spec.validate(opts, where=f"{where}: stages[{i}].{name}")
        counts[name] = counts.get(name, 0) + 1
        instance = str(given_id) if given_id is not None else name if counts[name] == 1 else f"{name}#{counts[name]}"
        if not _ID.match(instance):
            raise ConfigError(f"{where}: stages[{i}].{name}.id: {instance!r} is not a valid id (letters, digits, "
                              "'_', '-', '.', '#')")
        if any(step.id == instance for step in plan):
            raise ConfigError(f"{where}: stages[{i}].{name}: instance id {instance!r} is used twice; give the step "
                              "its own 'id:'")
        plan.append(StageInstance(instance, spec, options))
    return plan


def run_study(pipeline_path: str | Path, run_dir: str | Path | None = None) -> Run:
    """Run a pipeline file into ``run_dir`` (default ``runs/<name>``); stages resume where a killed run stopped.

    Examples
    --------
    ``gestalt-xai study run pipelines/demo.yaml --run runs/demo``
    """
    pipeline = load_pipeline(pipeline_path)
    plan = plan_study(pipeline, where=str(pipeline_path))
    run = Run(run_dir or Path("runs") / pipeline.name)
    run.set_study(pipeline.name, pipeline.seed, pipeline.model_dump(mode="json"))
    seed_everything(pipeline.seed)
    for step in plan:
        t0 = time.perf_counter()
        log.info("stage %s …", step.id)
        step.stage(run, step.options, instance=step.id)
        log.info("stage %s done in %.1f s", step.id, time.perf_counter() - t0)
    return run


def study_status(run: Run) -> list[dict[str, Any]]:
    """One row per stage instance the run has recorded (manifest order), then one per registered stage that has
    not run: instance, stage, status, items, errors, seconds and the outputs that exist."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    stages = load_stages()
    for instance, entry in run.manifest.get("stages", {}).items():
        name = entry.get("stage") or instance.split("#")[0]
        seen.add(name)
        spec = stages.get(name)
        outputs = entry.get("outputs") or {}
        paths = list(outputs.values()) if outputs else list(spec.writes if spec else ())
        rows.append({"instance": instance, "stage": name, "status": entry.get("status", "?"),
                     "items": entry.get("n_items"), "errors": run.error_count(instance),
                     "seconds": entry.get("timing", {}).get("seconds"),
                     "outputs": [p for p in paths if run.resolve(p).exists()]})
    for name, spec in stages.items():
        if name not in seen:
            rows.append({"instance": name, "stage": name, "status": "not run", "items": None, "errors": None,
                         "seconds": None, "outputs": [p for p in spec.writes if run.resolve(p).exists()]})
    return rows
