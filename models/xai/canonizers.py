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
* ViT attention is wrapped in :class:`~models.xai.layers.PassThrough` (Pass rule).

This is the only module of the LRP engine that knows architectures. Canonizers are looked up by
the id in ``ModelCfg.canonizer``: ``"resnet"`` (timm ResNet incl. the deep stem and avg-pool
downsample of resnet-d, torchvision ResNet; basic and bottleneck blocks), ``"vgg"``
(torchvision VGG, with or without BatchNorm) and ``"vit"`` (timm VisionTransformer).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import timm.models.resnet as timm_resnet
import timm.models.vision_transformer as timm_vit
import torch
import torchvision.models.resnet as tv_resnet
from torch import nn

from medaudit.models.errors import MedauditError, UnknownModelError
from medaudit.models.xai.layers import PassThrough, ResidualSum


class CanonizerError(MedauditError):
    """A model that the requested canonizer cannot rewrite (an unsupported variant)."""


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


def _merge_pair(owner: nn.Module, layer_name: str, bn_name: str) -> None:
    layer, bn = getattr(owner, layer_name), getattr(owner, bn_name)
    if isinstance(bn, nn.Identity):
        return
    merge_batchnorm(layer, bn)
    setattr(owner, bn_name, nn.Identity())


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
    """timm and torchvision ResNets (method.md §3.2): merge BN, explicit residual sums."""
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
    _require_no_batchnorm(model, "resnet")


# --------------------------------------------------------------------------- VGG


def canonize_vgg(model: nn.Module) -> None:
    """torchvision VGG (method.md §3.2): merge BN (vgg*_bn); plain vgg16 has none."""
    if not isinstance(getattr(model, "features", None), nn.Sequential):
        raise CanonizerError(f"canonizer 'vgg' expects a torchvision VGG, got {type(model).__name__}")
    merge_sequential_batchnorms(model)
    _require_no_batchnorm(model, "vgg")


# --------------------------------------------------------------------------- ViT


class _TimmViTBlock(timm_vit.Block):
    """timm ViT block with both residual additions as modules; ``attn`` is a PassThrough."""

    residual_sum1: ResidualSum
    residual_sum2: ResidualSum

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise CanonizerError("the canonized ViT block does not support attention masks")
        x = self.residual_sum1(x, self.drop_path1(self.ls1(self.attn(self.norm1(x)))))
        return self.residual_sum2(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


class _TimmVisionTransformer(timm_vit.VisionTransformer):
    """timm ViT with "tokens + position embedding" as a module (zennit ``EncoderCanonizer``)."""

    pos_sum: ResidualSum

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        to_cat = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = x.view(x.shape[0], -1, x.shape[-1])
        if to_cat:
            x = torch.cat([*to_cat, x], dim=1)
        x = self.pos_sum(x, self.pos_embed.expand_as(x))  # type: ignore[union-attr]  # checked in canonize_vit
        return self.pos_drop(x)


def canonize_vit(model: nn.Module) -> None:
    """timm VisionTransformer with zennit-0.5.1-equivalent rules (method.md §3.1, §3.2).

    Under the paper's ``EpsilonPlusFlat`` with zennit ≤ 0.5.1 and its ``VITCanonizer``:

    * attention is **Pass**: the relevance at the attention output is handed unchanged to the
      attention input (the ``norm1`` output); zennit lists ``nn.MultiheadAttention`` among the
      activations. We wrap timm's ``Attention`` in :class:`PassThrough` to get the same;
    * both residual additions and "tokens + position embedding" are sums with the **Norm** rule
      (the position embedding's share of relevance is dropped, as in zennit);
    * LayerNorm has no rule: plain **gradient**; the class-token concat and reshapes too;
    * MLP and head ``Linear`` layers get **ε**, GELU gets **Pass**, the patch-embedding conv (the
      first layer) gets **Flat**.
    """
    if not isinstance(model, timm_vit.VisionTransformer):
        raise CanonizerError(f"canonizer 'vit' expects a timm VisionTransformer, got {type(model).__name__}")
    if model.pos_embed is None or model.no_embed_class or model.dynamic_img_size:
        raise CanonizerError(
            "canonizer 'vit' supports learned position embeddings that include the class token "
            "(no_embed_class=False, dynamic_img_size=False)"
        )
    merge_sequential_batchnorms(model)
    for block in model.blocks:
        if type(block) is not timm_vit.Block:
            raise CanonizerError(f"canonizer 'vit' supports timm Block only, got {type(block).__name__}")
        block.__class__ = _TimmViTBlock
        block.attn = PassThrough(block.attn)
        block.add_module("residual_sum1", ResidualSum())
        block.add_module("residual_sum2", ResidualSum())
    model.__class__ = _TimmVisionTransformer
    model.add_module("pos_sum", ResidualSum())


# --------------------------------------------------------------------------- entry point

CANONIZERS: dict[str, Callable[[nn.Module], None]] = {
    "resnet": canonize_resnet,
    "vgg": canonize_vgg,
    "vit": canonize_vit,
}


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
