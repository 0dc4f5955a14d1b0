"""The :class:`Explainer` API: shapes, seeds in one batched backward, init_rel, hook hygiene, errors."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from medaudit.models.errors import ConfigError, MedauditError, UnknownModelError
from medaudit.models.registry import create_model
from medaudit.models.xai import ClassTarget, ConceptTarget, Explainer, Explanation, rules
from medaudit.models.xai import lrp as lrp_module
from medaudit.testing.models import branchy_resnet18

SIZE, BATCH = 32, 3


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, Explainer]:
    model, cfg = branchy_resnet18(SIZE)
    return model, Explainer(model, cfg)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_shapes_and_types(resnet: tuple[nn.Module, Explainer], x: torch.Tensor) -> None:
    _, explainer = resnet
    v = torch.randn(256)
    e = explainer.explain(
        x,
        ["pred", 1, ConceptTarget("identity_2", v)],
        cav_layers=["identity_2", "last_conv"],
        relevance_layers=["identity_1"],
        return_input_relevance=True,
    )
    assert isinstance(e, Explanation)
    assert e.logits.shape == (BATCH, 2)
    assert e.heatmaps.shape == (3, BATCH, SIZE, SIZE)
    assert e.input_relevance is not None and e.input_relevance.shape == (3, BATCH, 3, SIZE, SIZE)
    torch.testing.assert_close(e.input_relevance.sum(2), e.heatmaps)
    assert e.activations["identity_2"].shape == (BATCH, 256)
    assert e.activations["last_conv"].shape == (BATCH, 512)
    assert e.relevance["identity_1"].shape == (3, BATCH, 128, SIZE // 8, SIZE // 8)
    assert e.class_indices[0].tolist() == e.logits.argmax(1).tolist()
    assert e.class_indices[1].tolist() == [1] * BATCH
    assert e.class_indices[2].tolist() == [-1] * BATCH
    assert not e.heatmaps.requires_grad and not e.logits.requires_grad
    with pytest.raises(AttributeError):
        e.logits = e.logits  # type: ignore[misc]  # frozen


def test_logits_and_activations_are_the_original_models(
    resnet: tuple[nn.Module, Explainer], x: torch.Tensor
) -> None:
    model, explainer = resnet
    e = explainer.explain(x, [0], cav_layers=["identity_2"])
    seen: dict[str, torch.Tensor] = {}
    handle = model.layer3.register_forward_hook(lambda _m, _i, o: seen.update(a=o))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    torch.testing.assert_close(e.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e.activations["identity_2"], seen["a"].amax((2, 3)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["vmap", "repeat"])
def test_seeds_in_one_call_equal_separate_calls(
    resnet: tuple[nn.Module, Explainer], x: torch.Tensor, mode: str
) -> None:
    model, explainer = resnet
    if mode == "repeat":
        explainer = Explainer(model, explainer.cfg, batch_mode="repeat")
    v = torch.randn(256, generator=torch.Generator().manual_seed(3))
    targets = ["pred", ClassTarget((1, 0, 1)), ConceptTarget("identity_2", v)]
    together = explainer.explain(x, targets, relevance_layers=["identity_2"])
    for s, target in enumerate(targets):
        alone = explainer.explain(x, [target], relevance_layers=["identity_2"])
        torch.testing.assert_close(together.heatmaps[s], alone.heatmaps[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(together.relevance["identity_2"][s], alone.relevance["identity_2"][0])


def test_init_rel_one_hot_scales_by_the_logit(resnet: tuple[nn.Module, Explainer], x: torch.Tensor) -> None:
    _, explainer = resnet
    by_logit = explainer.explain(x, [1])
    one_hot = explainer.explain(x, [1], init_rel=1)
    # LRP is linear in the seed: the logit-seeded map is the one-hot map times the logit.
    torch.testing.assert_close(by_logit.heatmaps[0], one_hot.heatmaps[0] * by_logit.logits[:, 1, None, None])
    assert not torch.allclose(by_logit.heatmaps[0], one_hot.heatmaps[0])


def test_concept_seed_relevance_at_its_layer_is_the_seed(
    resnet: tuple[nn.Module, Explainer], x: torch.Tensor
) -> None:
    _, explainer = resnet
    v = torch.randn(256)
    e = explainer.explain(
        x, [ConceptTarget("identity_2", v)], cav_layers=["identity_2"], relevance_layers=["identity_2"]
    )
    r = e.relevance["identity_2"][0]
    assert torch.all((r == 0) | (torch.sign(r) == torch.sign(v)[None, :, None, None]))
    assert torch.count_nonzero(r) > 0
    # relevance share along v (the later "relevance share" metric) is computable from the result
    share = (r.sum((2, 3)) @ v) / r.sum((2, 3)).norm(dim=1)
    assert share.shape == (BATCH,)


def test_class_seed_is_conserved_up_to_biases(resnet: tuple[nn.Module, Explainer], x: torch.Tensor) -> None:
    _, explainer = resnet
    e = explainer.explain(x, [0], relevance_layers=["last_conv"])
    total = e.relevance["last_conv"][0].flatten(1).sum(1)
    torch.testing.assert_close(total, e.logits[:, 0] - _fc_bias(explainer)[0], atol=1e-4, rtol=1e-4)


def _fc_bias(explainer: Explainer) -> torch.Tensor:
    return explainer.model.fc.bias


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def test_no_hook_survives_a_call_or_a_failing_call(
    resnet: tuple[nn.Module, Explainer], x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, explainer = resnet
    before = (_hooks(model), _hooks(explainer.model))
    explainer.explain(x, [0, ConceptTarget("identity_2", torch.ones(256))], cav_layers=["identity_1"])
    assert (_hooks(model), _hooks(explainer.model)) == before == (0, 0)
    assert lrp_module._RECORDING.get() is None

    def explode(*_args: object) -> None:
        raise RuntimeError("injected failure in the backward")

    monkeypatch.setattr(lrp_module.Explainer, "_concept_seeds", staticmethod(explode))
    with pytest.raises(RuntimeError, match="injected failure"):
        explainer.explain(x, [ConceptTarget("identity_2", torch.ones(256))], cav_layers=["identity_1"])
    assert (_hooks(model), _hooks(explainer.model)) == (0, 0)
    assert lrp_module._RECORDING.get() is None
    monkeypatch.undo()
    with pytest.raises(ConfigError):  # a domain error raised after the forward
        explainer.explain(x, [ConceptTarget("identity_2", torch.ones(3))])
    assert (_hooks(model), _hooks(explainer.model)) == (0, 0)
    assert lrp_module._RECORDING.get() is None


def test_concurrent_calls_do_not_mix_activations(resnet: tuple[nn.Module, Explainer]) -> None:
    _, explainer = resnet
    inputs = [torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    alone = [explainer.explain(xi, [0], cav_layers=["identity_2"]).activations["identity_2"] for xi in inputs]
    got: dict[int, torch.Tensor] = {}

    def work(k: int) -> None:
        got[k] = explainer.explain(inputs[k], [0], cav_layers=["identity_2"]).activations["identity_2"]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        torch.testing.assert_close(got[k], alone[k])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": [7]}, ConfigError, "class index 7 out of range; valid: 0=benign, 1=malignant"),
        ({"targets": ["best"]}, ConfigError, "target 'best' is not valid"),
        ({"targets": []}, ConfigError, "targets is empty"),
        ({"targets": [ClassTarget((0, 1))]}, ConfigError, "2 indices for a batch of 3"),
        (
            {"targets": [ConceptTarget("layer9", torch.ones(3))]},
            UnknownModelError,
            "no hook point 'layer9'; valid",
        ),
        ({"cav_layers": ["nope"]}, UnknownModelError, "no hook point 'nope'; valid: identity_0"),
        ({"init_rel": "one"}, ConfigError, "init_rel='one'; valid: 'logit' or a number"),
        (
            {"targets": [ConceptTarget("identity_2", torch.ones(3))]},
            ConfigError,
            "3 entries; the layer has 256",
        ),
    ],
)
def test_bad_arguments_are_domain_errors_naming_choices(
    resnet: tuple[nn.Module, Explainer], x: torch.Tensor, kwargs: dict, error: type, match: str
) -> None:
    _, explainer = resnet
    kwargs = {"targets": [0], **kwargs}
    with pytest.raises(error, match=match) as info:
        explainer.explain(x, **kwargs)
    assert isinstance(info.value, MedauditError)


def test_bad_input_and_mode(resnet: tuple[nn.Module, Explainer]) -> None:
    model, explainer = resnet
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\); got torch.Size\(\[3, 32, 32\]\)"):
        explainer.explain(torch.randn(3, SIZE, SIZE))
    with pytest.raises(ConfigError, match="batch_mode='fast'; valid: 'vmap', 'repeat'"):
        Explainer(model, explainer.cfg, batch_mode="fast")  # type: ignore[arg-type]


def test_original_model_is_not_modified(resnet: tuple[nn.Module, Explainer], x: torch.Tensor) -> None:
    model, explainer = resnet
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    explainer.explain(x, [0])
    assert all(p.requires_grad for p in model.parameters())


class _SignedTiny(nn.Module):
    """conv2 sees conv1's raw output, so its input sign depends on the image."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.features[0].weight.uniform_(0.0, 1.0)
            self.features[0].bias.fill_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_deferred_sign_check_reruns_when_an_assumption_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """On accelerators z⁺ layers reuse the last input sign and verify once; a wrong guess reruns."""
    from medaudit.models.registry import ModelCfg
    from medaudit.models.xai import rules

    torch.manual_seed(0)
    model = _SignedTiny().eval()
    cfg = ModelCfg(arch="signed_tiny", source="test", canonizer="vgg", hook_points={})
    positive, signed = torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8) - 1.0
    exact = Explainer(model, cfg).explain(signed, [0]).heatmaps  # CPU: checked every call

    monkeypatch.setattr(rules, "sync_is_costly", lambda _x: True)
    explainer = Explainer(model, cfg)
    explainer.explain(positive, [0])  # conv2 learns "non-negative input"
    layer = explainer.model.features[1]
    assert isinstance(layer, rules.ZPlusConv) and layer.seen_nonnegative is True
    calls = []
    original = explainer._propagate
    monkeypatch.setattr(explainer, "_propagate", lambda *a: calls.append(1) or original(*a))
    got = explainer.explain(signed, [0]).heatmaps
    assert len(calls) == 2 and layer.seen_nonnegative is False  # guessed wrong, reran exactly
    torch.testing.assert_close(got, exact)
    calls.clear()
    explainer.explain(signed, [0])
    assert len(calls) == 1


