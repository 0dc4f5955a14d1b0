"""The fine-tuning fast view (models/corrections/fast_prefix.py): same function, same gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medaudit.models.corrections import RRR, CorrectionData, FinetuneConfig, RRClarc, Vanilla
from medaudit.models.corrections.base import freeze_up_to, frozen_module_names, keep_frozen_eval
from medaudit.models.corrections.fast_prefix import FrozenConv2d, _FrozenConvFn, fast_view
from medaudit.models.corrections.rrr import rrr_penalty
from medaudit.models.registry import ModelCfg, create_model


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, so that folding them is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def _frozen(arch: str, layer: str = "identity_2", size: int = 32) -> tuple[nn.Module, ModelCfg, list[str]]:
    torch.manual_seed(0)
    model, cfg = create_model(arch, img_size=size)
    net = _trained_like(model)
    freeze_up_to(net, cfg, layer)
    return net, cfg, frozen_module_names(net, cfg, layer)


def _modes(net: nn.Module, view: nn.Module, view_frozen: list[nn.Module], names: list[str]) -> None:
    net.train()
    keep_frozen_eval([net.get_submodule(n) for n in names])
    view.train()
    keep_frozen_eval(view_frozen)


# ------------------------------------------------------------------------- the custom conv


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups", "hw"),
    [(2, 1, 1, 1, (8, 7)), (2, 0, 1, 1, (9, 8)), (1, 2, 2, 2, (7, 7)), (3, 1, 1, 1, (10, 8))],
)
def test_frozen_conv_gradient_and_double_backward_match_conv2d(
    stride: int, padding: int, dilation: int, groups: int, hw: tuple[int, int]
) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    x = torch.randn(1, 4, *hw, dtype=torch.float64, generator=g, requires_grad=True)
    s, p, d = (stride,) * 2, (padding,) * 2, (dilation,) * 2

    def fast(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _FrozenConvFn.apply(x, w, b, s, p, d, groups)
        return out

    def ref(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, b, s, p, d, groups)

    assert torch.allclose(fast(x), ref(x), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fast, (x,))
    assert torch.autograd.gradgradcheck(fast, (x,))
    # the input gradient has the input's exact shape (output_padding) and equals conv2d's
    gy = torch.randn_like(ref(x))
    (ga,) = torch.autograd.grad(fast(x), x, gy)
    (gb,) = torch.autograd.grad(ref(x), x, gy)
    assert ga.shape == x.shape and torch.allclose(ga, gb, atol=1e-12)


def test_frozen_conv_module_copies_a_conv_and_keeps_no_state() -> None:
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    fc = FrozenConv2d(conv)
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(fc(x), conv(x), atol=1e-6)
    assert not list(fc.parameters()) and not fc.state_dict()
    with pytest.raises(ValueError):
        FrozenConv2d(nn.Conv2d(3, 5, 3, padding="same"))


# ------------------------------------------------------------------------- the view


@pytest.mark.parametrize(
    ("arch", "folded", "dtype", "tol"),
    [
        ("resnet18", 15, torch.float32, 1e-5),
        ("resnet18", 15, torch.float64, 1e-12),
        ("resnet50d", 45, torch.float64, 1e-12),
        ("resnet50", 43, torch.float64, 1e-12),
    ],
)
def test_view_logits_equal_and_suffix_is_shared(
    arch: str, folded: int, dtype: torch.dtype, tol: float
) -> None:
    """Equal logits with the suffix in eval and in train mode; float64 shows the only difference
    is float round-off (float32 train-mode BN over few values amplifies it to ~1e-5 in resnet50)."""
    net, _cfg, names = _frozen(arch)
    net = net.to(dtype)
    view, view_frozen, counts = fast_view(net, names)
    # every frozen BatchNorm is recognised (resnet50d: deep stem and AvgPool->conv->BN downsample)
    assert counts["folded_bn"] == folded
    assert not any(isinstance(view.get_submodule(n), nn.BatchNorm2d) for n in names)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable <= {id(p) for p in view.parameters()}
    assert view.layer4 is net.layer4 and view.fc is net.fc  # the very same modules
    x = torch.randn(8, 3, 64, 64, dtype=dtype)  # train-mode BN in layer4 normalises over B*2*2 values
    for train in (False, True):
        if train:
            _modes(net, view, view_frozen, names)
        else:
            net.eval(), view.eval()
        state = copy.deepcopy(net.state_dict())  # train-mode BN statistics move; compare from one state
        with torch.no_grad():
            a = net(x)
            net.load_state_dict(state)
            b = view(x)
            net.load_state_dict(state)
        # relative to the logits' scale (random-init resnet50d's reach ~170)
        assert (a - b).abs().max() <= tol * a.abs().max().clamp_min(1.0), (train, (a - b).abs().max())


def test_view_leaves_the_network_untouched() -> None:
    net, _cfg, names = _frozen("resnet18")
    before = copy.deepcopy(net.state_dict())
    modules_before = [type(m) for m in net.modules()]
    fast_view(net, names)
    assert [type(m) for m in net.modules()] == modules_before
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_rrr_penalty_and_loss_gradients_match_the_standard_network() -> None:
    net, _cfg, names = _frozen("resnet18")
    view, view_frozen, _ = fast_view(net, names)
    _modes(net, view, view_frozen, names)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 3, 32, 32, generator=g)
    masks = torch.zeros(8, 32, 32)
    masks[::2, 4:12, 3:20] = 1.0
    masks[1] = torch.rand(32, 32, generator=g)
    y = torch.tensor([0, 1] * 4)
    trainable = [p for p in net.parameters() if p.requires_grad]
    state = copy.deepcopy(net.state_dict())

    def grads(model: nn.Module) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        net.load_state_dict(state)
        x = x0.clone().requires_grad_(True)
        logits = model(x)
        pen = rrr_penalty(logits, x, masks)
        g_pen = torch.autograd.grad(pen, trainable, retain_graph=True, materialize_grads=True)
        loss = F.cross_entropy(logits, y) + 300.0 * pen
        return pen.item(), list(g_pen), list(torch.autograd.grad(loss, trainable))

    p_std, gp_std, gl_std = grads(net)
    p_fast, gp_fast, gl_fast = grads(view)
    assert p_fast == pytest.approx(p_std, rel=1e-5) and p_std > 0
    for ref, got in [*zip(gp_std, gp_fast, strict=True), *zip(gl_std, gl_fast, strict=True)]:
        assert float((ref - got).norm()) <= 1e-4 * float(ref.norm()) + 1e-12


# ------------------------------------------------------------------------- finetune


def _resnet_data(n: int = 16, size: int = 32) -> tuple[nn.Module, ModelCfg, CorrectionData]:
    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=size)
    model = _trained_like(model)
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1] * (n // 2))
    masks = torch.zeros(n, size, size)
    masks[::3, 2:10, 2:12] = 1.0
    # a base run's optimiser state over all parameters (what models.train saves)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, size, size)).sum().backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    rng = np.random.default_rng(0)
    v = rng.normal(size=256)
    data = CorrectionData(
        "identity_2",
        v / np.linalg.norm(v),
        np.zeros(256),
        images=X,
        labels=y,
        masks=masks,
        optimizer_state=opt.state_dict(),
    )
    return model, cfg, data


@pytest.mark.parametrize("correction", [RRR, RRClarc, Vanilla])
def test_finetune_returns_the_standard_network_with_its_prefix_bit_identical(correction: type) -> None:
    model, cfg, data = _resnet_data()
    before = copy.deepcopy(model.state_dict())
    ft = FinetuneConfig(epochs=1, batch_size=8, max_steps=2, lr=1e-3)
    net, flog, _ = correction(finetune=ft).fit(model, cfg, data)  # resumes data.optimizer_state
    assert flog.steps == 2 and type(net) is type(model)
    assert not any(isinstance(m, FrozenConv2d) for m in net.modules())
    after = net.state_dict()
    assert list(after) == list(before)
    prefix = tuple(f"{n}." for n in ("conv1", "bn1", "layer1", "layer2", "layer3"))
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(prefix))
    assert not torch.equal(after["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])
    assert "fast_prefix" not in ft.to_dict()  # an implementation switch, not a card parameter


def _assert_same_training(
    fast: dict[str, torch.Tensor], std: dict[str, torch.Tensor], original: dict[str, torch.Tensor]
) -> None:
    """Per tensor, fast and standard runs differ by float round-off: well under 1e-3 of what the
    fine-tuning changed (measured ≤ 6e-5 for RRR on resnet18); a wrong gradient is O(1) of it."""
    assert fast.keys() == std.keys() == original.keys()
    for k in std:
        a, b, o = fast[k].double(), std[k].double(), original[k].double()
        assert float((a - b).norm()) <= 1e-3 * float((b - o).norm()) + 1e-6 * float(b.norm()), k


@pytest.mark.parametrize("correction", [RRR, RRClarc, Vanilla])
def test_finetune_fast_and_standard_agree(correction: type) -> None:
    # 64 px, not 32: at 32 px layer4 is 1×1, its train-mode BatchNorms normalise over the 8 values
    # of a batch, and round-off grew to 1.8e-2 of Vanilla's change on 1 thread (CI failed); at 64 px
    # every correction stays ≤ 2.1e-4 on 1 and 2 threads.
    model, cfg, data = _resnet_data(size=64)
    runs = []
    for fast in (True, False):
        ft = FinetuneConfig(
            epochs=1, batch_size=8, optimizer="sgd", lr=1e-2, resume_optimizer=False, fast_prefix=fast
        )
        runs.append(correction(finetune=ft).fit(model, cfg, data))
    (a, log_a, lamb_a), (b, log_b, lamb_b) = runs
    assert lamb_a == pytest.approx(lamb_b, rel=1e-4)
    for k, v in log_a.history[0].items():
        assert v == pytest.approx(log_b.history[0][k], rel=1e-4, abs=1e-7)
    _assert_same_training(a.state_dict(), b.state_dict(), model.state_dict())


class _Odd(nn.Module):
    """A conv feeding a BN in a class fast_view does not know: left as it is, still correct."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.reflect = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.reflect(torch.relu(self.bn(self.conv(x)) * 2.0)))


