"""Marker modules that canonizers insert so that a rule can see an operation (method.md §3.2).

They compute exactly what the code they replace computed; their only purpose is to give the LRP
engine a module to attach a rule to. Like ``zennit.layer.Sum`` they know nothing of any
architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ResidualSum(nn.Module):
    """``a + b`` as a module, so the Norm rule can split relevance between the two summands.

    Unlike ``zennit.layer.Sum`` it takes the summands as two arguments instead of one stacked
    tensor, which saves a copy of every residual activation.
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Concat(nn.Module):
    """``torch.cat(parts, dim)`` as a module, so that a concatenation shows in the rule report.

    Its gradient hands each part the slice of the relevance at its own channels: relevance is
    split by part and otherwise passed through unchanged, the LRP treatment of a concatenation
    (each output channel has exactly one input, so every rule reduces to identity). zennit
    0.5.1 gives ``torch.cat`` this plain gradient too; the engine keeps it (method.md §3.1).
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(parts), self.dim)


class PassThrough(nn.Module):
    """Runs ``inner`` forward; under LRP its relevance passes through unchanged (the Pass rule).

    Used for ViT attention, which zennit ≤ 0.5.1 treats as an activation (method.md §3.1), and
    for squeeze-excitation, whose multiplicative gate is a constant under LRP (the signal-only
    gate of Pahde et al. 2023, "Optimizing explanations by network canonization and
    hyperparameter search", CVPR workshops; Arras et al. 2017's signal-take-all for LSTM gates):
    ``y = g(x) ⊙ x`` with ``g`` held fixed is a diagonal linear map without bias, under which ε,
    z⁺ and Pass all give ``R_x = R_y``.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)
