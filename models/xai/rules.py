"""LRP rules as custom autograd functions: zennit 0.5.1's ``EpsilonPlusFlat`` (method.md §3.1).

Each rule is a module that replaces one layer of a canonized model. Its forward computes the
layer's ordinary output; its backward receives the relevance ``R`` at the layer output and
returns the relevance at the layer input, with a small, fixed number of tensor ops. No hooks,
no re-running of modules with temporarily swapped parameters: modified weights (``w⁺``, ``w⁻``,
``b⁺``) are computed once when the rule is built.

The backward functions are written so that ``torch.autograd.grad(..., is_grads_batched=True)``
can run several relevance seeds through one backward (``generate_vmap_rule``): everything saved
from the forward is unbatched, only ``R`` carries the seed dimension.

Notation (method.md §3.1): ``x`` layer input, ``w``/``b`` weight and bias, ``z`` the
rule-specific pre-activation, ``s = R / stab(z)`` and ``stab(z) = z + ε·sign(z)`` with
``sign(0) = +1`` (zennit's ``stabilize``), ``ε = 1e-6``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
from torch import nn

#: zennit's default stabiliser for every rule of ``EpsilonPlusFlat`` (method.md §3.1).
EPSILON = 1e-6

ConvArgs = tuple[list[int], list[int], list[int], int]  # stride, padding, dilation, groups


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + ε·sign(z)`` with ``sign(0) = +1``, exactly as ``zennit.core.stabilize``.

    zennit writes ``where(z >= 0, z + ε, z - ε)``: four full-size temporaries. ``±ε + z`` is the
    same IEEE sum (addition commutes, and ``-0.0 >= 0`` picks ``+ε`` in both) with two. On the
    CPU every temporary of a large activation is a fresh allocation that faults its pages in, so
    this is measurably faster (benchmarks/lrp.py); tests compare it with zennit's form.
    """
    plus, minus = z.new_full((), eps), z.new_full((), -eps)  # 0-d, z's dtype: ε exact in float64
    return torch.where(z >= 0, plus, minus).add_(z)


# --------------------------------------------------------------------------- conv helpers


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, args: ConvArgs) -> torch.Tensor:
    stride, padding, dilation, groups = args
    return torch.convolution(x, w, b, stride, padding, dilation, False, [0] * len(stride), groups)


def _conv_transpose(
    s: torch.Tensor, input_shape: Sequence[int], w: torch.Tensor, args: ConvArgs
) -> torch.Tensor:
    """The adjoint of ``_conv`` w.r.t. its input: ``Σ_j w_ij s_j`` for every input position i."""
    stride, padding, dilation, groups = args
    shape_like = s.new_empty(1).expand(input_shape)  # only its shape is read
    return torch.ops.aten.convolution_backward(
        s, shape_like, w, None, stride, padding, dilation, False, [0] * len(stride), groups,
        (True, False, False),
    )[0]  # fmt: skip


# --------------------------------------------------------------------------- prepacked CPU kernels

#: ``MEDAUDIT_LRP_PACKED=0`` turns the prepacked CPU kernels off (plain ``aten`` convolutions).
PACKED_ENV = "MEDAUDIT_LRP_PACKED"


