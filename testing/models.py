"""Networks for tests: random weights made to look trained where it matters to the code under test."""

from __future__ import annotations

import torch
from torch import nn

from medaudit.models.registry import ModelCfg, create_model


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d of ``model`` random running statistics and affine parameters, in place.

    A fresh network's BatchNorms are the identity (mean 0, variance 1, γ 1, β 0), so merging
    them into a conv changes nothing and a canonizer bug would go unseen; a trained network's
    are not. Seeded: the same ``seed`` gives the same statistics.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is None or m.running_var is None:
                    raise ValueError(f"{m} tracks no running statistics; trained_like needs them")
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def branchy_resnet18(size: int) -> tuple[nn.Module, ModelCfg]:
    """The registry's ResNet-18 at ``size`` px, seeded, with BatchNorm scales and variances drawn so
    that every residual branch contributes (timm zero-inits each block's last BN)."""
    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=size)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_var is not None:
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    return model, cfg
