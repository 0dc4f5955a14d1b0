"""Each rule against a slow implementation written from its formula (method.md §3.1), in float64.

The references never call a transposed convolution or autograd: they build the explicit
contribution tensor ``z_ij`` (input i to output j) with ``unfold``, normalise it per output and
sum it back per input.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medaudit.models.xai import rules
from medaudit.models.xai.composite import build_lrp_model

EPS = 1e-6
TOL = 1e-6


def stab(z: torch.Tensor) -> torch.Tensor:
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z)


def conv_contributions(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """``c[b, i, o, l]`` = input i's term of output (o, position l), i over unfolded patches."""
    patches = F.unfold(x, w.shape[-2:], padding=padding, stride=stride)  # (B, Cin·k·k, L)
    return patches[:, :, None, :] * w.flatten(1).T[None, :, :, None]


def fold_back(r: torch.Tensor, x: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
    return F.fold(r, x.shape[-2:], k, padding=padding, stride=stride)


def ref_zplus(conv: nn.Conv2d, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    w, b = conv.weight, conv.bias
    s, p = conv.stride[0], conv.padding[0]
    c = conv_contributions(x.clamp(min=0), w.clamp(min=0), s, p)
    c = c + conv_contributions(x.clamp(max=0), w.clamp(max=0), s, p)
    z = c.sum(1) + b.clamp(min=0)[None, :, None]  # (B, Cout, L)
    r_patch = (c / stab(z)[:, None] * r.flatten(2)[:, None]).sum(2)
    return fold_back(r_patch, x, w.shape[-1], s, p)


def ref_flat(conv: nn.Conv2d, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    s, p = conv.stride[0], conv.padding[0]
    c = conv_contributions(torch.ones_like(x), torch.ones_like(conv.weight), s, p)
    r_patch = (c / stab(c.sum(1))[:, None] * r.flatten(2)[:, None]).sum(2)
    return fold_back(r_patch, x, conv.weight.shape[-1], s, p)


def ref_epsilon(lin: nn.Linear, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    c = x[:, :, None] * lin.weight.T[None]  # (B, in, out)
    z = c.sum(1) + lin.bias
    return (c / stab(z)[:, None] * r[:, None]).sum(2)


def ref_epsilon_conv(conv: nn.Conv2d, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    s, p = conv.stride[0], conv.padding[0]
    c = conv_contributions(x, conv.weight, s, p)
    z = c.sum(1) + conv.bias[None, :, None]
    r_patch = (c / stab(z)[:, None] * r.flatten(2)[:, None]).sum(2)
    return fold_back(r_patch, x, conv.weight.shape[-1], s, p)


def ref_norm_avgpool(k: int, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    c = F.unfold(x, k, stride=k).reshape(x.shape[0], x.shape[1], k * k, -1) / (k * k)
    z = c.sum(2)
    r_patch = (c / stab(z)[:, :, None] * r.flatten(2)[:, :, None]).flatten(1, 2)
    return F.fold(r_patch, x.shape[-2:], k, stride=k)


def rule_relevance(rule: nn.Module, r: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xs = tuple(x.clone().requires_grad_(True) for x in xs)
    out = rule(*xs)
    return torch.autograd.grad(out, xs, r)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("signed", [False, True], ids=["x>=0", "signed-x"])
@pytest.mark.parametrize(("stride", "padding"), [(1, 1), (2, 1), (2, 0)])
def test_zplus_matches_formula(gen: torch.Generator, signed: bool, stride: int, padding: int) -> None:
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding).double()
    x = torch.randn(2, 3, 9, 9, generator=gen, dtype=torch.float64)
    x = x if signed else x.clamp(min=0)
    r = torch.randn(2, 5, *conv(x).shape[-2:], generator=gen, dtype=torch.float64)
    (got,) = rule_relevance(rules.ZPlusConv(conv), r, x)
    torch.testing.assert_close(got, ref_zplus(conv, x, r), atol=TOL, rtol=TOL)


def test_zplus_conserves_relevance_without_bias(gen: torch.Generator) -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False).double()
    x = torch.rand(2, 3, 6, 6, generator=gen, dtype=torch.float64) + 0.1
    r = torch.rand(2, 5, 6, 6, generator=gen, dtype=torch.float64)
    (got,) = rule_relevance(rules.ZPlusConv(conv), r, x)
    z = F.conv2d(x, conv.weight.clamp(min=0), padding=1)
    torch.testing.assert_close(got.sum(), (r * z / (z + EPS)).sum(), rtol=1e-12, atol=0)  # only ε absorbs


@pytest.mark.parametrize(("stride", "padding"), [(1, 1), (2, 3)])
def test_flat_matches_formula(gen: torch.Generator, stride: int, padding: int) -> None:
    conv = nn.Conv2d(3, 4, 7 if padding == 3 else 3, stride=stride, padding=padding).double()
    x = torch.randn(2, 3, 11, 11, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 4, *conv(x).shape[-2:], generator=gen, dtype=torch.float64)
    (got,) = rule_relevance(rules.FlatConv(conv), r, x)
    torch.testing.assert_close(got, ref_flat(conv, x, r), atol=TOL, rtol=TOL)
    torch.testing.assert_close(got.sum(), r.sum(), atol=0, rtol=1e-6)  # Flat conserves (up to ε)


def test_flat_grouped_conv_matches_formula(gen: torch.Generator) -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    x = torch.randn(1, 4, 5, 5, generator=gen, dtype=torch.float64)
    r = torch.randn(1, 6, 5, 5, generator=gen, dtype=torch.float64)
    (got,) = rule_relevance(rules.FlatConv(conv), r, x)
    ones = torch.ones_like(x[:, :2])
    want = torch.cat([ref_flat(_slice_conv(conv, g), ones, r[:, 3 * g : 3 * g + 3]) for g in (0, 1)], 1)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def _slice_conv(conv: nn.Conv2d, group: int) -> nn.Conv2d:
    part = nn.Conv2d(2, 3, 3, padding=1).double()
    part.weight.data = conv.weight.data[3 * group : 3 * group + 3]
    return part


def test_epsilon_matches_formula(gen: torch.Generator) -> None:
    lin = nn.Linear(6, 3).double()
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    r = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    (got,) = rule_relevance(rules.EpsilonLinear(lin), r, x)
    torch.testing.assert_close(got, ref_epsilon(lin, x, r), atol=TOL, rtol=TOL)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"), [(3, 1, 1), (4, 4, 0)], ids=["overlapping", "patches"]
)
def test_epsilon_conv_matches_formula(gen: torch.Generator, kernel: int, stride: int, padding: int) -> None:
    """The ε rule on a conv, signed inputs: overlapping windows, and a ViT patch embedding's
    non-overlapping ones (kernel = stride)."""
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding).double()
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 5, *conv(x).shape[-2:], generator=gen, dtype=torch.float64)
    (got,) = rule_relevance(rules.EpsilonConv(conv), r, x)
    torch.testing.assert_close(got, ref_epsilon_conv(conv, x, r), atol=TOL, rtol=TOL)


def test_flat_linear_spreads_uniformly(gen: torch.Generator) -> None:
    lin = nn.Linear(5, 3).double()
    r = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    (got,) = rule_relevance(rules.FlatLinear(lin), r, torch.randn(2, 5, dtype=torch.float64))
    torch.testing.assert_close(got, (r.sum(1, keepdim=True) / (5 + EPS)).expand(2, 5), atol=TOL, rtol=0)


def test_norm_sum_splits_in_proportion(gen: torch.Generator) -> None:
    a, b = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    r = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    got_a, got_b = rule_relevance(rules.NormSum(), r, a, b)
    torch.testing.assert_close(got_a, a * r / stab(a + b), atol=TOL, rtol=TOL)
    torch.testing.assert_close(got_b, b * r / stab(a + b), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(3)])
def test_norm_avgpool_matches_formula(gen: torch.Generator, pool: nn.Module) -> None:
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64)
    (got,) = rule_relevance(rules.NormAvgPool(pool), r, x)
    torch.testing.assert_close(got, ref_norm_avgpool(2, x, r), atol=TOL, rtol=TOL)


