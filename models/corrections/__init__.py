"""Model corrections behind one :class:`Correction` interface (method.md §4).

``medaudit.models.corrections.io`` (version checkpoints) is imported from its module, not from here.
One version's whole build (correct, save, export, evaluate, card) is
``medaudit.models.build.correct_and_evaluate``, above the corrections.

P-ClArC and reactive P-ClArC insert a projection module at layer ℓ (training-free); RR-ClArC,
RRR and the Vanilla fine-tune train the layers after ℓ. ``CORRECTIONS`` maps each name to its
class, for configuration by name.
"""

from __future__ import annotations

from medaudit.models.corrections.base import (
    Correction,
    CorrectionData,
    FinetuneConfig,
    fit_correction_data,
    freeze_up_to,
    pooled_activations,
)
from medaudit.models.corrections.pclarc import PClarc, ReactivePClarc
from medaudit.models.corrections.projection import ClarcProjection, find_projection, insert_projection
from medaudit.models.corrections.rrclarc import RRClarc, rrclarc_penalty
from medaudit.models.corrections.rrr import RRR, rrr_penalty
from medaudit.models.corrections.vanilla import Original, Vanilla

CORRECTIONS: dict[str, type] = {c.name: c for c in (Original, Vanilla, PClarc, ReactivePClarc, RRClarc, RRR)}

__all__ = [
    "CORRECTIONS",
    "RRR",
    "ClarcProjection",
    "Correction",
    "CorrectionData",
    "FinetuneConfig",
    "Original",
    "PClarc",
    "RRClarc",
    "ReactivePClarc",
    "Vanilla",
    "find_projection",
    "fit_correction_data",
    "freeze_up_to",
    "insert_projection",
    "pooled_activations",
    "rrclarc_penalty",
    "rrr_penalty",
]
