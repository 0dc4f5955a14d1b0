"""Issue #7's outage acceptance through the HTTP service itself: Redis is killed while audited
requests keep coming, then restarted. The service answers every request (200, same order of
latency), and every flag it decided reaches the stream exactly once, in request order.

The service runs in-process (starlette's TestClient) on the tiny store with the policy opened wide
(every audit flags), against a ``redis-server`` of the test's own that it can kill.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytestmark = [
    pytest.mark.redis,
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_service_keeps_answering_through_a_redis_outage_and_delivers_each_flag_once(
    tiny_store: Path,
    tmp_path: Path,
    redis_server: Callable[[], Any],
    new_medaudit_app: Callable[[], Any],
) -> None:
    from starlette.testclient import TestClient

    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect

    server = redis_server()
    server.start()
    prefix = "outage"
    env = {
        "BENTOML_HOME": str(tiny_store),
        "MEDAUDIT_VERSIONS": "vanilla",
        "MEDAUDIT_AUTH": "off",
        "MEDAUDIT_FLAGS": "on",
        "MEDAUDIT_FLAG_FPR": "0.99",
        "MEDAUDIT_FLAG_SHARE": "0",
        "MEDAUDIT_FLAG_PREFIX": prefix,
        "MEDAUDIT_FLAG_SPOOL_DIR": str(tmp_path / "spool"),
        "REDIS_URL": server.url,
    }
    latency: dict[str, list[float]] = {"up": [], "down": [], "back": []}
    flagged: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with TestClient(new_medaudit_app()) as c:

            def audit(i: int, phase: str) -> None:
                rid = f"r{i:04d}"
                t0 = time.perf_counter()
                r = c.post(
                    "/audit", content=_png(i), headers={"Content-Type": "image/png", "X-Request-ID": rid}
                )
                latency[phase].append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                if r.json()["flag"]["flagged"]:
                    flagged.extend(f"{rid}:{f['concept']}" for f in r.json()["flag"]["flags"])

            i = 0
            for phase, n in (("up", 12), ("down", 12), ("back", 12)):
                if phase == "down":
                    server.kill()
                if phase == "back":
                    server.start()
                for _ in range(n):
                    audit(i, phase)
                    i += 1
        # Leaving the client ran the service's shutdown: the publisher drained to the restarted Redis.
    r = connect(server.url)
    deadline = time.monotonic() + 15
    entries: list[str] = []
    while time.monotonic() < deadline:
        entries = [
            f"{f[b'request_id'].decode()}:{f[b'concept'].decode()}"
            for _id, f in r.xrange(FlagKeys(prefix).stream)
        ]
        if len(entries) >= len(flagged):
            break
        time.sleep(0.2)
    med = {k: statistics.median(v) * 1e3 for k, v in latency.items()}
    print(
        f"outage via the service: {i} audits, {len(flagged)} flags decided, {len(entries)} in the stream; "
        f"median latency ms up {med['up']:.1f}, Redis down {med['down']:.1f}, back {med['back']:.1f}"
    )
    assert flagged, "the wide-open policy should flag every audit"
    assert len(entries) == len(set(entries)), "a flag arrived twice"
    assert entries == flagged, "flags missing or out of request order"
    # Redis being down must not slow requests beyond the same order (publishing is off-thread).
    assert med["down"] < 3 * med["up"] + 50
