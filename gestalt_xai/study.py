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

Besides ``id:``, a pipeline item may say ``optional: true``. Such an instance runs only when every option whose text
uses a pipeline variable (:mod:`gestalt_xai.config`) names an existing file or folder; a variable left at ``""`` or
a path that does not exist skips it, recorded as ``skipped (input … missing)``, never as an error::

    variables: {eyetracking: ""}
    stages:
      - eyetrack: {optional: true, data: "{eyetracking}"}   # runs with --var eyetracking=/data/study

``optional: NAME`` gates the instance on the one variable ``NAME`` instead (given, and naming an existing file or
folder), for a stage whose other variable-fed options are not paths on their own (globs inside the data folder).

A rerun skips every instance whose options, code version and inputs are unchanged and whose outputs exist
(:mod:`gestalt_xai.fingerprints`); an instance whose outputs were deleted or changed reruns, and so does every
instance reading what it rewrote. ``start_from`` / ``only`` select instances, ``force`` reruns regardless, ``sets``
override options (``STAGE.KEY=VALUE``, the value read as YAML) before validation. The run's wall time, peak memory of
the whole process tree, ``getrusage`` peaks and folder size are recorded in the manifest's ``measurements``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from gestalt_xai.config import RUN_VARIABLE, PipelineConfig, StageConfig, load_pipeline, set_option
from gestalt_xai.errors import ConfigError
from gestalt_xai.fingerprints import SKIPPED_UNCHANGED, invalidate_changed
from gestalt_xai.models.declaration import declares_models
from gestalt_xai.provenance import ProcessTreeMemory, folder_size_mb, rusage_peaks_mb
from gestalt_xai.runs import Run, seed_everything
from gestalt_xai.stages import STAGES, Stage, get_stage, load_stages

log = logging.getLogger(__name__)

__all__ = ["STAGES", "StageInstance", "plan_study", "run_study", "select_instances", "study_status", "where_to_look"]

_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_#.-]*$")
#: keys of a pipeline item that steer the runner, not the stage
RUNNER_KEYS = ("id", "optional")
#: output labels and suffixes ``where_to_look`` lists
_LOOK_LABELS = {"summary", "index", "report", "reports", "figure", "figures"}
_LOOK_SUFFIXES = (".md", ".html", ".pdf")


@dataclass(frozen=True)
class StageInstance:
    """One step of a pipeline: a stage, its validated options and its instance id.

    ``optional`` steps run only when their ``inputs`` (option key → value of each option whose text used a
    variable) all name existing files or folders.
    """

    id: str
    stage: Stage
    options: StageConfig
    optional: bool = False
    inputs: Mapping[str, str] = field(default_factory=dict)

    def missing_inputs(self, run: Run) -> list[str]:
        """``key=value`` of each input of an optional step that is not given (``""``) or does not exist."""
        return [f"{key}={value!r}" for key, value in sorted(self.inputs.items())
                if not value.strip() or not Path(value.replace("{" + RUN_VARIABLE + "}", str(run.path)))
                .expanduser().exists()]


def _instance_ids(items: list[tuple[str, dict[str, Any]]], where: str) -> list[str]:
    ids: list[str] = []
    counts: dict[str, int] = {}
    for i, (name, opts) in enumerate(items):
        given_id = opts.get("id")
        counts[name] = counts.get(name, 0) + 1
        instance = str(given_id) if given_id is not None else name if counts[name] == 1 else f"{name}#{counts[name]}"
        if not _ID.match(instance):
            raise ConfigError(f"{where}: stages[{i}].{name}.id: {instance!r} is not a valid id (letters, digits, "
                              "'_', '-', '.', '#')")
        if instance in ids:
            raise ConfigError(f"{where}: stages[{i}].{name}: instance id {instance!r} is used twice; give the step "
                              "its own 'id:'")
        ids.append(instance)
    return ids


def _unknown_instance(flag: str, given: str, ids: Sequence[str]) -> ConfigError:
    return ConfigError(f"{flag} {given}: no such stage instance in the pipeline (instances: {', '.join(ids)})")


