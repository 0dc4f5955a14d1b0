"""The offline build: every version built, registered and tabulated; a re-run reuses everything."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from medaudit.models.acceptance import best_version, rank_versions
from medaudit.models.cards import build_card
from medaudit.models.corrections import FinetuneConfig
from medaudit.models.data.synthetic import SynthDermConfig
from medaudit.models.errors import ConfigError
from medaudit.models.pipeline import DEFAULT_CORRECTIONS, BuildConfig, acceptance, build, stage_key
from medaudit.models.train import TrainConfig

NAME = "resnet18-synthderm"


def tiny_config() -> BuildConfig:
    return BuildConfig(
        train=TrainConfig(
            epochs=1, batch_size=16, data=SynthDermConfig(size=32, n_train=60, n_val=16, n_test=24)
        ),
        finetune=FinetuneConfig(epochs=1, batch_size=8, max_steps=1),
        n_correction_images=16,
        max_artifact_samples=3,
    )


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    from medaudit.service.store import list_versions, register_version

    out = tmp_path_factory.mktemp("build")
    home = out / "bento"
    reg = functools.partial(register_version, home=home)
    logs1: list[str] = []
    first = build(tiny_config(), out, log=logs1.append, register=reg)
    files1, store1 = _mtimes(out / NAME), list_versions(home=home)
    logs2: list[str] = []
    second = build(tiny_config(), out, log=logs2.append, register=reg)
    return out, home, first, second, logs1, logs2, files1, store1


@pytest.mark.slow
def test_first_build_makes_registers_and_tabulates_every_version(two_builds) -> None:
    from medaudit.service.store import load_version

    out, home, first, _, logs1, _, _, store1 = two_builds
    versions = ["vanilla"] + [f"{c}-band_aid" for c in DEFAULT_CORRECTIONS[1:]]
    assert [c.version for c in first.cards] == versions
    assert not any(s.reused for s in first.stages if s.stage != "train")
    assert any(line.startswith("train: trained") for line in logs1)
    assert {v: created for v, (_, created) in first.registered.items()} == dict.fromkeys(versions, True)
    assert [v.tag for v in store1] == sorted(f"{NAME}:{v}" for v in versions)
    md = first.comparison_md.read_text()
    rows = json.loads(first.comparison_json.read_text())["rows"]
    assert [r["version"] for r in rows] == versions
    for v in versions:
        assert f"| {v} |" in md
        vdir = first.version_dirs[v]
        assert {"model.pt", "model.onnx", "card.json", "card.md", "build.json"} <= {
            p.name for p in vdir.iterdir()
        }
    # each correction at its layer (the ResNet family's defaults), the best version recorded
    layers = {c.version: c.correction["layer"] for c in first.cards}
    assert layers["rrclarc-band_aid"] == "last_conv" and layers["rrr-band_aid"] == "identity_2"
    ranking = json.loads(first.comparison_json.read_text())
    assert ranking["best"] == first.best == best_version(rows)
    assert ranking["ranking"] == rank_versions(rows) and sorted(ranking["ranking"]) == sorted(versions[1:])
    lv = load_version(f"{NAME}:pclarc-band_aid", home=home)
    assert lv.card.correction["name"] == "pclarc"
    assert any("counterfactual pairs" in line for line in logs1)  # the correction CAV's data
    assert lv.bank.model_version == f"{NAME}:pclarc-band_aid" and "band_aid" in lv.bank.concepts


@pytest.mark.slow
def test_second_build_reuses_everything_and_registers_the_same_versions(two_builds) -> None:
    from medaudit.service.store import list_versions

    out, home, first, second, _, logs2, files1, store1 = two_builds
    assert all(s.reused for s in second.stages), [s for s in second.stages if not s.reused]
    assert not any(line.startswith("train: trained") or line.endswith("building") for line in logs2)
    changed = {k for k, t in _mtimes(out / NAME).items() if files1.get(k) != t}
    assert changed <= {"comparison.md", "comparison.json"}, (
        changed
    )  # no checkpoint, bank or version rewritten
    assert all(created is False for _, created in second.registered.values())
    assert list_versions(home=home) == store1
    assert [c.to_dict() for c in second.cards] == [c.to_dict() for c in first.cards]
    assert second.comparison == first.comparison


@pytest.mark.slow
def test_a_damaged_version_is_rebuilt_alone(two_builds) -> None:
    out, home, *_ = two_builds
    from medaudit.service.store import register_version

    onnx = out / NAME / "versions" / "pclarc-band_aid" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1])
    res = build(
        tiny_config(), out, log=lambda _m: None, register=functools.partial(register_version, home=home)
    )
    rebuilt = [s.stage for s in res.stages if not s.reused]
    assert rebuilt == ["pclarc-band_aid"]


def test_stage_keys_follow_their_inputs() -> None:
    assert stage_key("a", {"x": 1, "y": 2}) == stage_key("a", {"y": 2, "x": 1})
    assert stage_key("a", {"x": 1}) != stage_key("a", {"x": 2})


def test_build_config_defaults_come_from_the_dataclasses_and_bad_values_are_named() -> None:
    cfg = BuildConfig()
    assert cfg.train == TrainConfig() and cfg.train.data == SynthDermConfig()
    assert cfg.corrections == DEFAULT_CORRECTIONS and cfg.model_name == NAME
    with pytest.raises(ConfigError, match="unknown corrections"):
        BuildConfig(corrections=("clarc",))
    with pytest.raises(ConfigError, match="timestamp"):
        BuildConfig(artifact="timestamp")  # drawn nowhere in the default spec
    assert cfg.cav_data == "paired"
    with pytest.raises(ConfigError, match="cav_data='pairs'; valid: 'paired', 'membership'"):
        BuildConfig(cav_data="pairs")
    ft = FinetuneConfig(epochs=1)
    assert BuildConfig(finetune=ft).correction("rrr").finetune == ft  # type: ignore[attr-defined]


def _card(
    tmp_path: Path,
    version: str,
    name: str,
    clean: float,
    att_mal: float,
    rel: float,
    params: dict | None = None,
):
    w = tmp_path / f"{version}.pt"
    w.write_bytes(version.encode())
    cls = {"accuracy": clean, "accuracy_malignant": 0.9, "accuracy_benign": 0.9}
    metrics = {
        "classification": {"ch": cls, "clean": cls, "attacked": {**cls, "accuracy_malignant": att_mal}},
        "artifact_relevance": {"mean": rel},
        "tcav": {"quotient": 0.5},
        "retrieval": {"auroc": 0.5},
    }
    return build_card(
        name=f"{NAME}:{version}",
        version=version,
        architecture={"labels": ["benign", "malignant"]},
        data={},
        correction={"name": name, "params": params or {}},
        metrics=metrics,
        weights_path=w,
    )


def test_acceptance_columns_and_thresholds(tmp_path) -> None:
    spec = {"band_aid": (0.5, 0.03)}
    cards = [
        _card(tmp_path, "vanilla", "vanilla", 0.90, 0.50, 0.40),  # gap on malignant: 0.9 - 0.5
        _card(tmp_path, "good", "rrclarc", 0.875, 0.70, 0.20),  # 50 % back, -2.5 pts, -50 % relevance
        _card(tmp_path, "lossy", "rrr", 0.86, 0.90, 0.05),  # -4 pts clean
        _card(tmp_path, "shy", "pclarc", 0.90, 0.60, 0.10),  # 25 % back
    ]
    rows = {r["version"]: r for r in acceptance(cards, spec, "band_aid")}
    assert rows["good"]["malignant gap recovered %"] == pytest.approx(50.0)
    assert rows["good"]["clean Δ pts"] == pytest.approx(-2.5)
    assert rows["good"]["relevance cut %"] == pytest.approx(50.0)
    assert [v for v, r in rows.items() if r["meets criteria"]] == ["good"]


def test_an_unconverged_checkpoint_is_named_by_what_fine_tuning_alone_does(tmp_path) -> None:
    """vanilla-ft moving clean accuracy by more than the criteria's 3 points warns, in the report
    and the JSON's words; within them, or with no vanilla-ft, nothing is said."""
    from medaudit.models.acceptance import baseline_warnings, comparison_report

    spec = {"band_aid": (0.5, 0.03)}
    base = _card(tmp_path, "vanilla", "vanilla", 0.74, 0.04, 0.40)
    fixer = _card(tmp_path, "rrr-band_aid", "rrr", 0.85, 0.57, 0.38)
    moved = _card(tmp_path, "vanilla-ft-band_aid", "vanilla-ft", 0.89, 0.64, 0.44)
    cards = [base, moved, fixer]
    rows = acceptance(cards, spec, "band_aid")
    (w,) = baseline_warnings(cards, rows)
    assert "`vanilla-ft-band_aid` (fine-tuning alone) changes clean accuracy by +15.0 points" in w
    assert "unconverged" in w and "recovers" in w
    assert "**Warning:** `vanilla-ft-band_aid`" in comparison_report(cards, rows, focus_class="malignant")
    steady = _card(tmp_path, "vanilla-ft-band_aid", "vanilla-ft", 0.76, 0.20, 0.40)  # +2 points
    assert baseline_warnings([base, steady], acceptance([base, steady], spec, "band_aid")) == []
    assert baseline_warnings([base, fixer], acceptance([base, fixer], spec, "band_aid")) == []
    assert "Warning" not in comparison_report([base, fixer], acceptance([base, fixer], spec, "band_aid"))


