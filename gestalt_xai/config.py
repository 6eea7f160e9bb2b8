"""Configuration models: stage options and pipeline (study) files.

Every stage's options are a :class:`StageConfig` subclass, so unknown keys and wrong types fail *before* any work
starts, with the offending field named (:func:`validate_config`). A pipeline YAML file lists stages in order::

    name: demo
    seed: 0
    stages:
      - synth: {n_syndromes: 8}
      - align: {cohort: cohort}

A top-level ``models:`` declares the checkpoints once for every stage that runs a model (embed, explain, …), as
``seed`` does for every stage with a seed (:mod:`gestalt_xai.models.declaration`).

A top-level ``variables:`` maps names to defaults (``null``: the user must give a value); ``{name}`` in any string of
``models:`` or of a stage's options is replaced by the value given on the command line (``--var name=VALUE``) or the
default, before anything is validated. Values are text; ``""`` is the convention for "not given" (an ``optional``
stage fed by it is skipped, :mod:`gestalt_xai.study`). ``{run}`` is reserved: the stages replace it by the run
folder themselves::

    variables:
      gmdb: null            # required: --var gmdb=/data/gmdb
      eyetracking: ""       # optional input
    stages:
      - align: {cohort: "{gmdb}"}
      - eyetrack: {optional: true, data: "{eyetracking}"}
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from gestalt_xai.errors import ConfigError
from gestalt_xai.models.declaration import ModelDeclarations

__all__ = ["StageConfig", "PipelineConfig", "validate_config", "load_pipeline", "load_yaml", "set_option",
           "substitute_variables"]

#: the variable every stage expands itself (the run folder); a pipeline cannot declare it
RUN_VARIABLE = "run"
_REFERENCE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class StageConfig(BaseModel):
    """Base of every stage's options: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


C = TypeVar("C", bound=BaseModel)