def _apply_sets(items: list[tuple[str, dict[str, Any]]], ids: list[str], sets: Sequence[str],
                inputs: list[dict[str, str]]) -> None:
    """Apply ``STAGE.KEY=VALUE`` overrides to the raw options of the pipeline items (in place)."""
    by_length = sorted(ids, key=len, reverse=True)
    for item in sets:
        target, sep, raw = item.partition("=")
        instance = next((i for i in by_length if target.startswith(i + ".")), None)
        if not sep or instance is None:
            if not sep or "." not in target:
                raise ConfigError(f"--set expects STAGE.KEY=VALUE (STAGE an instance id), got {item!r}")
            raise _unknown_instance("--set", target.split(".")[0], ids)
        key = target[len(instance) + 1:].strip()
        if not key or key.split(".")[0] in RUNNER_KEYS:
            raise ConfigError(f"--set {item!r}: give an option of {instance} (not {', '.join(RUNNER_KEYS)})")
        index = ids.index(instance)
        set_option(items[index][1], key, yaml.safe_load(raw) if raw.strip() else None, where=f"--set {item!r}")
        for used in [k for k in inputs[index] if k == key or k.startswith(key + ".") or k.startswith(key + "[")]:
            del inputs[index][used]  # the option no longer comes from a variable


def plan_study(pipeline: PipelineConfig, where: str = "pipeline", sets: Sequence[str] = ()) -> list[StageInstance]:
    """Validate every stage's options (before any work), with the ``STAGE.KEY=VALUE`` overrides ``sets`` applied,
    and give each step its instance id."""
    items = pipeline.stage_items()
    ids = _instance_ids(items, where)
    inputs = [pipeline.from_variables(i) for i in range(len(items))]
    _apply_sets(items, ids, sets, inputs)
    plan: list[StageInstance] = []
    for i, ((name, opts), instance) in enumerate(zip(items, ids, strict=True)):
        try:
            spec = get_stage(name)
        except ConfigError as exc:  # name the file and the item
            raise ConfigError(f"{where}: stages[{i}]: {exc}") from None
        opts.pop("id", None)
        optional = opts.pop("optional", False)
        if isinstance(optional, str):  # gated by one variable: given, and naming an existing path
            if optional not in pipeline.values:
                raise ConfigError(f"{where}: stages[{i}].{name}.optional: {optional!r} is not a declared variable "
                                  f"(declared: {', '.join(sorted(pipeline.values)) or 'none'})")
            inputs[i] = {f"variable {optional}": pipeline.values[optional]}
            optional = True
        if not isinstance(optional, bool):
            raise ConfigError(f"{where}: stages[{i}].{name}.optional: expected true, false or a variable name, got "
                              f"{optional!r}")
        if optional and not inputs[i]:
            raise ConfigError(f"{where}: stages[{i}].{name}.optional: an optional stage runs when the paths its "
                              "options take from variables exist, and no option uses a variable (e.g. data: "
                              '"{eyetracking}" with variables: {eyetracking: ""})')
        if "seed" in spec.options.model_fields and "seed" not in opts:
            opts = {**opts, "seed": pipeline.seed}
        if pipeline.models is not None and declares_models(spec.options) and "models" not in opts:
            opts = {**opts, "models": pipeline.models}
        options = spec.validate(opts, where=f"{where}: stages[{i}].{name}")
        plan.append(StageInstance(instance, spec, options, optional, inputs[i] if optional else {}))
    return plan


def select_instances(plan: Sequence[StageInstance], start_from: str | None = None,
                     only: Sequence[str] = ()) -> list[str]:
    """The ids of the steps to run: all, those from ``start_from`` on, or only those in ``only`` (both: the steps of
    ``only`` from ``start_from`` on). An unknown id is a :class:`ConfigError` listing the instances."""
    ids = [step.id for step in plan]
    for flag, given in [("--from", start_from)] * (start_from is not None) + [("--only", o) for o in only]:
        if given not in ids:
            raise _unknown_instance(flag, str(given), ids)
    chosen = ids[ids.index(start_from):] if start_from is not None else ids
    return [i for i in chosen if not only or i in only]


