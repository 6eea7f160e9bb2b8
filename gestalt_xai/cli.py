"""Command line, generated from the stage registry: one subcommand per stage, plus ``study run|check|status``.

Every stage command takes ``--run RUN_DIR`` (the study folder it reads from and writes to), ``--config FILE`` (a YAML
file of the stage's options), ``--set KEY=VALUE`` for any option, and one flag per simple option of the stage's
options model (its field name in kebab case, plus the aliases and actions the stage declares); flags override
``--set``, which overrides the file. Options are validated before any work; a stage's failed items are printed after
it. Adding a stage (:func:`gestalt_xai.stages.stage`) adds its command here with no edit.
"""

from __future__ import annotations

import enum
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.table import Table

from gestalt_xai.config import load_yaml, set_option
from gestalt_xai.errors import ConfigError, GestaltXAIError
from gestalt_xai.progress import set_quiet
from gestalt_xai.runs import Run
from gestalt_xai.stages import Stage, load_stages

__all__ = ["build_app", "main"]

console = Console()
err_console = Console(stderr=True)

#: parameter names every stage command has (an options field of the same name is reachable through --set only)
_RESERVED = {"run", "config", "sets", "set", "help"}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (test runners swap it per command)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _main(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; warnings and errors only.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    set_quiet(quiet)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _options(config: Path | None, sets: list[str] | None = None, **given: Any) -> dict[str, Any]:
    """Options from ``--config``, then ``--set KEY=VALUE`` pairs, then the named command-line options (None = not
    given), each overriding the one before."""
    import yaml

    opts = load_yaml(config) if config else {}
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        set_option(opts, key, yaml.safe_load(raw) if raw.strip() else None, where=f"--set {item!r}")
    opts.update({k: (str(v) if isinstance(v, Path) else [str(x) if isinstance(x, Path) else x for x in v]
                     if isinstance(v, list) else v) for k, v in given.items() if v is not None})
    return opts


def _print_errors(run: Run, instance: str) -> None:
    errors = run.errors()
    errors = errors[errors["stage"] == instance]
    if errors.empty:
        return
    table = Table(title=f"{len(errors)} item(s) failed in {instance} (all in {run.path / run.ERRORS})")
    for col in ("item_id", "key", "error_kind", "message"):
        table.add_column(col, overflow="fold")
    for row in errors.head(20).itertuples():
        table.add_row(row.item_id, row.key, row.error_kind, row.message)
    err_console.print(table)


# ------------------------------------------------------------------------------------------ options → CLI flags
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _literal_values(tp: Any) -> list[str] | None:
    if typing.get_origin(tp) is Literal and all(isinstance(v, str) for v in typing.get_args(tp)):
        return list(typing.get_args(tp))
    return None


def _text_item(tp: Any) -> bool:
    """List items a flag can give as text: strings, paths, and option models that validate from a string (e.g.
    :class:`~gestalt_xai.models.declaration.ModelSpec`: a checkpoint path)."""
    return tp in (str, Path) or (isinstance(tp, type) and issubclass(tp, BaseModel))


def _cli_shape(tp: Any) -> tuple[str, Any] | None:
    """How an option's annotation maps onto a flag: ``("scalar", type)``, ``("choice", values)``, ``("bool", None)``,
    ``("list", literal values or None)``; ``None`` for options only ``--set``/``--config`` can give."""
    args = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a
            for a in (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,))
            if a is not type(None)]
    if str in args:
        return ("scalar", str)
    lists = [a for a in args if typing.get_origin(a) is list and _text_item(typing.get_args(a)[0])]
    literals = [v for a in args if (vals := _literal_values(a)) for v in vals]
    if lists and len(lists) + sum(_literal_values(a) is not None for a in args) == len(args):
        return ("list", literals or None)
    if len(args) != 1:
        return None
    (a,) = args
    if a is bool:
        return ("bool", None)
    if a in (int, float, Path):
        return ("scalar", a)
    if (vals := _literal_values(a)) is not None:
        return ("choice", vals)
    return None


def _option_parameters(spec: Stage) -> tuple[list[inspect.Parameter], dict[str, tuple[str, Any]]]:
    params, shapes = [], {}
    for name, field in spec.options.model_fields.items():
        shape = _cli_shape(field.annotation)
        if shape is None or name in _RESERVED:
            continue
        shapes[name] = shape
        names = [_flag(name)] + ([spec.aliases[name]] if name in spec.aliases else [])
        help_text = _field_help(field)
        if name in spec.choices:
            help_text += f"; registered: {', '.join(spec.choices[name]())}"
        kind, info = shape
        if kind == "bool":
            option = typer.Option("/".join([_flag(name), "--no-" + name.replace("_", "-")]), help=help_text)
            annotation: Any = bool | None
        elif kind == "choice":  # a str Enum gives click's choice list and its check
            option = typer.Option(*names, help=help_text)
            annotation = enum.Enum(f"{spec.name}_{name}", {v: v for v in info}, type=str) | None
        elif kind == "list":
            extra = f" One of {', '.join(info)}, or a" if info else " A"
            option = typer.Option(*names, help=f"{help_text}.{extra} comma-separated list (or repeat the flag).")
            annotation = list[str] | None
        else:
            option = typer.Option(*names, help=help_text)
            annotation = info | None
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[annotation, option]))
    return params, shapes


