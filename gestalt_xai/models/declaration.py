"""The one model declaration of every stage that runs a model (embed, explain, …) and of a pipeline's ``models:``.

A stage's ``models`` option (:data:`ModelDeclarations`) is ``"run"`` — every model stored in the run
(``run/models/*.safetensors``, :meth:`gestalt_xai.runs.Run.models`) — or a list of checkpoints, an ensemble. Each
checkpoint is a path (any format :func:`~gestalt_xai.models.checkpoints.load_model` reads) or a :class:`ModelSpec`
with what the file does not say itself::

    models:
      - s1_glint360k_r50_512d_gmdb__v1.1.0_bs64_size112_channels3_last_model.pth   # a bare path
      - path: s2_glint360k_r100_512d_gmdb__v1.1.0_bs128_size112_channels3_last_model.pth
        id: s2                                          # the model id (default: the file name without suffix)
        trust_pickle: true                              # GM-Arc's whole-module pickle (read tensors only)
        lookup_table: lookup_table_gmdb_v1.1.0.txt      # class index → syndrome id (GM-Arc's table)
        channel_order: RGB                              # override the format's default
      - {path: glint360k_r100.onnx, format: onnx}       # force a format instead of detecting it

Paths may contain ``{run}`` (replaced by the run folder). Every stage derives a model's id with the same rule
(:func:`model_id`), so the embeddings, the map store and the manifest of one declared model carry one id; stages that
only read the map store select by that id. A pipeline file's top-level ``models:`` is handed to every stage whose
options declare models and do not set them (:func:`declares_models`, :func:`gestalt_xai.study.plan_study`).

Files named in a declaration must exist when the options are validated (``study check`` refuses a missing
checkpoint or lookup table before any work, naming the field); a path under ``{run}`` is checked when the stage
resolves it (:func:`resolve_models`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from gestalt_xai.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch

    from gestalt_xai.models.gestaltmatcher import GestaltMatcher
    from gestalt_xai.runs import Run

__all__ = [
    "ENSEMBLE_ID",
    "DeclaredModel",
    "ModelDeclarations",
    "ModelSpec",
    "declares_models",
    "load_declared",
    "model_id",
    "models_field",
    "resolve_models",
]

#: the model id of an explained ensemble (explain ``ensemble: true``); no declared model may take it
ENSEMBLE_ID = "ensemble"
#: suffixes stripped from a checkpoint's file name to give its model id
_ID_SUFFIXES = (".safetensors", ".json", ".onnx", ".pth", ".pt")


def _placeholder(path: str) -> bool:
    return "{run}" in path


class ModelSpec(BaseModel):
    """One declared checkpoint (module docstring); a bare string validates as ``ModelSpec(path=string)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="checkpoint file (any format load_model reads); may contain {run}")
    id: str | None = Field(None, description="model id (default: the file name without its suffix)")
    format: str | None = Field(None, description="checkpoint format id (default: detected from the file)")
    lookup_table: str | None = Field(None, description="GM-Arc lookup_table_gmdb_<version>.txt: the classes' "
                                                       "syndrome ids, for formats that do not store them")
    channel_order: Literal["RGB", "BGR"] | None = Field(None, description="override the format's channel order")
    trust_pickle: bool = Field(False, description="allow a GM-Arc whole-module pickle (.pth; tensors only are read)")

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, data: Any) -> Any:
        return {"path": str(data)} if isinstance(data, str | Path) else data

    @field_validator("path", "lookup_table")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is not None and not _placeholder(value) and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        from gestalt_xai.models.checkpoints import CHECKPOINT_FORMATS

        if value is not None and value not in CHECKPOINT_FORMATS:
            raise ValueError(f"unknown checkpoint format {value!r}; registered: {', '.join(CHECKPOINT_FORMATS)}")
        return value

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        if value is not None:
            _check_id(value)
        return value


def _check_id(value: str) -> str:
    if not value or value.startswith(".") or any(c in value for c in "/\\:") or value == ENSEMBLE_ID:
        raise ValueError(f"{value!r} cannot be a model id (not empty, no '/', '\\\\' or ':', no leading '.', not "
                         f"{ENSEMBLE_ID!r}); give the model an id")
    return value


def model_id(spec: ModelSpec) -> str:
    """The id every stage gives a declared model: its ``id``, else its file name without the checkpoint suffix.

    >>> model_id(ModelSpec.model_construct(path="w/s1_e3.pt", id=None))
    's1_e3'
    >>> model_id(ModelSpec.model_construct(path="run/models/clf.safetensors", id="clf2"))
    'clf2'
    """
    if spec.id is not None:
        return spec.id
    name = Path(spec.path).name
    for suffix in _ID_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _bare_paths(value: Any) -> Any:
    """A single path (CLI ``--model a.pt``) is a one-model list, and a path in a list is ``{path: …}``; ``"run"``
    stays the keyword."""
    if isinstance(value, str | Path):
        return "run" if str(value) == "run" else [{"path": str(value)}]
    if isinstance(value, list | tuple):
        return [{"path": str(v)} if isinstance(v, str | Path) else v for v in value]
    return value


