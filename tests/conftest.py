"""Shared fixtures: a tiny served store (two random 32 px resnet18 versions with concept banks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

SERVED_NAME = "resnet18-synthderm"


def build_tiny_version(root: Path, home: Path, version: str, seed: int) -> str:
    """Registers a randomly initialised 32 px resnet18 as ``resnet18-synthderm:<version>``."""
    from models.cards import build_card
    from models.corrections.io import save_version
    from models.export import export_onnx
    from models.registry import create_model
    from models.xai.concepts import ConceptBank
    from service.store import register_version

    torch.manual_seed(seed)
    model, cfg = create_model("resnet18", img_size=32)
    layer = cfg.default_cav_layer
    d = root / version
    w = save_version(model, cfg, d / "model.pt", correction="vanilla", layer=layer, params={})
    o = export_onnx(model, cfg, d / "model.onnx")
    cls = {"accuracy": 0.9, "accuracy_malignant": 0.8, "f1_macro": 0.85}
    build_card(
        name=f"{SERVED_NAME}:{version}",
        version=version,
        architecture=cfg.to_dict(),
        data={"dataset": "synthderm"},
        correction={"name": "vanilla", "layer": layer, "params": {}},
        metrics={
            "classification": {"ch": cls, "clean": cls, "attacked": cls},
            "artifact_relevance": {"mean": 0.2, "sem": 0.01, "n": 4},
            "tcav": {"quotient": 0.6, "quotient_se": 0.1, "target_class": 0},
            "retrieval": {"auroc": 0.9},
            "artifact": "band_aid",
            "cav_layer": layer,
            "cav_kind": "svm",
        },
        weights_path=w,
        onnx_path=o,
    ).save(d)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        from models.xai.lrp import Explainer

        x = torch.randn(24, 3, 32, 32)
        acts = (
            Explainer(model, cfg).explain(x, ["pred"], cav_layers=[layer]).activations[layer].double().numpy()
        )
    t = (np.arange(24) % 2).astype(np.int64)
    labels = {"band_aid": t, "ruler": rng.permutation(t)}
    ConceptBank.fit(f"{SERVED_NAME}:{version}", layer, acts, labels, acts[t == 0], kind="signal").save(
        d / "bank"
    )
    tag, _ = register_version(
        SERVED_NAME, version, weights=w, onnx=o, card_dir=d, bank_dir=d / "bank", home=home
    )
    return tag


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BENTOML_HOME holding ``resnet18-synthderm:vanilla`` and ``…:pclarc-band_aid`` (random weights)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_store")
    home = root / "bentoml"
    for seed, version in enumerate(("vanilla", "pclarc-band_aid")):
        build_tiny_version(root / "src", home, version, seed)
    return home


@pytest.fixture(scope="session")
def tiny_deployment(tiny_store: Path) -> dict[str, str]:
    """The environment of a ``bentoml serve`` of :func:`tiny_store` as most served tests want it:
    both versions, split 1:1 A/B, the corrected one as shadow. Tests add auth, flags and limits."""
    return {
        "BENTOML_HOME": str(tiny_store),
        "MEDAUDIT_VERSIONS": "vanilla,pclarc-band_aid",
        "MEDAUDIT_AB_WEIGHTS": "vanilla=1,pclarc-band_aid=1",
        "MEDAUDIT_SHADOW_VERSION": "pclarc-band_aid",
    }


def _forget_bentoml_metrics() -> None:
    from prometheus_client import REGISTRY

    # prometheus_client has no public listing of a registry's collectors.
    names = REGISTRY._names_to_collectors  # type: ignore[attr-defined]
    for collector in {c for n, c in list(names.items()) if n.startswith("bentoml_")}:
        REGISTRY.unregister(collector)


@pytest.fixture(scope="module")
def new_medaudit_app() -> Iterator[Callable[[], Any]]:
    """Yields ``make() -> MedAudit.to_asgi()``, safe to call (and start) more than once a process.

    Start the app (``TestClient`` enter, uvicorn run) right after ``make()``: the metrics are
    registered at start. They are forgotten again when the module is done, so that a later
    module's app (``tests/integration/test_service.py`` in the same session) can register its own.
    """

    def make() -> Any:
        from service.api import MedAudit

        _forget_bentoml_metrics()
        return MedAudit.to_asgi()

    yield make
    _forget_bentoml_metrics()
