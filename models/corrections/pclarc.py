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

import numpy as np
import torch
from torch import nn

from medaudit.models.corrections.base import CorrectionData
from medaudit.models.errors import ConfigError
from medaudit.models.features import max_pool_spatial
from medaudit.models.registry import ModelCfg, hook_module


class ClarcProjection(nn.Module):
    """Moves the CAV coordinate of the max-pooled activation to ``mu0`` (method.md §4.2, §4.3).

    Args:
        v: Unit CAV, shape (C,).
        mu0: Target coordinate ⟨μ0, v⟩ (a scalar).
        gate: SVM-CAV for the reactive variant (shape (C,)), or None for plain P-ClArC.
    """

    def __init__(
        self, v: torch.Tensor | np.ndarray, mu0: float, gate: torch.Tensor | np.ndarray | None = None
    ):
        super().__init__()
        vec = torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(-1)
        self.register_buffer("v", vec.clone())
        self.register_buffer("mu0", torch.tensor(float(mu0), dtype=torch.float32))
        self.reactive = gate is not None
        g = (
            torch.zeros_like(vec)
            if gate is None
            else torch.as_tensor(np.asarray(gate, dtype=np.float32)).reshape(-1)
        )
        if g.shape != vec.shape:
            raise ConfigError(f"gate vector has shape {tuple(g.shape)}; v has {tuple(vec.shape)}")
        self.register_buffer("gate", g.clone())

    v: torch.Tensor
    mu0: torch.Tensor
    gate: torch.Tensor

    def extra_repr(self) -> str:
        return f"channels={self.v.numel()}, reactive={self.reactive}"

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        # shape check in eager mode only: under ONNX tracing shapes are tensors
        if not torch.jit.is_tracing() and (a.ndim < 2 or a.shape[1] != self.v.numel()):
            raise ConfigError(
                f"ClarcProjection expects (B, {self.v.numel()}, ...) activations; got {tuple(a.shape)}"
            )
        phi = max_pool_spatial(a)
        v = self.v.to(a.dtype)
        shift = (self.mu0.to(a.dtype) - phi @ v) / (v @ v)
        if self.reactive:
            shift = shift * (phi @ self.gate.to(a.dtype) > 0).to(a.dtype)
        delta = shift[:, None] * v[None, :]
        return a + delta[(...,) + (None,) * (a.ndim - 2)]


def insert_projection(model: nn.Module, cfg: ModelCfg, layer: str, projection: ClarcProjection) -> nn.Module:
    """Places ``projection`` at the output of hook point ``layer`` of ``model``, in place.

    After this, hook point ``layer`` (the same dotted path) resolves to an ``nn.Sequential`` whose
    last child is the projection, so hook-point consumers (LRP taps, CAV scoring) see the
    corrected activation.
    """
    module = hook_module(model, cfg, layer)
    if isinstance(module, nn.Sequential):
        if len(module) and isinstance(module[-1], ClarcProjection):
            raise ConfigError(f"layer {layer!r} already carries a ClArC projection")
        module.append(projection)  # keeps the original parameter names (layer3.0.conv1.weight, ...)
        return model
    path = cfg.hook_points[layer]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.Sequential(module, projection))
    return model


def find_projection(model: nn.Module, cfg: ModelCfg, layer: str) -> ClarcProjection | None:
    """The projection at hook point ``layer``, if one was inserted."""
    module = hook_module(model, cfg, layer)
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], ClarcProjection):
        return module[-1]
    return None


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
