"""Method protocol and registry: adding an attribution method is one file with one decorated class.

An :class:`AttributionMethod` produces one or more named maps from one computation (the gradient family yields five
maps from one forward+backward pass). It is configured by keyword parameters in ``__init__`` (recorded with every
map) and called with a :class:`~gestalt_xai.attribution.score_model.ScoreModel`, a batch of normalised images and
the layers to use::

    @register_method("my_method")
    class MyMethod(AttributionMethod):
        names = ("my_method",)

        def attribute(self, score_model, x, methods, layers):
            g = torch.autograd.grad(score_model(x).sum(), x)[0]
            return [MethodMaps("my_method", "", g.sum(1), self.params)]

Maps are returned raw and signed, float32, at the input resolution ``(B, 112, 112)``; views (ReLU, abs, …) belong to
:mod:`gestalt_xai.attribution.postprocess`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gestalt_xai.errors import ConfigError

__all__ = ["AttributionMethod", "MethodMaps", "register_method", "get_method", "available_methods", "INPUT_SIZE",
           "UNSIGNED_METHODS"]

INPUT_SIZE = 112
#: methods whose maps are non-negative by construction (drawn with a sequential colour map)
UNSIGNED_METHODS = frozenset({"saliency", "fullgrad", "smoothgrad"})

_REGISTRY: dict[str, type[AttributionMethod]] = {}


@dataclass
class MethodMaps:
    """Maps of one method at one layer (``layer=""`` for input-space methods) for a batch."""

    method: str
    layer: str
    maps: torch.Tensor  # (B, H, W) float32, raw and signed
    params: dict[str, Any] = field(default_factory=dict)


class AttributionMethod(ABC):
    """Base class of attribution methods (hyperparameters in ``__init__``, data in :meth:`attribute`)."""

    #: map names this class produces (several when they share one computation)
    names: ClassVar[tuple[str, ...]] = ()
    #: names among :attr:`names` that are computed at a named layer (one map per layer)
    layer_methods: ClassVar[frozenset[str]] = frozenset()
    #: whether the method needs ``x.requires_grad`` (gradients); perturbation methods do not
    needs_grad: ClassVar[bool] = True
    #: ScoreModel structures the method supports: some Captum methods need each module called once per forward
    supports_tta: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        self.params = params

    @abstractmethod
    def attribute(
        self, score_model: torch.nn.Module, x: torch.Tensor, methods: Sequence[str], layers: Sequence[str]
    ) -> list[MethodMaps]:
        """Return maps for the requested ``methods`` (a subset of :attr:`names`)."""


def register_method(*names: str) -> Callable[[type[AttributionMethod]], type[AttributionMethod]]:
    """Class decorator registering ``cls`` under each of ``names`` (default: ``cls.names``)."""

    def deco(cls: type[AttributionMethod]) -> type[AttributionMethod]:
        for name in names or cls.names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise ValueError(f"attribution method {name!r} is already registered by {_REGISTRY[name].__name__}")
            _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    # Importing the modules registers their methods; lazy so that importing base.py stays cheap.
    from gestalt_xai.attribution import captum_methods, gradients, lrp, occlusion  # noqa: F401


def get_method(name: str) -> type[AttributionMethod]:
    """The class implementing method ``name``.

    >>> get_method("hirescam").__name__
    'GradientFamily'
    """
    if name not in _REGISTRY:
        _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown attribution method {name!r}; available: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Names of every registered method."""
    _load_builtin()
    return sorted(_REGISTRY)
