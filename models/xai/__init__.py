"""LRP core: canonizers, rules and the :class:`Explainer` (method.md §2.1, §3)."""

from medaudit.models.errors import CanonizerError
from medaudit.models.xai.canonizers import canonize, detect_canonizer
from medaudit.models.xai.composite import LayerRule, build_lrp_model, rule_report
from medaudit.models.xai.lrp import (
    CapturedExplain,
    ClassTarget,
    ConceptTarget,
    Explainer,
    Explanation,
)

__all__ = [
    "CanonizerError",
    "CapturedExplain",
    "ClassTarget",
    "ConceptTarget",
    "Explainer",
    "Explanation",
    "LayerRule",
    "build_lrp_model",
    "canonize",
    "detect_canonizer",
    "rule_report",
]