def packed_kernels_usable(x: torch.Tensor, w: torch.Tensor, args: ConvArgs) -> bool:
    """Whether :class:`PackedConv` can run a conv of ``w`` on ``x``: a 2-d float32 conv on the CPU
    with oneDNN present, enabled, and not turned off by ``MEDAUDIT_LRP_PACKED=0``."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.dim() == 4
        and w.dim() == 4
        and args[3] == 1
        and torch.backends.mkldnn.is_available()
        and bool(torch.backends.mkldnn.enabled)
        and os.environ.get(PACKED_ENV, "1").strip() != "0"
    )


class PackedConv:
    """One rule weight's convolution and its adjoint as oneDNN kernels with prepacked weights.

    Eager ``aten`` convolutions on the CPU reorder the weight into oneDNN's blocked layout on every
    call, and run NCHW activations through layout reorders too. For the small batches an auditor
    sees that is a large share of each call (ResNet-18 at 128 px, batch 3, one thread: a
    512-channel 4×4 conv takes 1.7 ms instead of 2.5, a 64-channel 32×32 one 2.0 instead of 3.3).
    The whole engine, 2 seeds (benchmarks/results/lrp_cpu_packed.md): 1.18× at batch 2, 1.14× at
    4, 1.09× at 16 against the same engine on aten. Here the weight is reordered once per input size
    (``mkldnn._reorder_convolution_weight``, the weights inductor's CPU freezing pass makes) and the
    activations are channels-last, the layout those kernels read without a reorder. The same sums
    in another order: results agree with the ``aten`` path to float32 rounding (tests).

    Only used where :func:`packed_kernels_usable` says so; everything else takes ``aten``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, args: ConvArgs) -> None:
        self.weight, self.bias, self.args = weight, bias, args
        self._fwd: dict[tuple[int, ...], torch.Tensor] = {}
        #: per (output, input) shape: the packed transposed weight and its output padding
        self._adj: dict[tuple[int, ...], tuple[torch.Tensor, list[int]]] = {}

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x, w) + b`` for a channels-last ``x`` (the output is channels-last)."""
        stride, padding, dilation, groups = self.args
        key = tuple(x.shape[1:])
        packed = self._fwd.get(key)
        if packed is None:
            packed = self._fwd[key] = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, padding, stride, dilation, groups, list(x.shape)
            )
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, self.bias, padding, stride, dilation, groups, "none", [], ""
        )

    def adjoint(self, s: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
        """``Σ_j w_ij s_j`` for every input position i (what :func:`_conv_transpose` computes)."""
        stride, padding, dilation, groups = self.args
        key = (*s.shape[1:], *input_shape[2:])
        cached = self._adj.get(key)
        if cached is None:
            # the transposed conv's output padding that gives back exactly the input's spatial size
            out_pad = [
                int(n) - ((int(m) - 1) * st - 2 * p + d * (kk - 1) + 1)
                for n, m, st, p, d, kk in zip(
                    input_shape[2:],
                    s.shape[2:],
                    stride,
                    padding,
                    dilation,
                    self.weight.shape[2:],
                    strict=True,
                )
            ]
            packed = torch.ops.mkldnn._reorder_convolution_transpose_weight(
                self.weight, padding, out_pad, stride, dilation, groups, list(s.shape)
            )
            cached = self._adj[key] = (packed, out_pad)
        packed, out_pad = cached
        return packed_adjoint(s, packed, padding, out_pad, stride, dilation)


@torch.library.custom_op("medaudit::packed_adjoint", mutates_args=())
def packed_adjoint(
    s: torch.Tensor,
    packed: torch.Tensor,
    padding: list[int],
    out_pad: list[int],
    stride: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """The transposed convolution of :meth:`PackedConv.adjoint` (a custom op for its vmap rule)."""
    s = s.contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._convolution_transpose_pointwise(
        s, packed, None, padding, out_pad, stride, dilation, 1, "none", [], ""
    )


@packed_adjoint.register_vmap
def _packed_adjoint_vmap(
    info: Any, in_dims: tuple[Any, ...], s: torch.Tensor, packed: torch.Tensor, *conv: list[int]
) -> tuple[torch.Tensor, int | None]:
    """Several seeds (``is_grads_batched``) go through as one larger batch, not one call per
    seed: vmap's fallback for an op without a rule calls it per seed and stacks the results."""
    if in_dims[1] is not None:
        raise NotImplementedError("packed_adjoint: the packed weight cannot carry a vmap dimension")
    if in_dims[0] is None:
        return packed_adjoint(s, packed, *conv), None
    s = s.movedim(in_dims[0], 0)
    seeds, batch = s.shape[:2]
    out = packed_adjoint(s.reshape(seeds * batch, *s.shape[2:]), packed, *conv)
    return out.reshape(seeds, batch, *out.shape[1:]), 0


