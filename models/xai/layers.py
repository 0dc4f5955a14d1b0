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

    Used for squeeze-excitation, whose multiplicative gate is a constant under LRP (the signal-only
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


class AttentionCore(nn.Module):
    """``softmax(scale · q kᵀ) v`` per head, written out, as a module the attention rules replace.

    ``q, k, v`` are ``(B, heads, tokens, head_dim)``. Never the fused kernel
    (``F.scaled_dot_product_attention``): LRP needs the attention matrix and its logits, which the
    fused kernels do not expose (method of Achtibat et al. 2024, see
    :mod:`medaudit.models.xai.attention_rules`). The same function up to float rounding.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = (torch.matmul(q, k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return torch.matmul(attn, v)


class TokenMean(nn.Module):
    """The mean over tokens ``x[:, start:].mean(1)`` of ``(B, tokens, dim)`` as a module (Norm rule).

    As a function its gradient would hand every token ``R / tokens`` whatever it contributed; as a
    module it gets the Norm rule of average pooling (method.md §3.1).
    """

    def __init__(self, start: int = 0) -> None:
        super().__init__()
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start :].mean(1)


class Scale(nn.Module):
    """``x · γ`` with a constant per-channel ``γ`` (timm's LayerScale), as a module.

    An element-wise product with one variable factor: the uniform rule hands all the relevance to
    ``x`` (Achtibat et al. 2024, Prop. 3.2), where the gradient would scale it by γ.
    """

    gamma: torch.Tensor

    def __init__(self, gamma: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("gamma", gamma.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
