"""Explanations of GestaltMatcher-style models: targets, methods (one registry), and the explain stage.

>>> from gestalt_xai.attribution import available_methods
>>> {"gradcam", "hirescam", "fullgrad", "occlusion", "lrp"} <= set(available_methods())
True
"""

from gestalt_xai.attribution.base import AttributionMethod, MethodMaps, available_methods, get_method, register_method
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.attribution.targets import CentroidBank, CentroidTarget, LogitTarget, PairTarget, Target

__all__ = [
    "AttributionMethod",
    "CentroidBank",
    "CentroidTarget",
    "LogitTarget",
    "MethodMaps",
    "PairTarget",
    "ScoreModel",
    "Target",
    "available_methods",
    "get_method",
    "register_method",
]