def run_study(pipeline_path: str | Path, run_dir: str | Path | None = None, *,
              variables: Mapping[str, str] | None = None, sets: Sequence[str] = (), start_from: str | None = None,
              only: Sequence[str] = (), force: bool | Sequence[str] = False) -> Run:
    """Run a pipeline file into ``run_dir`` (default ``runs/<name>``); stages resume where a killed run stopped, and
    unchanged stages are skipped.

    Parameters
    ----------
    pipeline_path, run_dir:
        The pipeline file and the run folder.
    variables:
        Values of the pipeline's ``variables`` (name → text), overriding their defaults.
    sets:
        ``STAGE.KEY=VALUE`` option overrides (STAGE an instance id, KEY dotted for nested options, VALUE as YAML).
    start_from, only:
        Run the instances from ``start_from`` on / only those in ``only`` (instance ids such as ``explain#2``).
    force:
        ``True``: rerun every selected instance even when unchanged; a sequence: those instances.

    Everything is validated before any work: a wrong option, id or variable is a :class:`ConfigError` naming it.

    Examples
    --------
    ``gestalt-xai study run pipelines/demo.yaml --run runs/demo --from aggregate``
    """
    t0 = time.perf_counter()
    pipeline = load_pipeline(pipeline_path, variables)
    plan = plan_study(pipeline, where=str(pipeline_path), sets=sets)
    chosen = select_instances(plan, start_from, only)
    forced = set(chosen) if force is True else set(force or ())
    if not forced <= {step.id for step in plan}:
        raise _unknown_instance("--force-stage", sorted(forced - {step.id for step in plan})[0],
                                [step.id for step in plan])
    run = Run(run_dir or Path("runs") / pipeline.name)
    run.set_study(pipeline.name, pipeline.seed, pipeline.model_dump(mode="json"), variables=pipeline.values,
                  sets=list(sets), instances=[step.id for step in plan], selected=chosen)
    seed_everything(pipeline.seed)
    stale = invalidate_changed(run, [step.id for step in plan])
    for instance, reason in stale.items():
        log.info("stage %s: %s; it reruns", instance, reason)
    outcome: dict[str, list[str]] = {"ran": [], "skipped_unchanged": [], "skipped_optional": []}
    with ProcessTreeMemory() as memory:
        for step in plan:
            if step.id not in chosen:
                continue
            if step.optional and (missing := step.missing_inputs(run)):
                status = f"skipped (input {', '.join(missing)} missing)"
                run.update_stage(step.id, stage=step.stage.name, status=status, fingerprint=None,
                                 config=step.options.model_dump(mode="json"))
                log.info("stage %s %s", step.id, status)
                outcome["skipped_optional"].append(step.id)
                continue
            memory.window()
            t_stage = time.perf_counter()
            log.info("stage %s …", step.id)
            result = step.stage(run, step.options, instance=step.id, skip_unchanged=step.id not in forced)
            if result.status == SKIPPED_UNCHANGED:
                outcome["skipped_unchanged"].append(step.id)
                continue
            timing = dict(run.manifest["stages"].get(step.id, {}).get("timing", {}))
            run.update_stage(step.id, timing={**timing, "peak_memory_tree_mb": memory.window()})
            outcome["ran"].append(step.id)
            log.info("stage %s done in %.1f s", step.id, time.perf_counter() - t_stage)
    rusage = rusage_peaks_mb()
    measured = {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - t0, 2),
        # a peak of the runner between two samples is still caught by its own getrusage peak
        "peak_memory_mb": max(memory.peak_mb, rusage["self"]), "peak_memory_children_mb": memory.peak_children_mb,
        "peak_memory_note": f"summed RSS of the process tree, sampled every {memory.interval} s, and at least "
                            "this process' getrusage peak",
        "ru_maxrss_mb": rusage, "run_folder_mb": folder_size_mb(run.path),
        **outcome, "stale": stale}
    run.record("measurements", measured)  # this invocation
    if outcome["ran"]:  # the last invocation that did work: a quick rerun never hides what the work cost
        run.record("measurements_ran", measured)
    return run


def _stage_entries(run: Run) -> list[tuple[str, dict[str, Any]]]:
    """The manifest's stage entries, those of the last study's pipeline first, in its order."""
    stages = run.manifest.get("stages", {})
    order = [i for i in (run.manifest.get("study") or {}).get("instances", []) if i in stages]
    return [(i, stages[i]) for i in order] + [(i, e) for i, e in stages.items() if i not in order]


def where_to_look(run: Run) -> list[tuple[str, Path]]:
    """The run's main outputs that exist, for a person: summaries, figures, report pages (``(label, path)``, in
    stage order)."""
    out: dict[Path, str] = {}
    for instance, entry in _stage_entries(run):
        for label, stored in (entry.get("outputs") or {}).items():
            path = run.resolve(stored)
            if (label in _LOOK_LABELS or path.suffix in _LOOK_SUFFIXES) and path.exists():
                out.setdefault(path, f"{instance} {label}")
        for stored in entry.get("declared_outputs") or []:
            figures = run.resolve(stored) / "figures"
            if figures.is_dir():
                out.setdefault(figures, f"{instance} figures")
    return [(label, path) for path, label in out.items()]


def study_status(run: Run) -> list[dict[str, Any]]:
    """One row per stage instance the run has recorded (in pipeline order), then one per registered stage that has
    not run: instance, stage, status, items, errors, seconds and the outputs that exist."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    stages = load_stages()
    for instance, entry in _stage_entries(run):
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