def _field_help(field: FieldInfo) -> str:
    text = (field.description or "").rstrip(".")
    if field.default is not None and not callable(field.default) and field.default != "":
        text += f" (default: {field.default})"
    return text or "see the options model"


def _cli_value(shape: tuple[str, Any], value: Any) -> Any:
    kind, info = shape
    if kind == "choice":
        return value.value
    if kind != "list":
        return value
    items = [part.strip() for v in value for part in str(v).split(",") if part.strip()]
    if info and len(items) == 1 and items[0] in info:
        return items[0]
    return items


def _stage_command(spec: Stage) -> Callable[..., None]:
    option_params, shapes = _option_parameters(spec)
    action_params = {a.flag: inspect.Parameter(
        "action_" + a.flag.lstrip("-").replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Path | None, typer.Option(a.flag, help=a.help, metavar=a.metavar, dir_okay=False)])
        for a in spec.actions}

    def command(**kwargs: Any) -> None:
        run_dir: Path | None = kwargs.pop("run")
        config: Path | None = kwargs.pop("config")
        sets: list[str] | None = kwargs.pop("sets")
        actions = {a: kwargs.pop(p.name) for a, p in action_params.items()}
        given = {k: _cli_value(shapes[k], v) for k, v in kwargs.items() if v is not None}
        cfg = spec.validate(_options(config, sets, **given))
        chosen = [a for a in spec.actions if actions[a.flag] is not None]
        if any(a.replaces_stage for a in chosen):
            for a in chosen:
                for line in a.run(cfg, actions[a.flag], run_dir or Path(".")):
                    console.print(line)
            return
        if run_dir is None:
            raise ConfigError(f"{spec.name}: --run RUN_DIR is required (the study folder to read and write)")
        run = Run(run_dir)
        result = spec(run, cfg)
        _print_errors(run, spec.name)
        for line in result.summary:
            console.print(line)
        for label, path in sorted(result.outputs.items()):
            console.print(f"{label + ':':<12} {path}")
        for a in chosen:
            for line in a.run(cfg, actions[a.flag], run.path):
                console.print(line)

    common = [
        inspect.Parameter("run", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Path | None, typer.Option("--run", help="Run (study) folder to read from and write to.",
                                      file_okay=False)]),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Path | None, typer.Option("--config", help="YAML file of this stage's options (flags override it).",
                                      dir_okay=False)]),
        inspect.Parameter("sets", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            list[str] | None, typer.Option("--set", help="Any option as KEY=VALUE (YAML value; dotted keys for nested "
                                                         "options), repeatable.")]),
    ]
    params = common + option_params + list(action_params.values())
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    reads = ", ".join(spec.reads) or "nothing"
    writes = ", ".join(spec.writes) or "nothing"
    command.__doc__ = (f"{spec.summary[:1].upper()}{spec.summary[1:]}.\n\nReads {reads}; writes {writes}. Options not "
                       f"shown as flags: --set KEY=VALUE or --config FILE.\n\nExample: `{spec.example}`")
    command.__name__ = spec.name
    return command


# ------------------------------------------------------------------------------------------------------- study
_VAR_HELP = "A pipeline variable as NAME=VALUE (the file's variables: section), repeatable."
_SET_HELP = ("A stage option as STAGE.KEY=VALUE (STAGE an instance id such as explain#2; KEY dotted for nested "
             "options; VALUE read as YAML), repeatable; applied before validation.")


def _variables(given: list[str] | None) -> dict[str, str]:
    out = {}
    for item in given or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--var expects NAME=VALUE, got {item!r}")
        out[name.strip()] = value
    return out


