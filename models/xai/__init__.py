"""LRP core: canonizers, rules and the :class:`Explainer` (method.md §2.1, §3)."""

from medaudit.models.errors import CanonizerError
from medaudit.models.xai.canonizers import canonize
from medaudit.models.xai.lrp import (
    CapturedExplain,
    ClassTarget,
    ConceptTarget,
    Explainer,
    Explanation,
    build_lrp_model,
)

__all__ = [
    "CanonizerError",
    "CapturedExplain",
    "ClassTarget",
    "ConceptTarget",
    "Explainer",
    "Explanation",
    "build_lrp_model",
    "canonize",
]