def test_bfloat16_engine_agrees_with_float32(resnet: tuple[nn.Module, Explainer], x: torch.Tensor) -> None:
    model, explainer = resnet
    bf16 = Explainer(model, explainer.cfg).to(torch.bfloat16)
    got = bf16.explain(x, [1, ConceptTarget("identity_2", torch.ones(256))])
    want = explainer.explain(x, [1, ConceptTarget("identity_2", torch.ones(256))])
    assert got.heatmaps.dtype == torch.bfloat16
    cos = nn.functional.cosine_similarity(got.heatmaps.float().flatten(2), want.heatmaps.flatten(2), dim=2)
    assert cos.min().item() >= 0.99


def test_cuda_graph_capture_needs_a_cuda_input(resnet: tuple[nn.Module, Explainer], x: torch.Tensor) -> None:
    _, explainer = resnet
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA input; got device cpu"):
        explainer.capture(x, [0])
    with pytest.raises(ConfigError, match="cannot be replayed as a CUDA graph"):
        explainer.capture(x, [ConceptTarget("identity_2", lambda pooled: pooled)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager() -> None:
    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=64)
    explainer = Explainer(model.cuda(), cfg)
    xs = [torch.randn(1, 3, 64, 64, device="cuda") for _ in range(3)]
    v = ConceptTarget("identity_2", torch.randn(256, device="cuda"))
    # class and concept seeds at a cut layer: the two-stage backward, with one and two class seeds
    for targets in (["pred", v], ["pred", ClassTarget((1,)), v]):
        captured = explainer.capture(xs[0], targets, cav_layers=["identity_2"])
        for xi in xs:
            got, want = captured(xi), explainer.explain(xi, targets, cav_layers=["identity_2"])
            torch.testing.assert_close(got.heatmaps, want.heatmaps, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.activations["identity_2"], want.activations["identity_2"])
    first = captured(xs[0]).heatmaps
    captured(xs[1])
    torch.testing.assert_close(first, explainer.explain(xs[0], targets).heatmaps, atol=1e-5, rtol=1e-4)


def test_per_image_concept_vectors_equal_one_call_per_concept(resnet) -> None:
    """A ``(B, C)`` ConceptTarget seeds each image at its own direction: the same heatmaps as one
    call per direction (what the audit's masks rely on: one backward for all present pairs)."""
    _, explainer = resnet
    torch.manual_seed(5)
    x = torch.randn(4, 3, SIZE, SIZE)
    vs = torch.randn(2, 256)
    which = [0, 1, 1, 0]
    got = explainer.explain(x, [ConceptTarget("identity_2", vs[which])]).heatmaps[0]
    for b, k in enumerate(which):
        want = explainer.explain(x[b : b + 1], [ConceptTarget("identity_2", vs[k])]).heatmaps[0, 0]
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="one per image"):
        explainer.explain(x, [ConceptTarget("identity_2", vs[[0, 1, 1]])])


