"""The BentoML model store: round trip (torch and ONNX outputs identical), sha256 checks, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medaudit.models.cards import build_card
from medaudit.models.corrections import CorrectionData, PClarc
from medaudit.models.corrections.io import save_version
from medaudit.models.export import INPUT_NAME, OUTPUT_NAME, export_onnx, ort_session
from medaudit.models.registry import create_model
from medaudit.models.xai.concepts import ConceptBank
from medaudit.service.errors import IntegrityError, StoreError
from medaudit.service.store import list_versions, load_version
from medaudit.testing.versions import register_version_files

NAME = "resnet18-synthderm"


def _metrics() -> dict:
    cls = {"accuracy": 0.9, "accuracy_malignant": 0.8, "f1_macro": 0.85}
    return {
        "classification": {"ch": cls, "clean": cls, "attacked": {**cls, "accuracy": 0.7}},
        "artifact_relevance": {"mean": 0.2, "sem": 0.01, "n": 4},
        "tcav": {"quotient": 0.6, "quotient_se": 0.1, "target_class": 0},
        "retrieval": {"auroc": 0.9},
        "artifact": "band_aid",
        "cav_layer": "identity_2",
        "cav_kind": "signal",
    }


def _version(tmp_path: Path, version: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A complete version directory (model.pt, model.onnx, card.*, bank/) for a 32 px resnet18."""
    torch.manual_seed(seed)
    model, cfg = create_model("resnet18", img_size=32)
    layer = "identity_2"
    rng = np.random.default_rng(seed)
    v = rng.normal(size=256)
    v /= np.linalg.norm(v)
    if version.startswith("pclarc"):
        data = CorrectionData(layer=layer, cav=v, mu0=np.abs(rng.normal(size=256)), artifact="band_aid")
        model = PClarc().apply(model, cfg, data)
        correction = "pclarc"
    else:
        correction = "vanilla"
    d = tmp_path / "src" / version
    w = save_version(model, cfg, d / "model.pt", correction=correction, layer=layer, params={})
    o = export_onnx(model, cfg, d / "model.onnx")
    build_card(
        name=f"{NAME}:{version}",
        version=version,
        architecture=cfg.to_dict(),
        data={"dataset": "synthderm"},
        correction={"name": correction, "layer": layer, "params": {}},
        metrics=_metrics(),
        weights_path=w,
        onnx_path=o,
    ).save(d)
    acts = np.abs(rng.normal(size=(40, 256)))
    t = (np.arange(40) % 2).astype(np.int64)
    acts[t == 1] += 0.5 * v
    ConceptBank.fit(f"{NAME}:{version}", layer, acts, {"band_aid": t}, acts[t == 0], kind="signal").save(
        d / "bank"
    )
    return d, model


def _register(d: Path, version: str, home: Path) -> tuple[str, bool]:
    return register_version_files(d, version, home, name=NAME)


@pytest.mark.parametrize("version", ["vanilla", "pclarc-band_aid"])
def test_round_trip_gives_identical_torch_and_onnx_outputs(tmp_path, version) -> None:
    d, model = _version(tmp_path, version)
    home = tmp_path / "bento"
    tag, created = _register(d, version, home)
    assert (tag, created) == (f"{NAME}:{version}", True)
    lv = load_version(tag, home=home)
    assert lv.tag == tag and lv.card.version == version and lv.cfg.input_size == (3, 32, 32)
    assert lv.bank.model_version == tag and lv.bank.concepts == ("band_aid",)
    assert lv.record["name"] == version.split("-")[0]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(lv.model(x), model.eval()(x))
    feed = {INPUT_NAME: x.numpy()}
    ref = ort_session(d / "model.onnx").run([OUTPUT_NAME], feed)[0]
    got = ort_session(lv.onnx_path).run([OUTPUT_NAME], feed)[0]
    assert np.array_equal(ref, got)
    assert lv.onnx_path.read_bytes() == (d / "model.onnx").read_bytes()


@pytest.mark.parametrize("fname", ["model.pt", "model.onnx", "bank/concepts.safetensors"])
def test_a_tampered_file_is_refused_naming_the_file_and_both_hashes(tmp_path, fname) -> None:
    d, _ = _version(tmp_path, "vanilla")
    home = tmp_path / "bento"
    tag, _ = _register(d, "vanilla", home)
    stored = next(v for v in list_versions(home=home) if v.tag == tag).path / fname
    recorded = json.loads((d / "card.json").read_text())["files"]
    blob = bytearray(stored.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one flipped bit
    stored.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError) as e:
        load_version(tag, home=home)
    msg = str(e.value)
    assert str(stored) in msg and e.value.file == str(stored)
    assert e.value.expected in msg and e.value.actual in msg and e.value.expected != e.value.actual
    if fname == "model.pt":
        assert e.value.expected == recorded["weights"]["sha256"]
    if fname == "model.onnx":
        assert e.value.expected == recorded["onnx"]["sha256"]


def test_register_is_idempotent_and_replaces_changed_bytes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bento"))  # no home=: the env variable
    d, _ = _version(tmp_path, "vanilla")
    assert _register(d, "vanilla", None)[1] is True  # type: ignore[arg-type]
    first = list_versions()
    assert _register(d, "vanilla", None) == (f"{NAME}:vanilla", False)  # type: ignore[arg-type]
    assert list_versions() == first
    d2, model2 = _version(tmp_path / "other", "vanilla", seed=1)  # same tag, other weights
    assert _register(d2, "vanilla", None)[1] is True  # type: ignore[arg-type]
    (info,) = list_versions(NAME)
    assert info.weights_sha256 != first[0].weights_sha256
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_version(f"{NAME}:vanilla").model(x), model2(x))
    assert (tmp_path / "bento" / "models" / NAME / "vanilla").is_dir()


def test_unknown_tags_bad_names_and_foreign_banks_are_refused(tmp_path) -> None:
    d, _ = _version(tmp_path, "vanilla")
    home = tmp_path / "bento"
    assert list_versions(home=home) == []
    _register(d, "vanilla", home)
    with pytest.raises(
        StoreError, match=r"no model version 'resnet18-synthderm:rrr'.*resnet18-synthderm:vanilla"
    ):
        load_version(f"{NAME}:rrr", home=home)
    with pytest.raises(StoreError, match="not a valid BentoML tag part"):
        _register(d, "P-ClArC band aid", home)
    from medaudit.models.errors import ConceptBankError

    with pytest.raises(ConceptBankError, match="refit the bank"):
        _register(d, "pclarc-band_aid", home)  # the bank belongs to :vanilla
    assert [v.version for v in list_versions(home=home)] == ["vanilla"]
