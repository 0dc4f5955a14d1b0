"""Corrections (method.md §4): P-ClArC algebra, reactive gate, RR-ClArC and RRR losses, freezing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medaudit.models.corrections import (
    RRR,
    ClarcProjection,
    CorrectionData,
    FinetuneConfig,
    PClarc,
    ReactivePClarc,
    RRClarc,
    Vanilla,
    find_projection,
    fit_correction_data,
    freeze_up_to,
    pooled_activations,
    rrclarc_penalty,
    rrr_penalty,
)
from medaudit.models.corrections.base import capture, frozen_module_names
from medaudit.models.corrections.io import load_version, save_version
from medaudit.models.corrections.rrclarc import random_signs
from medaudit.models.corrections.rrr import DEFAULT_LAMB, PAPER_LAMBS
from medaudit.models.errors import ConfigError
from medaudit.models.registry import ModelCfg, create_model

C = 6


def _unit(rng: np.random.Generator, n: int = C) -> np.ndarray:
    v = rng.normal(size=n)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, ModelCfg, CorrectionData]:
    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=32)
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1] * 12)
    t = np.array([1, 0, 0] * 8)
    masks = torch.zeros(24, 32, 32)
    masks[torch.from_numpy(t == 1), 2:10, 2:12] = 1.0
    data = fit_correction_data(model, cfg, "identity_2", X, y, t, masks=masks, artifact="box")
    return model, cfg, data


def _toy() -> tuple[nn.Module, ModelCfg, CorrectionData]:
    """An 8-px two-stage conv net with hook point "feat" (the first stage): fast fine-tuning tests."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU()),
        nn.Conv2d(C, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()
    cfg = ModelCfg(arch="toy", source="test", input_size=(3, 8, 8), hook_points={"feat": "0"})
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1] * 16)
    t = np.array([1, 0, 0, 0] * 8)
    X[torch.from_numpy(t == 1), 0, :3, :3] = 255  # a red corner "artifact"
    masks = torch.zeros(32, 8, 8)
    masks[torch.from_numpy(t == 1), :3, :3] = 1.0
    return model, cfg, fit_correction_data(model, cfg, "feat", X, y, t, masks=masks, artifact="corner")


# ------------------------------------------------------------------------- P-ClArC algebra


@pytest.mark.parametrize("shape", [(5, C, 4, 3), (5, C)])
def test_pclarc_moves_coordinate_to_mu0_and_keeps_orthogonal_part(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    v, mu0 = _unit(rng), 0.7
    proj = ClarcProjection(v, mu0).double()
    a = torch.from_numpy(rng.normal(size=shape) * 3 + 1)
    out = proj(a)
    vt = proj.v  # the stored (float32-rounded) direction, the one the projection uses
    phi, phi2 = (a, out) if a.ndim == 2 else (a.flatten(2).amax(-1), out.flatten(2).amax(-1))
    # the max-pooled vector shifts by the same vector as every position, so the coordinate is exact
    assert torch.allclose(phi2 @ vt, torch.full((shape[0],), mu0, dtype=torch.float64), atol=1e-12)
    orth = lambda p: p - (p @ vt)[:, None] * vt / (vt @ vt)  # noqa: E731
    assert torch.allclose(orth(phi2), orth(phi), atol=1e-12)
    # per position too: only the component along v changes, by the same amount everywhere
    diff = out - a
    if a.ndim == 4:
        assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-12)
        diff = diff[:, :, 0, 0]
    assert torch.allclose(orth(diff), torch.zeros_like(diff), atol=1e-12)


def test_reactive_leaves_non_positive_gate_untouched() -> None:
    rng = np.random.default_rng(1)
    v, gate = _unit(rng), _unit(rng)
    proj = ClarcProjection(v, 0.3, gate=gate).double()
    a = torch.from_numpy(rng.normal(size=(40, C, 3, 3)) + 3 * rng.normal(size=(40, C, 1, 1)))
    out = proj(a)
    score = a.flatten(2).amax(-1) @ torch.from_numpy(gate)
    off, on = score <= 0, score > 0
    assert off.any() and on.any()
    assert torch.equal(out[off], a[off])
    coord = out[on].flatten(2).amax(-1) @ proj.v
    assert torch.allclose(coord, torch.full_like(coord, 0.3), atol=1e-12)


def test_projection_rejects_wrong_channel_count() -> None:
    with pytest.raises(ConfigError, match=r"\(B, 6"):
        ClarcProjection(np.eye(C)[0], 0.0)(torch.zeros(2, 5, 3, 3))


