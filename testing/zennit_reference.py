"""zennit 0.5.1 as the reference LRP implementation, for tests and benchmarks only (method.md §3).

zennit ships canonizers for torchvision ResNet and VGG only. For timm ResNets and timm ViTs this
module supplies canonizers written the paper's way — re-binding block ``forward`` methods so the
residual sums go through ``zennit.layer.Sum`` on a stacked tensor (method.md §3.2), merging
BatchNorm with zennit's own ``SequentialMergeBatchNorm`` (which leaves BN ε in place) — so that
they are independent of :mod:`medaudit.models.xai.canonizers`, which they are used to check.

zennit is imported inside the functions: the service never needs it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medaudit.models.errors import UnknownModelError


def _timm_basic_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    shortcut = x
    x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
    x = self.bn2(self.conv2(self.aa(x)))
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    return self.act2(self.canonizer_sum(torch.stack([shortcut, x], dim=-1)))


def _timm_bottleneck_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
    x = self.bn3(self.conv3(x))
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    return self.act3(self.canonizer_sum(torch.stack([shortcut, x], dim=-1)))


def _timm_vit_block_forward(self: Any, x: torch.Tensor, **_: Any) -> torch.Tensor:
    x = self.canonizer_sum1(torch.stack([x, self.drop_path1(self.ls1(self.attn(self.norm1(x))))], dim=-1))
    return self.canonizer_sum2(torch.stack([x, self.drop_path2(self.ls2(self.mlp(self.norm2(x))))], dim=-1))


def _timm_vit_pos_embed(self: Any, x: torch.Tensor) -> torch.Tensor:
    x = x.view(x.shape[0], -1, x.shape[-1])
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return self.pos_drop(self.canonizer_pos_sum(torch.stack([x, self.pos_embed.expand_as(x)], dim=-1)))


class SignalOnlyGate(torch.autograd.Function):
    """``scale * x`` with all relevance on ``x``: the signal-only gate of Pahde et al. 2023's SE
    canonizer (the engine's :class:`~medaudit.models.xai.layers.PassThrough`)."""

    @staticmethod
    def forward(ctx: Any, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return scale * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(grad), grad


def _timm_se_module_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    x_se = x.mean((2, 3), keepdim=True)
    if self.add_maxpool:
        x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
    return SignalOnlyGate.apply(self.gate(self.fc2(self.act(self.bn(self.fc1(x_se))))), x)


def zennit_canonizers(kind: str, model: nn.Module) -> list[Any]:
    """zennit canonizers equivalent to the paper's for ``ModelCfg.canonizer`` id ``kind``."""
    import timm.layers.squeeze_excite as timm_se
    import timm.models.resnet as timm_resnet
    import timm.models.vision_transformer as timm_vit
    from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
    from zennit.layer import Sum
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    def rebind(cls: type, forward: Any, sums: tuple[str, ...], method: str = "forward") -> Any:
        def attribute_map(_name: str, module: nn.Module) -> dict[str, Any] | None:
            if type(module) is not cls:
                return None
            return {method: forward.__get__(module), **{s: Sum() for s in sums}}

        return AttributeCanonizer(attribute_map)

    if kind == "vgg":
        return [VGGCanonizer()]
    if kind == "resnet" and isinstance(model, timm_resnet.ResNet):
        return [
            SequentialMergeBatchNorm(),
            rebind(timm_resnet.BasicBlock, _timm_basic_forward, ("canonizer_sum",)),
            rebind(timm_resnet.Bottleneck, _timm_bottleneck_forward, ("canonizer_sum",)),
            rebind(timm_se.SEModule, _timm_se_module_forward, ()),  # SE-ResNets
        ]
    if kind == "resnet":
        return [ResNetCanonizer()]
    if kind == "vit":
        return [
            SequentialMergeBatchNorm(),
            rebind(timm_vit.Block, _timm_vit_block_forward, ("canonizer_sum1", "canonizer_sum2")),
            rebind(
                timm_vit.VisionTransformer, _timm_vit_pos_embed, ("canonizer_pos_sum",), method="_pos_embed"
            ),
        ]
    raise UnknownModelError(f"no zennit canonizer for {kind!r}; valid: resnet, vgg, vit")


def zennit_composite(kind: str, model: nn.Module) -> Any:
    """zennit's ``EpsilonPlusFlat`` with the canonizers above (method.md §3.1).

    For the ViT, timm's ``Attention`` is mapped to ``Pass``, as zennit ≤ 0.5.1 does for
    ``nn.MultiheadAttention`` (method.md §3.1).
    """
    from zennit.composites import EpsilonPlusFlat
    from zennit.rules import Pass

    layer_map = []
    if kind == "vit":
        import timm.models.vision_transformer as timm_vit

        layer_map.append((timm_vit.Attention, Pass()))
    return EpsilonPlusFlat(canonizers=zennit_canonizers(kind, model), layer_map=layer_map)


def zennit_lrp(
    model: nn.Module, kind: str, x: torch.Tensor, grad_output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, input relevance)`` of zennit's LRP with relevance ``grad_output`` at the output.

    ``model`` is temporarily modified by zennit's canonizers (and restored); its parameters must
    not require gradients (CRP's ``no_param_grad``).
    """
    from zennit.attribution import Gradient

    with Gradient(model, zennit_composite(kind, model)) as attributor:
        out, rel = attributor(x.detach().clone().requires_grad_(True), lambda _o: grad_output)
    return out, rel
