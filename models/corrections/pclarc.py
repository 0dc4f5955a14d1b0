"""P-ClArC and reactive P-ClArC: training-free projections at layer ℓ (method.md §4.2, §4.3, §11.7).

For every sample, with φ the spatially max-pooled activation and v the unit pattern-CAV::

    a'(x) = a(x) + g(x) · (⟨μ0, v⟩ − ⟨φ(x), v⟩) / ⟨v, v⟩ · v ⊗ 1_{H×W}

where g ≡ 1 (P-ClArC) or g(x) = 1[⟨φ(x), v_svm⟩ > 0] (reactive, no intercept, §4.3). The length is
measured on the max-pooled vector, the correction is added uniformly to every position (§11.4).
Because a per-channel constant commutes with the spatial max, φ(a') = φ(a) + shift · v, so
⟨φ(a'), v⟩ = ⟨μ0, v⟩ exactly and the part of φ orthogonal to v is unchanged.

Departures from the authors' hooks:

* the projection is an ``nn.Module`` placed **inside** the network (appended to ℓ when ℓ is an
  ``nn.Sequential``, otherwise ℓ becomes ``Sequential(ℓ, projection)``), so it is part of the
  state dict and of the exported ONNX graph; a Python forward hook would be lost on export;
* the division by ⟨v, v⟩ has no zennit ``stabilize`` ε: v is checked to be unit-norm, and the ε
  would move the coordinate to μ0·(1 − 1e-6) instead of μ0;
* 2-D outputs (ViT CLS, (B, C)) are used as φ directly; the authors lift 3-D token tensors
  (B, T, D) with tokens as channels (§4.2), which this module does not imitate: inputs are
  channel-first, (B, C) or (B, C, *spatial).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from medaudit.models.corrections.base import CorrectionData
from medaudit.models.corrections.projection import ClarcProjection, insert_projection
from medaudit.models.errors import ConfigError
from medaudit.models.registry import ModelCfg


@dataclass(frozen=True)
class PClarc:
    """Training-free P-ClArC (method.md §4.2): every sample's coordinate goes to ⟨μ0, v⟩."""

    name: ClassVar[str] = "pclarc"

    @property
    def params(self) -> dict[str, Any]:
        return {"direction": "signal", "pooling": "max", "target": "mu0", "epochs": 0}

    def apply(self, model: nn.Module, cfg: ModelCfg, data: CorrectionData) -> nn.Module:
        net = copy.deepcopy(model)
        insert_projection(net, cfg, data.layer, ClarcProjection(data.cav, data.mu0_coordinate))
        return net.eval()


@dataclass(frozen=True)
class ReactivePClarc:
    """Reactive P-ClArC (method.md §4.3): the shift only where ⟨φ, v_svm⟩ > 0 (no intercept)."""

    name: ClassVar[str] = "rpclarc"

    @property
    def params(self) -> dict[str, Any]:
        return {
            "direction": "signal",
            "gate": "svm, <phi, v_svm> > 0, no intercept",
            "pooling": "max",
            "target": "mu0",
            "epochs": 0,
        }

    def apply(self, model: nn.Module, cfg: ModelCfg, data: CorrectionData) -> nn.Module:
        if data.cav_svm is None:
            raise ConfigError(
                "reactive P-ClArC needs CorrectionData.cav_svm (fit_correction_data(fit_svm=True))"
            )
        net = copy.deepcopy(model)
        proj = ClarcProjection(data.cav, data.mu0_coordinate, gate=data.cav_svm)
        insert_projection(net, cfg, data.layer, proj)
        return net.eval()
