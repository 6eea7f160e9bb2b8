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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gestalt_xai.errors import ConfigError
from gestalt_xai.models.declaration import ModelDeclarations

__all__ = ["StageConfig", "PipelineConfig", "validate_config", "load_pipeline", "load_yaml"]


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
    """A study definition: a name, a seed and models given to every stage that has none, and stages in order."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="study name, used as the default run folder name")
    seed: int = Field(0, description="seed handed to every stage whose options have a seed field left unset")
    models: ModelDeclarations | None = Field(
        None, description="models handed to every stage whose options declare models and leave them unset "
                          "(gestalt_xai.models.declaration): checkpoint paths or {path, id, format, lookup_table, "
                          'channel_order, trust_pickle}, or "run"')
    description: str = ""
    stages: list[dict[str, dict[str, Any] | None]] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _one_stage_per_item(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, item in enumerate(value):
            if len(item) != 1:
                raise ValueError(f"stages[{i}] must be a mapping with exactly one stage name, got {sorted(item)}")
        return value

    def stage_items(self) -> list[tuple[str, dict[str, Any]]]:
        """Return ``(stage name, options)`` pairs in order."""
        return [(name, dict(opts or {})) for item in self.stages for name, opts in item.items()]


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


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file (stage options are validated by :mod:`gestalt_xai.study`)."""
    return validate_config(PipelineConfig, load_yaml(path), where=str(path))
