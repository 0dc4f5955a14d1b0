"""Canonizers: rewrite a copy of a model so that LRP rules apply to it (method.md §3.2, §11.1).

A canonizer never touches the model it is given: :func:`canonize` deep-copies it, freezes the
copy, and rewrites the copy in place. A canonized model computes the same function as the
original (up to float rounding), but

* every BatchNorm that follows a conv is merged into that conv, **exactly**:
  ``w' = w·γ/√(σ²+ε)``, ``b' = (b-μ)·γ/√(σ²+ε) + β`` and the BatchNorm is replaced by
  ``nn.Identity``. zennit 0.5.1's ``MergeBatchNorm`` instead resets the BatchNorm to
  ``μ=0, σ²=1, γ=1, β=0`` but leaves its ε, so its canonized model still divides by
  ``√(1+ε)`` after every merge (method.md §3.2, ~1e-5 relative per layer);
  ``tests/unit/test_canonizers.py`` shows the difference;
* residual additions become :class:`~models.xai.layers.ResidualSum` modules (Norm rule) with
  the block's last activation after the sum;
* squeeze-excitation is wrapped in :class:`~models.xai.layers.PassThrough` (Pass rule),
  concatenations become :class:`~models.xai.layers.Concat`; ViT attention is written out as an
  :class:`~models.xai.layers.AttentionCore` (AttnLRP / CP-LRP, :mod:`.vit_canonizers`);
* modules that are the identity at inference (timm ``DropPath``) become ``nn.Identity`` and
  timm's fused ``BatchNormAct2d`` is split into the merged BatchNorm and its activation, so the
  generic engine never meets an architecture's own layer types.

This module and :mod:`.vit_canonizers` (the ViTs, kept apart for their size) are the only ones of
the LRP engine that know architectures. Canonizers are looked up by
the id in ``ModelCfg.canonizer`` (or found by :func:`detect_canonizer`): ``"resnet"`` (timm
ResNet incl. the deep stem and avg-pool downsample of resnet-d, torchvision ResNet; basic and
bottleneck blocks), ``"vgg"`` (torchvision VGG, with or without BatchNorm), ``"densenet"``
(torchvision and timm DenseNet), ``"efficientnet"`` (timm EfficientNet/MobileNet-style blocks,
torchvision EfficientNet and MobileNetV3)
and ``"vit"`` (timm VisionTransformer with class-token or average pooling, torchvision
VisionTransformer).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import timm.layers as timm_layers
import timm.layers.squeeze_excite as timm_se
import timm.models._efficientnet_blocks as timm_eff_blocks
import timm.models.densenet as timm_densenet
import timm.models.efficientnet as timm_efficientnet
import timm.models.resnet as timm_resnet
import torch
import torchvision.models.densenet as tv_densenet
import torchvision.models.efficientnet as tv_efficientnet
import torchvision.models.mobilenetv3 as tv_mobilenetv3
import torchvision.models.resnet as tv_resnet
import torchvision.models.vgg as tv_vgg
from torch import nn
from torchvision.ops import SqueezeExcitation as TvSqueezeExcitation
from torchvision.ops import StochasticDepth

from medaudit.models.errors import CanonizerError, UnknownModelError
from medaudit.models.xai import vit_canonizers
from medaudit.models.xai.layers import Concat, PassThrough, ResidualSum

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MERGEABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --------------------------------------------------------------------------- generic pieces


@torch.no_grad()
def merge_batchnorm(layer: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode ``bn`` into ``layer`` (a conv or linear that feeds it), exactly.

    Computed in float64 and cast back, so the merged layer differs from ``bn(layer(x))`` only by
    the rounding of one float32 conv. The caller replaces ``bn`` by ``nn.Identity``.
    """
    if not isinstance(layer, _MERGEABLE) or not isinstance(bn, _BATCHNORMS):
        raise CanonizerError(f"cannot merge {type(bn).__name__} into {type(layer).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise CanonizerError(f"{bn} has no running statistics; only eval-mode BatchNorm can be merged")
    w = layer.weight.double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)  # ε stays inside the square root, where it belongs
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    layer.weight.copy_((w * scale.reshape(-1, *([1] * (w.ndim - 1)))).to(layer.weight.dtype))
    merged_bias = ((bias - mean) * scale + beta).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(merged_bias, requires_grad=False)
    else:
        layer.bias.copy_(merged_bias)


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if next(child.children(), None) is None:
            yield path, child
        else:
            yield from _leaves(child, path)


