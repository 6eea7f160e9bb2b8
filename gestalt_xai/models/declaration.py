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
      - {path: "{run}/models/demo_r18_w0.25.safetensors", id: random_init, randomise: true}   # random control

**Random-model control.** ``randomise: true`` declares the checkpoint's architecture with every weight replaced by a
fresh seeded initialisation (``randomise_seed``, default 0; :func:`~gestalt_xai.models.gestaltmatcher.reinitialised`:
the initialisation training from scratch starts from, BatchNorm statistics reset). Its hash
(:meth:`DeclaredModel.sha256`) is derived from the file's hash and the seed, never the file's own, so manifests, the
embeddings and the map store never confuse it with the trained model; without an ``id`` it is called
``<file stem>-random<seed>``. Stages take it like any model; the embed stage records it in the manifest
(``randomise``, ``randomise_seed``, ``source_sha256``), which is how later stages tell a control from a trained model
(:func:`random_controls`): the match stage leaves controls out of its default ensemble, and the aggregate stage
labels their rows and prints them beside the trained model they were drawn from.

Paths may contain ``{run}`` (replaced by the run folder). Every stage derives a model's id with the same rule
(:func:`model_id`), so the embeddings, the map store and the manifest of one declared model carry one id; stages that
only read the map store select by that id. A pipeline file's top-level ``models:`` is handed to every stage whose
options declare models and do not set them (:func:`declares_models`, :func:`gestalt_xai.study.plan_study`).

Files named in a declaration must exist when the options are validated (``study check`` refuses a missing
checkpoint or lookup table before any work, naming the field); a path under ``{run}`` is checked when the stage
resolves it (:func:`resolve_models`).
"""

from __future__ import annotations

import hashlib
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
    "random_controls",
    "resolve_models",
]

#: the model id of an explained ensemble (explain ``ensemble: true``); no declared model may take it
ENSEMBLE_ID = "ensemble"
#: names the initialisation of a random control in its hash (change it if :func:`reinitialised` ever changes)
RANDOMISE_SCHEME = "build_gestaltmatcher-v1"
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
    randomise: bool = Field(False, description="random-model control: the checkpoint's architecture with every "
                                               "weight freshly initialised (seeded; BatchNorm statistics reset)")
    randomise_seed: int = Field(0, ge=0, description="seed of the random initialisation (with randomise: true)")

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, data: Any) -> Any:
        return {"path": str(data)} if isinstance(data, str | Path) else data

    @model_validator(mode="after")
    def _seed_needs_randomise(self) -> ModelSpec:
        # a dumped declaration (the manifest's stage options) carries the default seed: it must validate again
        if "randomise_seed" in self.model_fields_set and not self.randomise and self.randomise_seed != 0:
            raise ValueError("randomise_seed is set but randomise is not: add randomise: true for a random-model "
                             "control")
        return self

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
    >>> model_id(ModelSpec(path="{run}/models/clf.safetensors", randomise=True, randomise_seed=3))
    'clf-random3'
    """
    if spec.id is not None:
        return spec.id
    name = Path(spec.path).name
    stem = Path(name).stem or name
    for suffix in _ID_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            stem = name[: -len(suffix)]
            break
    # a random control never takes its checkpoint's id (module docstring)
    return f"{stem}-random{spec.randomise_seed}" if getattr(spec, "randomise", False) else stem


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
                                      'trust_pickle, randomise, randomise_seed}) as an ensemble, or "run" = every '
                                      'model in run/models')


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

    @property
    def randomised(self) -> bool:
        """Whether this is a random-model control (``randomise: true``)."""
        return bool(getattr(self.spec, "randomise", False))

    def file_sha256(self) -> str:
        """The checkpoint file's content hash (:func:`~gestalt_xai.models.checkpoints.model_sha256`)."""
        from gestalt_xai.models.checkpoints import model_sha256

        return model_sha256(self.path)

    def sha256(self) -> str:
        """The model's hash: the checkpoint's content hash, or for a random control the SHA-256 of that hash and
        its randomisation (never equal to the checkpoint's own)."""
        sha = self.file_sha256()
        if not self.randomised:
            return sha
        tag = f"{sha}|randomise|{RANDOMISE_SCHEME}|seed={self.spec.randomise_seed}"
        return hashlib.sha256(tag.encode()).hexdigest()

    def info(self) -> dict[str, Any]:
        """What the manifest records about the declaration beyond path and hash (a control's randomisation)."""
        if not self.randomised:
            return {}
        return {"randomise": True, "randomise_seed": int(self.spec.randomise_seed), "source_sha256": self.file_sha256()}


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
    from gestalt_xai.models.gestaltmatcher import reinitialised

    spec = model.spec
    loaded = load_model(model.path, format=spec.format, trust_pickle=spec.trust_pickle,  # type: ignore[arg-type]
                        channel_order=spec.channel_order, syndrome_ids=model.lookup_table, device=device).eval()
    if model.randomised:
        loaded = reinitialised(loaded, spec.randomise_seed)
        loaded.config["source"]["model_sha256"] = model.sha256()
    return loaded


def random_controls(run: Run) -> dict[str, str | None]:
    """The run's random-model controls as recorded by the embed stage: control id → the id of the trained model whose
    checkpoint it was drawn from (the model recorded with that file's hash), or ``None`` when that model is not in
    the run's manifest."""
    models = run.manifest.get("models", {})
    by_sha = {info.get("sha256"): mid for mid, info in sorted(models.items()) if not info.get("randomise")}
    return {mid: by_sha.get(info.get("source_sha256")) for mid, info in sorted(models.items())
            if info.get("randomise")}