def test_a_build_of_fine_tuned_versions_without_vanilla_ft_says_the_check_did_not_run(tmp_path) -> None:
    """Fine-tuned versions (their params carry ``finetune``) and no vanilla-ft: the report names them
    and says how to run the check; projections alone (no fine-tune) need no such check."""
    from medaudit.models.acceptance import baseline_warnings, comparison_report

    spec = {"band_aid": (0.5, 0.03)}
    base = _card(tmp_path, "vanilla", "vanilla", 0.74, 0.04, 0.40)
    tuned = _card(tmp_path, "rrr-band_aid", "rrr", 0.85, 0.57, 0.38, params={"finetune": {"epochs": 3}})
    projected = _card(tmp_path, "pclarc-band_aid", "pclarc", 0.70, 0.50, 0.30, params={"mode": "signal"})
    cards = [base, projected, tuned]
    (w,) = baseline_warnings(cards, acceptance(cards, spec, "band_aid"))
    assert "no `vanilla-ft` version was built" in w and "`rrr-band_aid`" in w
    assert "pclarc" not in w and "add `vanilla-ft`" in w
    report = comparison_report(cards, acceptance(cards, spec, "band_aid"), focus_class="malignant")
    assert "**Warning:** no `vanilla-ft`" in report
    assert baseline_warnings([base, projected], acceptance([base, projected], spec, "band_aid")) == []
    steady = _card(
        tmp_path, "vanilla-ft-band_aid", "vanilla-ft", 0.76, 0.20, 0.40, {"finetune": {"epochs": 3}}
    )
    with_ft = [base, steady, tuned]
    assert baseline_warnings(with_ft, acceptance(with_ft, spec, "band_aid")) == []


