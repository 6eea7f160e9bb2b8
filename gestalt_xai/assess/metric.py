"""One small record per metric: what it is called, which way is better, where it is defined.

Each metric of the assess stage is a plain function on arrays, decorated with :func:`metric`, which attaches a
:class:`MetricInfo` (``fn.info``) and registers it in :data:`METRICS` (Quantus's taxonomy — faithfulness,
localisation, randomisation, robustness, comparison — without its class boilerplate: Hedström et al., JMLR 2023)::

    @metric("relevance_mass_accuracy", family="localisation", direction="higher",
            reference="Arras et al., Information Fusion 2022")
    def relevance_mass_accuracy(maps, masks): ...

Summaries and figures read ``info.direction`` to rank methods and ``info.reference`` to cite the definition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from gestalt_xai.registry import Registry

__all__ = ["METRICS", "MetricInfo", "metric", "better"]

Family = Literal["faithfulness", "localisation", "randomisation", "robustness", "comparison", "eyetracking"]
Direction = Literal["higher", "lower"]

F = TypeVar("F", bound=Callable[..., object])


@dataclass(frozen=True)
class MetricInfo:
    """``name``; ``family``; ``direction``: ``"higher"`` or ``"lower"`` is better (for a faithful, well-localised or
    model-sensitive explanation; for comparisons: more similar); ``reference``: the paper or file defining it."""

    name: str
    family: Family
    direction: Direction
    reference: str


#: the modules whose metrics are registered when :data:`METRICS` is first read
METRIC_MODULES = ("gestalt_xai.assess.compare", "gestalt_xai.assess.faithfulness", "gestalt_xai.assess.localisation",
                  "gestalt_xai.assess.randomisation", "gestalt_xai.assess.robustness",
                  "gestalt_xai.experiments.eyetracking.metrics")


def _load_builtin_metrics() -> None:
    import importlib

    for name in METRIC_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a family not installed in this checkout; any other import error raises
            if exc.name != name:
                raise


#: every registered metric function, by name (``fn.info`` holds its record)
METRICS: Registry[Callable[..., object]] = Registry("metric", _load_builtin_metrics)


def metric(name: str, *, family: Family, direction: Direction, reference: str) -> Callable[[F], F]:
    """Attach a :class:`MetricInfo` to the decorated function and register it under ``name``.

    >>> @metric("doc_example", family="comparison", direction="higher", reference="none")
    ... def doc_example(a, b):
    ...     return 0.0
    >>> doc_example.info.direction
    'higher'
    >>> METRICS.remove("doc_example")
    """
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be 'higher' or 'lower', not {direction!r}")

    def deco(fn: F) -> F:
        fn.info = MetricInfo(name, family, direction, reference)  # type: ignore[attr-defined]
        METRICS.add(name, fn, same=lambda a, b: (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__))
        return fn

    return deco


def better(direction: Direction, a: float, b: float) -> bool:
    """Whether value ``a`` is better than ``b`` for a metric of this direction.

    >>> better("lower", 0.2, 0.5), better("higher", 0.2, 0.5)
    (True, False)
    """
    return a < b if direction == "lower" else a > b