def test_concept_only_call_may_stop_the_forward_at_its_layer(resnet, x: torch.Tensor) -> None:
    """``logits=False``: a concept-seeded call stops the forward after the last hook point it
    needs (the layers above do not run) and returns the same heatmaps, activations and
    relevance as the full forward; a class seed keeps the full forward."""
    _, explainer = resnet
    target = ConceptTarget("identity_2", torch.randn(256, generator=torch.Generator().manual_seed(3)))
    kwargs = {"cav_layers": ["identity_1", "identity_2"], "relevance_layers": ["identity_1"]}
    ran: list[str] = []
    last = explainer.model.get_submodule(explainer.cfg.hook_points["last_conv"])
    handle = last.register_forward_hook(lambda *_: ran.append("last_conv"))
    try:
        want = explainer.explain(x, [target], **kwargs)
        assert ran == ["last_conv"]
        got = explainer.explain(x, [target], logits=False, **kwargs)
        assert ran == ["last_conv"], "the layers above identity_2 ran"
        assert got.logits.shape == (x.shape[0], 0)
        torch.testing.assert_close(got.heatmaps, want.heatmaps, rtol=0, atol=0)
        for ln in ("identity_1", "identity_2"):
            torch.testing.assert_close(got.activations[ln], want.activations[ln], rtol=0, atol=0)
        torch.testing.assert_close(got.relevance["identity_1"], want.relevance["identity_1"], rtol=0, atol=0)
        with_class = explainer.explain(x, ["pred", target], logits=False)
        assert ran == ["last_conv", "last_conv"] and with_class.logits.shape[1] == len(explainer.cfg.labels)
        # the next call is not affected by the stop (the context variable is reset)
        assert explainer.explain(x, [target]).logits.shape[1] == len(explainer.cfg.labels)
    finally:
        handle.remove()


