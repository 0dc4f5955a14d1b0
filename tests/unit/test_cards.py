"""Model cards (JSON + Markdown), the comparison table, and correct_and_evaluate end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medaudit.models.cards import (
    ModelCard,
    build_card,
    comparison_markdown,
    comparison_rows,
    comparison_table,
)
from medaudit.models.errors import ConfigError
from medaudit.models.train import sha256_file


def _metrics(clean: float, att: float, att_mal: float, rel: float, q: float, auroc: float) -> dict:
    cls = {"accuracy": clean, "accuracy_malignant": 0.9, "auc_malignant": 0.95, "f1_macro": 0.8}
    return {
        "classification": {
            "ch": dict(cls),
            "clean": dict(cls),
            "attacked": {**cls, "accuracy": att, "accuracy_malignant": att_mal},
        },
        "artifact_relevance": {"mean": rel, "sem": 0.01, "n": 10},
        "tcav": {"quotient": q, "quotient_se": 0.02, "mean_quotient": q, "mean_quotient_se": 0.1,
                 "sensitivity": 0.3, "sensitivity_se": 0.01, "n": 10, "target_class": 0},
        "retrieval": {"auroc": auroc, "ap": 0.7, "kendall_tau": None, "kendall_p": None, "n": 20, "n_pos": 5},
        "artifact": "band_aid",
        "cav_layer": "identity_2",
        "cav_kind": "signal",
    }  # fmt: skip


def _card(tmp_path, version: str, name: str, metrics: dict) -> ModelCard:
    w = tmp_path / f"{version}.pt"
    w.write_bytes(version.encode())
    o = tmp_path / f"{version}.onnx"
    o.write_bytes(b"onnx" + version.encode())
    return build_card(
        name=f"resnet18-synthderm:{version}",
        version=version,
        architecture={
            "arch": "resnet18",
            "source": "timm",
            "input_size": [3, 32, 32],
            "labels": ["benign", "malignant"],
        },
        data={"dataset": "synthderm", "seed": 0},
        correction={"name": name, "layer": "identity_2", "cav_kind": "signal", "params": {"lamb": 10.0}},
        metrics=metrics,
        weights_path=w,
        onnx_path=o,
        parity={"max_abs_diff": 1e-6, "n_images": 64, "atol": 1e-4, "providers": ["CPUExecutionProvider"]},
        opset=17,
    )


def test_card_json_and_markdown_hold_hashes_and_metrics(tmp_path) -> None:
    card = _card(tmp_path, "rrclarc-band_aid", "rrclarc", _metrics(0.9, 0.8, 0.6, 0.1, 0.55, 0.9))
    j, md = card.save(tmp_path / "card")
    d = json.loads(j.read_text())
    assert d["files"]["weights"]["sha256"] == sha256_file(tmp_path / "rrclarc-band_aid.pt")
    assert d["files"]["onnx"]["sha256"] == sha256_file(tmp_path / "rrclarc-band_aid.onnx")
    assert d["metrics"]["tcav"]["quotient"] == 0.55 and d["correction"]["params"]["lamb"] == 10.0
    assert ModelCard.load(tmp_path / "card") == card
    text = md.read_text()
    for needle in (
        d["files"]["weights"]["sha256"],
        d["files"]["onnx"]["sha256"],
        "identity_2",
        "rrclarc",
        "0.5500",  # TCAV
        "0.9000",  # AUROC
        "0.1000",  # artifact relevance
        "f1_macro",
        "| malignant | AUC | 0.9500 |",  # per class: one row per class and metric
    ):
        assert needle in text


def test_comparison_table_gap_recovered_and_rendering(tmp_path) -> None:
    cards = [
        _card(tmp_path, "vanilla", "vanilla", _metrics(0.9, 0.7, 0.5, 0.3, 0.9, 0.95)),
        _card(tmp_path, "pclarc-band_aid", "pclarc", _metrics(0.88, 0.8, 0.7, 0.1, 0.5, 0.5)),
    ]
    rows = comparison_rows(cards)
    assert [r["version"] for r in rows] == ["vanilla", "pclarc-band_aid"]
    assert rows[0]["gap recovered % (all classes)"] == pytest.approx(0.0)
    assert rows[1]["gap recovered % (all classes)"] == pytest.approx(50.0)  # (0.8 − 0.7) / (0.9 − 0.7)
    assert rows[1]["attacked malignant acc"] == 0.7
    md = comparison_markdown(cards)
    assert md.splitlines()[0].startswith("| version | clean acc | attacked acc | attacked malignant acc")
    assert "| pclarc-band_aid | 0.880 | 0.800 | 0.700 | 50.0 | 0.100 | 0.500 | 0.500 |" in md
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(comparison_table(cards))
    assert "pclarc-band_aid" in console.export_text()
    with pytest.raises(ConfigError):
        comparison_rows(cards, baseline="nope")
    with pytest.raises(ConfigError):
        comparison_rows([])


def test_card_rejects_nan_and_foreign_documents(tmp_path) -> None:
    card = _card(tmp_path, "x", "pclarc", _metrics(0.9, 0.7, 0.5, float("nan"), 0.5, 0.5))
    with pytest.raises(ValueError):
        card.to_json()  # metrics must go through EvalReport.as_dict, which maps NaN to null
    with pytest.raises(ConfigError):
        ModelCard.from_dict({"format": "other"})


def test_correct_and_evaluate_writes_a_complete_version(tmp_path) -> None:
    from medaudit.models.build import correct_and_evaluate
    from medaudit.models.corrections import PClarc, fit_correction_data
    from medaudit.models.corrections.io import load_version
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
    from medaudit.models.evaluate import synthderm_eval_data
    from medaudit.models.registry import create_model
    from medaudit.models.train import render_split

    torch.manual_seed(0)
    ds = SynthDerm(SynthDermConfig(n_train=24, n_val=2, n_test=12, size=32, seed=3))
    model, cfg = create_model("resnet18", img_size=32)
    X, y = render_split(ds, "train")
    t = ds.membership["band_aid"][ds.indices("train")]
    data = fit_correction_data(model, cfg, "identity_2", X, y, t, artifact="band_aid")
    ed = synthderm_eval_data(
        ds,
        cfg,
        artifact="band_aid",
        cav=data.cav,
        cav_layer="identity_2",
        cav_kind="signal",
        max_artifact_samples=4,
    )
    assert ed.tcav_class == 0  # band-aids are drawn mostly on benign lesions
    res = correct_and_evaluate(model, cfg, PClarc(), data, ed, tmp_path)
    assert res.version == "pclarc-band_aid"
    d = json.loads((res.directory / "card.json").read_text())
    assert d["files"]["weights"]["sha256"] == sha256_file(res.weights_path)
    assert d["files"]["onnx"]["sha256"] == sha256_file(res.onnx_path)
    assert d["files"]["onnx"]["parity"]["max_abs_diff"] <= 1e-4
    assert set(d["metrics"]["classification"]) == {"ch", "clean", "attacked"}
    assert d["metrics"]["retrieval"]["auroc"] == 0.5  # the CAV coordinate is constant after P-ClArC
    assert (res.directory / "card.md").exists()
    loaded, _, record = load_version(res.weights_path)
    assert record["name"] == "pclarc"
    x = torch.randn(2, 3, 32, 32)
    assert np.allclose(loaded(x).detach().numpy(), res.model(x).detach().numpy())


def test_an_rrr_version_records_the_masks_it_was_fitted_on() -> None:
    """A build on data whose masks were derived from concepts must not record RRR as fitted on
    ground truth: the card's correction parameters name the data's mask source."""
    from medaudit.models.build import recorded_params
    from medaudit.models.corrections import PClarc
    from medaudit.models.corrections.rrr import RRR

    assert recorded_params(RRR(), {"mask_source": "derived"})["masks"] == "derived"
    assert recorded_params(RRR(), {"mask_source": "ground_truth"})["masks"] == "ground_truth"
    assert recorded_params(RRR(), {})["masks"] == "ground_truth"
    assert "masks" not in recorded_params(PClarc(), {"mask_source": "derived"})
    assert recorded_params(RRR(lamb=7.0), {"mask_source": "derived"})["lamb"] == 7.0