def test_fit_banks_forwards_rows_shared_with_the_ch_render_once(tmp_path, monkeypatch) -> None:
    """The counterfactual pairs reuse φ of training rows the "ch" render already forwarded; the banks
    equal those of forwarding every row (up to float round-off of another batch composition)."""
    import numpy as np
    import torch

    import medaudit.models.banks as banks
    from medaudit.models.build_data import SynthDermData
    from medaudit.models.data.synthetic import SynthDerm
    from medaudit.models.registry import create_model
    from medaudit.models.train import render_split

    cfg = tiny_config()
    ds = SynthDerm(cfg.train.data)
    torch.manual_seed(0)
    model, mcfg = create_model("resnet18", img_size=32)
    Xtr, ytr = render_split(ds, "train", cache_dir=tmp_path)
    tr_idx = ds.indices("train")
    concepts = [a for a in ds.membership if ds.membership[a][tr_idx].any()]
    forwarded: list[int] = []
    real = banks.pooled_activations

    def counting(m, c, layer, images, *a, **k):
        forwarded.append(len(images))
        return real(m, c, layer, images, *a, **k)

    monkeypatch.setattr(banks, "pooled_activations", counting)
    data = SynthDermData(cfg.train.data, tmp_path)
    assert list(data.train_membership()) == concepts

    def fit() -> banks.Banks:
        forwarded.clear()
        return banks.fit_banks(
            model, mcfg, data, "identity_2", Xtr, ytr, artifact=cfg.artifact, scope=(0,), cav_data="paired",
            base_tag="t:vanilla", seed=cfg.seed, target_fpr=cfg.target_fpr, log=lambda _s: None,
        )  # fmt: skip

    reused = fit()
    n_reused = list(forwarded)
    monkeypatch.setattr(banks, "reusing", lambda images, _done, compute: compute(images))
    full = fit()
    n = len(tr_idx)
    arts = np.stack([ds.membership[a][tr_idx] for a in ds.membership])
    bare = int((~arts.any(0)).sum())  # "ch" rows without artifacts: identical in "clean"
    only = int((arts.any(0) & (arts.sum(0) == 1) & ds.membership[cfg.artifact][tr_idx]).sum())
    assert bare > 0 and only > 0
    # rows equal byte for byte; at 32 px an artifact may also draw no pixel, so a few more
    same = [
        int(
            (render_split(ds, "train", v, cfg.artifact, cache_dir=tmp_path)[0] == Xtr).flatten(1).all(1).sum()
        )
        for v in ("clean", "attacked")
    ]
    assert same[0] >= bare and same[1] >= only
    assert forwarded == [n, cfg.train.data.n_val, n, n]
    assert n_reused == [n, cfg.train.data.n_val, n - same[0], n - same[1]]
    for name in ("detection", "correction"):
        a, b = getattr(reused, name), getattr(full, name)
        assert a.concepts == b.concepts
        for c in a:
            assert a[c].cav.reg == b[c].cav.reg and a[c].cav.cv_score == b[c].cav.cv_score
            for f in ("mu0", "mu1", "clean_scores"):
                np.testing.assert_allclose(getattr(a[c], f), getattr(b[c], f), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(a[c].cav.v, b[c].cav.v, rtol=0, atol=1e-6)
    np.testing.assert_allclose(reused.cav_svm, full.cav_svm, rtol=0, atol=1e-6)


def test_banks_at_two_layers_share_one_forward_per_image_set(tmp_path) -> None:
    """The build's banks at its layer and at the ClArC corrections' deeper layer come from one
    forward per image set (training split, clean validation, the pair renders' unshared rows), and
    equal the banks each layer's own forwards fit."""
    import numpy as np
    import torch

    import medaudit.models.banks as banks
    from medaudit.models.build_data import SynthDermData
    from medaudit.models.corrections.base import pooled_activations
    from medaudit.models.registry import create_model
    from medaudit.models.train import render_split

    cfg = tiny_config()
    torch.manual_seed(0)
    model, mcfg = create_model("resnet18", img_size=32)
    data = SynthDermData(cfg.train.data, tmp_path)
    Xtr, ytr = render_split(data.ds, "train", cache_dir=tmp_path)
    layers = ("identity_2", "last_conv")
    shared = banks.SharedActivations(model, mcfg, layers)
    both = {
        at: pooled_activations(model, mcfg, at, Xtr[:10]) for at in layers
    }  # one layer per forward, stopped at it
    for at in layers:
        np.testing.assert_array_equal(shared(at, Xtr[:10]), both[at])
    assert shared.forwards == 1
    with pytest.raises(KeyError, match="identity_1"):
        shared("identity_1", Xtr[:10])

    def fit(at: str, detection: bool, via: banks.SharedActivations | None) -> banks.Banks:
        return banks.fit_banks(
            model, mcfg, data, at, Xtr, ytr, artifact=cfg.artifact, scope=(0,), cav_data="paired",
            base_tag="t:vanilla", seed=cfg.seed, target_fpr=cfg.target_fpr, log=lambda _s: None,
            detection=detection, shared=via,
        )  # fmt: skip

    shared = banks.SharedActivations(model, mcfg, layers)
    got = [fit("identity_2", True, shared), fit("last_conv", False, shared)]
    assert shared.forwards == 4  # train, clean validation, the two renders' unshared rows
    want = [fit("identity_2", True, None), fit("last_conv", False, None)]
    for a, b in zip(got, want, strict=True):
        for name in ("detection", "correction"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.concepts == y.concepts and x.layer == y.layer
            for c in x:
                np.testing.assert_allclose(x[c].mu0, y[c].mu0, rtol=1e-9, atol=1e-9)
                np.testing.assert_allclose(x[c].cav.v, y[c].cav.v, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.cav_svm, b.cav_svm, rtol=0, atol=1e-6)


def test_the_victim_is_the_class_the_attack_costs_vanilla_most() -> None:
    """With three classes the realised artifact rates of the two rare classes differ by chance
    (band-aids on nevi: melanoma 4 %, bcc 3 %); the class whose images the attack pushes away is
    the one that loses most, not the rarer."""
    from medaudit.models.acceptance import victim_class
    from medaudit.models.cards import ModelCard

    def card(labels, clean, att):
        sets = {"clean": dict(zip([f"accuracy_{k}" for k in labels], clean, strict=True))}
        sets["attacked"] = dict(zip([f"accuracy_{k}" for k in labels], att, strict=True))
        return ModelCard(
            "m:vanilla", "vanilla", {"labels": labels}, {}, {"name": "vanilla"}, {"classification": sets}, {}
        )

    assert (
        victim_class([card(["benign", "malignant"], [0.9, 0.8], [0.95, 0.4])], {"a": (0.5, 0.03)}, "a")
        == "malignant"
    )
    three = card(["NV", "MEL", "BCC"], [0.92, 0.71, 1.0], [0.96, 0.31, 0.95])
    assert victim_class([three], {"a": (0.5, 0.04, 0.03)}, "a") == "MEL"
    no_attack = ModelCard(
        "m:vanilla", "vanilla", {"labels": ["NV", "MEL", "BCC"]}, {}, {"name": "vanilla"}, {}, {}
    )
    assert victim_class([no_attack], {"a": (0.5, 0.04, 0.03)}, "a") == "BCC"  # the rarest, untold