def test_unrecognised_patterns_and_no_batchnorm_still_finetune_the_same() -> None:
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(
        nn.Sequential(_Odd(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()),  # no BN after this conv
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    model = _trained_like(model).eval()
    cfg = ModelCfg(arch="toy", source="test", input_size=(3, 12, 12), hook_points={"feat": "0"})
    names = frozen_module_names(model, cfg, "feat")
    net = copy.deepcopy(model)
    freeze_up_to(net, cfg, "feat")
    view, _, counts = fast_view(net, names)
    assert counts == {"folded_bn": 0, "frozen_convs": 2}  # _Odd.conv and 0.1; not the reflect conv
    assert isinstance(view.get_submodule("0.0.bn"), nn.BatchNorm2d)
    assert type(view.get_submodule("0.0.reflect")) is nn.Conv2d
    x = torch.randn(4, 3, 12, 12)
    assert torch.allclose(view(x), net(x), atol=1e-6)

    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=g)
    masks = torch.zeros(16, 12, 12)
    masks[::2, :4, :4] = 1.0
    data = CorrectionData(
        "feat", np.eye(6)[0], np.zeros(6), images=X, labels=torch.tensor([0, 1] * 8), masks=masks
    )
    nets = [
        RRR(finetune=FinetuneConfig(epochs=2, batch_size=8, optimizer="sgd", lr=1e-2, fast_prefix=fast))
        .fit(model, cfg, data)[0]
        .state_dict()
        for fast in (True, False)
    ]
    _assert_same_training(nets[0], nets[1], model.state_dict())
    assert torch.equal(nets[0]["0.0.conv.weight"], model.state_dict()["0.0.conv.weight"])


def test_a_finetune_leaves_the_resumed_optimizer_state_as_it_was() -> None:
    """The build runs every fine-tuning correction from one CorrectionData: each must resume the
    base run's Adam state, not the state an earlier correction's steps left behind."""
    model, cfg, data = _resnet_data()
    assert data.optimizer_state is not None
    saved = copy.deepcopy(data.optimizer_state)
    ft = FinetuneConfig(epochs=1, batch_size=8, max_steps=2, lr=1e-3)
    first = Vanilla(finetune=ft).fit(model, cfg, data)[0].state_dict()
    state = data.optimizer_state["state"]
    for k, entry in saved["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(state[k][name]), torch.as_tensor(value)), (k, name)
    second = Vanilla(finetune=ft).fit(model, cfg, data)[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # order of corrections is irrelevant
