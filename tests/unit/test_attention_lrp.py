"""AttnLRP and CP-LRP in the engine: each rule against its formula, ViTs against lxt 2.1 (issue 25).

The reference is lxt's own rule functions (``lxt.explicit.functional``: ``linear_epsilon``,
``layer_norm``, ``add2``, ``matmul``, ``softmax``; ``lxt.explicit.rules``: ``identity``,
``epsilon_lrp``) composed into the same ViT forward pass, seeded at the same logit. lxt is a
test-only dependency (installed without its dependencies, Makefile): ``lxt.efficient``, its
monkey-patching of torchvision's ViT, imports ``transformers`` for its LLM patches and is not used.

The comparison is at the patch-embedding output (every transformer rule is above it); the input
heatmap is then checked against the ε rule through the patch embedding written out by hand (the
ViT family's ``epsilon`` composite; lxt's own pixel relevance, gradient × input of that linear
map, is the same rule with ε = 0).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import timm
import torch
import torchvision
from torch import nn

from medaudit.models.errors import ConfigError
from medaudit.models.registry import ModelCfg
from medaudit.models.xai import Explainer, canonize, rule_report
from medaudit.models.xai import attention_rules as ar
from medaudit.models.xai.layers import AttentionCore, TokenMean

EPS = 1e-6
ATTENTION = ["attnlrp", "cp-lrp"]


def stab(z: torch.Tensor) -> torch.Tensor:
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z)


def relevance(fn: object, r: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xs = tuple(x.clone().requires_grad_(True) for x in xs)
    return torch.autograd.grad(fn(*xs), xs, r)  # type: ignore[operator]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------- rules vs formulas


def test_matmul_uniform_epsilon_matches_prop_3_3(gen: torch.Generator) -> None:
    """Contribution z_ipj = s·a_ip b_pj, ε over the sum, half of each term to each factor."""
    a = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64)
    scale = 0.7
    got_a, got_b = relevance(lambda x, y: ar._UniformMatMulFn.apply(x, y, scale, EPS), r, a, b)
    z = scale * a[..., :, :, None] * b[..., None, :, :]  # (.., i, p, j)
    share = z / stab(z.sum(-2, keepdim=True) * 2) * r[..., :, None, :]
    torch.testing.assert_close(got_a, share.sum(-1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_b, share.sum(-3), rtol=1e-9, atol=1e-12)


def test_matmul_with_a_constant_factor_gives_the_other_all(gen: torch.Generator) -> None:
    """CP-LRP's A·v: the ε-rule of the linear map v ↦ A v (A without gradient)."""
    attn = torch.rand(2, 4, 4, generator=gen, dtype=torch.float64).softmax(-1)
    v = torch.rand(2, 4, 3, generator=gen, dtype=torch.float64) + 0.1  # |A v| ≫ ε
    r = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    (got,) = relevance(lambda y: ar._UniformMatMulFn.apply(attn, y, 1.0, EPS), r, v)
    z = attn[..., :, :, None] * v[..., None, :, :]
    want = (z / stab(z.sum(-2, keepdim=True)) * r[..., :, None, :]).sum(-3)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(got.sum(), r.sum(), rtol=1e-5)  # no bias: conserved