def conv_args(conv: nn.modules.conv._ConvNd) -> ConvArgs:
    """Stride, padding, dilation and groups of ``conv`` in the form the aten ops take."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(
            f"LRP rules need numeric zero padding; {conv} has padding={conv.padding!r}, "
            f"padding_mode={conv.padding_mode!r}"
        )
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


# --------------------------------------------------------------------------- z+ (conv)


class _ZPlusFn(torch.autograd.Function):
    """z⁺ = α1β0 allowing negative inputs (method.md §3.1, zennit ``ZPlus``).

    ``R_i = x⁺_i Σ_j w⁺_ij s_j + x⁻_i Σ_j w⁻_ij s_j`` with
    ``s_j = R_j / stab(Σ_i x⁺_i w⁺_ij + x⁻_i w⁻_ij + b⁺_j)``.
    When the input has no negative entries (the usual case after a ReLU) the x⁻ terms are exactly
    zero and are skipped: one conv and one transposed conv per backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        w_pos: torch.Tensor,
        w_neg: torch.Tensor,
        b_pos_eps: torch.Tensor,
        args: ConvArgs,
        nonnegative: bool,
        packed: ZPlusKernels | None,
    ) -> torch.Tensor:
        return _conv(x, w, b, args) if packed is None else packed.conv.conv(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, _, _, w_pos, w_neg, b_pos_eps, args, nonnegative, packed = inputs
        ctx.save_for_backward(x, w_pos, w_neg, b_pos_eps)
        ctx.args, ctx.nonnegative, ctx.packed = args, nonnegative, packed

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w_pos, w_neg, b_pos_eps = ctx.saved_tensors
        k: ZPlusKernels | None = ctx.packed
        args = ctx.args

        # The same four operations either way: prepacked oneDNN kernels on the CPU (PackedConv),
        # aten's convolution and its adjoint elsewhere.
        def z_pos(v: torch.Tensor) -> torch.Tensor:
            return _conv(v, w_pos, b_pos_eps, args) if k is None else k.pos.conv(v)

        def z_neg(v: torch.Tensor) -> torch.Tensor:
            return _conv(v, w_neg, None, args) if k is None else k.neg.conv(v)

        def adj_pos(v: torch.Tensor) -> torch.Tensor:
            return _conv_transpose(v, x.shape, w_pos, args) if k is None else k.pos.adjoint(v, x.shape)

        def adj_neg(v: torch.Tensor) -> torch.Tensor:
            return _conv_transpose(v, x.shape, w_neg, args) if k is None else k.neg.adjoint(v, x.shape)

        # z⁺ ≥ 0, so stab(z⁺) = z⁺ + ε; the ε is folded into the bias b⁺ + ε (see ZPlusConv).
        # In-place products (``mul_``/``add_``) only on tensors this backward just made; the
        # saved x and the incoming r are never written.
        if ctx.nonnegative:
            rel = adj_pos(r / z_pos(x)).mul_(x)
            return rel, None, None, None, None, None, None, None, None
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        s = r / z_pos(x_pos).add_(z_neg(x_neg))
        rel = adj_pos(s).mul_(x_pos).add_(adj_neg(s).mul_(x_neg))
        return rel, None, None, None, None, None, None, None, None


class ZPlusKernels:
    """A z⁺ layer's three convolutions as :class:`PackedConv` (``w, b``; ``w⁺, b⁺ + ε``; ``w⁻``)."""

    def __init__(self, layer: ZPlusConv) -> None:
        self.conv = PackedConv(layer.weight, layer.bias, layer.args)
        self.pos = PackedConv(layer.weight_pos, layer.bias_pos_eps, layer.args)
        self.neg = PackedConv(layer.weight_neg, None, layer.args)
        self.source = ZPlusKernels.source_of(layer)

    @staticmethod
    def source_of(layer: ZPlusConv) -> tuple[Any, ...]:
        """What the packed weights were made from: rebuilt when a buffer moves or is written."""
        bufs = (layer.weight, layer.bias, layer.weight_pos, layer.weight_neg, layer.bias_pos_eps)
        return tuple((b.data_ptr(), b._version) if b is not None else None for b in bufs)


class ZPlusConv(nn.Module):
    """A convolution whose backward is the z⁺ rule (every conv but the first, method.md §3.1)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_pos: torch.Tensor
    weight_neg: torch.Tensor
    bias_pos_eps: torch.Tensor

    def __init__(self, conv: nn.modules.conv._ConvNd, eps: float = EPSILON) -> None:
        super().__init__()
        self.args = conv_args(conv)
        self.eps = eps
        w, b = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
        self.register_buffer("weight", w.clone())
        self.register_buffer("bias", None if b is None else b.clone())
        self.register_buffer("weight_pos", w.clamp(min=0))
        self.register_buffer("weight_neg", w.clamp(max=0))
        # zennit zeroes the bias of the x⁻w⁻ term; only b⁺ enters the denominator. Its
        # stabiliser is folded in: stab(z⁺) = z⁺ + ε because z⁺ ≥ 0.
        b_pos = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b.clamp(min=0)
        self.register_buffer("bias_pos_eps", b_pos + eps)
        #: whether this layer's input had no negative entries last time (see :func:`input_is_nonnegative`)
        self.seen_nonnegative: bool | None = None

    def packed(self, x: torch.Tensor) -> ZPlusKernels | None:
        """This layer's prepacked CPU kernels for ``x``, or ``None`` where they do not apply."""
        if not packed_kernels_usable(x, self.weight, self.args):
            return None
        kernels: ZPlusKernels | None = self.__dict__.get("_packed")
        if kernels is None or kernels.source != ZPlusKernels.source_of(self):
            kernels = self.__dict__["_packed"] = ZPlusKernels(self)
        return kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No relevance flows back into an input that needs no gradient (the layers below the cut
        # of explain(heatmaps=False)): the sign, read only by the backward, is not checked.
        nonnegative = input_is_nonnegative(self, x) if x.requires_grad else True
        packed = self.packed(x)
        if packed is not None:
            x = x.contiguous(memory_format=torch.channels_last)  # no copy once the first layer did it
        return _ZPlusFn.apply(
            x,
            self.weight,
            self.bias,
            self.weight_pos,
            self.weight_neg,
            self.bias_pos_eps,
            self.args,
            nonnegative,
            packed,
        )


# --------------------------------------------------------------------------- sign audit

#: ``(layer, min of its input)`` for every z⁺ layer that assumed a non-negative input this call.
_SIGN_AUDIT: ContextVar[list[tuple[ZPlusConv, torch.Tensor]] | None] = ContextVar(
    "medaudit_lrp_sign_audit", default=None
)


def sync_is_costly(x: torch.Tensor) -> bool:
    """Reading a value of ``x`` on the host stalls an asynchronous device (not the CPU)."""
    return x.device.type != "cpu"


def input_is_nonnegative(layer: ZPlusConv, x: torch.Tensor) -> bool:
    """Whether z⁺ may skip its x⁻ terms, without a device sync per layer on accelerators.

    On CPU the check is exact and cheap. On an accelerator, inside :func:`sign_audit`, a layer
    that saw a non-negative input before assumes it again and records ``x.min()`` for one
    verification after the backward; anywhere else it synchronises and checks.
    """
    audit = _SIGN_AUDIT.get()
    if audit is not None and layer.seen_nonnegative and sync_is_costly(x):
        audit.append((layer, x.detach().amin()))
        return True
    layer.seen_nonnegative = bool(x.numel() == 0 or x.min() >= 0)
    return layer.seen_nonnegative


@contextlib.contextmanager
def sign_audit() -> Iterator[Callable[[], bool]]:
    """Collect the sign assumptions of z⁺ layers; the yielded ``verify()`` says whether all held.

    ``verify()`` synchronises once; a layer whose assumption failed forgets it, so running the
    same computation again is exact.
    """
    records: list[tuple[ZPlusConv, torch.Tensor]] = []
    token = _SIGN_AUDIT.set(records)

    def verify() -> bool:
        if not records:
            return True
        held = (torch.stack([m for _, m in records]) >= 0).tolist()
        for (layer, _), ok in zip(records, held, strict=True):
            layer.seen_nonnegative = layer.seen_nonnegative and ok
        return all(held)

    try:
        yield verify
    finally:
        _SIGN_AUDIT.reset(token)


# --------------------------------------------------------------------------- Flat (first layer)


class _FlatConvFn(torch.autograd.Function):
    """Flat (method.md §3.1, zennit ``Flat``): relevance spread uniformly over the receptive field.

    ``R_i = Σ_{j ∋ i} R_j / stab(n_j)`` where ``n_j`` counts the (non-padding) inputs of output j.
    The result is the same for every input channel; with ``groups == 1`` it is computed on one
    channel and broadcast.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, args: ConvArgs, eps: float
    ) -> torch.Tensor:
        return _conv(x, w, b, args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, w, _, args, eps = inputs
        ctx.input_shape, ctx.kernel = x.shape, w.shape
        ctx.args, ctx.eps = args, eps

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        shape, kernel, args = ctx.input_shape, ctx.kernel, ctx.args
        stride, padding, dilation, groups = args
        single = (stride, padding, dilation, 1)
        kernel_ones = r.new_ones((1, 1, *kernel[2:]))
        taps = _conv(r.new_ones((1, 1, *shape[2:])), kernel_ones, None, single)  # zero padding: not counted
        n = stabilize(taps * (shape[1] // groups), ctx.eps)  # n_j = taps · input channels per group
        if groups == 1:
            # Σ_j R_j / n_j over the output channels, summed before dividing: n_j is the same for
            # every channel, so this is the same sum, and the division runs on one channel
            # instead of all of them (on the CPU a broadcast over channels-last relevance).
            one_channel = _conv_transpose(
                r.sum(1, keepdim=True) / n, (shape[0], 1, *shape[2:]), kernel_ones, single
            )
            rel = one_channel.expand(shape)
        else:
            rel = _conv_transpose(r / n, shape, r.new_ones(kernel), args)
        return rel, None, None, None, None


class _RuleConv(nn.Module):
    """A frozen copy of a convolution whose forward runs the autograd function ``_fn``."""

    _fn: ClassVar[type[torch.autograd.Function]]
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, conv: nn.modules.conv._ConvNd, eps: float = EPSILON) -> None:
        super().__init__()
        self.args = conv_args(conv)
        self.eps = eps
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn.apply(x, self.weight, self.bias, self.args, self.eps)


class FlatConv(_RuleConv):
    """A convolution whose backward is the Flat rule (the first conv/linear, method.md §3.1)."""

    _fn = _FlatConvFn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if packed_kernels_usable(x, self.weight, self.args):
            # the layers above run channels-last (PackedConv); from here on everything is
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class _EpsilonConvFn(torch.autograd.Function):
    """ε rule on a convolution (method.md §3.1, zennit ``Epsilon``):
    ``R_i = x_i Σ_j w_ji R_j / stab(z_j)``, the adjoint convolution of ``R / stab(z)`` times x."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, args: ConvArgs, eps: float
    ) -> torch.Tensor:
        return _conv(x, w, b, args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, w, _, args, eps = inputs
        ctx.save_for_backward(x, w, output)
        ctx.args, ctx.eps = args, eps

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, z = ctx.saved_tensors
        rel = _conv_transpose(r / stabilize(z, ctx.eps), x.shape, w, ctx.args).mul_(x)
        return rel, None, None, None, None


class EpsilonConv(_RuleConv):
    """A convolution whose backward is the ε rule: a ViT's patch embedding under the ``epsilon``
    composite (:mod:`medaudit.models.xai.composite`), where Flat would make every 16×16 patch one
    uniform block of the heatmap."""

    _fn = _EpsilonConvFn


class _FlatLinearFn(torch.autograd.Function):
    """Flat for a linear first layer: ``R_i = Σ_j R_j / stab(d_in)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
        return nn.functional.linear(x, w, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, _, _, eps = inputs
        ctx.input_shape, ctx.eps = x.shape, eps

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        d_in = ctx.input_shape[-1]
        total = r.sum(-1, keepdim=True) / stabilize(r.new_tensor(float(d_in)), ctx.eps)
        return total.expand(*r.shape[:-1], d_in), None, None, None


class _RuleLinear(nn.Module):
    """A frozen copy of an ``nn.Linear`` whose forward runs the autograd function ``_fn``."""

    _fn: ClassVar[type[torch.autograd.Function]]

    def __init__(self, linear: nn.Linear, eps: float = EPSILON) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn.apply(x, self.weight, self.bias, self.eps)


class FlatLinear(_RuleLinear):
    """A linear layer whose backward is the Flat rule (if it is the model's first layer)."""

    _fn = _FlatLinearFn


# --------------------------------------------------------------------------- ε (linear)


class _EpsilonFn(torch.autograd.Function):
    """ε rule (method.md §3.1, zennit ``Epsilon``): ``R_i = x_i Σ_j w_ji R_j / stab(z_j)``, z = wx + b."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
        return nn.functional.linear(x, w, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, w, _, eps = inputs
        ctx.save_for_backward(x, w, output)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, z = ctx.saved_tensors
        return torch.matmul(r / stabilize(z, ctx.eps), w).mul_(x), None, None, None


class EpsilonLinear(_RuleLinear):
    """A linear layer whose backward is the ε rule (every ``nn.Linear`` but a first layer)."""

    _fn = _EpsilonFn


# --------------------------------------------------------------------------- Norm (sums, avg-pools)


class _NormSumFn(torch.autograd.Function):
    """Norm on a residual sum (method.md §3.1, §11.1): ``R_a = a·R / stab(a + b)``, same for b."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        return a + b

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        a, b, eps = inputs
        ctx.save_for_backward(a, b, output)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b, z = ctx.saved_tensors
        s = r / stabilize(z, ctx.eps)
        need_a, need_b, _ = ctx.needs_input_grad
        rel_b = b * s if need_b else None
        return (s.mul_(a) if need_a else None), rel_b, None  # s is ours: a's share reuses it


class NormSum(nn.Module):
    """Replaces :class:`~models.xai.layers.ResidualSum`; backward is the Norm rule."""

    def __init__(self, eps: float = EPSILON) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _NormSumFn.apply(a, b, self.eps)


def _avg_pool_adjoint(pool: nn.Module, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The adjoint (vector-Jacobian product) of the linear map ``pool`` at ``x`` applied to ``s``."""
    if isinstance(pool, nn.AdaptiveAvgPool2d) and s.shape[-2:] == (1, 1):
        return s.expand(*s.shape[:-2], *x.shape[-2:]) / (x.shape[-1] * x.shape[-2])
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return torch.ops.aten._adaptive_avg_pool2d_backward(s, x.expand(*s.shape[:-2], *x.shape[-2:]))
    if isinstance(pool, nn.AvgPool2d):
        return torch.ops.aten.avg_pool2d_backward(
            s, x.expand(*s.shape[:-2], *x.shape[-2:]), list(nn.modules.utils._pair(pool.kernel_size)),
            list(nn.modules.utils._pair(pool.stride)), list(nn.modules.utils._pair(pool.padding)),
            pool.ceil_mode, pool.count_include_pad, pool.divisor_override,
        )  # fmt: skip
    raise TypeError(f"no adjoint for {type(pool).__name__}")


class _NormPoolFn(torch.autograd.Function):
    """Norm on average pooling (method.md §3.1): ``R_i = x_i · Pᵀ(R / stab(P x))_i``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, pool: nn.Module, eps: float) -> torch.Tensor:
        return pool(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, pool, eps = inputs
        ctx.save_for_backward(x, output)
        ctx.pool, ctx.eps = pool, eps

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, z = ctx.saved_tensors
        rel = _avg_pool_adjoint(ctx.pool, x, r / stabilize(z, ctx.eps))
        return (rel.mul_(x) if rel.is_contiguous() else rel * x), None, None


class NormAvgPool(nn.Module):
    """An average pool (``AvgPool2d``, ``AdaptiveAvgPool2d``) whose backward is the Norm rule."""

    def __init__(self, pool: nn.Module, eps: float = EPSILON) -> None:
        super().__init__()
        if not isinstance(pool, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
            raise TypeError(
                f"NormAvgPool supports AvgPool2d and AdaptiveAvgPool2d, not {type(pool).__name__}"
            )
        self.pool = pool
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NormPoolFn.apply(x, self.pool, self.eps)


# --------------------------------------------------------------------------- Pass


class _PassFn(torch.autograd.Function):
    """Pass (method.md §3.1, zennit ``Pass``): the relevance at the output is the relevance at the input."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, fn: nn.Module) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, r: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return r, None


class PassRule(nn.Module):
    """Runs ``inner`` forward and passes relevance straight through (activations, attention)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PassFn.apply(x, self.inner)
