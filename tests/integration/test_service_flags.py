"""Flags through the HTTP service (issue #7 wired into #6): /audit publishes what the policy flags to
the real Redis, a worker turns it into a review record, and a reviewer resolves it over HTTP.

The policy is opened wide (``MEDAUDIT_FLAG_FPR=0.99``, share 0) so that the tiny store's random
models flag every audit; the stream lives under a per-run key prefix that is deleted afterwards.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medaudit.service.auth import hash_key

pytestmark = [
    pytest.mark.redis,
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]

SALT, CLIENT_KEY, REVIEWER_KEY = "flag-salt", "client-key-flags-0123456789", "reviewer-key-flags-0123456789"
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tiny_store: Path, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory, new_medaudit_app):
    from starlette.testclient import TestClient

    env = {
        "BENTOML_HOME": str(tiny_store),
        "MEDAUDIT_VERSIONS": "vanilla,pclarc-band_aid",
        "MEDAUDIT_SHADOW_VERSION": "pclarc-band_aid",
        "MEDAUDIT_AUTH": "on",
        "MEDAUDIT_API_KEYS": f"client:{hash_key(CLIENT_KEY, SALT)},reviewer:{hash_key(REVIEWER_KEY, SALT)}",
        "MEDAUDIT_API_KEY_SALT": SALT,
        "MEDAUDIT_FLAGS": "on",
        "MEDAUDIT_FLAG_FPR": "0.99",
        "MEDAUDIT_FLAG_SHARE": "0",
        "MEDAUDIT_FLAG_PREFIX": redis_prefix,
        "MEDAUDIT_FLAG_SPOOL_DIR": str(tmp_path_factory.mktemp("spool")),
        "REDIS_URL": REDIS_URL,
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with TestClient(new_medaudit_app()) as c:
            c.headers["Authorization"] = f"Bearer {CLIENT_KEY}"
            yield c


def _stream_request_ids(redis_prefix: str) -> list[str]:
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect

    r = connect(REDIS_URL)
    out = []
    for _id, fields in r.xrange(FlagKeys(redis_prefix).stream):
        out.append(fields[b"request_id"].decode())
    return out


def test_audit_flags_are_published_once_reviewed_and_resolved(client, redis_prefix: str) -> None:
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect
    from medaudit.service.flags.worker import Worker, WorkerConfig

    rids = [f"req-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for i, rid in enumerate(rids):
        headers = {"Content-Type": "image/png", "X-Request-ID": rid, "X-Subject-Key": f"patient-{i}"}
        r = client.post("/audit", content=_png(i), headers=headers)
        assert r.status_code == 200, r.text
        flag = r.json()["flag"]
        assert flag["flagged"] and flag["severity"] in ("low", "medium", "high"), flag
        assert flag["concepts"] == [f["concept"] for f in flag["flags"]] and flag["reasons"]
    # The same request id again (a client retry) must not publish twice.
    client.post("/audit", content=_png(0), headers={"Content-Type": "image/png", "X-Request-ID": rids[0]})
    deadline = time.monotonic() + 10
    while set(_stream_request_ids(redis_prefix)) != set(rids) and time.monotonic() < deadline:
        time.sleep(0.1)
    published = _stream_request_ids(redis_prefix)
    print(f"flags: {len(rids)} flagged requests, {len(published)} stream entries")
    assert set(published) == set(rids)
    stream = connect(REDIS_URL).xrange(FlagKeys(redis_prefix).stream)
    for _id, fields in stream:
        assert b"image" not in fields and b"patient-0" not in b"".join(fields.values())

    worker = Worker(
        connect(REDIS_URL, timeout=5.0), FlagKeys(redis_prefix), WorkerConfig(consumer="t", block_ms=200)
    )
    stats = worker.run(drain=True)
    assert stats.written == len(stream) and stats.failed == 0

    reviewer = {"Authorization": f"Bearer {REVIEWER_KEY}"}
    assert client.get("/reviews/").status_code == 403  # a client key is not a reviewer
    assert client.get("/reviews/", headers={"Authorization": "Bearer nope"}).status_code == 401
    listing = client.get("/reviews/?status=open", headers=reviewer)
    assert listing.status_code == 200, listing.text
    items = listing.json()["items"]
    assert {i["request_id"] for i in items} == set(rids)
    fid = items[0]["flag_id"]
    shown = client.get(f"/reviews/{fid}", headers=reviewer).json()
    assert shown["flag_id"] == fid and shown["heatmap_png"]
    r = client.post(f"/reviews/{fid}/resolve", json={"verdict": "artifact_confirmed"}, headers=reviewer)
    assert r.status_code == 200 and r.json()["status"] == "resolved", r.text
    r = client.post(f"/reviews/{fid}/resolve", json={"verdict": "false_alarm"}, headers=reviewer)
    assert r.status_code == 409
    r = client.post(f"/reviews/{items[1]['flag_id']}/resolve", json={"verdict": "maybe"}, headers=reviewer)
    assert r.status_code == 422
    assert client.get("/reviews/nope", headers=reviewer).status_code == 404


def test_flag_metrics_are_exported(client) -> None:
    # In-process the registry is read directly: BentoML's /metrics route does not answer under
    # starlette's TestClient (it does under `bentoml serve`: test_service.py's 2-worker test).
    from prometheus_client import generate_latest

    text = generate_latest().decode()
    assert 'medaudit_flags_total{concept="' in text
    assert 'medaudit_flag_publish_total{outcome="published"}' in text
    assert 'stage="flag_publish"' in text