def merge_sequential_batchnorms(module: nn.Module) -> int:
    """Merge every BatchNorm that directly follows a conv/linear in module order; return the count.

    Module order equals forward order for ``nn.Sequential`` stacks (VGG, the ResNet stems and
    downsample branches), which is where this is used.
    """
    merged, previous = 0, None
    for path, leaf in list(_leaves(module)):
        if isinstance(leaf, _BATCHNORMS) and previous is not None and isinstance(previous, _MERGEABLE):
            merge_batchnorm(previous, leaf)
            _set_child(module, path, nn.Identity())
            merged += 1
        previous = leaf
    return merged


def _after_merge(bn: nn.Module) -> nn.Module:
    """What is left of ``bn`` once its affine map lives in the conv: nothing, or timm's fused act."""
    if isinstance(bn, timm_layers.BatchNormAct2d):
        drop, act = getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity())
        return act if isinstance(drop, nn.Identity) else nn.Sequential(drop, act)
    return nn.Identity()


def _merge_pair(owner: nn.Module, layer_name: str, bn_name: str) -> None:
    """Merge ``owner.<bn_name>`` into ``owner.<layer_name>``, the conv that feeds it (exact)."""
    layer, bn = getattr(owner, layer_name, None), getattr(owner, bn_name, None)
    if layer is None or bn is None or not isinstance(bn, _BATCHNORMS):
        return  # an optional conv/BN pair that this block does not have (or already merged)
    merge_batchnorm(layer, bn)
    setattr(owner, bn_name, _after_merge(bn))


def _require_no_batchnorm(model: nn.Module, kind: str) -> None:
    left = [name for name, m in model.named_modules() if isinstance(m, _BATCHNORMS)]
    if left:
        raise CanonizerError(
            f"canonizer {kind!r} left BatchNorm layers it could not merge: {', '.join(left[:5])}"
        )


# --------------------------------------------------------------------------- ResNet


class _TimmBasicBlock(timm_resnet.BasicBlock):
    """timm BasicBlock with the residual addition as a module and ``act2`` after it."""

    residual_sum: ResidualSum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(self.aa(x)))  # type: ignore[misc]  # timm annotates aa as None-able
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(self.residual_sum(shortcut, x))


class _TimmBottleneck(timm_resnet.Bottleneck):
    """timm Bottleneck with the residual addition as a module and ``act3`` after it."""

    residual_sum: ResidualSum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))  # type: ignore[misc]  # as above
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(self.residual_sum(shortcut, x))


class _TvBasicBlock(tv_resnet.BasicBlock):
    """torchvision BasicBlock with the residual addition as a module (zennit's ``Sum`` placement)."""

    residual_sum: ResidualSum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.residual_sum(identity, out))


class _TvBottleneck(tv_resnet.Bottleneck):
    """torchvision Bottleneck with the residual addition as a module (zennit's ``Sum`` placement)."""

    residual_sum: ResidualSum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.residual_sum(identity, out))


#: exact block class -> (canonical subclass, its conv/bn pairs)
_RESNET_BLOCKS: dict[type, tuple[type, tuple[tuple[str, str], ...]]] = {
    timm_resnet.BasicBlock: (_TimmBasicBlock, (("conv1", "bn1"), ("conv2", "bn2"))),
    timm_resnet.Bottleneck: (_TimmBottleneck, (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))),
    tv_resnet.BasicBlock: (_TvBasicBlock, (("conv1", "bn1"), ("conv2", "bn2"))),
    tv_resnet.Bottleneck: (_TvBottleneck, (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))),
}


def canonize_resnet(model: nn.Module) -> None:
    """timm and torchvision ResNets (method.md §3.2): merge BN, explicit residual sums; a timm
    SE-ResNet's squeeze-excitation as :class:`PassThrough`, the signal-only gate of the
    efficientnet family (:func:`canonize_efficientnet`)."""
    if not isinstance(model, timm_resnet.ResNet | tv_resnet.ResNet):
        raise CanonizerError(
            f"canonizer 'resnet' expects a timm or torchvision ResNet, got {type(model).__name__}"
        )
    # Stem: timm's deep stem is Sequential(conv, bn, act, conv, bn, act, conv), then bn1.
    if isinstance(model.conv1, nn.Sequential):
        merge_sequential_batchnorms(model.conv1)
        stem_conv = model.conv1[-1]
    else:
        stem_conv = model.conv1
    merge_batchnorm(stem_conv, model.bn1)
    model.bn1 = nn.Identity()
    blocks = 0
    for module in model.modules():
        spec = _RESNET_BLOCKS.get(type(module))
        if spec is None:
            continue
        canonical, pairs = spec
        for conv_name, bn_name in pairs:
            _merge_pair(module, conv_name, bn_name)
        if module.downsample is not None:  # conv→BN, or resnet-d's AvgPool→conv→BN
            merge_sequential_batchnorms(module.downsample)  # type: ignore[arg-type]
        module.__class__ = canonical
        module.add_module("residual_sum", ResidualSum())
        blocks += 1
    if blocks == 0:
        raise CanonizerError(f"no ResNet blocks of a known type in {type(model).__name__}")
    for path, module in list(model.named_modules()):
        if type(module) in (timm_se.SEModule, timm_se.EffectiveSEModule):
            _set_child(model, path, PassThrough(module))
    _require_no_batchnorm(model, "resnet")