def test_softmax_is_linearised_at_its_input(gen: torch.Generator) -> None:
    """Prop. 3.1: R_i = x_i (R_i − s_i Σ_j R_j), i.e. x ⊙ Jᵀ(R / s) ⊙ ... written out per row."""
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    r = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    (got,) = relevance(ar._SoftmaxFn.apply, r, x)
    s = x.softmax(-1)
    jac = torch.diag_embed(s) - s[:, :, None] * s[:, None, :]  # ∂s_j/∂x_i
    want = x * torch.einsum("bij,bj->bi", jac, r / s)  # DTD at x: x_i Σ_j ∂s_j/∂x_i R_j / s_j
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_holds_sigma_constant_and_applies_epsilon(gen: torch.Generator, affine: bool) -> None:
    """Prop. 3.4: y = W x + b with W = diag(w/σ)(I − 11ᵀ/n) fixed at this x; ε over W x + b."""
    norm = nn.LayerNorm(6, elementwise_affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=gen)
            norm.bias.normal_(0, 0.3, generator=gen)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64) * 2 + 1
    r = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    rule = ar.LayerNormRule(norm)
    with torch.no_grad():
        torch.testing.assert_close(rule(x), norm(x))
    (got,) = relevance(rule, r, x)
    w = norm.weight if affine else torch.ones(6, dtype=torch.float64)
    b = norm.bias if affine else torch.zeros(6, dtype=torch.float64)
    for row in range(4):
        sigma = (x[row].var(unbiased=False) + norm.eps).sqrt()
        mat = torch.diag(w / sigma) @ (torch.eye(6, dtype=torch.float64) - 1 / 6)  # y_j = Σ_i M_ji x_i + b_j
        z = mat * x[row][None, :]  # (j, i)
        want = (z / stab(z.sum(1, keepdim=True) + b[:, None]) * r[row][:, None]).sum(0)
        torch.testing.assert_close(got[row], want, rtol=1e-9, atol=1e-12)


def test_token_mean_is_norm_and_skips_prefix_tokens(gen: torch.Generator) -> None:
    x = torch.rand(2, 5, 3, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    rule = ar.NormTokenMean(TokenMean(start=1))
    (got,) = relevance(rule, r, x)
    y = x[:, 1:].mean(1)
    assert torch.equal(got[:, 0], torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(got[:, 1:], x[:, 1:] / 4 * (r / stab(y))[:, None], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("attention", ATTENTION)
def test_attention_rules_compute_attention_and_take_batched_seeds(
    gen: torch.Generator, attention: str
) -> None:
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    core = AttentionCore(4**-0.5)
    rule = (ar.AttnLRPAttention if attention == "attnlrp" else ar.CPLRPAttention)(core)
    with torch.no_grad():
        want = nn.functional.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(core(q, k, v), want)
        torch.testing.assert_close(rule(q, k, v), want)
    seeds = torch.randn(3, 2, 3, 5, 4, generator=gen, dtype=torch.float64)
    xs = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
    out = rule(*xs)
    batched = torch.autograd.grad(out, xs, seeds, is_grads_batched=True, allow_unused=True)
    for s in range(3):
        single = torch.autograd.grad(rule(*xs), xs, seeds[s], allow_unused=True)
        for got, want_s in zip(batched, single, strict=True):
            if want_s is None:
                assert attention == "cp-lrp" and got is None  # q, k get nothing under CP-LRP
            else:
                torch.testing.assert_close(got[s], want_s)


# --------------------------------------------------------------------------- ViTs


def timm_vit(pool: str, layer_scale: bool = False) -> nn.Module:
    torch.manual_seed(0)
    kw = {"init_values": 0.5} if layer_scale else {}
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=3, img_size=32, depth=3, global_pool=pool, **kw
    )
    with torch.no_grad():  # trained-like: biases, affine norms and a non-trivial head
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.7, 1.3, generator=g)
        model.head.weight.normal_(0, 0.3, generator=g)
    return model.eval().double().requires_grad_(False)


def tv_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96, num_classes=3
    )
    with torch.no_grad():  # torchvision zero-initialises the head
        model.heads.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return model.eval().double().requires_grad_(False)


def vit_cfg(model: nn.Module) -> ModelCfg:
    tokens = "patch_embed" if isinstance(model, timm.models.VisionTransformer) else "conv_proj"
    return ModelCfg(
        arch="vit", source="test", labels=("a", "b", "c"), hook_points={"tokens": tokens}, canonizer="vit"
    )


