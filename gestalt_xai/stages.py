"""The stage contract: one declaration per stage, one registry that the CLI, the study runner and the tests read.

A stage module declares its stage once, with the :func:`stage` decorator on its entry function::

    @stage("atlas", options=AtlasConfig, summary="draw the facial region atlas over an aligned face",
           reads=("aligned",), writes=("aligned/atlas.png", "aligned/regions.parquet"),
           example="gestalt-xai atlas --run runs/demo")
    def atlas_stage(run: Run, cfg: AtlasConfig) -> StageResult:
        ...
        return StageResult(items=1, outputs={"atlas": run.path / "aligned" / "atlas.png"})

The decorated function keeps its name and is called as ``atlas_stage(run, cfg)`` (``run`` a :class:`Run` or a
folder, ``cfg`` the options model, a mapping or ``None`` for the defaults). The wrapper validates the options, opens
the manifest entry of the stage *instance* (its id: the stage name, or ``explain#2`` for the second ``explain`` of a
pipeline, or the pipeline item's ``id:``), so the instance keys its ledger, fingerprint, error rows and timings, and
counts the instance's error rows into the :class:`StageResult`. It records what the instance read and wrote
(:mod:`gestalt_xai.fingerprints`), so the study runner skips an instance whose inputs and options did not change.

:data:`STAGES` is the only list of stages. The package's own stage modules are found through the
``gestalt_xai.stages`` entry-point group (``pyproject.toml``), so a lab's package can add a stage the same way;
:func:`register_stage` adds one at run time. The CLI (one subcommand per stage, with ``--run``, ``--config`` and
``--set``), ``study check``, ``study status`` and the runner's summary are generated from it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

from gestalt_xai.config import StageConfig, validate_config
from gestalt_xai.errors import ConfigError
from gestalt_xai.fingerprints import SKIPPED_UNCHANGED, StageInputs, path_token, refresh_overlapping, reusable
from gestalt_xai.provenance import package_versions
from gestalt_xai.registry import Registry
from gestalt_xai.runs import Run

log = logging.getLogger(__name__)

__all__ = [
    "STAGES",
    "CliAction",
    "Stage",
    "StageResult",
    "get_stage",
    "load_stages",
    "register_stage",
    "stage",
    "unregister_stage",
]

#: the entry-point group stage entry functions are registered under
ENTRY_POINT_GROUP = "gestalt_xai.stages"


@dataclass
class StageResult:
    """What one stage instance did.

    Attributes
    ----------
    items: work items the stage considered (images, maps, models …).
    errors: error rows of this instance in ``errors.parquet`` (filled in by the stage wrapper).
    outputs: label → path of what it wrote (shown by the CLI and ``study status``).
    summary: lines for a person (printed by the CLI after the stage, kept in the manifest).
    extra: further JSON-serialisable facts recorded in the stage's manifest entry.
    status: ``done``, or ``skipped: unchanged`` when the study runner found nothing changed (filled in by the
        wrapper).
    """

    items: int = 0
    errors: int = 0
    outputs: dict[str, Path] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = "done"


@dataclass(frozen=True)
class CliAction:
    """A command-line flag of a stage that does more than set an option (e.g. synth's ``--preview``).

    ``run(cfg, value, run_dir)`` does the work and returns lines to print. With ``replaces_stage`` the stage itself
    does not run (the action is an alternative to it); otherwise the action runs after the stage.
    """

    flag: str
    help: str
    run: Callable[[Any, Path, Path], list[str]]
    metavar: str = "PATH"
    replaces_stage: bool = False


@dataclass(frozen=True)
class Stage:
    """One stage: its name, options model, entry function and what it reads and writes (paths inside the run)."""

    name: str
    options: type[StageConfig]
    function: Callable[[Run, Any], StageResult]
    summary: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    example: str = ""
    #: extra command-line names of options: field → flag, e.g. ``{"models": "--model"}``
    aliases: Mapping[str, str] = field(default_factory=dict)
    actions: tuple[CliAction, ...] = ()
    #: position in listings (pipeline order)
    order: int = 100
    #: options for a tiny run on a small synthetic cohort: the contract test runs every registered stage with them
    tiny_options: Mapping[str, Any] = field(default_factory=dict)
    #: options whose values name registry entries: field → function listing the names registered now (shown by the
    #: CLI's help, so a method or target kind registered later appears there with no edit)
    choices: Mapping[str, Callable[[], list[str]]] = field(default_factory=dict)

    def validate(self, cfg: Any = None, where: str | None = None) -> StageConfig:
        """The stage's options from ``None`` (defaults), a mapping, or an options object (validated again)."""
        if isinstance(cfg, self.options):
            return cfg
        if isinstance(cfg, StageConfig):
            raise ConfigError(f"stage {self.name!r} expects {self.options.__name__} options, got "
                              f"{type(cfg).__name__}")
        if cfg is not None and not isinstance(cfg, Mapping):
            raise ConfigError(f"stage {self.name!r}: options must be a mapping, got {type(cfg).__name__}")
        return validate_config(self.options, dict(cfg or {}), where=where or self.name)

    def inputs(self, run: Run, options: StageConfig) -> StageInputs:
        """What an instance of this stage with ``options`` reads in ``run`` (:mod:`gestalt_xai.fingerprints`)."""
        return StageInputs.of(self.name, self.reads, options.model_dump(mode="json"), run.path)

    def __call__(self, run: Run | str | Path, cfg: Any = None, *, instance: str | None = None,
                 skip_unchanged: bool = False) -> StageResult:
        """Run the stage as instance ``instance`` (default: the stage name) and record it in the run's manifest.

        The manifest entry records the instance's input fingerprint, declared outputs and their token
        (:mod:`gestalt_xai.fingerprints`). With ``skip_unchanged`` (the study runner) an instance whose fingerprint
        equals the recorded one and whose outputs all exist is not run: its entry's status becomes
        ``skipped: unchanged`` and its recorded result is returned.
        """
        run = run if isinstance(run, Run) else Run(run)
        options = self.validate(cfg)
        instance = instance or self.name
        inputs = self.inputs(run, options)
        version = package_versions()["gestalt-xai"]
        entry = run.manifest.get("stages", {}).get(instance)
        if skip_unchanged and entry and entry.get("stage") == self.name and \
                reusable(entry, inputs.fingerprint(run.path, version), run.path):
            run.update_stage(instance, status=SKIPPED_UNCHANGED,
                             checked=datetime.now(UTC).isoformat(timespec="seconds"))
            log.info("%s: skipped, unchanged since %s", instance, entry.get("timing", {}).get("finished", "?"))
            return StageResult(items=entry.get("n_items") or 0, errors=run.error_count(instance),
                               outputs={k: run.resolve(v) for k, v in (entry.get("outputs") or {}).items()},
                               summary=list(entry.get("summary") or []), status=SKIPPED_UNCHANGED)
        with run.stage(instance, options, kind=self.name) as record:
            result = self.function(run, options)
            if not isinstance(result, StageResult):
                raise TypeError(f"stage {self.name!r} returned {type(result).__name__}, not a StageResult")
            result.errors = run.error_count(instance)
            record.n_items, record.n_errors = result.items, result.errors
            record.extra.update(result.extra)
            record.extra["outputs"] = {k: run.relative(v) for k, v in sorted(result.outputs.items())}
            if result.summary:
                record.extra["summary"] = list(result.summary)
            declared = sorted(set(self.writes) | {p for p in record.extra["outputs"].values()
                                                  if not Path(p).is_absolute()})
            record.extra.update(fingerprint=inputs.fingerprint(run.path, version), declared_outputs=declared,
                                outputs_token=path_token(run.path, declared), version=version)
        refresh_overlapping(run, instance, declared)
        for line in result.summary:
            log.info("%s: %s", instance, line)
        return result


def _load_entry_points() -> None:
    """Import the stage modules named in the ``gestalt_xai.stages`` entry-point group (registering their stages)."""
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            ep.load()
        except ImportError as exc:  # a broken plugin must not take the whole CLI down
            log.warning("stage %s (%s) could not be imported: %s", ep.name, ep.value, exc)


#: every registered stage by name; the entry points are imported the first time the stages are listed
STAGES: Registry[Stage] = Registry("stage", _load_entry_points)

F = TypeVar("F", bound=Callable[..., StageResult])


def _same_function(old: Stage, new: Stage) -> bool:
    # a module imported again (importlib.reload, doctest collection) registers the same stage anew
    return (old.function.__module__, old.function.__qualname__) == (new.function.__module__, new.function.__qualname__)


def register_stage(spec: Stage) -> Stage:
    """Add ``spec`` to :data:`STAGES`; a different stage under a registered name is a :class:`ConfigError`."""
    if not spec.name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"stage name {spec.name!r}: use letters, digits, '_' and '-'")
    STAGES.add(spec.name, spec, same=_same_function)
    return spec