# --------------------------------------------------------------------------- VGG


def canonize_vgg(model: nn.Module) -> None:
    """torchvision VGG (method.md §3.2): merge BN into the preceding conv (vgg*_bn); vgg11…19 have none.

    zennit's ``VGGCanonizer`` is ``SequentialMergeBatchNorm``; ``features`` is a Sequential, so
    module order is forward order.
    """
    if not isinstance(getattr(model, "features", None), nn.Sequential):
        raise CanonizerError(f"canonizer 'vgg' expects a torchvision VGG, got {type(model).__name__}")
    merge_sequential_batchnorms(model)
    _require_no_batchnorm(model, "vgg")


# --------------------------------------------------------------------------- DenseNet


class _DenseBlock:
    """Forward of a dense block (torchvision ``_DenseBlock``, timm ``DenseBlock``: ModuleDicts).

    Each layer reads the concatenation of everything before it; the block returns the
    concatenation of its input and every layer's output, through :class:`Concat`.
    """

    concat: Concat

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():  # type: ignore[attr-defined]  # mixed into a ModuleDict
            if layer is not self.concat:  # the ModuleDict holds the concat too
                features.append(layer(features))
        return self.concat(features)


class _TvDenseBlock(_DenseBlock, tv_densenet._DenseBlock):
    pass


class _TimmDenseBlock(_DenseBlock, timm_densenet.DenseBlock):
    pass


class _TvDenseLayer(tv_densenet._DenseLayer):
    """torchvision dense layer: concat → norm1 → relu1 → conv1 → (norm2 merged) → relu2 → conv2.

    Dropout is the identity at inference; memory-efficient checkpointing only matters in training.
    """

    concat: Concat

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        parts = [x] if isinstance(x, torch.Tensor) else x
        out = self.conv1(self.relu1(self.norm1(self.concat(parts))))
        return self.conv2(self.relu2(self.norm2(out)))


class _TimmDenseLayer(timm_densenet.DenseLayer):
    """timm dense layer: concat → norm1 (BN+ReLU) → conv1 → (norm2 merged, its ReLU) → conv2."""

    concat: Concat

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        parts = [x] if isinstance(x, torch.Tensor) else x
        # timm registers these with add_module: mypy types them as Tensor | Module
        out = self.conv1(self.norm1(self.concat(parts)))  # type: ignore[operator]
        return self.conv2(self.norm2(out))  # type: ignore[operator]


class _TvDenseNet(tv_densenet.DenseNet):
    """torchvision DenseNet with its functional final ReLU and average pool as modules.

    ``F.relu`` would get plain gradient (harmless: Pass and gradient agree on a ReLU whose output
    relevance is zero wherever it is inactive) but ``F.adaptive_avg_pool2d`` would get gradient
    instead of Norm (method.md §3.1); as modules they get Pass and Norm.
    """

    final_relu: nn.ReLU
    final_pool: nn.AdaptiveAvgPool2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.final_pool(self.final_relu(self.features(x)))
        return self.classifier(torch.flatten(out, 1))