def lxt_token_relevance(
    model: nn.Module, x: torch.Tensor, target: int, attention: str, aligned: bool = False
) -> torch.Tensor:
    """lxt's rules through the ViT above its patch embedding: relevance at the patch tokens.

    ``aligned``: ε = 1e-6 on sums and products too (lxt's defaults there are 1e-8); with
    :func:`signed_stabilizer` the two then compute the same numbers.
    """
    import lxt.explicit.functional as lf
    from lxt.explicit.rules import epsilon_lrp, identity

    eps = {"epsilon": EPS} if aligned else {}
    timm_model = isinstance(model, timm.models.VisionTransformer)
    with torch.no_grad():
        tokens = model.patch_embed(x) if timm_model else model._process_input(x)
    leaf = tokens.clone().requires_grad_(True)
    batch = x.shape[0]
    cls = (model.cls_token if timm_model else model.class_token).expand(batch, -1, -1)
    h = torch.cat([cls, leaf], 1)
    h = lf.add2(h, (model.pos_embed if timm_model else model.encoder.pos_embedding).expand_as(h), **eps)

    def ln(norm: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
        return lf.layer_norm(t, norm.weight, norm.bias, norm.eps)

    def attend(t: torch.Tensor, qkv: nn.Linear, proj: nn.Linear, heads: int) -> torch.Tensor:
        b, n, dim = t.shape
        q, k, v = (
            lf.linear_epsilon(t, qkv.weight, qkv.bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        )
        scale = q.shape[-1] ** -0.5
        if attention == "attnlrp":
            attn = lf.softmax(lf.matmul(lf.mul2(q, scale), k.transpose(-2, -1), **eps), -1)
            out = lf.matmul(attn, v, **eps)
        else:  # CP-LRP: A a constant, the ε-rule of v ↦ A v
            attn = ((q @ k.transpose(-2, -1)) * scale).softmax(-1).detach()
            out = epsilon_lrp(lambda vv: attn @ vv, 1e-6, v)
        return lf.linear_epsilon(out.transpose(1, 2).reshape(b, n, dim), proj.weight, proj.bias)

    def mlp(t: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
        t = identity(nn.functional.gelu, lf.linear_epsilon(t, fc1.weight, fc1.bias))
        return lf.linear_epsilon(t, fc2.weight, fc2.bias)

    if timm_model:
        for blk in model.blocks:
            a = attend(ln(blk.norm1, h), blk.attn.qkv, blk.attn.proj, blk.attn.num_heads)
            if not isinstance(blk.ls1, nn.Identity):
                a = lf.mul2(a, blk.ls1.gamma)
            h = lf.add2(h, a, **eps)
            m = mlp(ln(blk.norm2, h), blk.mlp.fc1, blk.mlp.fc2)
            if not isinstance(blk.ls2, nn.Identity):
                m = lf.mul2(m, blk.ls2.gamma)
            h = lf.add2(h, m, **eps)
        h = h if isinstance(model.norm, nn.Identity) else ln(model.norm, h)
        pooled = h[:, 0] if model.global_pool == "token" else lf.mean(h[:, 1:], 1, False)
        pooled = pooled if isinstance(model.fc_norm, nn.Identity) else ln(model.fc_norm, pooled)
        head = model.head
    else:
        for blk in model.encoder.layers:
            mha = blk.self_attention
            a = attend(ln(blk.ln_1, h), _packed(mha), mha.out_proj, mha.num_heads)
            h = lf.add2(a, h, **eps)
            h = lf.add2(h, mlp(ln(blk.ln_2, h), blk.mlp[0], blk.mlp[3]), **eps)
        pooled, head = ln(model.encoder.ln, h)[:, 0], model.heads.head
    logits = lf.linear_epsilon(pooled, head.weight, head.bias)
    seed = torch.zeros_like(logits)
    seed[:, target] = logits[:, target].detach()
    (rel,) = torch.autograd.grad(logits, leaf, seed)
    return rel


def _packed(mha: nn.MultiheadAttention) -> nn.Linear:
    lin = nn.Linear(mha.embed_dim, 3 * mha.embed_dim).double()
    lin.weight, lin.bias = mha.in_proj_weight, mha.in_proj_bias  # type: ignore[assignment]
    return lin


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


MODELS = {
    "timm-token": lambda: timm_vit("token"),
    "timm-avg": lambda: timm_vit("avg"),
    "timm-layerscale": lambda: timm_vit("token", layer_scale=True),
    "torchvision": tv_vit,
}


def signed_stabilizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """lxt stabilises every denominator as ``z + ε``; zennit and the engine as ``z + ε·sign(z)``
    (method.md §3.1). Where ``z < 0`` the two differ by 2ε: set lxt to the engine's convention."""
    import lxt.explicit.functional as lf
    import lxt.explicit.rules as lr

    def stabilize(z: torch.Tensor, epsilon: float = 1e-6, inplace: bool = False) -> torch.Tensor:
        return stab(z) if epsilon == EPS else z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z)

    monkeypatch.setattr(lf, "_stabilize", stabilize)
    monkeypatch.setattr(lr, "_stabilize", stabilize)


def engine_tokens(model: nn.Module, x: torch.Tensor, attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's relevance at the patch tokens (B, N, C) and its input heatmaps, target 1."""
    e = Explainer(model, vit_cfg(model), attention=attention).explain(x, [1], relevance_layers=["tokens"])
    ours = e.relevance["tokens"][0]
    if ours.ndim == 4:  # torchvision's conv_proj output (B, C, h, w) -> tokens (B, h·w, C)
        ours = ours.flatten(2).transpose(1, 2)
    return ours, e.heatmaps[0]


def epsilon_through_patches(model: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The ε rule from patch-token relevance (B, N, C) to the pixels, summed over RGB (B, H, W):
    ``R_i = x_i Σ_c w_ci R_c / stab(z_c)`` within each non-overlapping patch."""
    conv = model.patch_embed.proj if isinstance(model, timm.models.VisionTransformer) else model.conv_proj
    with torch.no_grad():
        z = conv(x).flatten(2).transpose(1, 2)
    b, _, h, w = x.shape
    p = conv.kernel_size[0]
    back = torch.einsum("bnc,cdij->bndij", tokens / stab(z), conv.weight)  # (B, N, 3, p, p)
    back = back.reshape(b, h // p, w // p, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h, w)
    return (x * back).sum(1)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("name", list(MODELS))
def test_vit_relevance_equals_lxt_with_the_same_stabiliser(
    name: str, attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ε and its sign convention aligned, the relevance at the patch tokens is lxt's to
    float64 rounding, and the input heatmap is that relevance taken to the pixels by the ε rule
    through the patch embedding: pixel detail inside each 16×16 patch, not Flat's uniform block."""
    signed_stabilizer(monkeypatch)
    model = MODELS[name]()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours, heat = engine_tokens(model, x, attention)
    theirs = lxt_token_relevance(model, x, 1, attention, aligned=True)
    # Average pooling: lxt's mean puts ε on the token sum, the engine's Norm (zennit's, as for
    # avg-pools) on the mean; everywhere else the two agree to rounding.
    tol = 1e-3 if name == "timm-avg" else 1e-9
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * theirs.abs().max().item())
    torch.testing.assert_close(heat, epsilon_through_patches(model, x, ours), rtol=1e-8, atol=1e-12)
    patch = heat[:, :16, :16]  # one patch: its pixels differ (Flat would give them one value)
    assert patch.std(dim=(1, 2)).min() > 1e-3 * patch.abs().amax(dim=(1, 2)).max()


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("name", ["timm-token", "torchvision"])
def test_vit_relevance_is_close_to_lxt_as_shipped(name: str, attention: str) -> None:
    """lxt's own defaults (ε = 1e-8 on sums and products, ``z + ε`` for every sign): the only
    differences are those stabilisers; mean cosine ≥ 0.999, relevance sums within 2 %."""
    model = MODELS[name]()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours, _ = engine_tokens(model, x, attention)
    theirs = lxt_token_relevance(model, x, 1, attention)
    assert cosines(ours, theirs).mean() >= 0.999, cosines(ours, theirs)
    torch.testing.assert_close(ours.sum((1, 2)), theirs.sum((1, 2)), rtol=0.02, atol=1e-3)


def test_vit_conserves_the_logit_when_nothing_absorbs_it() -> None:
    """CP-LRP with average pooling, no biases, no position embedding: input relevance = logit.

    Every rule on the way conserves then (ε, Norm, identity on σ, Pass, CP's ε on v); AttnLRP's
    softmax rule does not (the bias of its linearisation keeps a share), nor does class-token
    pooling, where the class token's own stream ends at a parameter.
    """
    model = timm_vit("avg")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name == "pos_embed":
                p.zero_()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    e = Explainer(model, vit_cfg(model), attention="cp-lrp").explain(x, [0, 1, 2])
    torch.testing.assert_close(e.heatmaps.flatten(2).sum(2), e.logits.T, rtol=1e-4, atol=1e-6)


def test_concept_heatmaps_at_the_class_token_as_the_audit_asks_them() -> None:
    """The registry ViT's CAV layer is the class token after the final norm, (B, C): a concept
    seed there (ReLU(A) ⊙ v, method.md §2.1) reaches every pixel, and the audit's one call with a
    class and a concept seed (a batched backward) equals one call per seed."""
    from medaudit.models.registry import get_cfg
    from medaudit.models.xai import ConceptTarget

    model = timm_vit("token").float()  # three blocks of the registry's vit_tiny (class token)
    cfg = replace(vit_cfg(model), hook_points=get_cfg("vit_tiny_patch16_224").hook_points)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    v = torch.randn(192, generator=torch.Generator().manual_seed(2))
    explainer = Explainer(model, cfg)
    concept = ConceptTarget("inspection_layer", v)
    both = explainer.explain(x, ["pred", concept], relevance_layers=["inspection_layer"])
    alone = explainer.explain(x, [concept]).heatmaps[0]
    assert torch.count_nonzero(alone) == alone.numel()
    torch.testing.assert_close(both.heatmaps[1], alone, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        both.heatmaps[0], explainer.explain(x, ["pred"]).heatmaps[0], rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_canonized_vit_computes_the_same_function(name: str) -> None:
    model = MODELS[name]()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    canonical = canonize(model, "vit")
    assert sum(isinstance(m, AttentionCore) for m in canonical.modules()) == (3 if "timm" in name else 2)
    with torch.no_grad():
        torch.testing.assert_close(canonical(x), model(x), rtol=1e-10, atol=1e-10)


def test_lrp_path_never_runs_the_fused_attention_kernel() -> None:
    """The fused kernels keep neither the attention matrix nor its logits; the engine's forward
    and backward must not call them (timm uses them by default: the original model does)."""
    from torch.profiler import ProfilerActivity, profile

    model = timm_vit("token").float()
    assert model.blocks[0].attn.fused_attn
    x = torch.randn(1, 3, 32, 32)
    explainer = Explainer(model, vit_cfg(model))

    def ops(fn: object) -> set[str]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()  # type: ignore[operator]
        return {e.key for e in prof.key_averages()}

    assert any("scaled_dot_product" in k for k in ops(lambda: model(x)))
    assert not any("scaled_dot_product" in k for k in ops(lambda: explainer.explain(x, [0, 1])))


def test_vit_rule_report_and_attention_choice() -> None:
    model = timm_vit("avg")
    report = {r.path: r.rule for r in rule_report(model, "vit")}
    assert report["blocks.0.attn.core"] == "CP-LRP"
    assert report["blocks.0.norm1"].startswith("LayerNorm") and report["fc_norm"].startswith("LayerNorm")
    assert report["blocks.0.mlp.act"] == "Pass" and report["blocks.0.attn.qkv"] == "Epsilon"
    assert report["patch_embed.proj"] == "Epsilon" and report["token_pool"] == "Norm"
    assert {r.path: r.rule for r in rule_report(model, "vit", "attnlrp")}["blocks.2.attn.core"] == "AttnLRP"
    with pytest.raises(ConfigError, match="attention='softmax'; valid: attnlrp, cp-lrp"):
        Explainer(model, vit_cfg(model), attention="softmax")


def test_unsupported_vit_variants_are_refused_by_name() -> None:
    from medaudit.models.errors import CanonizerError

    pooled = timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32, depth=1, global_pool="max")
    with pytest.raises(CanonizerError, match="pools by 'max'"):
        canonize(pooled, "vit")
    gated = timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32, depth=1)
    gated.blocks[0].attn.gate = nn.Linear(192, 192)
    with pytest.raises(CanonizerError, match="gated attention"):
        canonize(gated, "vit")
