"""Canonizers (method.md §3.2, §11.1): same function as the original, original untouched, exact BN merge."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from medaudit.models.errors import CanonizerError, MedauditError, UnknownModelError
from medaudit.models.registry import create_model, list_models
from medaudit.models.xai.canonizers import canonize, merge_batchnorm
from medaudit.models.xai.layers import AttentionCore, ResidualSum
from medaudit.testing.models import trained_like

SIZE = {"vit_tiny_patch16_224": 32, "vit_base_patch16_224": 32}


def small(name: str) -> tuple[nn.Module, torch.Tensor]:
    size = SIZE.get(name, 32)
    model, _ = create_model(name, img_size=size)
    return trained_like(model), torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


CANONIZED = [n for n in list_models() if n != "vit_base_patch16_224"]  # vit_base: same code, 12x slower


@pytest.mark.parametrize("name", CANONIZED)
def test_canonized_model_computes_the_same_function(name: str) -> None:
    model, x = small(name)
    model, x = model.double(), x.double()
    canonical = canonize(model, create_model(name)[1].canonizer)
    with torch.no_grad():
        assert (canonical(x) - model(x)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "vgg16"])
def test_canonized_model_matches_in_float32(name: str) -> None:
    model, cfg = create_model(name, img_size=32)  # default BN statistics: float32 noise stays small
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (canonize(model, cfg.canonizer)(x) - model(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", CANONIZED)
def test_original_model_is_untouched(name: str) -> None:
    model, x = small(name)
    cfg = create_model(name)[1]
    state = copy.deepcopy(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        before = model(x)
    canonize(model, cfg.canonizer)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "resnet50"])
def test_resnet_canonizer_merges_every_batchnorm_and_makes_sums_explicit(name: str) -> None:
    model, cfg = create_model(name, img_size=32)
    canonical = canonize(model, cfg.canonizer)
    assert not [n for n, m in canonical.named_modules() if isinstance(m, nn.BatchNorm2d)]
    blocks = sum(len(getattr(model, f"layer{k}")) for k in range(1, 5))
    assert sum(isinstance(m, ResidualSum) for m in canonical.modules()) == blocks
    assert not any(getattr(m, "inplace", False) for m in canonical.modules())
    assert not any(p.requires_grad for p in canonical.parameters())


def test_resnet_d_stem_and_avgpool_downsample_are_merged() -> None:
    model, _ = create_model("resnet50d", img_size=32)
    canonical = canonize(trained_like(model), "resnet")
    # deep stem: conv, bn, act, conv, bn, act, conv (+ bn1): every BN became Identity
    assert [type(m).__name__ for m in canonical.conv1] == ["Conv2d", "Identity", "ReLU"] * 2 + ["Conv2d"]
    assert isinstance(canonical.bn1, nn.Identity)
    down = canonical.layer2[0].downsample
    assert [type(m).__name__ for m in down] == ["AvgPool2d", "Conv2d", "Identity"]
    assert down[1].bias is not None  # the merged BN's shift lives in the conv bias now


def test_torchvision_basic_block_resnet() -> None:
    model = trained_like(torchvision.models.resnet18(num_classes=3)).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    canonical = canonize(model, "resnet")
    assert sum(isinstance(m, ResidualSum) for m in canonical.modules()) == 8
    with torch.no_grad():
        assert (canonical(x) - model(x)).abs().max().item() <= 1e-10


def test_vit_canonizer_writes_attention_out_and_makes_sums_modules() -> None:
    model, cfg = create_model("vit_tiny_patch16_224", img_size=32)
    canonical = canonize(model, cfg.canonizer)
    n_blocks = len(model.blocks)
    assert sum(isinstance(m, AttentionCore) for m in canonical.modules()) == n_blocks
    assert sum(isinstance(m, ResidualSum) for m in canonical.modules()) == 2 * n_blocks + 1


def test_batchnorm_merge_is_exact_where_zennit_leaves_epsilon() -> None:
    """zennit 0.5.1 resets BN to identity but keeps ε, so it still divides by √(1+ε) (method.md §3.2)."""
    from zennit.canonizers import SequentialMergeBatchNorm

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.1)).eval().double()
    trained_like(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        ours = copy.deepcopy(model)
        merge_batchnorm(ours[0], ours[1])
        ours[1] = nn.Identity()
        assert (ours(x) - reference).abs().max().item() <= 1e-12
        theirs = copy.deepcopy(model)
        for instance in SequentialMergeBatchNorm().apply(theirs):
            assert instance is not None
        deviation = (theirs(x) - reference).abs().max().item()
    assert deviation > 1e-3  # ≈ |y|·(1 - 1/√1.1): the ε zennit leaves behind


def test_merge_creates_a_bias_for_bias_free_convs() -> None:
    conv, bn = nn.Conv2d(2, 3, 1, bias=False), trained_like(nn.Sequential(nn.BatchNorm2d(3)))[0].eval()
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        want = bn(conv(x))
        merge_batchnorm(conv, bn)
        assert conv.bias is not None
        assert (conv(x) - want).abs().max().item() <= 1e-5


def test_unknown_canonizer_names_the_choices() -> None:
    model, _ = create_model("resnet18", img_size=32)
    with pytest.raises(UnknownModelError, match="'inception'.*densenet, efficientnet, resnet, vgg, vit"):
        canonize(model, "inception")


def test_wrong_architecture_is_a_domain_error() -> None:
    model, _ = create_model("vgg16", img_size=32)
    with pytest.raises(CanonizerError, match="timm or torchvision ResNet, got VGG") as info:
        canonize(model, "resnet")
    assert isinstance(info.value, MedauditError)