def canonize_densenet(model: nn.Module) -> None:
    """torchvision and timm DenseNet (method.md §3.1, §3.2).

    * BatchNorm that follows a conv is merged into it: the stem (``conv0``/``norm0``, timm's deep
      stem too) and ``norm2`` of every dense layer (after ``conv1``).
    * BatchNorm that follows a concatenation (``norm1`` of each dense layer, each transition's
      ``norm``, the final ``norm5``) has no conv before it, and a ReLU between it and the next
      conv, so it cannot be merged exactly into either. It keeps zennit 0.5.1's rule for
      BatchNorm in ``EpsilonPlusFlat``: **Pass** (``layer_map_base``: ``(BatchNorm, Pass())``),
      which is what the paper's pipeline runs for DenseNet (method.md §3.1: canonizer applied,
      composite ``EpsilonPlusFlat``). Moving its scale forward into the next conv (keeping the
      shift as a shifted ReLU) gives the same relevance: the next conv's z⁺ contributions
      ``x_i w_ij`` are unchanged when a positive per-channel scale moves from ``x_i`` to ``w_ij``.
      Motzkus et al. 2022 ("Measurably stronger explanation reliability via model
      canonization", ICIP) propose a thresholded-ReLU merge instead; it changes the heatmaps and
      is not what zennit or the paper runs.
    * Concatenations are :class:`Concat` (relevance split by part); transitions' ``AvgPool2d``
      and the final pool get Norm, ReLUs Pass, the first conv Flat, other convs z⁺, the
      classifier ε.
    """
    classes: tuple[type[nn.Module], ...]
    if isinstance(model, tv_densenet.DenseNet):
        classes = (
            tv_densenet._DenseLayer, tv_densenet._DenseBlock, _TvDenseLayer, _TvDenseBlock,
        )  # fmt: skip
    elif isinstance(model, timm_densenet.DenseNet):
        classes = (
            timm_densenet.DenseLayer, timm_densenet.DenseBlock, _TimmDenseLayer, _TimmDenseBlock,
        )  # fmt: skip
    else:
        raise CanonizerError(
            f"canonizer 'densenet' expects a torchvision or timm DenseNet, got {type(model).__name__}"
        )
    layer_cls, block_cls, canonical_layer, canonical_block = classes
    features = model.features
    stem: list[str] = []  # everything before the first dense block: conv0/norm0 (or timm's deep stem)
    for name, child in features.named_children():
        if isinstance(child, block_cls):
            break
        stem.append(name)
    for conv_name, bn_name in zip(stem, stem[1:], strict=False):
        if isinstance(getattr(features, conv_name), _MERGEABLE):
            _merge_pair(features, conv_name, bn_name)
    blocks = 0
    for module in list(model.modules()):
        if type(module) is layer_cls:
            _merge_pair(module, "conv1", "norm2")
            module.__class__ = canonical_layer
            module.add_module("concat", Concat())
        elif type(module) is block_cls:
            module.__class__ = canonical_block
            module.add_module("concat", Concat())
            blocks += 1
    if blocks == 0:
        raise CanonizerError(f"no DenseNet blocks of a known type in {type(model).__name__}")
    if isinstance(model, tv_densenet.DenseNet):
        model.__class__ = _TvDenseNet
        model.add_module("final_relu", nn.ReLU())
        model.add_module("final_pool", nn.AdaptiveAvgPool2d(1))


# --------------------------------------------------------------------------- EfficientNet


class _TimmDepthwiseSeparable(timm_eff_blocks.DepthwiseSeparableConv):
    """timm depthwise-separable block with the residual addition as a module."""

    residual_sum: ResidualSum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = self.se(self.aa(self.bn1(self.conv_dw(x))))  # type: ignore[misc]  # timm annotates aa as None-able
        x = self.bn2(self.conv_pw(x))
        return self.residual_sum(shortcut, self.drop_path(x)) if self.has_skip else x


class _TimmInvertedResidual(timm_eff_blocks.InvertedResidual):
    """timm inverted residual (MBConv) block with the residual addition as a module."""

    residual_sum: ResidualSum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = self.bn1(self.conv_pw(x))
        x = self.se(self.aa(self.bn2(self.conv_dw(x))))  # type: ignore[misc]  # timm annotates aa as None-able
        x = self.bn3(self.conv_pwl(x))
        return self.residual_sum(shortcut, self.drop_path(x)) if self.has_skip else x


class _TimmEdgeResidual(timm_eff_blocks.EdgeResidual):
    """timm edge residual (fused MBConv) block with the residual addition as a module."""

    residual_sum: ResidualSum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.se(self.aa(self.bn1(self.conv_exp(x))))  # type: ignore[misc]  # timm annotates aa as None-able
        x = self.bn2(self.conv_pwl(x))
        return self.residual_sum(shortcut, self.drop_path(x)) if self.has_skip else x


