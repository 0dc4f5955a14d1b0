"""Fixtures for the client and CLI tests: the tiny store served over real HTTP by uvicorn in a thread.

``MedAudit.to_asgi()`` runs BentoML's lifespan (which builds the service and its in-process
``Predictor`` dependency) under uvicorn as it does under starlette's ``TestClient``, so the async
client and the CLI get a real socket without the minutes of a ``bentoml serve`` subprocess.

BentoML registers its HTTP metrics in ``prometheus_client``'s process-global registry when an app
starts, so a second app in one process (another module's, or a ``TestClient`` beside the uvicorn
one) fails with ``DuplicateTimeseries``. :func:`new_medaudit_app` forgets them before each start and
after the module; an earlier app keeps working, its metrics are just no longer exported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medaudit.service.auth import hash_key
from medaudit.service.process import free_port

SALT, CLIENT_KEY = "test-salt", "client-key-0123456789abcdef"


@dataclass(frozen=True)
class LiveService:
    """A served tiny store: its URL, a valid client key, and the environment it was started with."""

    url: str
    client_key: str
    env: dict[str, str]


def live_service_env(home: Path) -> dict[str, str]:
    """Two versions, A/B split, a shadow, auth on with one client key (test_service.py's setup)."""
    return {
        "BENTOML_HOME": str(home),
        "MEDAUDIT_VERSIONS": "vanilla,pclarc-band_aid",
        "MEDAUDIT_AB_WEIGHTS": "vanilla=1,pclarc-band_aid=1",
        "MEDAUDIT_SHADOW_VERSION": "pclarc-band_aid",
        "MEDAUDIT_AUTH": "on",
        "MEDAUDIT_API_KEYS": f"client:{hash_key(CLIENT_KEY, SALT)}",
        "MEDAUDIT_API_KEY_SALT": SALT,
    }


@pytest.fixture(scope="module")
def live_service(tiny_store: Path, new_medaudit_app: Callable[[], Any]) -> Iterator[LiveService]:
    """The service on a free local port, up until the module's tests are done.

    The environment stays set while it serves: the service reads it at start, and every
    in-process ``MedAudit`` of the module (a ``TestClient`` one too) sees the same settings,
    which matters because the mounted ``/models`` app holds the most recently built service.
    """
    import uvicorn

    env = live_service_env(tiny_store)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        port = free_port()
        config = uvicorn.Config(
            new_medaudit_app(), host="127.0.0.1", port=port, lifespan="on", log_level="warning"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="medaudit-uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield LiveService(f"http://127.0.0.1:{port}", CLIENT_KEY, env)
        finally:
            server.should_exit = True
            thread.join(30)
