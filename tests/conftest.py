"""Shared fixtures: a tiny served store (two random 32 px resnet18 versions with concept banks)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

#: The real Redis of the tests (.ci/run starts one when none answers).
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def build_tiny_version(root: Path, home: Path, version: str, seed: int) -> str:
    """Registers a randomly initialised 32 px resnet18 as ``resnet18-synthderm:<version>``."""
    from medaudit.testing.versions import register_version_files, write_version_files

    tag, _ = register_version_files(write_version_files(root / version, version, seed), version, home)
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
def tiny_loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A ``vanilla`` like :func:`tiny_store`'s, loaded without BentoML (machines without it)."""
    from medaudit.testing.versions import load_version_files, write_version_files

    d = write_version_files(tmp_path_factory.mktemp("tiny_files") / "vanilla", "vanilla", 0)
    return load_version_files(d, "vanilla")


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
        from medaudit.service.api import MedAudit

        _forget_bentoml_metrics()
        return MedAudit.to_asgi()

    yield make
    _forget_bentoml_metrics()


@pytest.fixture(scope="module")
def redis_prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Redis key prefix of this test module's own at :data:`REDIS_URL` (give it to the service as
    ``MEDAUDIT_FLAG_PREFIX``); every key under it is deleted afterwards."""
    from medaudit.service.flags.redis_conn import answers, connect

    assert answers(REDIS_URL, timeout=2.0), f"no Redis at {REDIS_URL} (.ci/run starts one)"
    prefix = f"test-{request.module.__name__.rsplit('.', 1)[-1]}-{uuid.uuid4().hex[:10]}"
    yield prefix
    r = connect(REDIS_URL)
    try:
        for k in r.scan_iter(match=f"{prefix}:*"):
            r.delete(k)
    finally:
        r.close()


@pytest.fixture(scope="session")
def three_class_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthderm's three-class form (nevus, melanoma, bcc; band-aids on nevi) at 32 px, exported
    in the folder + labels CSV layout with its true masks: a small dataset on disk for the build,
    the service and refine-cav with more than two classes."""
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig

    cfg = SynthDermConfig.preset("isic_like", size=32, n_train=90, n_val=30, n_test=45)
    return SynthDerm(cfg).export(tmp_path_factory.mktemp("three_class") / "derm3", layout="folder")
