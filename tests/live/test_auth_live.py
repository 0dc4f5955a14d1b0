"""Authentication of the live service (issue #9): every protected operation of the published
OpenAPI document refuses a missing or wrong key (401) and the reviewer operations refuse a client
key (403); the right key gets past authentication; no key ever reaches the service's log.

The operations come from ``/openapi.json`` itself, so a new endpoint is covered the day it is
documented, and one missing from the document fails the fuzzing suite instead.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np
import pytest
from live_support import Live
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

#: Operations only the reviewer role may call (the review queue).
REVIEWER_PREFIX = "/reviews"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(method, concrete path, needs the reviewer role) of every operation that needs a key."""
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if op.get("security", doc.get("security")) == []:
                continue
            concrete = re.sub(r"\{version\}", "vanilla", path)
            concrete = re.sub(r"\{flag_id\}", "no-such-flag", concrete)
            out.append((method.upper(), concrete, path.startswith(REVIEWER_PREFIX)))
    return out


def _call(live: Live, key: str | None, method: str, path: str, header: str | None = None) -> Any:
    kwargs: dict[str, Any] = {}
    if method == "POST" and path.startswith(REVIEWER_PREFIX):
        kwargs["json"] = {"verdict": "false_alarm", "note": "auth test"}
    elif method == "POST":
        kwargs = {"content": _png(), "headers": {"Content-Type": "image/png"}}
    with live.client(key) as c:
        if header is not None:
            c.headers["Authorization"] = header
        return c.request(method, path, **kwargs)


def test_every_protected_operation_checks_the_key_and_the_role(live: Live) -> None:
    doc = live.openapi()
    assert doc["security"] == [{"bearer": []}] and "bearer" in doc["components"]["securitySchemes"]
    ops = _operations(doc)
    documented = {p for _, p, _ in ops}
    assert {"/predict", "/audit", "/compare", "/models/", "/reviews/"} <= documented, documented
    wrong = "ck-" + "0" * 32  # right shape, not a key
    tried = 0
    for method, path, reviewer_only in ops:
        where = f"{method} {path}"
        for key, header in (
            (None, None),
            (wrong, None),
            (None, f"Basic {base64.b64encode(f'user:{live.client_key}'.encode()).decode()}"),
            (None, "Bearer"),
            (None, f"Bearer {live.client_key}x"),
        ):
            r = _call(live, key, method, path, header)
            tried += 1
            assert r.status_code == 401, (
                f"{where} with key={key!r} header={header!r}: {r.status_code} {r.text[:200]}"
            )
            assert r.json()["error"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
            assert live.client_key not in r.text and wrong not in r.text
        r = _call(live, "client", method, path)
        tried += 1
        if reviewer_only:
            assert r.status_code == 403, f"{where} with a client key: {r.status_code} {r.text[:200]}"
            assert r.json()["error"] == "forbidden" and r.json()["required"] == "reviewer"
        else:
            assert r.status_code not in (401, 403), f"{where} with a client key: {r.status_code}"
        r = _call(live, "reviewer", method, path)
        tried += 1
        assert r.status_code not in (401, 403), (
            f"{where} with the reviewer key: {r.status_code} {r.text[:200]}"
        )
    print(
        f"\nauth: {len(ops)} protected operations, {tried} requests "
        "(missing, wrong, malformed, client, reviewer)"
    )


def test_no_key_reaches_the_log(live: Live) -> None:
    # Requests that put keys where a careless logger would print them: wrong keys, keys in the
    # wrong scheme, a reviewer key on client routes, a client key on reviewer routes.
    for key in ("client", "reviewer", live.client_key + "-wrong", live.reviewer_key[::-1]):
        for method, path in (("POST", "/audit"), ("GET", "/models/"), ("GET", "/reviews/")):
            _call(live, key, method, path)
    log = live.server.log_path.read_text(errors="replace")
    assert "/audit" in log or "POST" in log, "the access log is empty: nothing was checked"
    for secret in (live.client_key, live.reviewer_key, live.client_key + "-wrong", live.reviewer_key[::-1]):
        assert secret not in log, "an API key is in the service log"
        # Also no long fragment of it (a truncated or re-encoded key is still a leak).
        assert secret[3:19] not in log, "a fragment of an API key is in the service log"
    print(f"\nlog: {len(log.splitlines())} lines, {len(log)} bytes, no key or key fragment in it")