def study_run(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline file (YAML).", exists=True, dir_okay=False)],
    run: Annotated[Path | None, typer.Option("--run", help="Run folder (default: runs/<pipeline name>).")] = None,
    start_from: Annotated[str | None, typer.Option("--from", help="Run from this stage instance on (an id such as "
                                                                  "explain#2 or an item's id:).")] = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only this stage instance, repeatable.")] = None,
    variables: Annotated[list[str] | None, typer.Option("--var", help=_VAR_HELP)] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun every selected stage, even when nothing it depends "
                                                        "on changed.")] = False,
    force_stages: Annotated[list[str] | None, typer.Option("--force-stage", help="Rerun this stage instance even "
                                                                                 "when unchanged, repeatable.")] = None,
) -> None:
    """Run the stages a pipeline file declares, in order, into one run folder.

    Options are validated before any work. Stages whose options, inputs and code version did not change since they
    last ran (and whose outputs exist) are skipped; deleting a stage's outputs reruns it and the stages reading them.
    Prints the run's status, wall time, peak memory (all processes), folder size and where to look.

    Example: `gestalt-xai study run pipelines/demo.yaml --run runs/demo`
    """
    from gestalt_xai.study import run_study

    result = run_study(pipeline, run, variables=_variables(variables), sets=sets or (), start_from=start_from,
                       only=only or (), force=True if force else list(force_stages or ()))
    _print_status(result)
    _print_measurements(result)


def _print_measurements(run: Run) -> None:
    from gestalt_xai.study import where_to_look

    m = run.manifest.get("measurements") or {}
    if m:
        rss = m.get("ru_maxrss_mb", {})
        console.print(f"wall time {m['wall_seconds']:.1f} s; peak memory {m['peak_memory_mb']:.0f} MiB (all "
                      f"processes; getrusage peak: this process {rss.get('self', 0):.0f} MiB, largest finished child "
                      f"{rss.get('children', 0):.0f} MiB); run folder {m['run_folder_mb']:.0f} MiB", soft_wrap=True)
        console.print(f"ran {len(m['ran'])} stage(s), skipped {len(m['skipped_unchanged'])} unchanged and "
                      f"{len(m['skipped_optional'])} optional")
    look = where_to_look(run)
    if look:
        console.print("where to look:")
        for label, path in look:
            console.print(f"  {label + ':':<28} {path}", soft_wrap=True)


def study_check(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline file (YAML).", exists=True, dir_okay=False)],
    variables: Annotated[list[str] | None, typer.Option("--var", help=_VAR_HELP)] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
) -> None:
    """Validate a pipeline file (every option of every stage) without running anything.

    Example: `gestalt-xai study check pipelines/demo.yaml`
    """
    from gestalt_xai.config import load_pipeline
    from gestalt_xai.study import plan_study

    plan = plan_study(load_pipeline(pipeline, _variables(variables)), where=str(pipeline), sets=sets or ())
    console.print(f"{pipeline}: valid; stages: {', '.join(step.id + ' (optional)' * step.optional for step in plan)}")


def study_status(
    run: Annotated[Path, typer.Option("--run", help="Run folder.", exists=True, file_okay=False)],
) -> None:
    """Show which stages of a run have run, with their counts, timings and outputs, and which have not; then the
    last study run's measurements and where to look.

    Example: `gestalt-xai study status --run runs/demo`
    """
    _print_status(Run(run))
    _print_measurements(Run(run))


def _print_status(run: Run) -> None:
    from gestalt_xai.study import study_status as status_rows

    rows = status_rows(run)
    table = Table(title=f"Run {run.path}")
    for col in ("stage", "status", "items", "errors", "seconds", "outputs"):
        table.add_column(col, overflow="fold")
    for r in rows:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        table.add_row(r["instance"], r["status"], str(r["items"] if r["items"] is not None else ""),
                      str(r["errors"] if r["errors"] is not None else ""), seconds, ", ".join(r["outputs"]))
    console.print(table)
    console.print(f"manifest: {run.path / run.MANIFEST}\nerrors:   {run.path / run.ERRORS}")


# ---------------------------------------------------------------------------------------------------------- app
def build_app() -> typer.Typer:
    """The ``gestalt-xai`` application: the study commands and one command per registered stage."""
    app = typer.Typer(name="gestalt-xai", no_args_is_help=True, add_completion=False, rich_markup_mode="markdown",
                      help="Explain facial syndrome classifiers (GestaltMatcher-style): "
                           "align → embed/match → explain → aggregate.")
    app.callback()(_main)
    study_app = typer.Typer(help="Run, check and inspect study definitions (pipelines/*.yaml).", no_args_is_help=True)
    study_app.command("run")(study_run)
    study_app.command("check")(study_check)
    study_app.command("status")(study_status)
    app.add_typer(study_app, name="study")
    for spec in load_stages().values():
        app.command(name=spec.name)(_stage_command(spec))
    return app


def main() -> None:
    """Console entry point: known errors print one clear message (exit 2 for configuration, 1 otherwise)."""
    try:
        build_app()()
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error:[/] {exc}")
        sys.exit(2)
    except GestaltXAIError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