def _format_validation_error(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {where}{'.' if where else ''}{loc}: {err['msg']}{shown}")
    return "\n".join(lines)


def validate_config(cls: type[C], data: dict[str, Any] | None, where: str = "") -> C:
    """Build ``cls`` from ``data``, turning pydantic's error into a :class:`ConfigError` naming every bad field.

    >>> class Opts(StageConfig):
    ...     size: int = 1
    >>> validate_config(Opts, {"size": 3}).size
    3
    >>> validate_config(Opts, {"sise": 3}, "stages[0].demo")
    Traceback (most recent call last):
    ...
    gestalt_xai.errors.ConfigError: invalid options for stages[0].demo:
      stages[0].demo.sise: Extra inputs are not permitted (got 3)
    """
    try:
        return cls.model_validate(data or {})
    except ValidationError as exc:
        message = f"invalid options for {where or cls.__name__}:\n" + _format_validation_error(exc, where)
        raise ConfigError(message) from None


class PipelineConfig(BaseModel):
    """A study definition: a name, a seed and models given to every stage that has none, variables, and stages in
    order."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="study name, used as the default run folder name")
    seed: int = Field(0, description="seed handed to every stage whose options have a seed field left unset")
    models: ModelDeclarations | None = Field(
        None, description="models handed to every stage whose options declare models and leave them unset "
                          "(gestalt_xai.models.declaration): checkpoint paths or {path, id, format, lookup_table, "
                          'channel_order, trust_pickle}, or "run"')
    description: str = ""
    variables: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="name → default value (null: required); {name} in models and stage "
                                          "options is replaced by --var name=VALUE or the default")
    stages: list[dict[str, dict[str, Any] | None]] = Field(min_length=1)
    #: the values the variables took (given or default) when the file was loaded
    _values: dict[str, str] = PrivateAttr(default_factory=dict)
    #: per stage item: dotted option key → value, for every option whose text used a variable
    _from_variables: list[dict[str, str]] = PrivateAttr(default_factory=list)

    @field_validator("variables")
    @classmethod
    def _variable_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"variable name {name!r}: use letters, digits and '_' (not starting with a digit)")
            if name == RUN_VARIABLE:
                raise ValueError("'run' is reserved (the run folder, expanded by the stages): choose another name")
        return value

    @field_validator("stages")
    @classmethod
    def _one_stage_per_item(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, item in enumerate(value):
            if len(item) != 1:
                raise ValueError(f"stages[{i}] must be a mapping with exactly one stage name, got {sorted(item)}")
        return value

    def stage_items(self) -> list[tuple[str, dict[str, Any]]]:
        """Return ``(stage name, options)`` pairs in order."""
        return [(name, copy.deepcopy(dict(opts or {}))) for item in self.stages for name, opts in item.items()]

    @property
    def values(self) -> dict[str, str]:
        """The value each variable took (given on the command line, or its default)."""
        return dict(self._values)

    def from_variables(self, index: int) -> dict[str, str]:
        """Dotted option key → value of every option of stage item ``index`` whose text used a variable."""
        return dict(self._from_variables[index]) if index < len(self._from_variables) else {}


def substitute_variables(value: Any, values: Mapping[str, str], where: str,
                         used: dict[str, str] | None = None, key: str = "") -> Any:
    """``value`` with every ``{name}`` in its strings (nested in mappings and lists) replaced by ``values[name]``.

    ``{run}`` is kept (the stages expand it). ``used`` collects dotted key → new text of every string that used a
    variable. A name that is not a variable is a :class:`ConfigError` naming ``where`` and the key.

    >>> substitute_variables({"data": "{root}/et", "n": 3}, {"root": "/d"}, "stages[0].eyetrack")
    {'data': '/d/et', 'n': 3}
    >>> substitute_variables({"data": "{rooot}"}, {"root": "/d"}, "stages[0].eyetrack")
    Traceback (most recent call last):
    ...
    gestalt_xai.errors.ConfigError: stages[0].eyetrack.data: {rooot} is not a declared variable (declared: root)
    """
    if isinstance(value, Mapping):
        return {k: substitute_variables(v, values, where, used, f"{key}.{k}" if key else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_variables(v, values, where, used, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == RUN_VARIABLE:
            return match.group(0)
        if name not in values:
            field = f"{where}.{key}" if key else where
            raise ConfigError(f"{field}: {{{name}}} is not a declared variable (declared: "
                              f"{', '.join(sorted(values)) or 'none; add a variables: mapping'})")
        return values[name]

    text = _REFERENCE.sub(replace, value)
    if used is not None and any(m.group(1) != RUN_VARIABLE for m in _REFERENCE.finditer(value)):
        used[key] = text
    return text


def set_option(options: dict[str, Any], key: str, value: Any, where: str = "--set") -> None:
    """Set the (dotted, for nested options) ``key`` of ``options`` to ``value`` in place.

    >>> opts = {"augment": {"flip": True}}
    >>> set_option(opts, "augment.flip", False); set_option(opts, "epochs", 5); opts
    {'augment': {'flip': False}, 'epochs': 5}
    """
    *parents, leaf = key.strip().split(".")
    node = options
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part!r} is not a group of options")
    node[leaf] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` naming the file when it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the file as UTF-8 text: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to be a pipeline or options file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_pipeline(path: str | Path, variables: Mapping[str, str] | None = None) -> PipelineConfig:
    """Read and validate a pipeline file, its variables replaced by ``variables`` (name → text) or their defaults
    (stage options are validated by :mod:`gestalt_xai.study`).

    Raises
    ------
    ConfigError : the file is invalid; a variable given is not declared, a required one is not given, or a string
        uses ``{name}`` with no such variable (each naming the field).
    """
    data = load_yaml(path)
    declared = data.get("variables") or {}
    if not isinstance(declared, dict):
        raise ConfigError(f"{path}: variables: expected a mapping of name → default, got {type(declared).__name__}")
    given = dict(variables or {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ConfigError(f"--var {unknown[0]}: {path} declares no variable {unknown[0]!r} (declared: "
                          f"{', '.join(sorted(declared)) or 'none'})")
    values: dict[str, str] = {}
    for name, default in declared.items():
        if name in given:
            values[str(name)] = str(given[name])
        elif default is None:
            raise ConfigError(f"{path}: variables.{name}: required (no default): give --var {name}=VALUE")
        else:
            values[str(name)] = str(default).lower() if isinstance(default, bool) else str(default)
    where = str(path)
    used: list[dict[str, str]] = []
    if data.get("models") is not None:
        data["models"] = substitute_variables(data["models"], values, f"{where}: models")
    stages = data.get("stages")
    if isinstance(stages, list):
        substituted = []
        for i, item in enumerate(stages):
            found: dict[str, str] = {}
            if isinstance(item, dict) and len(item) == 1:
                (name, opts), = item.items()
                item = {name: substitute_variables(opts, values, f"{where}: stages[{i}].{name}", found)}
            substituted.append(item)
            used.append(found)
        data["stages"] = substituted
    pipeline = validate_config(PipelineConfig, data, where=where)
    pipeline._values, pipeline._from_variables = values, used
    return pipeline
