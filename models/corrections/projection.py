"""The ClArC projection as a layer: the operation P-ClArC and reactive P-ClArC insert at ℓ
(method.md §4.2, §4.3, §11.7), and where it sits in a network.

For every sample, with φ the spatially max-pooled activation and v the unit pattern-CAV::

    a'(x) = a(x) + g(x) · (⟨μ0, v⟩ − ⟨φ(x), v⟩) / ⟨v, v⟩ · v ⊗ 1_{H×W}

where g ≡ 1 (P-ClArC) or g(x) = 1[⟨φ(x), v_svm⟩ > 0] (reactive). Its own module because the
correction machinery (:mod:`medaudit.models.corrections.base`: reading activations before a
projection), saved versions (:mod:`~medaudit.models.corrections.io`) and evaluation all need the
layer, and only :mod:`~medaudit.models.corrections.pclarc` fits it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from medaudit.models.errors import ConfigError
from medaudit.models.features import max_pool_spatial
from medaudit.models.registry import ModelCfg, hook_module
from medaudit.models.xai.composite import GRADIENT_TYPES


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
    #: the LRP engine records hook point ℓ at this module's input, the layer's own output, where the
    #: concept banks were fitted (:func:`medaudit.models.xai.lrp.add_taps`)
    tap_before: ClassVar[bool] = True

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


# LRP through a corrected model: the projection keeps its plain gradient, as the authors' hooks
# (a forward hook at ℓ, method.md §4.2) leave autograd's backward through the shift in place. The
# engine refuses layers it has no rule for, so the projection is declared here, where it lives.
GRADIENT_TYPES[ClarcProjection] = "Gradient (ClArC projection)"
