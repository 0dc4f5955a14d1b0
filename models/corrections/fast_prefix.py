"""A faster stand-in for the frozen part of a network during fine-tuning (method.md §4.1, §11.9).

Every fine-tuning correction freezes the network up to and including ℓ, with those BatchNorms in
eval mode, so the frozen prefix is a fixed function. :func:`finetune
<models.corrections.base.finetune>` runs its steps on a *view* of the network built here, in
which that prefix is computed more cheaply and everything after ℓ is the very same modules (the
same Parameter and buffer objects) as in the standard network. The network that fine-tuning
returns, saves and exports is still the standard one; its prefix is never touched.

Two things make the view faster; neither changes what is computed beyond float round-off:

* **Eval-mode BatchNorm folded into the conv before it** (exactly the canonizers' merge,
  :func:`medaudit.models.xai.canonizers.merge_batchnorm`, in float64). On RRR's step (resnet18 at 128 px,
  batch 16, 2 CPU threads) the frozen BatchNorms cost ~12 % of the step: the forward, the
  input-gradient and the double backward through each. Folding them gave 860 → 756 ms per step,
  logits equal within 4e-8.
* **Frozen convs whose double backward is one convolution.** RRR differentiates an input gradient
  (``create_graph=True``), so the loss' backward runs the backward of every conv's backward.
  torch (2.14, CPU) does that in ``_convolution_double_backward``, which computes the
  weight-gradient-shaped convolution even when the weight has ``requires_grad=False``: a frozen
  Conv2d(64, 64, 3) on (16, 64, 32, 32) spends 16 of the node's 23 ms on that unused gW, and the
  ``ConvolutionBackwardBackward0`` nodes took ~283 ms of an ~800 ms RRR step. :class:`FrozenConv2d`
  runs ``F.conv2d`` forward and writes its input gradient as ``F.conv_transpose2d(grad, W)`` with
  differentiable ops, so the double backward is that transposed conv's input gradient: one
  convolution, no gW.

Only patterns known to be a conv feeding straight into a BatchNorm are folded: the conv/BN pairs
of timm's and torchvision's ResNet blocks, the ResNet stems (timm's deep stem included), and
consecutive ``[conv, BN]`` children of an ``nn.Sequential`` (downsample branches, resnet50d's
``[AvgPool, conv, BN]``, ``vgg*_bn`` features). Anything else in the prefix stays as it is: correct,
only not faster.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import resnet as timm_resnet
from torch import nn
from torchvision.models import resnet as tv_resnet

from medaudit.models.xai.canonizers import merge_batchnorm

#: exact block class -> its (conv, BN) attribute pairs; each conv feeds its BN directly.
_BLOCK_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    timm_resnet.BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    timm_resnet.Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    tv_resnet.BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    tv_resnet.Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}
#: exact network classes whose stem is ``conv1`` (a conv or a Sequential ending in one) then ``bn1``.
_STEM_ROOTS: tuple[type, ...] = (timm_resnet.ResNet, tv_resnet.ResNet)


class _FrozenConvFn(torch.autograd.Function):
    """``F.conv2d`` with a fixed weight; the input gradient is a differentiable transposed conv."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> torch.Tensor:
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.in_hw = tuple(x.shape[-2:])
        ctx.out_hw = tuple(out.shape[-2:])
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        k = weight.shape[-2:]
        # A strided conv drops the last rows/columns that do not fill a window; output_padding
        # gives them back (as zeros) so the gradient has the input's exact shape.
        output_padding = tuple(
            ctx.in_hw[i] - ((ctx.out_hw[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
            for i in range(2)
        )
        gx = F.conv_transpose2d(grad, weight, None, stride, padding, output_padding, groups, dilation)
        return gx, None, None, None, None, None, None


class FrozenConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` (zero padding) whose double backward costs one convolution.

    Weight and bias are non-persistent buffers sharing the conv's storage (:func:`fast_view` builds
    them from its own copy of the prefix): they never train, never reach an optimiser and never
    appear in a ``state_dict``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not supports(conv):
            raise ValueError(f"FrozenConv2d supports nn.Conv2d with numeric zero padding, not {conv}")
        self.register_buffer("weight", conv.weight.detach(), persistent=False)
        bias = None if conv.bias is None else conv.bias.detach()
        self.register_buffer("bias", bias, persistent=False)
        self.stride: tuple[int, int] = tuple(conv.stride)  # type: ignore[assignment]
        self.padding: tuple[int, int] = tuple(conv.padding)  # type: ignore[assignment]
        self.dilation: tuple[int, int] = tuple(conv.dilation)  # type: ignore[assignment]
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _FrozenConvFn.apply(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, "
            f"kernel_size={tuple(self.weight.shape[-2:])}, stride={self.stride}, padding={self.padding}"
        )


def supports(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain 2-D conv that :class:`FrozenConv2d` reproduces exactly."""
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.weight.ndim == 4
    )


def _is_eval_foldable_bn(m: nn.Module) -> bool:
    return type(m) is nn.BatchNorm2d and m.running_mean is not None and m.running_var is not None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def conv_bn_pairs(model: nn.Module) -> Iterator[tuple[str, str]]:
    """``(conv path, BN path)`` of every recognised conv that feeds a BatchNorm directly."""
    for path, module in model.named_modules():
        if type(module) in _BLOCK_PAIRS:
            for conv, bn in _BLOCK_PAIRS[type(module)]:
                yield _join(path, conv), _join(path, bn)
        elif type(module) in _STEM_ROOTS:
            stem = module.conv1
            if isinstance(stem, nn.Sequential) and len(stem):
                yield _join(path, f"conv1.{len(stem) - 1}"), _join(path, "bn1")
            else:
                yield _join(path, "conv1"), _join(path, "bn1")
        elif type(module) is nn.Sequential:
            names = list(module._modules)
            for a, b in zip(names, names[1:], strict=False):
                yield _join(path, a), _join(path, b)


def _clone_except(module: nn.Module, path: str, frozen: set[str]) -> nn.Module:
    """``module`` itself if nothing in it is frozen; a deep copy if all of it is; else a shallow
    copy (shared parameters and buffers) whose children are handled the same way."""
    if path in frozen:
        return copy.deepcopy(module)
    if path and not any(n.startswith(path + ".") for n in frozen):
        return module
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {
        name: None if child is None else _clone_except(child, _join(path, name), frozen)
        for name, child in module._modules.items()
    }
    return clone


def fast_view(net: nn.Module, frozen_names: list[str]) -> tuple[nn.Module, list[nn.Module], dict[str, int]]:
    """The network with its frozen modules replaced by faster equivalents; see the module docstring.

    Args:
        net: The network being fine-tuned, already frozen (:func:`~models.corrections.base.freeze_up_to`).
        frozen_names: Its frozen module names (:func:`~models.corrections.base.frozen_module_names`).

    Returns:
        ``(view, frozen modules of the view, counts)``. Every module of ``net`` outside the frozen
        names is shared with the view, so training the view trains ``net``; call ``view.train()``
        and then put the returned frozen modules in eval mode, as for ``net``. ``counts`` says how
        many BatchNorms were folded and how many convs replaced.
    """
    frozen = set(frozen_names)
    if any(p.requires_grad for n in frozen for p in net.get_submodule(n).parameters(recurse=False)):
        raise ValueError("fast_view needs the frozen modules' parameters frozen (freeze_up_to first)")
    view = _clone_except(net, "", frozen)
    folded = replaced = 0
    for conv_path, bn_path in list(conv_bn_pairs(view)):
        if conv_path not in frozen or bn_path not in frozen:
            continue
        conv, bn = view.get_submodule(conv_path), view.get_submodule(bn_path)
        # frozen BatchNorms always run in eval mode (keep_frozen_eval), so folding them is exact
        if not supports(conv) or not _is_eval_foldable_bn(bn) or conv.out_channels != bn.num_features:
            continue
        merge_batchnorm(conv, bn)
        _set(view, bn_path, nn.Identity())
        folded += 1
    for path in sorted(frozen):
        module = view.get_submodule(path)
        if supports(module):
            assert isinstance(module, nn.Conv2d)
            _set(view, path, FrozenConv2d(module))
            replaced += 1
    view_frozen = [view.get_submodule(n) for n in frozen_names]
    return view, view_frozen, {"folded_bn": folded, "frozen_convs": replaced}


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)
