"""LRP rules for transformer layers: AttnLRP and CP-LRP, as custom autograd functions.

The same design as :mod:`medaudit.models.xai.rules`: each rule is a module that replaces one layer
of a canonized model, its forward computes the layer's ordinary output, its backward takes the
relevance ``R`` at the output and returns the relevance at the inputs, and the backwards are
written for ``is_grads_batched`` (everything saved is unbatched, only ``R`` carries the seeds).

**AttnLRP** (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers", ICML 2024, §3; proposition and equation numbers are the paper's, as lxt cites them):

* softmax: Deep Taylor Decomposition at the input itself, i.e. its linearisation at ``x`` with
  the bias kept (Prop. 3.1): ``R_x = x ⊙ (R − s ⊙ Σ_j R_j)``, ``s = softmax(x)``;
* bilinear products (``q kᵀ``, ``A v``): the ε-rule over the sum and the uniform rule over each
  product's factors (Prop. 3.3): with ``O = a b`` and ``S = R / stab(2·O)``,
  ``R_a = a ⊙ (S bᵀ)`` and ``R_b = b ⊙ (aᵀ S)``. A factor that is a constant (no gradient)
  gets nothing and the other gets all of it: the uniform rule over one variable input
  (Prop. 3.2, Eq. 7);
* LayerNorm: the division by the standard deviation is the identity rule, i.e. σ is a constant
  (Prop. 3.4), and the remaining affine map ``w ⊙ (x − mean(x)) / σ + b`` gets the
  ε-rule (Eq. 8); the bias takes its share, as a linear layer's does;
* element-wise activations (GELU, ...): the identity rule (Eq. 9), which is the engine's Pass;
  linear layers ε, residual sums Norm, as for CNNs (:mod:`~medaudit.models.xai.rules`).

**CP-LRP** (Ali et al., "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML 2022; the variant AttnLRP compares with, §4): the attention matrix is held
constant (the gradient is stopped through q and k), so all relevance of ``A v`` goes to ``v``
by the ε-rule and none reaches q, k or the softmax.

Notation: ``stab(z) = z + ε·sign(z)`` with ``sign(0) = +1`` (:func:`rules.stabilize`), ε = 1e-6.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medaudit.models.xai.layers import AttentionCore, TokenMean
from medaudit.models.xai.rules import EPSILON, stabilize

# --------------------------------------------------------------------------- products


class _UniformMatMulFn(torch.autograd.Function):
    """``O = scale · a @ b`` with the ε + uniform rule (Prop. 3.3), see the module docstring.

    ``scale`` is a constant factor of every product term, so it appears in each term's share and
    in ``O`` alike. Only the inputs that need a gradient count as variable factors.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
        out = torch.matmul(a, b)
        return out if scale == 1.0 else out.mul_(scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        a, b, scale, eps = inputs
        ctx.save_for_backward(a, b, output)
        ctx.scale, ctx.eps = scale, eps

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b, out = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        n_variable = int(need_a) + int(need_b)
        if n_variable == 0:
            return None, None, None, None
        s = r / stabilize(out * n_variable, ctx.eps)
        if ctx.scale != 1.0:
            s = s * ctx.scale
        rel_a = torch.matmul(s, b.transpose(-2, -1)).mul_(a) if need_a else None
        rel_b = torch.matmul(a.transpose(-2, -1), s).mul_(b) if need_b else None
        return rel_a, rel_b, None, None


class _SoftmaxFn(torch.autograd.Function):
    """Softmax over the last dim by its linearisation at the input (Prop. 3.1):
    ``R_x = x ⊙ (R − s ⊙ Σ_j R_j)``. Not conservative: the bias of the linearisation keeps a part."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.softmax(dim=-1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        (x,) = inputs
        ctx.save_for_backward(x, output)

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> torch.Tensor:
        x, s = ctx.saved_tensors
        return (r - s * r.sum(-1, keepdim=True)).mul_(x)


# --------------------------------------------------------------------------- attention


class AttnLRPAttention(nn.Module):
    """Replaces an :class:`~medaudit.models.xai.layers.AttentionCore`: AttnLRP through
    ``softmax(scale · q kᵀ) v`` (uniform rule on both products, softmax linearised at its input)."""

    def __init__(self, core: AttentionCore, eps: float = EPSILON) -> None:
        super().__init__()
        self.scale, self.eps = core.scale, eps

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        logits = _UniformMatMulFn.apply(q, k.transpose(-2, -1), self.scale, self.eps)
        return _UniformMatMulFn.apply(_SoftmaxFn.apply(logits), v, 1.0, self.eps)


class CPLRPAttention(nn.Module):
    """Replaces an :class:`~medaudit.models.xai.layers.AttentionCore`: CP-LRP, the attention
    matrix a constant (no relevance to q and k), ``v`` gets all of ``A v``'s relevance by ε."""

    def __init__(self, core: AttentionCore, eps: float = EPSILON) -> None:
        super().__init__()
        self.scale, self.eps = core.scale, eps

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            attn = torch.matmul(q, k.transpose(-2, -1)).mul_(self.scale).softmax(dim=-1)
        return _UniformMatMulFn.apply(attn, v, 1.0, self.eps)


# --------------------------------------------------------------------------- LayerNorm


class _LayerNormFn(torch.autograd.Function):
    """LayerNorm over the last dim with σ held constant (Prop. 3.4) and ε on the affine rest.

    ``y = w ⊙ (x − μ)/σ + b``; with ``S = R / stab(y)`` and ``g = w ⊙ S``:
    ``R_x = x ⊙ (g − mean(g)) / σ``, the ε-rule of the linear map ``x ↦ w ⊙ (x − μ)/σ`` (its
    Jacobian ``diag(w/σ)(I − 11ᵀ/n)``) with ``b`` in the denominator.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, norm_eps: float, eps: float
    ) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], w, b, norm_eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, w, _, norm_eps, eps = inputs
        sigma = (x.var(-1, unbiased=False, keepdim=True) + norm_eps).sqrt()
        ctx.save_for_backward(x / sigma, w, output)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_over_sigma, w, y = ctx.saved_tensors
        g = r / stabilize(y, ctx.eps)
        if w is not None:
            g = g.mul_(w)
        return (g - g.mean(-1, keepdim=True)).mul_(x_over_sigma), None, None, None, None


class LayerNormRule(nn.Module):
    """A LayerNorm (over the last dim) whose backward is AttnLRP's identity rule (Prop. 3.4)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, norm: nn.LayerNorm, eps: float = EPSILON) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"LayerNormRule normalises over the last dim only; got {norm.normalized_shape}")
        w, b = norm.weight, norm.bias
        self.register_buffer("weight", None if w is None else w.detach().clone())
        self.register_buffer("bias", None if b is None else b.detach().clone())
        self.norm_eps, self.eps = norm.eps, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LayerNormFn.apply(x, self.weight, self.bias, self.norm_eps, self.eps)


# --------------------------------------------------------------------------- token pooling


class _NormTokenMeanFn(torch.autograd.Function):
    """Norm on the mean over tokens ``y = mean_t x[:, t]`` (t ≥ start): ``R_t = (x_t / n) R / stab(y)``;
    the tokens before ``start`` (class, register tokens) get none."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, start: int, eps: float) -> torch.Tensor:
        return x[:, start:].mean(1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, start, eps = inputs
        share = x / (x.shape[1] - start)
        share[:, :start] = 0
        ctx.save_for_backward(share, output)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        share, y = ctx.saved_tensors
        return (r / stabilize(y, ctx.eps)).unsqueeze(-2).mul(share), None, None


class NormTokenMean(nn.Module):
    """Replaces :class:`~medaudit.models.xai.layers.TokenMean`: the Norm rule of average pooling."""

    def __init__(self, pool: TokenMean, eps: float = EPSILON) -> None:
        super().__init__()
        self.start, self.eps = pool.start, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NormTokenMeanFn.apply(x, self.start, self.eps)
