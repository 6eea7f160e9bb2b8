"""Method protocol and registry: adding an attribution method is one file with one decorated class.

An :class:`AttributionMethod` produces one or more named maps from one computation (the gradient family yields five
maps from one forward+backward pass). It declares its parameters as a :class:`MethodParams` model (typed, with
defaults, a description and an example value each; unknown keys and wrong types are configuration errors), receives
them validated in ``__init__`` (``self.params``, recorded with every map), and is called with a
:class:`~gestalt_xai.attribution.score_model.ScoreModel`, a batch of normalised images and the layers to use::

    @register_method("my_method")
    class MyMethod(AttributionMethod):
        names = ("my_method",)

        class Params(MethodParams):
            scale: float = Field(1.0, gt=0, description="multiplies the map", examples=[2.0])

        def attribute(self, score_model, x, methods, layers):
            g = torch.autograd.grad(score_model(x).sum(), x)[0]
            return [MethodMaps("my_method", "", self.params["scale"] * g.sum(1), self.params)]

Maps are returned raw and signed, float32, at the input resolution ``(B, 112, 112)``; views (ReLU, abs, …) belong to
:mod:`gestalt_xai.attribution.postprocess`. Every registered method is run by ``tests/test_attribution_contract.py``
(shape, finiteness, determinism, parameters recorded in the map store) with no test edit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from gestalt_xai.errors import ConfigError
from gestalt_xai.registry import Registry

__all__ = ["AttributionMethod", "MethodMaps", "MethodParams", "register_method", "get_method",
           "available_methods", "build_methods", "UNSIGNED_METHODS", "METHODS"]

#: methods whose maps are non-negative by construction (drawn with a sequential colour map)
UNSIGNED_METHODS = frozenset({"saliency", "fullgrad", "smoothgrad"})

T = TypeVar("T")


def _load_builtin_methods() -> None:
    # Importing the modules registers their methods
    from gestalt_xai.attribution import captum_methods, gradients, lrp, occlusion  # noqa: F401


#: the attribution methods, by name (several names may share one class)
METHODS: Registry[type[AttributionMethod]] = Registry("attribution method", _load_builtin_methods)


@dataclass
class MethodMaps:
    """Maps of one method at one layer (``layer=""`` for input-space methods) for a batch."""

    method: str
    layer: str
    maps: torch.Tensor  # (B, H, W) float32, raw and signed
    params: dict[str, Any] = field(default_factory=dict)


class MethodParams(BaseModel):
    """Base of a method's declared parameters: each a typed field with a default, a ``description`` and an example
    value other than the default (``examples=[…]``, used by the docs and the contract tests).

    Strict: unknown keys are refused, and so are values of the wrong type (``"5"`` is not an int, ``True`` is not a
    number); an int is accepted where a float is declared.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AttributionMethod(ABC):
    """Base class of attribution methods (parameters in ``__init__``, data in :meth:`attribute`)."""

    #: map names this class produces (several when they share one computation)
    names: ClassVar[tuple[str, ...]] = ()
    #: names among :attr:`names` that are computed at a named layer (one map per layer)
    layer_methods: ClassVar[frozenset[str]] = frozenset()
    #: whether the method needs ``x.requires_grad`` (gradients); perturbation methods do not
    needs_grad: ClassVar[bool] = True
    #: ScoreModel structures the method supports: some Captum methods need each module called once per forward
    supports_tta: ClassVar[bool] = True
    #: the declared parameters; a method without parameters keeps this empty model (any key is refused)
    Params: ClassVar[type[MethodParams]] = MethodParams

    def __init__(self, **params: Any) -> None:
        #: every declared parameter, defaults filled in (recorded with each map)
        self.params: dict[str, Any] = self.validate_params(params)

    @classmethod
    def validate_params(cls, params: Mapping[str, Any], origin: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Every declared parameter, from ``params`` or its default; a :class:`ConfigError` naming method and key.

        ``origin`` names the method each key was given for (when one class serves several names).

        >>> get_method("integrated_gradients").validate_params({"steps": 8})["steps"]
        8
        >>> get_method("occlusion").validate_params({"patch": "big"}, origin={"patch": "occlusion"})
        Traceback (most recent call last):
        ...
        gestalt_xai.errors.ConfigError: method_params: occlusion.patch: Input should be a valid integer (got 'big')
        """
        try:
            return cls.Params.model_validate(dict(params)).model_dump()
        except ValidationError as exc:
            raise ConfigError("method_params: " + "; ".join(cls._param_problems(exc, origin or {}))) from None

    @classmethod
    def _param_problems(cls, exc: ValidationError, origin: Mapping[str, str]) -> list[str]:
        declared = sorted(cls.Params.model_fields)
        unknown: list[str] = []
        invalid: dict[str, list[str]] = {}  # "method.key" -> messages
        given: dict[str, Any] = {}
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            name = origin.get(key) or "/".join(cls.names) or cls.__name__
            if err["type"] == "extra_forbidden":
                known = f"its parameters: {', '.join(declared)}" if declared else f"{name} takes no parameters"
                unknown.append(f"{name} has no parameter {key!r} ({known})")
                continue
            where = f"{name}.{key}" if key else name
            invalid.setdefault(where, []).append(str(err["msg"]).removeprefix("Value error, "))
            if key:
                given[where] = err["input"]
        # a union type reports one error per member: one line per parameter
        return unknown + [f"{where}: {' or '.join(dict.fromkeys(msgs))}"
                          + (f" (got {given[where]!r})" if where in given else "") for where, msgs in invalid.items()]

    @abstractmethod
    def attribute(
        self, score_model: torch.nn.Module, x: torch.Tensor, methods: Sequence[str], layers: Sequence[str]
    ) -> list[MethodMaps]:
        """Return maps for the requested ``methods`` (a subset of :attr:`names`)."""


def register_method(*names: str) -> Callable[[type[AttributionMethod]], type[AttributionMethod]]:
    """Class decorator registering ``cls`` under each of ``names`` (default: ``cls.names``)."""

    def deco(cls: type[AttributionMethod]) -> type[AttributionMethod]:
        for name in names or cls.names:
            METHODS.add(name, cls)
        return cls

    return deco


def get_method(name: str) -> type[AttributionMethod]:
    """The class implementing method ``name``.

    >>> get_method("hirescam").__name__
    'GradientFamily'
    """
    return METHODS.get(name)


def available_methods() -> list[str]:
    """Names of every registered method."""
    return METHODS.names()


def build_methods(methods: Sequence[str],
                  method_params: Mapping[str, Mapping[str, Any]]) -> list[tuple[AttributionMethod, list[str]]]:
    """One instance per method class, with its validated parameters, and the requested names it produces.

    Names served by one class share one computation and therefore one set of parameters: a parameter given for two
    of them must have the same value (``smoothgrad: {samples: 8}`` with ``smoothgrad_ig: {samples: 16}`` is a
    :class:`ConfigError`, not a silent merge). Parameters for a method not requested are an error too.

    >>> [(type(m).__name__, names) for m, names in build_methods(["gradcam", "occlusion", "saliency"], {})]
    [('GradientFamily', ['gradcam', 'saliency']), ('Occlusion', ['occlusion'])]
    >>> build_methods(["gradcam"], {"gradcam": {"bogus": 1}})
    Traceback (most recent call last):
    ...
    gestalt_xai.errors.ConfigError: method_params: gradcam has no parameter 'bogus' (gradcam takes no parameters)
    >>> given = {"smoothgrad": {"samples": 8}, "smoothgrad_ig": {"samples": 4}}
    >>> build_methods(["smoothgrad", "smoothgrad_ig"], given)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gestalt_xai.errors.ConfigError: method_params: smoothgrad.samples = 8 and smoothgrad_ig.samples = 4 conflict: ...
    """
    if not_requested := sorted(set(method_params) - set(methods)):
        raise ConfigError(f"method_params given for methods not requested: {not_requested}")
    groups: dict[type[AttributionMethod], list[str]] = {}
    for name in methods:
        groups.setdefault(get_method(name), []).append(name)
    out = []
    for cls, names in groups.items():
        merged: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for name in names:
            for key, value in method_params.get(name, {}).items():
                if key in merged and merged[key] != value:
                    raise ConfigError(
                        f"method_params: {origin[key]}.{key} = {merged[key]!r} and {name}.{key} = {value!r} conflict: "
                        f"{', '.join(names)} are computed together ({cls.__name__}) with one value of {key}")
                merged[key] = value
                origin.setdefault(key, name)
        out.append((cls(**cls.validate_params(merged, origin)), names))
    return out
