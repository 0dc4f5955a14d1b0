"""One real ``bentoml serve`` for the hostile-traffic suites (issue #9): hostile uploads, API
fuzzing and authentication, all against the same live process so that its memory and its log
cover everything they sent.

The deployment is the tiny two-version store with everything on: API keys (a client and a
reviewer), A/B weights, a shadow version, the flag pipeline publishing to the real Redis at
``REDIS_URL`` under a key prefix of this session's own (deleted afterwards), and lowered limits
(8 MiB bodies, 20 MP images) so that the over-limit inputs stay cheap to send.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from live_support import MAX_BYTES, MAX_PIXELS, SALT, Live

from medaudit.service.auth import hash_key
from medaudit.service.process import serving

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def live(tiny_deployment: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from medaudit.service.flags.redis_conn import answers, connect

    assert answers(REDIS_URL, timeout=2.0), f"no Redis at {REDIS_URL} (.ci/run starts one)"
    # Fresh random keys per run: the log check greps for them, so they must not be guessable
    # constants that some other string could contain by chance.
    client_key, reviewer_key = f"ck-{uuid.uuid4().hex}", f"rk-{uuid.uuid4().hex}"
    prefix = f"live-{uuid.uuid4().hex[:10]}"
    tmp = tmp_path_factory.mktemp("live")
    env = {
        **tiny_deployment,
        "MEDAUDIT_AUTH": "on",
        "MEDAUDIT_API_KEYS": f"client:{hash_key(client_key, SALT)},reviewer:{hash_key(reviewer_key, SALT)}",
        "MEDAUDIT_API_KEY_SALT": SALT,
        "MEDAUDIT_FLAGS": "on",
        "MEDAUDIT_FLAG_PREFIX": prefix,
        "MEDAUDIT_FLAG_SPOOL_DIR": str(tmp / "spool"),
        "MEDAUDIT_MAX_BYTES": str(MAX_BYTES),
        "MEDAUDIT_MAX_PIXELS": str(MAX_PIXELS),
        "REDIS_URL": REDIS_URL,
    }
    try:
        with serving(env, tmp / "serve.log") as server:
            yield Live(server, client_key, reviewer_key, prefix)
    finally:
        r = connect(REDIS_URL)
        doomed = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(doomed), 500):
            r.delete(*doomed[i : i + 500])
        r.close()