def unregister_stage(name: str) -> None:
    """Remove a stage registered at run time (tests, plugins)."""
    STAGES.remove(name)


def stage(name: str, *, options: type[StageConfig], summary: str, reads: tuple[str, ...] = (),
          writes: tuple[str, ...] = (), example: str = "", aliases: Mapping[str, str] | None = None,
          actions: tuple[CliAction, ...] = (), order: int = 100,
          tiny_options: Mapping[str, Any] | None = None,
          choices: Mapping[str, Callable[[], list[str]]] | None = None) -> Callable[[F], F]:
    """Declare and register the stage whose entry function this decorates (see the module docstring).

    >>> from gestalt_xai.config import StageConfig
    >>> class HelloConfig(StageConfig):
    ...     greeting: str = "hello"
    >>> @stage("hello_doc", options=HelloConfig, summary="say hello")
    ... def hello_stage(run, cfg):
    ...     return StageResult(items=1, summary=[cfg.greeting])
    >>> import tempfile
    >>> hello_stage(tempfile.mkdtemp(), {"greeting": "hi"}).summary
    ['hi']
    >>> unregister_stage("hello_doc")
    """

    def decorate(function: F) -> F:
        spec = register_stage(Stage(name=name, options=options, function=function, summary=summary, reads=reads,
                                    writes=writes, example=example, aliases=dict(aliases or {}), actions=actions,
                                    order=order, tiny_options=dict(tiny_options or {}),
                                    choices=dict(choices or {})))

        @functools.wraps(function)
        def entry(run: Run | str | Path, cfg: Any = None, *, instance: str | None = None) -> StageResult:
            return spec(run, cfg, instance=instance)

        entry.stage = spec  # type: ignore[attr-defined]
        return entry  # type: ignore[return-value]

    return decorate


def load_stages() -> dict[str, Stage]:
    """Every stage, in pipeline order: the package's own (entry points, imported once) and those registered since."""
    return dict(sorted(STAGES.items(), key=lambda kv: (kv[1].order, kv[0])))


def get_stage(name: str) -> Stage:
    """The registered stage ``name`` (a :class:`ConfigError` lists the known ones)."""
    return STAGES.get(name)
