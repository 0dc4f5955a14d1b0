"""Marker modules that canonizers insert so that a rule can see an operation (method.md §3.2).

They compute exactly what the code they replace computed; their only purpose is to give the LRP
engine a module to attach a rule to. Like ``zennit.layer.Sum`` they know nothing of any
architecture.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualSum(nn.Module):
    """``a + b`` as a module, so the Norm rule can split relevance between the two summands.

    Unlike ``zennit.layer.Sum`` it takes the summands as two arguments instead of one stacked
    tensor, which saves a copy of every residual activation.
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class PassThrough(nn.Module):
    """Runs ``inner`` forward; under LRP its relevance passes through unchanged (the Pass rule).

    Used for ViT attention, which zennit ≤ 0.5.1 treats as an activation (method.md §3.1).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)
