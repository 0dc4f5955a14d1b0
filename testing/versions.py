"""Random-weight served versions, written and loaded without training or the BentoML store.

For tests (``tests/conftest.py``: ``tiny_store`` registers these files in a store) and benchmarks
that need an :class:`~service.audit.AuditEngine` on a machine without the trained store
(``benchmarks/audit_device.py`` on a lent GPU). Weights are ``torch.manual_seed``-random, the
concept bank is fitted on random activations: the shapes and code paths of a real version, none
of its meaning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medaudit.service.store import LoadedVersion

SERVED_NAME = "resnet18-synthderm"


def write_version_files(
    d: Path,
    version: str,
    seed: int,
    img_size: int = 32,
    *,
    labels: tuple[str, ...] | None = None,
    name: str = SERVED_NAME,
    data: dict[str, object] | None = None,
    arch: str = "resnet18",
) -> Path:
    """A randomly initialised resnet18's served files in ``d``: weights, ONNX, card, concept bank;
    ``labels`` (default benign, malignant) set its classes, ``name`` the model it belongs to,
    ``data`` the card's data entry (default: synthderm), ``arch`` another registered
    architecture (``resnet50`` for the GPU throughput figures of benchmarks/scan.py)."""
    from medaudit.models.cards import build_card
    from medaudit.models.corrections.io import save_version
    from medaudit.models.export import export_onnx
    from medaudit.models.registry import create_model
    from medaudit.models.xai.concepts import ConceptBank

    torch.manual_seed(seed)
    model, cfg = create_model(arch, img_size=img_size, labels=labels)
    layer = cfg.default_cav_layer
    w = save_version(model, cfg, d / "model.pt", correction="vanilla", layer=layer, params={})
    o = export_onnx(model, cfg, d / "model.onnx")
    cls = {"accuracy": 0.9, "accuracy_malignant": 0.8, "f1_macro": 0.85}
    build_card(
        name=f"{name}:{version}",
        version=version,
        architecture=cfg.to_dict(),
        data=data or {"dataset": "synthderm"},
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
        from medaudit.models.xai.lrp import Explainer

        x = torch.randn(24, 3, img_size, img_size)
        acts = (
            Explainer(model, cfg).explain(x, ["pred"], cav_layers=[layer]).activations[layer].double().numpy()
        )
    t = (np.arange(24) % 2).astype(np.int64)
    concepts = {"band_aid": t, "ruler": rng.permutation(t)}
    ConceptBank.fit(f"{name}:{version}", layer, acts, concepts, acts[t == 0], kind="signal").save(d / "bank")
    return d


def register_version_files(
    d: Path, version: str, home: Path | None, name: str = SERVED_NAME
) -> tuple[str, bool]:
    """Registers :func:`write_version_files`' output as ``<name>:<version>`` in the store at ``home``
    (see :func:`medaudit.service.store.register_version`: the tag, and whether it was new)."""
    from medaudit.service.store import register_version

    return register_version(
        name,
        version,
        weights=d / "model.pt",
        onnx=d / "model.onnx",
        card_dir=d,
        bank_dir=d / "bank",
        home=home,
    )


def load_version_files(d: Path, version: str) -> LoadedVersion:
    """The :class:`medaudit.service.store.LoadedVersion` of :func:`write_version_files`' output, read
    without the BentoML store (whose checks ``tiny_store`` covers): for machines without BentoML."""
    from medaudit.models.cards import ModelCard
    from medaudit.models.corrections.io import load_version as load_checkpoint
    from medaudit.models.xai.concepts import ConceptBank

    model, cfg, record = load_checkpoint(d / "model.pt")
    tag = f"{SERVED_NAME}:{version}"
    return LoadedVersion(
        tag, model, d / "model.onnx", ConceptBank.load(d / "bank"), ModelCard.load(d), cfg, record, d
    )


def synthderm_images(n: int) -> list[np.ndarray]:
    """``n`` synthderm test images (RGB arrays), every other one with the band-aid artifact: what a
    served model sees (benchmarks send these; PNG encoding and concept masks behave as in service,
    unlike noise)."""
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig

    ds = SynthDerm(SynthDermConfig())
    idx = [int(i) for i in ds.indices("test")[:n]]
    return [
        (ds.sample(i, "attacked", attack="band_aid") if k % 2 else ds.sample(i, "clean")).image
        for k, i in enumerate(idx)
    ]
