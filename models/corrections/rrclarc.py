"""RR-ClArC: fine-tuning with a gradient penalty along the CAV (method.md §4.5, §11.8).

Per batch, with random signs σ_{b,k} ∈ {−1, +1} resampled every step (criterion
``all_logits_random``)::

    g(x_b) = Σ_k σ_{b,k} f_k(x_b),    G_b = ∂g(x_b)/∂a(x_b)   (a: output of ℓ, create_graph=True)
    L = CE_w(f(x), y) + λ · (1/B) Σ_b ⟨mean_{h,w} G_b, v⟩²                  (``compute: l2_mean``)

The penalty applies to every sample. At inference RR-ClArC is just the fine-tuned weights.

λ: the penalty is a squared gradient, so its scale depends on architecture, layer and resolution;
the authors' λ spans 10 to 5·10⁶ across datasets (§4.5). The default here, ``lamb="auto"``,
measures CE and the penalty of the original model on the first batch and sets
λ = ``auto_ratio`` · CE / penalty (``auto_ratio`` 10: the penalty starts at ten times the
classification loss, so it dominates until the gradient along v has shrunk tenfold). The resolved
λ is returned in the model card's parameters. A number fixes λ as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from medaudit.models.corrections.base import (
    Batch,
    CorrectionData,
    FinetuneConfig,
    FinetuneLog,
    capture,
    finetune,
)
from medaudit.models.errors import ConfigError
from medaudit.models.registry import ModelCfg


def random_signs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """σ = sign(0.5 − u), u ~ U(0, 1), as ±1 (an exact 0.5 maps to +1, not to 0)."""
    u = torch.rand(shape, generator=generator)
    return torch.where(u < 0.5, 1.0, -1.0)


def rrclarc_penalty(
    logits: torch.Tensor, activation: torch.Tensor, v: torch.Tensor, signs: torch.Tensor
) -> torch.Tensor:
    """(1/B) Σ_b ⟨mean_{h,w} ∂(Σ_k σ_{b,k} f_k)/∂a_b, v⟩² with ``create_graph=True`` (§4.5).

    Args:
        logits: (B, K) model outputs computed from ``activation``.
        activation: (B, C, *spatial) or (B, C) output of ℓ, part of the graph of ``logits``.
        v: Unit CAV (C,).
        signs: (B, K) random signs σ.
    """
    g = (logits * signs.to(logits.dtype)).sum()
    (grad,) = torch.autograd.grad(g, activation, create_graph=True)
    mean_grad = grad if grad.ndim == 2 else grad.flatten(2).mean(-1)  # (B, C)
    return ((mean_grad @ v.to(grad.dtype)) ** 2).mean()


@dataclass(frozen=True)
class RRClarc:
    """Right-Reason ClArC (method.md §4.5). See the module docstring for λ."""

    lamb: float | Literal["auto"] = "auto"
    auto_ratio: float = 10.0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    name: ClassVar[str] = "rrclarc"

    def __post_init__(self) -> None:
        if not (self.lamb == "auto" or (isinstance(self.lamb, int | float) and self.lamb >= 0)):
            raise ConfigError(f"lamb={self.lamb!r}; valid: 'auto' or a number ≥ 0")

    @property
    def params(self) -> dict[str, Any]:
        return {
            "lamb": self.lamb,
            "auto_ratio": self.auto_ratio,
            "criterion": "all_logits_random",
            "compute": "l2_mean",
            "direction": "signal",
            "finetune": self.finetune.to_dict(),
        }

    def apply(self, model: nn.Module, cfg: ModelCfg, data: CorrectionData) -> nn.Module:
        return self.fit(model, cfg, data)[0]

    def fit(
        self, model: nn.Module, cfg: ModelCfg, data: CorrectionData, log: Any = None
    ) -> tuple[nn.Module, FinetuneLog, float]:
        """Like :meth:`apply`, also returning the training log and the λ actually used."""
        v = torch.as_tensor(np.asarray(data.cav, np.float32))

        def penalty(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            with capture(net, cfg, data.layer, before_correction=False, ensure_grad=True) as store:
                logits = net(batch.x)
            signs = random_signs(tuple(logits.shape), batch.generator)
            return logits, rrclarc_penalty(logits, store["a"], v, signs)

        lamb = self.lamb if self.lamb != "auto" else _auto_lambda(self.auto_ratio)
        return finetune(model, cfg, data, self.finetune, penalty, lamb, who="RR-ClArC", log=log)


def _auto_lambda(ratio: float) -> Any:
    def resolve(ce: float, pen: float) -> float:
        # A model with no gradient along v at all needs no penalty; any λ is then equivalent.
        return ratio * ce / pen if pen > 1e-30 else 1.0

    return resolve