def test_pclarc_model_coordinate_is_mu0_and_original_untouched(tiny) -> None:
    model, cfg, data = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    corrected = PClarc().apply(model, cfg, data)
    assert find_projection(model, cfg, "identity_2") is None  # the original is not modified
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    X = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    phi = pooled_activations(corrected, cfg, "identity_2", X)
    np.testing.assert_allclose(phi @ data.cav, data.mu0_coordinate, rtol=0, atol=1e-5)
    # before the projection the activation is the original model's
    np.testing.assert_allclose(
        pooled_activations(corrected, cfg, "identity_2", X, before_correction=True),
        pooled_activations(model, cfg, "identity_2", X),
        atol=1e-6,
    )
    with pytest.raises(ConfigError, match="already carries"):
        PClarc().apply(corrected, cfg, data)


def _full_forward_phi(
    model: nn.Module, cfg: ModelCfg, layer: str, X: torch.Tensor, before: bool
) -> np.ndarray:
    """φ as pooled_activations computed it before the early exit: a whole forward per batch of 2."""

    model.eval()
    out = []
    with torch.no_grad(), capture(model, cfg, layer, before_correction=before) as store:
        for i in range(0, len(X), 2):
            model(cfg.normalize(X[i : i + 2]))
            out.append(store["a"].flatten(2).amax(-1).double().numpy())
    return np.concatenate(out)


def test_pooled_activations_stop_at_the_layer_and_equal_a_full_forward(tiny) -> None:
    model, cfg, data = tiny
    corrected = PClarc().apply(model, cfg, data)  # a ClarcProjection sits at the hook point
    X = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ran: list[str] = []
    for net, before in ((model, False), (corrected, False), (corrected, True)):
        ran.clear()
        handles = [
            net.get_submodule(name).register_forward_hook(lambda *_a, name=name: ran.append(name))
            for name in ("layer4", "fc")
        ]
        try:
            phi = pooled_activations(net, cfg, "identity_2", X, batch_size=2, before_correction=before)
        finally:
            for h in handles:
                h.remove()
        assert "layer4" not in ran and "fc" not in ran
        np.testing.assert_array_equal(phi, _full_forward_phi(net, cfg, "identity_2", X, before))
    # the hooks are gone and the models still run whole forwards
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    with torch.no_grad(), capture(model, cfg, "identity_2") as store:  # no stop by default
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2) and "a" in store


def test_reactive_needs_svm_cav(tiny) -> None:
    model, cfg, data = tiny
    no_svm = CorrectionData(layer=data.layer, cav=data.cav, mu0=data.mu0)
    with pytest.raises(ConfigError, match="cav_svm"):
        ReactivePClarc().apply(model, cfg, no_svm)


def test_pclarc_version_round_trips_through_save_and_load(tiny, tmp_path) -> None:
    model, cfg, data = tiny
    for corr in (PClarc(), ReactivePClarc()):
        net = corr.apply(model, cfg, data)
        path = save_version(
            net, cfg, tmp_path / f"{corr.name}.pt", correction=corr.name, layer=data.layer, params=corr.params
        )
        loaded, cfg2, record = load_version(path)
        assert record["name"] == corr.name and cfg2 == cfg
        proj = find_projection(loaded, cfg, data.layer)
        assert proj is not None and proj.reactive == (corr.name == "rpclarc")
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(loaded(x), net(x))


def test_vgg_layer_is_wrapped_and_keeps_working() -> None:
    torch.manual_seed(0)
    model, cfg = create_model("vgg16", img_size=32)
    rng = np.random.default_rng(0)
    data = CorrectionData(layer="features.8", cav=_unit(rng, 128), mu0=rng.random(128))
    net = PClarc().apply(model, cfg, data)
    assert isinstance(net.features[8], nn.Sequential)
    X = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    phi = pooled_activations(net, cfg, "features.8", X)
    np.testing.assert_allclose(phi @ data.cav, data.mu0_coordinate, atol=1e-5)


# ------------------------------------------------------------------------- RR-ClArC