def _unique_ids(value: list[ModelSpec] | Literal["run"]) -> list[ModelSpec] | Literal["run"]:
    if value == "run":
        return value
    if not value:
        raise ValueError('declare at least one model, or "run" for every model in run/models')
    ids = []
    for i, spec in enumerate(value):
        try:
            ids.append(_check_id(model_id(spec)))
        except ValueError as exc:
            raise ValueError(f"[{i}] {spec.path}: {exc}") from None
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"model ids {dup} occur twice; give the models their own 'id'")
    return value


#: the type of every ``models`` option that declares models: ``"run"`` or a list of :class:`ModelSpec` (a path
#: string validates as one). The two forms are told apart before validation, so an error names only the one given
#: (``models.list.0.path: no such file``).
ModelDeclarations = Annotated[
    Annotated[list[ModelSpec], Tag("list")] | Annotated[Literal["run"], Tag("run")],
    Discriminator(lambda v: "run" if v == "run" else "list"),
    BeforeValidator(_bare_paths),
    AfterValidator(_unique_ids),
]


def models_field(default: Any = "run") -> Any:
    """The ``models`` field of a stage's options (the same type and description everywhere)."""
    return Field(default, description='checkpoints (paths, or {path, id, format, lookup_table, channel_order, '
                                      'trust_pickle}) as an ensemble, or "run" = every model in run/models')


def declares_models(options: type[BaseModel]) -> bool:
    """Whether ``options`` (a stage's options model) has a ``models`` field of :data:`ModelDeclarations`."""
    field = options.model_fields.get("models")
    if field is None:
        return False
    pending = [field.annotation]
    while pending:
        tp = pending.pop()
        if tp is ModelSpec:
            return True
        pending += list(typing.get_args(tp))
    return False


@dataclass(frozen=True)
class DeclaredModel:
    """A declared model resolved in a run: its id, its checkpoint file (``{run}`` expanded) and its declaration."""

    model_id: str
    path: Path
    spec: ModelSpec
    lookup_table: Path | None = None

    def sha256(self) -> str:
        """The checkpoint's content hash (:func:`~gestalt_xai.models.checkpoints.model_sha256`)."""
        from gestalt_xai.models.checkpoints import model_sha256

        return model_sha256(self.path)


def resolve_models(run: Run, models: list[ModelSpec] | Literal["run"]) -> list[DeclaredModel]:
    """The declared models of a stage in ``run``, sorted by id; ``"run"`` = every model in ``run/models``.

    Raises
    ------
    InputError : ``"run"`` and the run holds no model.
    ConfigError : a declared file (with ``{run}`` expanded) does not exist.
    """
    from gestalt_xai.runs import LAYOUT

    if models == "run":
        found = run.models()
        if not found:
            raise InputError(f"no models in {run.path / LAYOUT.models}: run `gestalt-xai train` first or declare "
                             "models (--model PATH, or models: in the options / pipeline file)")
        # stored models need no validation: their files exist and their ids are the ones embed gave them
        return [DeclaredModel(m.model_id, m.path, ModelSpec.model_construct(path=str(m.path), id=m.model_id))
                for m in found]
    out = []
    for i, spec in enumerate(models):
        files = {}
        for name in ("path", "lookup_table"):
            value = getattr(spec, name)
            if value is None:
                continue
            p = Path(value.replace("{run}", str(run.path)))
            if not p.is_file():
                raise ConfigError(f"models[{i}].{name}: no such file: {p}")
            files[name] = p
        out.append(DeclaredModel(model_id(spec), files["path"], spec, files.get("lookup_table")))
    return sorted(out, key=lambda m: m.model_id)


def load_declared(model: DeclaredModel, device: torch.device | str = "cpu") -> GestaltMatcher:
    """Load a declared model through :func:`~gestalt_xai.models.checkpoints.load_model` with its format, lookup table
    (class index → syndrome id, checked against the classifier's size), channel order and pickle opt-in.

    Raises :class:`~gestalt_xai.errors.CheckpointError` for an unreadable file and :class:`ConfigError` for a lookup
    table that does not fit the classifier (both name the file).
    """
    from gestalt_xai.models.checkpoints import load_model

    spec = model.spec
    return load_model(model.path, format=spec.format, trust_pickle=spec.trust_pickle,  # type: ignore[arg-type]
                      channel_order=spec.channel_order, syndrome_ids=model.lookup_table, device=device).eval()