def test_norm_global_avgpool(gen: torch.Generator) -> None:
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 3, 1, 1, generator=gen, dtype=torch.float64)
    (got,) = rule_relevance(rules.NormAvgPool(nn.AdaptiveAvgPool2d(1)), r, x)
    mean = x.mean((2, 3), keepdim=True)  # Norm: x_i · Pᵀ(R / stab(P x)), Pᵀs = s / (H·W)
    torch.testing.assert_close(got, x * (r / stab(mean)) / 25, atol=TOL, rtol=TOL)


def test_pass_forwards_relevance_unchanged(gen: torch.Generator) -> None:
    x, r = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    (got,) = rule_relevance(rules.PassRule(nn.GELU()), r, x)
    assert torch.equal(got, r)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_tiny_model_matches_layerwise_reference(gen: torch.Generator) -> None:
    """Composite of the rules, chained by hand from the formulas, vs the rule model's backward."""
    torch.manual_seed(0)
    model = Tiny().double().eval()
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    f = model.features
    a1 = f[1](f[0](x))
    a2 = f[3](f[2](a1))
    p = f[4](a2)
    a3 = f[6](f[5](p))
    pooled = model.pool(a3)
    logits = model.fc(pooled.flatten(1))
    r = torch.zeros_like(logits)
    r[:, 1] = logits[:, 1]
    r_pool = ref_epsilon(model.fc, pooled.flatten(1), r)[:, :, None, None]
    r_a3 = a3 * r_pool / stab(pooled) / (a3.shape[-1] * a3.shape[-2])  # Norm on global average pool
    r_p = ref_zplus(f[5], p, r_a3)  # ReLU: Pass
    p_in = a2.clone().requires_grad_(True)
    (r_a2,) = torch.autograd.grad(f[4](p_in), p_in, r_p)  # MaxPool: gradient
    r_a1 = ref_zplus(f[2], a1, r_a2)
    r_x = ref_flat(f[0], x, r_a1)

    lrp = build_lrp_model(copy.deepcopy(model))
    x_in = x.clone().requires_grad_(True)
    out = lrp(x_in)
    torch.testing.assert_close(out, logits, atol=1e-12, rtol=0)
    (got,) = torch.autograd.grad(out, x_in, r)
    torch.testing.assert_close(got, r_x, atol=TOL, rtol=TOL)