class _Head(nn.Module):
    """a (B, C, 2, 2) -> logits via a linear map of the spatial mean; gradient is W per position."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        self.lin.weight.data.copy_(w)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.lin(a.mean((2, 3)))


def test_rrclarc_penalty_zero_iff_gradient_orthogonal_to_v() -> None:
    rng = np.random.default_rng(2)
    v = torch.from_numpy(_unit(rng))
    w = torch.from_numpy(rng.normal(size=(3, C)))
    a = torch.randn(4, C, 2, 2, dtype=torch.float64, requires_grad=True)
    signs = random_signs((4, 3), torch.Generator().manual_seed(0)).double()
    w_perp = w - (w @ v)[:, None] * v
    zero = rrclarc_penalty(_Head(w_perp).double()(a), a, v, signs)
    assert abs(zero.item()) < 1e-20
    pos = rrclarc_penalty(_Head(w).double()(a), a, v, signs)
    # reference: G_b = (Σ_k σ_bk W_k) / (H·W) at every position; its spatial mean projected on v
    ref = np.mean([(float((signs[b] @ w) @ v) / 4) ** 2 for b in range(4)])
    assert pos.item() == pytest.approx(ref, rel=1e-10)
    assert pos.requires_grad  # create_graph=True: the penalty is differentiable in the weights


def test_random_signs_are_plus_minus_one_and_seeded() -> None:
    s1 = random_signs((50, 3), torch.Generator().manual_seed(3))
    assert set(s1.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(s1, random_signs((50, 3), torch.Generator().manual_seed(3)))


def test_rrclarc_finetune_reduces_penalty() -> None:
    model, cfg, data = _toy()
    ft = FinetuneConfig(epochs=4, batch_size=16, lr=1e-2, augment=False)
    v = torch.as_tensor(data.cav, dtype=torch.float32)
    X, _ = data.require_training_data("test")

    def penalty_of(net: nn.Module) -> float:
        net.eval()
        with capture(net, cfg, data.layer, before_correction=False, ensure_grad=True) as store:
            logits = net((X.float() / 255 - 0.5) / 0.5)
        signs = random_signs(tuple(logits.shape), torch.Generator().manual_seed(0))
        return rrclarc_penalty(logits, store["a"], v, signs).item()

    net, flog, lamb = RRClarc(finetune=ft).fit(model, cfg, data)
    assert lamb > 0 and flog.steps == 8
    assert penalty_of(net) < 0.5 * penalty_of(model)
    # determinism: same seed, same weights
    again, _, lamb2 = RRClarc(finetune=ft).fit(model, cfg, data)
    assert lamb2 == lamb and all(
        torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters(), strict=True)
    )


def test_rrclarc_lambda_validation() -> None:
    with pytest.raises(ConfigError):
        RRClarc(lamb=-1.0)


# ------------------------------------------------------------------------- RRR


def _rrr_slow(model: nn.Module, x: torch.Tensor, masks: torch.Tensor) -> float:
    vals = []
    for b in range(len(x)):
        xb = x[b : b + 1].clone().requires_grad_(True)
        out = model(xb)
        (g,) = torch.autograd.grad(out[0, out[0].argmax()], xb)
        e = g[0].sum(0).abs().flatten().numpy()
        m = masks[b].flatten().numpy()
        den = np.linalg.norm(e) * np.linalg.norm(m)
        vals.append(float(e @ m / den) if den > 0 else 0.0)
    return float(np.mean(vals))


def test_rrr_penalty_matches_slow_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    masks = torch.zeros(5, 8, 8, dtype=torch.float64)
    masks[0, :3, :3] = 1
    masks[2, 4:, 2:7] = 0.5
    masks[3] = 1  # whole-image mask (like CheXpert's brightness artifact)
    fast = rrr_penalty(model(x), x, masks)
    assert fast.item() == pytest.approx(_rrr_slow(model, x.detach(), masks), rel=1e-10)
    assert fast.requires_grad
    assert rrr_penalty(model(x), x, torch.zeros_like(masks)).item() == 0.0


def test_rrr_finetune_runs_and_needs_masks() -> None:
    model, cfg, data = _toy()
    net, flog, lamb = RRR(finetune=FinetuneConfig(epochs=1, batch_size=16)).fit(model, cfg, data)
    assert lamb == DEFAULT_LAMB and flog.steps == 2 and flog.history[0]["penalty"] > 0
    no_masks = CorrectionData(data.layer, data.cav, data.mu0, images=data.images, labels=data.labels)
    with pytest.raises(ConfigError, match="masks"):
        RRR().apply(model, cfg, no_masks)


def test_rrr_default_lambda_departs_from_the_paper_and_cuts_the_mask_gradient_more() -> None:
    """The default λ is above the paper's {10, 50} (rrr.py docstring: the demo's short, small-step
    schedule); under such a schedule it must lower the input-gradient/mask cosine more than λ=10."""
    assert max(PAPER_LAMBS) < DEFAULT_LAMB and RRR().lamb == DEFAULT_LAMB
    assert RRR().params["lamb"] == DEFAULT_LAMB
    model, cfg, data = _toy()
    X, _ = data.require_training_data("test")
    assert data.masks is not None

    def penalty_of(net: nn.Module) -> float:
        x = ((X.float() / 255 - 0.5) / 0.5).requires_grad_(True)
        return rrr_penalty(net.eval()(x), x, data.masks).item()

    ft = FinetuneConfig(epochs=6, batch_size=16, lr=1e-2, augment=False)
    paper, _, _ = RRR(lamb=PAPER_LAMBS[0], finetune=ft).fit(model, cfg, data)
    ours, _, lamb = RRR(finetune=ft).fit(model, cfg, data)
    assert lamb == DEFAULT_LAMB
    before, p10, p_default = penalty_of(model), penalty_of(paper), penalty_of(ours)
    # measured 0.067 before, 0.030 at λ=10, 0.026 at the default
    assert p_default < 0.95 * p10 and p10 < before


# ------------------------------------------------------------------------- freezing


def test_freeze_up_to_freezes_exactly_layers_through_l() -> None:
    model, cfg = create_model("resnet18", img_size=32)
    frozen = freeze_up_to(model, cfg, "identity_2")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("layer4.", "fc."))}
    model.train()
    from medaudit.models.corrections.base import keep_frozen_eval

    keep_frozen_eval(frozen)
    bn_modes = {n: m.training for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all(not t for n, t in bn_modes.items() if not n.startswith("layer4."))
    assert all(t for n, t in bn_modes.items() if n.startswith("layer4."))


def test_freeze_vgg_excludes_ancestor_and_vit_tokens() -> None:
    model, cfg = create_model("vgg16", img_size=32)
    names = frozen_module_names(model, cfg, "features.8")
    assert "features" not in names and "features.8" in names and "features.9" not in names
    freeze_up_to(model, cfg, "features.8")
    assert not model.features[7].weight.requires_grad and model.features[10].weight.requires_grad
    vit, vcfg = create_model("vit_tiny_patch16_224")
    freeze_up_to(vit, vcfg, "inspection_layer")
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_vanilla_changes_only_layers_after_l() -> None:
    model, cfg, data = _toy()
    net = Vanilla(finetune=FinetuneConfig(epochs=1, batch_size=16, lr=1e-2)).apply(model, cfg, data)
    before, after = model.state_dict(), net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # weights and BN running statistics after ℓ change; nothing of ℓ (incl. its BN statistics) does
    assert changed and not any(k.startswith("0.") for k in changed)
    assert {"1.weight", "2.running_mean", "6.weight"} <= changed
    assert all(p.requires_grad for p in model.parameters())  # the original keeps its flags


def test_correction_data_validation() -> None:
    with pytest.raises(ConfigError, match="unit"):
        CorrectionData(layer="identity_2", cav=np.ones(3), mu0=np.zeros(3))
    with pytest.raises(ConfigError, match="uint8"):
        CorrectionData(
            layer="identity_2",
            cav=np.eye(3)[0],
            mu0=np.zeros(3),
            images=torch.zeros(2, 3, 4, 4),
            labels=torch.zeros(2),
        )


def test_augment_pair_moves_mask_with_image() -> None:
    # Departure from the authors' Kvasir-attacked hm loader (image augmented, mask not; §8, §11.15)
    from medaudit.models.corrections.base import augment_pair

    x = torch.zeros(16, 3, 8, 8)
    x[:, :, 0, 1] = 1.0  # one bright pixel, off the diagonal so transposes show
    m = (x[:, 0] > 0).float()
    xa, ma = augment_pair(x, m, torch.Generator().manual_seed(0))
    assert ma is not None
    assert torch.equal(xa[:, 0] == xa[:, 0].amax((1, 2), keepdim=True), ma > 0)
    assert not torch.equal(ma, m)  # some geometry was applied


def test_rrr_fine_tunes_a_vit() -> None:
    """RRR's double backward runs through attention: the math kernel (flash has no double backward)."""
    model, cfg = create_model("vit_tiny_patch16_224")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=g)
    masks = torch.zeros(2, 224, 224)
    masks[:, :32, :32] = 1.0
    v = np.ones(192) / np.sqrt(192)
    data = CorrectionData(
        layer=cfg.default_cav_layer, cav=v, mu0=np.zeros(192), images=images, labels=torch.tensor([0, 1]),
        masks=masks,
    )  # fmt: skip
    net, flog, _ = RRR(finetune=FinetuneConfig(epochs=1, batch_size=2, max_steps=1)).fit(model, cfg, data)
    assert flog.steps == 1 and flog.history[0]["penalty"] > 0
    assert not torch.equal(net.head.weight, model.head.weight)
