"""Vanilla baselines (method.md §4.7): the same fine-tuning without a penalty, and the original."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from medaudit.models.corrections.base import CorrectionData, FinetuneConfig, FinetuneLog, finetune
from medaudit.models.registry import ModelCfg


@dataclass(frozen=True)
class Vanilla:
    """Fine-tuning after ℓ with the same freezing and schedule as RR-ClArC and RRR, CE only."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    name: ClassVar[str] = "vanilla-ft"

    @property
    def params(self) -> dict[str, Any]:
        return {"finetune": self.finetune.to_dict()}

    def apply(self, model: nn.Module, cfg: ModelCfg, data: CorrectionData) -> nn.Module:
        return self.fit(model, cfg, data)[0]

    def fit(
        self, model: nn.Module, cfg: ModelCfg, data: CorrectionData, log: Any = None
    ) -> tuple[nn.Module, FinetuneLog, float]:
        return finetune(model, cfg, data, self.finetune, None, 0.0, who="Vanilla", log=log)


@dataclass(frozen=True)
class Original:
    """``Vanilla-0epochs``: the original model, unchanged (a copy), as the comparison baseline."""

    name: ClassVar[str] = "vanilla"

    @property
    def params(self) -> dict[str, Any]:
        return {"epochs": 0}

    def apply(self, model: nn.Module, cfg: ModelCfg, data: CorrectionData) -> nn.Module:
        return copy.deepcopy(model).eval()
