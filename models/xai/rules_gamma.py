"""The generalised γ-rule for convolutions (method.md §3.1), the conv rule of the
``epsilon-gamma-flat`` composite (:mod:`medaudit.models.xai.composite`).

Each output's relevance is shared by the contributions of its own sign, each favoured by γ times
its positive part, so every output that receives relevance has a denominator: z⁺ has none where
all contributions are sign-mismatched, which is where EfficientNet's linear bottlenecks and
depthwise convs leak relevance. Written as :mod:`~medaudit.models.xai.rules` writes its rules
(a custom autograd function, modified weights built once); zennit 0.5.1's ``Gamma`` is the
reference in tests/unit/test_lrp_families.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medaudit.models.xai.rules import EPSILON, ConvArgs, _conv, _conv_transpose, conv_args, stabilize

#: γ of the γ-rule: Montavon et al. 2019 ("Layer-wise relevance propagation: an overview") use
#: 0.25 in the lower layers of VGG-16; zennit's ``Gamma`` default and the ``EpsilonGammaFlat`` of
#: the paper's ``utils/lrp_composites.py`` (method.md §3.1) take the same value.
GAMMA = 0.25


class _GammaFn(torch.autograd.Function):
    """Generalised γ-rule (method.md §3.1, zennit 0.5.1 ``Gamma``), signed inputs and outputs.

    With ``A = w + γw⁺``, ``B = w + γw⁻`` (biases ``b + γb⁺``, ``b + γb⁻``): an output with
    ``z_j > 0`` takes the contributions that favour its sign, ``D⁺_j = Σ x⁺A + x⁻B + b + γb⁺``;
    one with ``z_j < 0`` the mirror image, ``D⁻_j = Σ x⁺B + x⁻A + b + γb⁻``; ``z_j = 0`` gets
    nothing. ``R_i = x⁺_i (Aᵀs⁺ + Bᵀs⁻)_i + x⁻_i (Bᵀs⁺ + Aᵀs⁻)_i``, ``s^± = 1[±z > 0] R / stab(D^±)``.
    ``D⁺ = z + γ·(same-sign part) ≥ z > 0`` and ``D⁻ ≤ z < 0``: unlike z⁺ (the γ → ∞ limit for
    ``z > 0`` outputs), every output that received relevance has a denominator, so without biases
    nothing is lost (EfficientNet's linear bottlenecks and SiLUs pass negative outputs on).

    Both denominators come from the forward output ``z`` and one same-sign sum
    ``Q = Σ x⁺w⁺ + x⁻w⁻ + b⁺ ≥ 0``: ``D⁺ = z + γQ``, ``D⁻ = (1 + γ)z − γQ`` (two convolutions
    instead of zennit's four; both sums add terms of one sign, so nothing cancels).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        w_pos: torch.Tensor,
        w_neg: torch.Tensor,
        b_pos: torch.Tensor,
        w_a: torch.Tensor,
        w_b: torch.Tensor,
        args: ConvArgs,
        gamma: float,
        eps: float,
    ) -> torch.Tensor:
        return _conv(x, w, b, args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, _, _, w_pos, w_neg, b_pos, w_a, w_b, args, gamma, eps = inputs
        ctx.save_for_backward(x, w_pos, w_neg, b_pos, w_a, w_b, output)
        ctx.args, ctx.gamma, ctx.eps = args, gamma, eps

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w_pos, w_neg, b_pos, w_a, w_b, z = ctx.saved_tensors
        args, gamma, eps = ctx.args, ctx.gamma, ctx.eps
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        q = _conv(x_pos, w_pos, b_pos, args).add_(_conv(x_neg, w_neg, None, args)).mul_(gamma)  # γQ
        d_pos, d_neg = z + q, (z * (1 + gamma)).sub_(q)
        s_pos = torch.where(z > 0, r / stabilize(d_pos, eps), 0.0)
        s_neg = torch.where(z < 0, r / stabilize(d_neg, eps), 0.0)

        def adj(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return _conv_transpose(v, x.shape, w, args)

        rel = (adj(s_pos, w_a) + adj(s_neg, w_b)).mul_(x_pos)
        return rel.add_((adj(s_pos, w_b) + adj(s_neg, w_a)).mul_(x_neg)), *([None] * 10)


class GammaConv(nn.Module):
    """A convolution whose backward is the generalised γ-rule (:class:`_GammaFn`).

    The efficientnet family's composite (``epsilon-gamma-flat``, models/xai/composite.py) gives it
    every conv but the first: z⁺ drops the relevance of outputs without a same-sign contribution.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_pos: torch.Tensor
    weight_neg: torch.Tensor
    bias_pos: torch.Tensor
    weight_a: torch.Tensor
    weight_b: torch.Tensor

    def __init__(self, conv: nn.modules.conv._ConvNd, gamma: float = GAMMA, eps: float = EPSILON) -> None:
        super().__init__()
        self.args = conv_args(conv)
        self.gamma, self.eps = gamma, eps
        w = conv.weight.detach()
        b = conv.bias.detach() if conv.bias is not None else w.new_zeros(w.shape[0])
        self.register_buffer("weight", w.clone())
        self.register_buffer("bias", None if conv.bias is None else b.clone())
        self.register_buffer("weight_pos", w.clamp(min=0))
        self.register_buffer("weight_neg", w.clamp(max=0))
        self.register_buffer("bias_pos", b.clamp(min=0))
        self.register_buffer("weight_a", w + gamma * w.clamp(min=0))
        self.register_buffer("weight_b", w + gamma * w.clamp(max=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GammaFn.apply(
            x, self.weight, self.bias, self.weight_pos, self.weight_neg, self.bias_pos,
            self.weight_a, self.weight_b, self.args, self.gamma, self.eps,
        )  # fmt: skip
