"""Engine heatmaps vs zennit 0.5.1 ``EpsilonPlusFlat`` + canonizers on the registry's architectures.

zennit uses its own canonizers where it has them (torchvision ResNet/VGG) and the paper-style
ones of :mod:`medaudit.testing.zennit_reference` for timm models, so the engine's canonizers are
checked too. Small inputs (64 px, batch 2) at random and "trained-like" weights (random BN
statistics and affine, so merging BN matters; timm also zero-inits each block's last BN).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medaudit.models.registry import create_model
from medaudit.models.xai import ClassTarget, ConceptTarget, Explainer
from medaudit.testing.models import trained_like
from medaudit.testing.zennit_reference import zennit_composite, zennit_lrp

SIZE, BATCH = 64, 2


def assert_heatmaps_agree(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Mean cosine ≥ 0.99 and per-image relevance sums within 1% (the issue's acceptance bar)."""
    cos = nn.functional.cosine_similarity(ours.flatten(1).double(), theirs.flatten(1).double(), dim=1)
    assert cos.mean().item() >= 0.99, cos
    s_ours, s_theirs = ours.flatten(1).sum(1), theirs.flatten(1).sum(1)
    assert ((s_ours - s_theirs).abs() <= 0.01 * s_theirs.abs() + 1e-6).all(), (s_ours, s_theirs)


def zennit_heatmaps(model: nn.Module, kind: str, x: torch.Tensor, target: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(x)
    grad = torch.zeros_like(logits)
    grad[:, target] = logits[:, target]  # zennit-crp's default initial relevance: the logit
    _, rel = zennit_lrp(model, kind, x, grad)
    return rel.sum(1)


CASES = [
    pytest.param("vgg16", marks=pytest.mark.slow),
    "resnet50",
    "resnet18",
    "resnet50d",
]


@pytest.mark.parametrize("weights", ["random", "trained-like"])
@pytest.mark.parametrize("name", CASES)
def test_class_heatmaps_match_zennit(name: str, weights: str) -> None:
    torch.manual_seed(0)
    model, cfg = create_model(name, img_size=SIZE)
    if weights == "trained-like":
        trained_like(model)
    model.requires_grad_(False)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    explanation = Explainer(model, cfg).explain(x, [1])
    assert_heatmaps_agree(explanation.heatmaps[0], zennit_heatmaps(model, cfg.canonizer, x, 1))


def test_vit_token_pooling_has_input_relevance_where_zennit_has_none() -> None:
    """zennit ≤ 0.5.1 passes attention (method.md §3.1): the class token's relevance never reaches
    a patch and its heatmaps are zero. The engine propagates through attention (CP-LRP by default,
    tests/unit/test_attention_lrp.py checks it against lxt): every pixel gets relevance."""
    model, cfg = create_model("vit_tiny_patch16_224", img_size=32)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = Explainer(model, cfg).explain(x, [0]).heatmaps[0]
    assert torch.count_nonzero(ours) == ours.numel()
    assert torch.count_nonzero(zennit_heatmaps(model.requires_grad_(False), "vit", x, 0)) == 0


def _crp_or_injection(model: nn.Module, kind: str, x: torch.Tensor, path: str, rel: torch.Tensor):
    """zennit's modified gradient of the output of module ``path`` seeded with ``rel``.

    This is what zennit-crp's ``CondAttribution(start_layer=path, init_rel=rel)`` computes; it is
    used directly when zennit-crp cannot be imported.
    """
    composite = zennit_composite(kind, model)
    out: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(path).register_forward_hook(lambda _m, _i, o: out.update(a=o))
    try:
        with composite.context(model) as modified:
            x_in = x.clone().requires_grad_(True)
            modified(x_in)
            (grad,) = torch.autograd.grad(out["a"], x_in, rel)
    finally:
        handle.remove()
    return grad.sum(1)


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", pytest.param("vgg16", marks=pytest.mark.slow)])
def test_concept_heatmaps_match_crp(name: str) -> None:
    torch.manual_seed(0)
    model, cfg = create_model(name, img_size=SIZE)
    trained_like(model).requires_grad_(False)
    layer = cfg.default_cav_layer
    path = cfg.hook_points[layer]
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    explainer = Explainer(model, cfg)
    first = explainer.explain(x, [0], cav_layers=[layer], relevance_layers=[layer])
    channels = first.activations[layer].shape[1]
    v = torch.randn(channels, generator=torch.Generator().manual_seed(2))
    v = v / v.norm()
    got = explainer.explain(x, [ConceptTarget(layer, v)]).heatmaps[0]

    with torch.no_grad():
        acts: dict[str, torch.Tensor] = {}
        handle = model.get_submodule(path).register_forward_hook(lambda _m, _i, o: acts.update(a=o))
        model(x)
        handle.remove()
    init = acts["a"].clamp(min=0) * v[None, :, None, None]  # method.md §2.1
    try:
        from crp.attribution import CondAttribution
    except ImportError:  # zennit-crp pins zennit<=0.4.6; see the module docstring of zennit_reference
        want = _crp_or_injection(model, cfg.canonizer, x, path, init)
    else:
        result = CondAttribution(model)(
            x.clone().requires_grad_(True), [{}], zennit_composite(cfg.canonizer, model),
            start_layer=path, init_rel=init,
        )  # fmt: skip
        want = result.heatmap
    assert_heatmaps_agree(got, want)
    assert_heatmaps_agree(got, _crp_or_injection(model, cfg.canonizer, x, path, init))


def test_layer_relevance_matches_crp_record_layer() -> None:
    """The relevance at a hook point is zennit's modified gradient at that layer's output (§3.1)."""
    crp = pytest.importorskip("crp.attribution", reason="zennit-crp is optional (it pins an older zennit)")
    model, cfg = create_model("resnet18", img_size=SIZE)
    trained_like(model).requires_grad_(False)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    ours = Explainer(model, cfg).explain(x, [ClassTarget(1)], relevance_layers=["identity_1"])
    result = crp.CondAttribution(model)(
        x.clone().requires_grad_(True),
        [{"y": [1]}],
        zennit_composite("resnet", model),
        record_layer=["layer2"],
    )
    assert_heatmaps_agree(ours.heatmaps[0], result.heatmap)
    got, want = ours.relevance["identity_1"][0], result.relevances["layer2"]
    cos = nn.functional.cosine_similarity(got.flatten(1), want.flatten(1), dim=1)
    assert cos.min().item() >= 0.99