#: exact block class -> (canonical subclass, its conv/BN pairs in forward order)
_EFFICIENTNET_BLOCKS: dict[type, tuple[type | None, tuple[tuple[str, str], ...]]] = {
    timm_eff_blocks.DepthwiseSeparableConv: (
        _TimmDepthwiseSeparable, (("conv_s2d", "bn_s2d"), ("conv_dw", "bn1"), ("conv_pw", "bn2")),
    ),
    timm_eff_blocks.InvertedResidual: (
        _TimmInvertedResidual,
        (("conv_s2d", "bn_s2d"), ("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    ),
    timm_eff_blocks.EdgeResidual: (_TimmEdgeResidual, (("conv_exp", "bn1"), ("conv_pwl", "bn2"))),
    timm_eff_blocks.ConvBnAct: (None, (("conv", "bn1"),)),  # residual only with has_skip: refused below
}  # fmt: skip


class _TvMBConv(tv_efficientnet.MBConv):
    """torchvision MBConv (EfficientNet) with the residual addition as a module."""

    residual_sum: ResidualSum

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        return self.residual_sum(input, self.stochastic_depth(result)) if self.use_res_connect else result


class _TvFusedMBConv(tv_efficientnet.FusedMBConv):
    """torchvision fused MBConv (EfficientNet-V2) with the residual addition as a module."""

    residual_sum: ResidualSum

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        return self.residual_sum(input, self.stochastic_depth(result)) if self.use_res_connect else result


class _TvInvertedResidual(tv_mobilenetv3.InvertedResidual):
    """torchvision MobileNetV3 inverted residual with the residual addition as a module."""

    residual_sum: ResidualSum

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        return self.residual_sum(input, result) if self.use_res_connect else result


_TV_EFFICIENTNET_BLOCKS: dict[type, type] = {
    tv_efficientnet.MBConv: _TvMBConv,
    tv_efficientnet.FusedMBConv: _TvFusedMBConv,
    tv_mobilenetv3.InvertedResidual: _TvInvertedResidual,
}


def _canonize_tv_efficientnet(model: tv_efficientnet.EfficientNet | tv_mobilenetv3.MobileNetV3) -> None:
    """torchvision's EfficientNet (B0-B7, V2) and MobileNetV3: the same canonical form as timm's (see
    :func:`canonize_efficientnet`). Every BatchNorm is the second layer of a ``Conv2dNormActivation``
    right after its conv, so the sequential merge finds them all."""
    merge_sequential_batchnorms(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, StochasticDepth):
            _set_child(model, path, nn.Identity())
        elif isinstance(module, TvSqueezeExcitation):
            _set_child(model, path, PassThrough(module))
    blocks = 0
    for module in model.features.modules():
        canonical = _TV_EFFICIENTNET_BLOCKS.get(type(module))
        if canonical is not None:
            module.__class__ = canonical
            module.add_module("residual_sum", ResidualSum())
            blocks += 1
    if blocks == 0:
        raise CanonizerError(f"no EfficientNet blocks of a known type in {type(model).__name__}")
    _require_no_batchnorm(model, "efficientnet")


def canonize_efficientnet(model: nn.Module) -> None:
    """timm EfficientNet / MobileNet-style networks and torchvision's EfficientNet (method.md §3.2,
    "EfficientNet" row).

    * Every BatchNorm follows a conv (stem, the convs of each block, the head) and is merged
      into it; timm's fused ``BatchNormAct2d`` leaves its activation (SiLU: **Pass**).
    * Depthwise convs are convs with ``groups = channels``: per group the rule of any other conv,
      **γ** under the family's composite ``epsilon-gamma-flat`` (z⁺ under ``epsilon-plus-flat``;
      models/xai/composite.py ``FAMILY_COMPOSITES`` says why).
    * Squeeze-excitation ``x ⊙ σ(W₂ SiLU(W₁ mean(x)))`` is wrapped in :class:`PassThrough`: the
      gate is a constant and relevance passes through the signal (**Pass**), the SE branch gets
      none — the signal-only gate of Pahde et al. 2023 (CVPR workshops, "Optimizing explanations
      by network canonization and hyperparameter search"), the ``SECanonizer`` of the paper's
      code base (method.md §3.2).
    * Skip connections (``has_skip``) are :class:`ResidualSum` (**Norm**); ``DropPath`` is the
      identity at inference.
    """
    if isinstance(model, tv_efficientnet.EfficientNet | tv_mobilenetv3.MobileNetV3):
        _canonize_tv_efficientnet(model)
        return
    if not isinstance(model, timm_efficientnet.EfficientNet):
        raise CanonizerError(
            "canonizer 'efficientnet' expects a timm or torchvision EfficientNet or a torchvision "
            f"MobileNetV3, got {type(model).__name__}"
        )
    _merge_pair(model, "conv_stem", "bn1")
    _merge_pair(model, "conv_head", "bn2")
    for path, module in list(model.named_modules()):
        if isinstance(module, timm_layers.DropPath):
            _set_child(model, path, nn.Identity())
        elif isinstance(module, timm_eff_blocks.SqueezeExcite | timm_layers.SqueezeExcite):
            _set_child(model, path, PassThrough(module))
    blocks = 0
    for module in model.blocks.modules():
        if isinstance(module, timm_eff_blocks.CondConvResidual) or type(module) in (
            timm_eff_blocks.UniversalInvertedResidual, timm_eff_blocks.MobileAttention,
        ):  # fmt: skip
            raise CanonizerError(f"canonizer 'efficientnet' does not support {type(module).__name__} blocks")
        spec = _EFFICIENTNET_BLOCKS.get(type(module))
        if spec is None:
            continue
        canonical, pairs = spec
        for conv_name, bn_name in pairs:
            _merge_pair(module, conv_name, bn_name)
        if canonical is None:
            if getattr(module, "has_skip", False):
                raise CanonizerError("canonizer 'efficientnet' does not support ConvBnAct blocks with a skip")
        else:
            module.__class__ = canonical
            module.add_module("residual_sum", ResidualSum())
        blocks += 1
    if blocks == 0:
        raise CanonizerError(f"no EfficientNet blocks of a known type in {type(model).__name__}")
    _require_no_batchnorm(model, "efficientnet")


# --------------------------------------------------------------------------- ViT


def canonize_vit(model: nn.Module) -> None:
    """timm and torchvision ViTs (:mod:`medaudit.models.xai.vit_canonizers`), BatchNorms of a conv
    stem merged first (the paper's torchvision ViT has one, method.md §9)."""
    merge_sequential_batchnorms(model)
    vit_canonizers.canonize_vit(model)


# --------------------------------------------------------------------------- entry point

CANONIZERS: dict[str, Callable[[nn.Module], None]] = {
    "resnet": canonize_resnet,
    "vgg": canonize_vgg,
    "densenet": canonize_densenet,
    "efficientnet": canonize_efficientnet,
    "vit": canonize_vit,
}

#: canonizer id -> the model classes it rewrites (what :func:`detect_canonizer` looks for)
FAMILIES: dict[str, tuple[type, ...]] = {
    "resnet": (timm_resnet.ResNet, tv_resnet.ResNet),
    "vgg": (tv_vgg.VGG,),
    "densenet": (tv_densenet.DenseNet, timm_densenet.DenseNet),
    "efficientnet": (
        timm_efficientnet.EfficientNet,
        tv_efficientnet.EfficientNet,
        tv_mobilenetv3.MobileNetV3,
    ),
    "vit": vit_canonizers.VIT_CLASSES,
}


def detect_canonizer(model: nn.Module) -> str:
    """The canonizer id for ``model``, read off its class (one of :data:`CANONIZERS`).

    Raises:
        CanonizerError: the model is of no supported family; the message names its class and
            the families with the classes each accepts.
    """
    for kind, classes in FAMILIES.items():
        if isinstance(model, classes):
            return kind
    supported = "; ".join(
        f"{kind}: {', '.join(f'{c.__module__}.{c.__name__}' for c in classes)}"
        for kind, classes in FAMILIES.items()
    )
    name = f"{type(model).__module__}.{type(model).__name__}"
    raise CanonizerError(f"no LRP canonizer for {name}; supported families: {supported}")


def canonize(model: nn.Module, kind: str) -> nn.Module:
    """Return a canonized, frozen, eval-mode deep copy of ``model``; ``model`` is left untouched.

    Args:
        model: the network as built by the registry (trained or not).
        kind: canonizer id, ``ModelCfg.canonizer`` (one of :data:`CANONIZERS`).

    Raises:
        UnknownModelError: ``kind`` is not a known canonizer id.
        CanonizerError: the model is a variant the canonizer does not support.
    """
    if kind not in CANONIZERS:
        raise UnknownModelError(f"unknown canonizer {kind!r}; valid: {', '.join(sorted(CANONIZERS))}")
    canonical = copy.deepcopy(model).eval()
    canonical.requires_grad_(False)
    CANONIZERS[kind](canonical)
    for module in canonical.modules():
        if getattr(module, "inplace", False):  # in-place activations would overwrite saved inputs
            module.inplace = False  # type: ignore[assignment]
    return canonical