def test_seed_chosen_from_the_forward_equals_the_same_seed_given_up_front(resnet, x: torch.Tensor) -> None:
    """A ConceptTarget whose vector is a function of the layer's pooled activation is called with
    exactly that activation and gives the heatmaps of the same vectors passed as a tensor; a seed
    that comes out all zero is skipped (zero heatmaps) and leaves the other seeds unchanged."""
    _, explainer = resnet
    vs = torch.randn(2, 256, generator=torch.Generator().manual_seed(7))
    seen: list[torch.Tensor] = []

    def choose(pooled: torch.Tensor) -> torch.Tensor:  # image b gets vs[b % 2], image 1 none
        seen.append(pooled.clone())
        out = vs[[b % 2 for b in range(pooled.shape[0])]].clone()
        out[1] = 0
        return out

    got = explainer.explain(x, ["pred", ConceptTarget("identity_2", choose)], cav_layers=["identity_2"])
    torch.testing.assert_close(seen[0], got.activations["identity_2"], rtol=0, atol=0)
    fixed = vs[[b % 2 for b in range(x.shape[0])]].clone()
    fixed[1] = 0
    want = explainer.explain(x, ["pred", ConceptTarget("identity_2", fixed)], cav_layers=["identity_2"])
    torch.testing.assert_close(got.heatmaps, want.heatmaps, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(got.heatmaps[1, 1]) == 0

    def nothing(pooled: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(pooled)

    skipped = explainer.explain(
        x, ["pred", ConceptTarget("identity_2", nothing)], relevance_layers=["identity_1"]
    )
    alone = explainer.explain(x, ["pred"], relevance_layers=["identity_1"])
    assert skipped.heatmaps.shape == (2, *alone.heatmaps.shape[1:])
    assert torch.count_nonzero(skipped.heatmaps[1]) == 0
    assert torch.count_nonzero(skipped.relevance["identity_1"][1]) == 0
    torch.testing.assert_close(skipped.heatmaps[0], alone.heatmaps[0], rtol=0, atol=0)
    torch.testing.assert_close(
        skipped.relevance["identity_1"][0], alone.relevance["identity_1"][0], rtol=0, atol=0
    )
    only = explainer.explain(x, [ConceptTarget("identity_2", nothing)], logits=False)
    assert only.heatmaps.shape == (1, *alone.heatmaps.shape[1:]) and torch.count_nonzero(only.heatmaps) == 0


def test_two_stage_backward_equals_one_batched_backward(resnet, x: torch.Tensor) -> None:
    """Class seeds plus concept seeds at one cut layer run as two backwards (class seeds down to
    ℓ, then every seed from ℓ to the input); the result must be the single batched backward's,
    for several class seeds, relevance asked at and below ℓ, and a seed chosen from the forward
    that is zero for one image."""
    model, cfg = resnet[0], resnet[1].cfg
    two, one = Explainer(model, cfg), Explainer(model, cfg)
    one._cuts["identity_2"] = False  # forces the single batched backward from the logits
    v = torch.randn(256, generator=torch.Generator().manual_seed(11))

    def some(pooled: torch.Tensor) -> torch.Tensor:
        out = v.expand(pooled.shape[0], -1).clone()
        out[0] = 0
        return out

    for targets in (
        ["pred", ConceptTarget("identity_2", v)],
        ["pred", ClassTarget((1, 0, 1)), ConceptTarget("identity_2", some)],
    ):
        kw = {"cav_layers": ["identity_2"], "relevance_layers": ["identity_2", "identity_0"]}
        a, b = two.explain(x, targets, **kw), one.explain(x, targets, **kw)
        assert two._cuts == {"identity_2": True}
        torch.testing.assert_close(a.heatmaps, b.heatmaps, rtol=1e-5, atol=1e-7)
        for ln in kw["relevance_layers"]:
            torch.testing.assert_close(a.relevance[ln], b.relevance[ln], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    # relevance asked above ℓ: the split would not give it, so the call keeps one backward
    calls: list[int] = []
    original = two._two_stage
    two._two_stage = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
    two.explain(x, ["pred", ConceptTarget("identity_2", v)], relevance_layers=["last_conv"])
    assert calls == []
    two.explain(x, ["pred", ConceptTarget("identity_2", v)], relevance_layers=["identity_2"])
    assert calls == [1]


def test_separates_finds_a_path_that_bypasses_the_layer() -> None:
    x = torch.randn(4, requires_grad=True)
    a = x * 2
    assert lrp_module._separates((a * 3).sum(), a, x)  # everything goes through a
    assert not lrp_module._separates((a * 3).sum() + x.sum(), a, x)  # a skip around a
    assert not lrp_module._separates((a * 3).sum() + (x * 5).exp().sum(), a, x)


def test_packed_cpu_kernels_give_the_aten_engines_results(
    resnet: tuple[nn.Module, Explainer], x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole ResNet: heatmaps (class and concept seed, one batched backward), logits,
    activations and layer relevance with prepacked oneDNN kernels equal aten's to float32
    rounding (MEDAUDIT_LRP_PACKED=0 is the aten engine)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN: the aten path is all there is")
    _, explainer = resnet
    v = torch.randn(256, generator=torch.Generator().manual_seed(3))
    targets = ["pred", ConceptTarget("identity_2", v)]
    kwargs = {"cav_layers": ["identity_2"], "relevance_layers": ["identity_2"]}
    packed = explainer.explain(x, targets, **kwargs)
    monkeypatch.setenv(rules.PACKED_ENV, "0")
    aten = explainer.explain(x, targets, **kwargs)
    for got, want in [
        (packed.heatmaps, aten.heatmaps),
        (packed.logits, aten.logits),
        (packed.activations["identity_2"], aten.activations["identity_2"]),
        (packed.relevance["identity_2"], aten.relevance["identity_2"]),
    ]:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    # the explainer's z⁺ layers really built packed kernels in the first call
    assert any("_packed" in vars(m) for m in explainer.model.modules() if isinstance(m, rules.ZPlusConv))