def test_tiny_model_matches_zennit(gen: torch.Generator) -> None:
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    torch.manual_seed(1)
    model = Tiny().double().eval().requires_grad_(False)
    x = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    grad = torch.zeros(3, 3, dtype=torch.float64)
    grad[:, 2] = 1.0
    with Gradient(model, EpsilonPlusFlat()) as attributor:
        _, want = attributor(x.clone().requires_grad_(True), lambda _o: grad)
    lrp = build_lrp_model(copy.deepcopy(model))
    x_in = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(lrp(x_in), x_in, grad)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_unsupported_padding_is_refused() -> None:
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        rules.ZPlusConv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


@pytest.mark.parametrize(
    "make",
    [
        lambda: rules.ZPlusConv(nn.Conv2d(3, 4, 3, padding=1).double()),
        lambda: rules.FlatConv(nn.Conv2d(3, 4, 3, stride=2, padding=1).double()),
        lambda: rules.EpsilonLinear(nn.Linear(6 * 6 * 3, 4).double()),
        lambda: rules.NormAvgPool(nn.AvgPool2d(2)),
        lambda: rules.NormAvgPool(nn.AdaptiveAvgPool2d(4)),
        lambda: rules.NormAvgPool(nn.AdaptiveAvgPool2d(1)),
        lambda: rules.PassRule(nn.ReLU()),
    ],
    ids=["zplus", "flat", "epsilon", "avgpool", "adaptive", "global", "pass"],
)
def test_batched_seeds_equal_one_backward_each(gen: torch.Generator, make: object) -> None:
    """``is_grads_batched`` (vmap over the backward) must give each seed's own relevance."""
    rule = make()  # type: ignore[operator]
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    x = x.flatten(1) if isinstance(rule, rules.EpsilonLinear) else x
    x = x.requires_grad_(True)
    out = rule(x)
    seeds = torch.randn(3, *out.shape, generator=gen, dtype=torch.float64)
    (batched,) = torch.autograd.grad(out, x, seeds, is_grads_batched=True, retain_graph=True)
    for s in range(3):
        (one,) = torch.autograd.grad(out, x, seeds[s], retain_graph=True)
        torch.testing.assert_close(batched[s], one, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_stabilize_is_bit_identical_to_zennits_form(dtype: torch.dtype) -> None:
    """rules.stabilize computes ``±ε + z`` with fewer temporaries than zennit's
    ``where(z >= 0, z + ε, z - ε)``; the two must agree bit for bit, signed zeros included."""
    torch.manual_seed(0)
    z = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-8, 3, (1000,)), torch.tensor([0.0, -0.0])])
    z = z.to(dtype)
    expected = torch.where(z >= 0, z + EPS, z - EPS)
    got = rules.stabilize(z, EPS)
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    assert got[-1] > 0 and got[-2] > 0  # sign(±0) = +1, as zennit


