"""Explanations of GestaltMatcher-style models: targets, methods (one registry each), and the explain stage.

>>> from gestalt_xai.attribution import available_methods, available_target_kinds
>>> {"gradcam", "hirescam", "fullgrad", "occlusion", "lrp"} <= set(available_methods())
True
>>> {"centroid", "contrast", "logit", "pair"} <= set(available_target_kinds())
True
"""

from gestalt_xai.attribution.base import (
    AttributionMethod,
    MethodMaps,
    MethodParams,
    available_methods,
    build_methods,
    get_method,
    register_method,
)
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.attribution.target_kinds import (
    PlanContext,
    TargetKind,
    WorkItem,
    available_target_kinds,
    get_target_kind,
    register_target_kind,
    target_group,
)
from gestalt_xai.attribution.targets import (
    CentroidBank,
    CentroidTarget,
    LogitTarget,
    PairTarget,
    Target,
    TargetKey,
    TTASlot,
    split_targets,
)

__all__ = [
    "AttributionMethod",
    "CentroidBank",
    "CentroidTarget",
    "LogitTarget",
    "MethodMaps",
    "MethodParams",
    "PairTarget",
    "PlanContext",
    "ScoreModel",
    "TTASlot",
    "Target",
    "TargetKey",
    "TargetKind",
    "WorkItem",
    "available_methods",
    "available_target_kinds",
    "build_methods",
    "get_method",
    "get_target_kind",
    "register_method",
    "register_target_kind",
    "split_targets",
    "target_group",
]
