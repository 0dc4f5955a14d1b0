"""Per-correction settings (layer, optimiser, lr, epochs, λ) with the family defaults, the ranking of
versions by the correction criteria that picks what the demo serves, and where a projected
version's concept scores are read (issue 24)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from medaudit.cli.commands import demo_serving, try_commands
from medaudit.models.acceptance import best_version, criteria_score, rank_versions
from medaudit.models.corrections import RRR, CorrectionData, PClarc, RRClarc, Vanilla
from medaudit.models.corrections.base import pooled_activations
from medaudit.models.corrections.settings import (
    FAMILY_LAYER_MODULES,
    CorrectionSettings,
    family_defaults,
    make_correction,
    parse_setting,
    resolve,
    settings_from_pairs,
)
from medaudit.models.errors import ConfigError
from medaudit.models.pipeline import BuildConfig, correction_plan
from medaudit.models.registry import create_model, get_cfg

# --------------------------------------------------------------------------------- settings


def test_parse_setting_reads_each_field_with_its_type() -> None:
    assert parse_setting("rrclarc.layer=last_conv") == ("rrclarc", "layer", "last_conv")
    assert parse_setting("rrclarc.lr=1e-3") == ("rrclarc", "lr", 1e-3)
    assert parse_setting(" rrr.epochs = 3 ") == ("rrr", "epochs", 3)
    assert parse_setting("rrclarc.lamb=auto") == ("rrclarc", "lamb", "auto")
    assert parse_setting("rrr.lamb=50") == ("rrr", "lamb", 50.0)
    assert parse_setting("vanilla-ft.optimizer=sgd") == ("vanilla-ft", "optimizer", "sgd")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rrclarc.layer", "NAME.FIELD=VALUE"),
        ("layer=last_conv", "NAME.FIELD=VALUE"),
        ("rrclarc.momentum=0.9", "unknown field 'momentum'; valid: layer, optimizer, lr, epochs, lamb"),
        ("rrclarc.lr=fast", "lr must be a number, got 'fast'"),
        ("rrclarc.lr=-1", "lr=-1.0; must be > 0"),
        ("rrclarc.optimizer=rmsprop", "optimizer='rmsprop'; valid: adam, sgd"),
        ("rrclarc.epochs=-2", "epochs=-2; must be ≥ 0"),
    ],
)
def test_bad_settings_are_refused_by_name(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        parse_setting(text)


def test_settings_from_pairs_groups_by_correction_and_refuses_unknown_names() -> None:
    got = settings_from_pairs(["rrclarc.layer=identity_2", "rrclarc.lr=1e-4", "rrr.lamb=100"])
    assert got == {
        "rrclarc": CorrectionSettings(layer="identity_2", lr=1e-4),
        "rrr": CorrectionSettings(lamb=100.0),
    }
    with pytest.raises(ConfigError, match="unknown correction 'rrclarx'; valid: rrclarc, rrr"):
        settings_from_pairs(["rrclarx.lr=1"], {"rrclarc": None, "rrr": None})


def test_user_settings_override_the_family_defaults_which_override_the_build_layer() -> None:
    paper = family_defaults("resnet", "rrclarc")
    assert (paper.layer, paper.optimizer, paper.lr) == ("last_conv", "adam", 1e-3)  # method.md §4.5
    assert resolve("rrclarc", "resnet", "identity_2") == paper
    mine = resolve("rrclarc", "resnet", "identity_2", CorrectionSettings(layer="identity_2", lr=1e-4))
    assert (mine.layer, mine.optimizer, mine.lr) == ("identity_2", "adam", 1e-4)
    # no family entry: the build layer and the corrections' own schedules
    assert resolve("rrr", "vit", "inspection_layer") == CorrectionSettings(layer="inspection_layer")


def test_the_family_layers_modules_are_the_registrys_and_map_onto_a_specs_names() -> None:
    assert FAMILY_LAYER_MODULES["resnet"] == get_cfg("resnet18").hook_points
    named = {"stem": "conv1", "deep": "layer4", "mid": "layer3"}
    assert resolve("rrclarc", "resnet", "mid", hook_points=named).layer == "deep"
    assert resolve("rrclarc", "resnet", "mid", hook_points=list(named)).layer == "mid"  # names only
    assert resolve("rrclarc", "vit", "x", hook_points=named).layer == "x"  # no family layer


def test_make_correction_applies_the_schedule_and_lambda() -> None:
    rr = make_correction(RRClarc, CorrectionSettings(optimizer="sgd", lr=5e-3, epochs=3, lamb=10.0))
    assert isinstance(rr, RRClarc)
    assert (rr.finetune.optimizer, rr.finetune.lr, rr.finetune.epochs, rr.lamb) == ("sgd", 5e-3, 3, 10.0)
    assert make_correction(RRR, CorrectionSettings()) == RRR()
    assert make_correction(Vanilla, CorrectionSettings(lr=1e-3)).finetune.lr == 1e-3
    with pytest.raises(ConfigError, match="pclarc is training-free"):
        make_correction(PClarc, CorrectionSettings(lr=1e-3))
    with pytest.raises(ConfigError, match="lamb='auto' is RR-ClArC's; rrr takes a number"):
        make_correction(RRR, CorrectionSettings(lamb="auto"))
    with pytest.raises(ConfigError, match="vanilla-ft has no λ"):
        make_correction(Vanilla, CorrectionSettings(lamb=1.0))


def test_build_config_checks_settings_before_anything_is_built() -> None:
    with pytest.raises(ConfigError, match=r"settings for \['rrr'\], which this build does not make"):
        BuildConfig(corrections=("vanilla", "rrclarc"), settings={"rrr": CorrectionSettings(lamb=1.0)})
    with pytest.raises(ConfigError, match="pclarc is training-free"):
        BuildConfig(corrections=("vanilla", "pclarc"), settings={"pclarc": CorrectionSettings(epochs=1)})


def test_correction_plan_gives_each_correction_its_layer_and_refuses_one_before_the_build_layer() -> None:
    mcfg = get_cfg("resnet18")
    plan = correction_plan(BuildConfig(), mcfg, "identity_2")
    assert plan["rrclarc"].layer == family_defaults("resnet", "rrclarc").layer
    assert plan["rrr"].layer == "identity_2" and plan["vanilla"].layer == "identity_2"
    early = BuildConfig(settings={"rrclarc": CorrectionSettings(layer="identity_1")})
    with pytest.raises(ConfigError, match="rrclarc at identity_1 would change the activations at the build"):
        correction_plan(early, mcfg, "identity_2")
    # a spec naming its own hook points (timm's layer1..layer4) gets the family's layer under its
    # own name: last_conv is the module layer4 (the ISIC-layout build ran RR-ClArC and P-ClArC at
    # the build layer layer3 before, where the demo measured them far worse)
    spec_like = replace(mcfg, hook_points={f"layer{k}": f"layer{k}" for k in range(1, 5)})
    plan = correction_plan(BuildConfig(), spec_like, "layer3")
    assert [plan[c].layer for c in ("rrclarc", "pclarc", "rpclarc", "rrr")] == ["layer4"] * 3 + ["layer3"]
    # where no hook point sits at that module, the build layer stays
    no_layer4 = replace(mcfg, hook_points={f"block{k}": f"layer{k}" for k in range(1, 4)})
    assert correction_plan(BuildConfig(), no_layer4, "block3")["rrclarc"].layer == "block3"
    bad = BuildConfig(settings={"rrr": CorrectionSettings(layer="layer9")})
    with pytest.raises(
        ConfigError, match="layer 'layer9' is not a hook point of resnet18; valid: identity_0"
    ):
        correction_plan(bad, mcfg, "identity_2")


# --------------------------------------------------------------------------------- served choice


def _row(version: str, gap: float | None, d_clean: float | None, cut: float | None) -> dict:
    return {
        "version": version,
        "malignant gap recovered %": gap,
        "clean Δ pts": d_clean,
        "relevance cut %": cut,
    }


def test_criteria_score_is_the_worst_criterion_against_its_threshold() -> None:
    assert criteria_score(_row("a", 50.0, -3.0, 50.0)) == pytest.approx(1.0)  # all on the threshold
    assert criteria_score(_row("a", 100.0, 0.0, 25.0)) == pytest.approx(0.5)  # the cut is the worst
    assert criteria_score(_row("a", 100.0, -4.5, 100.0)) == pytest.approx(0.5)  # clean loss 4.5 pts
    assert criteria_score(_row("a", 100.0, 0.0, 100.0)) == pytest.approx(2.0)  # perfect
    assert criteria_score(_row("a", None, 0.0, 60.0)) == -np.inf


def test_the_best_version_follows_the_card_numbers() -> None:
    rows = [
        _row("vanilla", 0.0, 0.0, 0.0),
        _row("pclarc-band_aid", -8.5, 0.5, -30.0),
        _row("rrclarc-band_aid", 62.0, -0.4, 57.0),
        _row("rrr-band_aid", 91.5, -1.0, 53.0),
    ]
    # rrclarc's worst criterion is 1.14 of its threshold (relevance cut 57 / 50), rrr's 1.06
    assert rank_versions(rows) == ["rrclarc-band_aid", "rrr-band_aid", "pclarc-band_aid"]
    assert best_version(rows) == "rrclarc-band_aid"
    rows[3] = _row("rrr-band_aid", 91.5, -1.0, 70.0)  # a better relevance cut: now RRR leads
    assert best_version(rows) == "rrr-band_aid"
    rows[3] = _row("rrr-band_aid", 91.5, -3.6, 70.0)  # fails the clean-cost criterion
    assert best_version(rows) == "rrclarc-band_aid"
    # no gap measured (data without masks): nothing to rank, vanilla is served alone
    assert best_version([_row("vanilla", None, 0.0, 0.0), _row("rrr-band_aid", None, 0.1, 40.0)]) is None


def test_the_demo_serves_vanilla_and_the_best_version_and_prints_it_in_the_curl_examples(tmp_path) -> None:
    served = demo_serving("rrr-band_aid")
    assert served == {
        "MEDAUDIT_VERSIONS": "vanilla,rrr-band_aid",
        "MEDAUDIT_AB_WEIGHTS": "vanilla=1",
        "MEDAUDIT_SHADOW_VERSION": "rrr-band_aid",
    }
    assert demo_serving(None)["MEDAUDIT_VERSIONS"] == "vanilla"
    assert demo_serving(None)["MEDAUDIT_SHADOW_VERSION"] == ""
    named = demo_serving("rrr-band_aid", "vanilla, pclarc-band_aid")  # the user names them
    assert named["MEDAUDIT_VERSIONS"] == "vanilla,pclarc-band_aid"
    assert named["MEDAUDIT_SHADOW_VERSION"] == "pclarc-band_aid"
    compare = try_commands(tmp_path / "x.png", 3000, served["MEDAUDIT_SHADOW_VERSION"])[1]
    assert compare.endswith("/compare?versions=vanilla,rrr-band_aid'")


# --------------------------------------------------------------------------------- concept scores


def test_a_projected_versions_concept_scores_are_read_before_the_projection() -> None:
    """The LRP engine's activations at ℓ of a P-ClArC version are the original model's (where its
    bank was fitted), while its logits are the projected model's."""
    from medaudit.models.xai.lrp import ClassTarget, Explainer

    torch.manual_seed(0)
    model, cfg = create_model("resnet18", img_size=32)
    model.eval()
    rng = np.random.default_rng(0)
    v = rng.normal(size=256)
    v /= np.linalg.norm(v)
    net = PClarc().apply(model, cfg, CorrectionData(layer="identity_2", cav=v, mu0=np.full(256, 0.3)))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    exp = Explainer(net, cfg).explain(
        cfg.normalize(x), [ClassTarget((0, 0, 0, 0))], cav_layers=["identity_2"]
    )
    before = pooled_activations(model, cfg, "identity_2", x)
    after = pooled_activations(net, cfg, "identity_2", x)  # the projection's output: ⟨φ, v⟩ = ⟨μ0, v⟩
    got = exp.activations["identity_2"].double().numpy()
    np.testing.assert_allclose(got, before, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got @ v, after @ v, atol=1e-3)
    np.testing.assert_allclose(after @ v, np.full(4, 0.3 * v.sum()), rtol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(exp.logits.numpy(), net(cfg.normalize(x)).numpy(), rtol=1e-4, atol=1e-4)