# --------------------------------------------------------------------------- prepacked CPU kernels
# The z⁺ layers run on oneDNN kernels with prepacked weights on the CPU in float32 (rules.PackedConv);
# the float64 tests above take aten. These compare the two paths in float32.


def _aten_and_packed(
    monkeypatch: pytest.MonkeyPatch, run: object
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    monkeypatch.setenv(rules.PACKED_ENV, "0")
    aten = run()  # type: ignore[operator]
    monkeypatch.delenv(rules.PACKED_ENV)
    packed = run()  # type: ignore[operator]
    return aten, packed


needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(),
    reason="this torch build has no oneDNN: the aten path is all there is",
)


@needs_onednn
@pytest.mark.parametrize("signed", [False, True], ids=["x>=0", "signed-x"])
@pytest.mark.parametrize(
    ("k", "stride", "padding", "size"),
    [(3, 1, 1, 8), (3, 2, 1, 9), (3, 2, 0, 10), (1, 2, 0, 7), (3, 1, 1, 4)],
    ids=["3x3", "3x3-s2-odd", "3x3-s2-nopad", "1x1-s2", "3x3-4px"],
)
def test_packed_zplus_equals_aten(
    monkeypatch: pytest.MonkeyPatch,
    gen: torch.Generator,
    signed: bool,
    k: int,
    stride: int,
    padding: int,
    size: int,
) -> None:
    """Output and relevance of a z⁺ layer: the same with prepacked kernels as with aten, to float32
    rounding, including strided convs whose transposed conv needs an output padding."""
    conv = nn.Conv2d(16, 24, k, stride=stride, padding=padding)
    x = torch.randn(3, 16, size, size, generator=gen)
    x = x if signed else x.clamp(min=0)
    rule = rules.ZPlusConv(conv)
    r = torch.randn(3, 24, *conv(x).shape[-2:], generator=gen)

    def run() -> tuple[torch.Tensor, ...]:
        xg = x.clone().requires_grad_(True)
        out = rule(xg)
        (rel,) = torch.autograd.grad(out, xg, r)
        return out.detach(), rel

    aten, packed = _aten_and_packed(monkeypatch, run)
    assert rule.packed(x) is not None  # the packed path really ran
    for a, p in zip(aten, packed, strict=True):
        assert p.shape == a.shape
        torch.testing.assert_close(p, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


@needs_onednn
def test_packed_zplus_batched_seeds_equal_one_backward_each(gen: torch.Generator) -> None:
    """Several seeds through the packed adjoint's vmap rule (one larger batch) give each seed's own
    relevance, as one backward per seed does."""
    rule = rules.ZPlusConv(nn.Conv2d(8, 16, 3, stride=2, padding=1))
    x = torch.rand(2, 8, 9, 9, generator=gen).requires_grad_(True)
    assert rule.packed(x) is not None
    out = rule(x)
    seeds = torch.randn(3, *out.shape, generator=gen)
    (batched,) = torch.autograd.grad(out, x, seeds, is_grads_batched=True, retain_graph=True)
    for s in range(3):
        (one,) = torch.autograd.grad(out, x, seeds[s], retain_graph=True)
        torch.testing.assert_close(batched[s], one, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_packed_weights_follow_the_layers_weights(gen: torch.Generator) -> None:
    """Packed weights are a cache of the buffers: loading new weights repacks them."""
    a, b = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    rule, other = rules.ZPlusConv(a), rules.ZPlusConv(b)
    x = torch.rand(2, 4, 5, 5, generator=gen)
    before = rule(x).detach()
    kernels = rule.packed(x)
    rule.load_state_dict(other.state_dict())
    assert rule.packed(x) is not kernels
    torch.testing.assert_close(rule(x), other(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rule(x), before)


def test_packed_kernels_only_where_they_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64, the switch set to 0: aten. (CUDA tensors never reach oneDNN: device check.)"""
    rule = rules.ZPlusConv(nn.Conv2d(4, 6, 3, padding=1))
    assert rule.packed(torch.rand(1, 4, 5, 5, dtype=torch.float64)) is None
    monkeypatch.setenv(rules.PACKED_ENV, "0")
    assert rule.packed(torch.rand(1, 4, 5, 5)) is None
