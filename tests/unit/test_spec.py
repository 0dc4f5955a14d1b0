"""Model specs (models/spec.py) and ``medaudit model inspect|check``: a classifier medaudit did not
train, loaded offline from a spec file, and every user mistake refused with the fix named."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from typer.testing import CliRunner

from medaudit.models.errors import CanonizerError, ConfigError, SpecError, UnknownModelError, WeightsError
from medaudit.models.spec import build, check, inspect_layers, load_spec
from medaudit.models.train import sha256_file
from medaudit.testing.models import trained_like

IMAGENET = "mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]"
LABELS3 = '["nevus", "melanoma", "bcc"]'


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return trained_like(model, seed).eval()


def _spec(tmp_path: Path, body: str, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = _trained_like(timm.create_model("resnet18", pretrained=False, num_classes=3))
    torch.save(model.state_dict(), d / "model.pt")
    return d / "model.pt"


def _resnet_spec(tmp_path: Path, ckpt: Path, extra: str = "", labels: str = LABELS3) -> Path:
    return _spec(
        tmp_path,
        f"""
        name = "derm-resnet18"
        source = "timm"
        arch = "resnet18"
        checkpoint = "{ckpt}"
        labels = {labels}
        input_size = 64
        {IMAGENET}
        {extra}
        """,
    )


def test_a_spec_loads_relative_paths_and_defaults(tmp_path: Path, resnet_ckpt: Path) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.pt").write_bytes(resnet_ckpt.read_bytes())
    s = load_spec(_resnet_spec(tmp_path, Path("w/model.pt")))
    assert s.checkpoint == (tmp_path / "w" / "model.pt").resolve()
    assert s.labels == ("nevus", "melanoma", "bcc") and s.input_size == (3, 64, 64)
    assert (s.resize, s.canonizer, s.allow_pickle, dict(s.hook_points)) == ("resize", "auto", False, {})


def test_build_gives_the_trained_model_and_the_family_defaults(tmp_path: Path, resnet_ckpt: Path) -> None:
    model, cfg, digest = build(load_spec(_resnet_spec(tmp_path, resnet_ckpt)))
    ref = timm.create_model("resnet18", pretrained=False, num_classes=3)
    ref.load_state_dict(torch.load(resnet_ckpt, weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))
    assert digest == sha256_file(resnet_ckpt)
    assert cfg.canonizer == "resnet" and cfg.labels == ("nevus", "melanoma", "bcc")
    assert cfg.hook_points == {f"layer{i}": f"layer{i}" for i in range(1, 5)}
    assert cfg.default_cav_layer == "layer3" and cfg.mean == (0.485, 0.456, 0.406)


def test_check_runs_forward_canonizer_and_lrp_with_conservation(tmp_path: Path, resnet_ckpt: Path) -> None:
    report = check(load_spec(_resnet_spec(tmp_path, resnet_ckpt)))
    assert report.canonized_max_diff < 1e-3
    rules = {r.rule for r in report.rules}
    assert len(rules) >= 3 and all(r.rule for r in report.rules)
    # EpsilonPlusFlat: biases absorb some relevance, never a sign flip or an explosion.
    for z, r in zip(report.logits, report.relevance_sums, strict=True):
        assert abs(r) <= 2 * abs(z) + 1e-3
    assert report.conservation_error < 1.0


def test_inspect_lists_stages_with_shapes(tmp_path: Path, resnet_ckpt: Path) -> None:
    model, cfg, _ = build(load_spec(_resnet_spec(tmp_path, resnet_ckpt)))
    layers = {la.path: la for la in inspect_layers(model, cfg)}
    assert layers["layer3"].shape == (256, 4, 4) and layers["layer3"].hook_point == "layer3"
    assert layers["layer1"].shape == (64, 16, 16)


def test_torchvision_vgg_bn_gets_block_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _trained_like(torchvision.models.vgg11_bn(weights=None, num_classes=2))
    torch.save(model.state_dict(), tmp_path / "vgg.pt")
    spec = _spec(
        tmp_path,
        f"""
        name = "cxr-vgg11bn"
        source = "torchvision"
        arch = "vgg11_bn"
        checkpoint = "vgg.pt"
        labels = ["normal", "cardiomegaly"]
        input_size = 64
        {IMAGENET}
        """,
    )
    _model, cfg, _ = build(load_spec(spec))
    assert cfg.canonizer == "vgg" and len(cfg.hook_points) == 5
    assert cfg.default_cav_layer == list(cfg.hook_points)[-2]


def test_a_torchvision_efficientnet_is_canonized_with_its_stages_as_hook_points(tmp_path: Path) -> None:
    """torchvision's EfficientNet (a chest X-ray staple) joins the efficientnet family: its
    stages ``features.1..7`` are the hook points (the stem conv and the 1x1 head conv are not),
    ``check`` canonizes it to the same function and runs LRP through it (its drop-path is the
    identity at inference)."""
    torch.manual_seed(0)
    model = _trained_like(torchvision.models.efficientnet_b0(weights=None, num_classes=2))
    torch.save(model.state_dict(), tmp_path / "b0.pt")
    spec = _spec(
        tmp_path,
        f"""
        name = "cxr-b0"
        source = "torchvision"
        arch = "efficientnet_b0"
        checkpoint = "b0.pt"
        labels = ["normal", "cardiomegaly"]
        input_size = 64
        {IMAGENET}
        """,
    )
    _model, cfg, _ = build(load_spec(spec))
    assert cfg.canonizer == "efficientnet"
    assert list(cfg.hook_points) == [f"features.{i}" for i in range(1, 8)]
    assert cfg.default_cav_layer == "features.6"
    report = check(load_spec(spec))  # (its biases absorb nearly all relevance: docs/models.md)
    assert report.canonized_max_diff < 1e-3 and len(report.relevance_sums) == len(report.logits)
    assert {"Gamma", "Pass", "Norm"} <= {r.rule for r in report.rules}


def test_a_torchvision_mobilenet_v3_gets_its_blocks_as_hook_points(tmp_path: Path) -> None:
    """MobileNetV3 (torchvision) is canonized by the efficientnet family; its hook points are the
    blocks between the stem and the last 1x1 conv."""
    torch.manual_seed(0)
    model = _trained_like(torchvision.models.mobilenet_v3_small(weights=None, num_classes=2))
    torch.save(model.state_dict(), tmp_path / "mnv3.pt")
    spec = _spec(
        tmp_path,
        f"""
        name = "mnv3"
        source = "torchvision"
        arch = "mobilenet_v3_small"
        checkpoint = "mnv3.pt"
        labels = ["normal", "effusion"]
        input_size = 64
        {IMAGENET}
        """,
    )
    report = check(load_spec(spec))
    _model, cfg, _ = build(load_spec(spec))
    assert cfg.canonizer == "efficientnet" and list(cfg.hook_points) == [
        f"features.{i}" for i in range(1, 12)
    ]
    assert report.canonized_max_diff < 1e-3 and {"Gamma", "Pass", "Norm"} <= {r.rule for r in report.rules}


def test_a_torchvision_vit_gets_its_class_token_as_the_cav_layer(tmp_path: Path) -> None:
    """torchvision picks the class token inline in ``forward``, so no module outputs it: the spec
    model gets an Identity at the front of ``heads`` (the checkpoint of the plain model loads, the
    logits do not change), and the family's default hook point records exactly that token after
    the final norm. A concept seeded there explains to the pixels, and the version round-trips."""
    from torchvision.models.vision_transformer import VisionTransformer

    from medaudit.models.corrections.base import pooled_activations
    from medaudit.models.corrections.io import load_version, save_version
    from medaudit.models.xai.lrp import ConceptTarget, Explainer

    kw = {
        "image_size": 32,
        "patch_size": 16,
        "num_layers": 2,
        "num_heads": 2,
        "hidden_dim": 16,
        "mlp_dim": 32,
    }
    torch.manual_seed(0)
    plain = _trained_like(VisionTransformer(num_classes=2, **kw))
    torch.save(plain.state_dict(), tmp_path / "vit.pt")
    body = "\n".join(f"{k} = {v}" for k, v in kw.items())
    spec = _spec(
        tmp_path,
        f"""
        name = "tv-vit"
        source = "entrypoint"
        arch = "torchvision.models.vision_transformer:VisionTransformer"
        checkpoint = "vit.pt"
        labels = ["benign", "malignant"]
        input_size = 32
        {IMAGENET}
        [factory_kwargs]
        num_classes = 2
        {body}
        """,
    )
    model, cfg, _ = build(load_spec(spec))
    assert cfg.canonizer == "vit" and cfg.hook_points == {"inspection_layer": "heads.class_token"}
    x = torch.rand(3, 3, 32, 32)
    images = (x * 255).round().to(torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        tokens = plain._process_input(cfg.normalize(images))
        cls = plain.encoder(torch.cat([plain.class_token.expand(3, -1, -1), tokens], dim=1))[:, 0]
    acts = pooled_activations(model, cfg, "inspection_layer", images)
    assert acts.shape == (3, 16) and np.allclose(acts, cls.double().numpy(), atol=1e-5)
    v = torch.randn(16)
    hm = (
        Explainer(model, cfg)
        .explain(cfg.normalize(images), [ConceptTarget("inspection_layer", v)])
        .heatmaps[0]
    )
    assert hm.shape == (3, 32, 32) and bool((hm.abs().flatten(1).sum(1) > 0).all())
    report = check(load_spec(spec))
    assert report.canonized_max_diff < 1e-3 and report.conservation_error < 1.0
    save_version(model, cfg, tmp_path / "v" / "model.pt", correction="vanilla", layer="", params={})
    loaded, cfg2, _ = load_version(tmp_path / "v" / "model.pt")
    assert cfg2.hook_points == cfg.hook_points
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))


# ------------------------------------------------------------------------------ refusals


def test_wrong_label_count_names_the_heads_width(tmp_path: Path, resnet_ckpt: Path) -> None:
    with pytest.raises(SpecError, match=r"head \(fc.weight\) has 3 outputs but the spec lists 2 labels"):
        build(load_spec(_resnet_spec(tmp_path, resnet_ckpt, labels='["benign", "malignant"]')))


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="checkpoint not found: .*nope.pt.*relative to the spec file"):
        build(load_spec(_resnet_spec(tmp_path, Path("nope.pt"))))


def test_unknown_architecture_suggests_names(tmp_path: Path, resnet_ckpt: Path) -> None:
    spec = _resnet_spec(tmp_path, resnet_ckpt).read_text().replace('"resnet18"', '"resnet1_8"')
    with pytest.raises(UnknownModelError, match=r"timm has no model 'resnet1_8'; did you mean resnet18"):
        build(load_spec(_spec(tmp_path, spec, "unknown.toml")))


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    torch.save(torchvision.models.vgg11(weights=None, num_classes=3).state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(WeightsError, match="another architecture"):
        build(load_spec(_resnet_spec(tmp_path, tmp_path / "vgg.pt")))


def test_a_layer_without_a_rule_is_refused_by_name(tmp_path: Path) -> None:
    from spec_toys import gru_stack, lstm_net

    torch.save(lstm_net(2).state_dict(), tmp_path / "lstm.pt")
    spec = _spec(
        tmp_path,
        f"""
        name = "toy-lstm"
        source = "entrypoint"
        arch = "spec_toys:lstm_net"
        checkpoint = "lstm.pt"
        labels = ["a", "b"]
        input_size = 16
        {IMAGENET}
        [hook_points]
        stem = "stem"
        """,
    )
    with pytest.raises(
        ConfigError, match=r"no LRP rule for torch.nn.modules.rnn.LSTM \(1 layer: rnn\)\. Either"
    ):
        check(load_spec(spec))
    # Repeated blocks: one refusal per layer type, its first layers named, the advice said once.
    torch.save(gru_stack(2).state_dict(), tmp_path / "gru.pt")
    gru = spec.read_text().replace("lstm_net", "gru_stack").replace("lstm.pt", "gru.pt")
    with pytest.raises(ConfigError) as refused:
        check(load_spec(_spec(tmp_path, gru, "gru.toml")))
    text = str(refused.value)
    assert "no LRP rule for torch.nn.modules.rnn.GRU (5 layers: rnns.0, rnns.1, rnns.2, and 2 more)" in text
    assert "torch.nn.modules.activation.Softmin (2 layers: acts.0, acts.1)" in text
    assert text.count("Either the canonizer") == 1 and "rnns.3" not in text
    # Named explicitly, the family's canonizer refuses the model instead.
    named = spec.read_text().replace("input_size = 16", 'input_size = 16\ncanonizer = "vgg"')
    with pytest.raises(CanonizerError, match="expects a torchvision VGG"):
        check(load_spec(_spec(tmp_path, named, "named.toml")))


def test_a_pickled_module_needs_allow_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _trained_like(timm.create_model("resnet18", pretrained=False, num_classes=3))
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(WeightsError, match="allow_pickle = true"):
        build(load_spec(_resnet_spec(tmp_path, tmp_path / "whole.pt")))
    loaded, _cfg, _ = build(load_spec(_resnet_spec(tmp_path, tmp_path / "whole.pt", "allow_pickle = true")))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_sha256_that_differs_is_refused(tmp_path: Path, resnet_ckpt: Path) -> None:
    with pytest.raises(WeightsError, match="sha256 .* is not the spec's 0000"):
        build(load_spec(_resnet_spec(tmp_path, resnet_ckpt, f'sha256 = "{"0" * 64}"')))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name = [", "not valid TOML"),
        ('name = "x"\nlables = []', r"unknown key 'lables' \(did you mean 'labels'\?\)"),
        ('name = "x"', "missing source, arch, checkpoint, labels, input_size, mean, std"),
    ],
)
def test_malformed_specs(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(_spec(tmp_path, body))


@pytest.mark.parametrize(
    ("extra_or_replace", "message"),
    [
        (('"timm"', '"keras"'), "source: unknown source 'keras'"),
        ((LABELS3, '["only-one"]'), "need at least 2 distinct labels"),
        ((LABELS3, '["a", "a"]'), "need at least 2 distinct labels"),
        (("input_size = 64", "input_size = [1, 64, 64]"), "expected 3 channels"),
        (("std = [0.229, 0.224, 0.225]", "std = [0.2, 0.0, 0.2]"), "every value must be > 0"),
        (("mean = [0.485, 0.456, 0.406]", "mean = [124, 116, 104]"), "divide 0-255 values by 255"),
        (('"derm-resnet18"', '"Derm Model"'), "not a valid model name"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, resnet_ckpt: Path, extra_or_replace, message: str) -> None:
    old, new = extra_or_replace
    text = _resnet_spec(tmp_path, resnet_ckpt).read_text().replace(old, new, 1)
    with pytest.raises(SpecError, match=message):
        load_spec(_spec(tmp_path, text, "bad.toml"))


def test_the_cli_checks_inspects_and_refuses_without_writing(
    tmp_path: Path, resnet_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medaudit.cli.commands import app

    home = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    runner = CliRunner()
    spec = _resnet_spec(tmp_path, resnet_ckpt)
    out = runner.invoke(app, ["model", "check", str(spec), "--rules"])
    assert out.exit_code == 0, out.output
    assert "conservation" in out.output and "ok" in out.output and "layer4.1.conv2" in out.output
    out = runner.invoke(app, ["model", "inspect", str(spec)])
    assert out.exit_code == 0 and "default CAV" in " ".join(out.output.split()), out.output
    bad = _resnet_spec(tmp_path, resnet_ckpt, labels='["a", "b"]')
    out = runner.invoke(app, ["model", "check", str(bad)])
    assert out.exit_code == 2 and "3 outputs but the spec lists 2 labels" in out.output
    assert "Traceback" not in out.output
    assert not home.exists() or not any(home.rglob("*"))


def test_a_spec_models_versions_round_trip_without_the_registry(tmp_path: Path) -> None:
    """save_version / load_version rebuild a spec's architecture from its source and name (timm's
    resnet10t is not registered; an entrypoint is not either), factory kwargs included."""
    from medaudit.models.corrections.io import load_version, save_version

    torch.manual_seed(0)
    model = _trained_like(timm.create_model("resnet10t", pretrained=False, num_classes=2, drop_rate=0.1))
    torch.save(model.state_dict(), tmp_path / "r10t.pt")
    spec = _spec(
        tmp_path,
        f"""
        name = "r10t"
        source = "timm"
        arch = "resnet10t"
        checkpoint = "r10t.pt"
        labels = ["benign", "malignant"]
        input_size = 48
        resize = "center_crop"
        canonizer = "resnet"
        {IMAGENET}
        [factory_kwargs]
        drop_rate = 0.1
        """,
    )
    built, cfg, _ = build(load_spec(spec))
    save_version(built, cfg, tmp_path / "v" / "model.pt", correction="vanilla", layer="", params={})
    loaded, cfg2, record = load_version(tmp_path / "v" / "model.pt")
    assert cfg2 == cfg and cfg2.resize == "center_crop" and cfg2.factory_kwargs == {"drop_rate": 0.1}
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), built(x))
    assert record["name"] == "vanilla"
