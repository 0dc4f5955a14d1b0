"""Fixtures of the flag pipeline tests: the real Redis at ``REDIS_URL``, one key prefix per test,
and throwaway ``redis-server`` processes (for outages) on free ports.

Every test uses its own :class:`~service.flags.events.FlagKeys` prefix and deletes its keys
afterwards, so tests never see each other's streams and the shared Redis is left clean.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flagtools import RedisServer

from medaudit.service.process import free_port

REDIS_URL = os.environ.get("REDIS_URL") or os.environ.get("MEDAUDIT_REDIS_URL") or "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    from medaudit.service.flags.redis_conn import answers

    if not answers(REDIS_URL, timeout=2.0):
        pytest.skip(f"no Redis answers at {REDIS_URL}; set REDIS_URL to run the flag pipeline tests")
    return REDIS_URL


@pytest.fixture
def keys(redis_url: str) -> Iterator[object]:
    """A unique key prefix for this test; every key under it is deleted afterwards."""
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect

    k = FlagKeys(f"test-{uuid.uuid4().hex[:12]}")
    yield k
    client = connect(redis_url)
    try:
        doomed = list(client.scan_iter(match=k.scan_pattern(), count=1000))
        for i in range(0, len(doomed), 500):
            client.delete(*doomed[i : i + 500])
    finally:
        client.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[object]:
    from medaudit.service.flags.redis_conn import connect

    c = connect(redis_url, timeout=10.0)
    yield c
    c.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Factory of :class:`RedisServer` (not started); all are killed at the end of the test."""
    made: list[RedisServer] = []

    def make() -> RedisServer:
        s = RedisServer(tmp_path / f"redis-{len(made)}", free_port())
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()
