"""Retries as a policy object (redis-py's habit), not loops copied into call sites.

Connection failures and 502/503/504/429 are retried with exponential backoff and jitter,
``Retry-After`` honoured; other 4xx never are, since the same request would fail the same way. Every
endpoint is a pure computation (apart from the shadow agreement counters), so retrying a POST is safe;
a read timeout is not retried, since a slow audit sent again would only add load.
"""

from __future__ import annotations

import email.utils
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

__all__ = ["RetryPolicy", "parse_retry_after"]


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a request again.

    Attempt ``n`` (0-based) waits ``d/2 + U(0, d/2)`` with ``d = min(max_delay, base_delay * 2**n)``
    ("equal jitter": clients that failed together do not retry together, and the wait still grows),
    unless the response said ``Retry-After``, which wins, capped at ``max_retry_after``.

    Attributes:
        retries: Retries after the first attempt (0: never retry).
        base_delay: Seconds; the first retry waits between half of this and this.
        max_delay: Cap of the exponential part, seconds.
        max_retry_after: Cap on a server's ``Retry-After``, seconds.
        statuses: Statuses that are retried: overload and gateway errors, never a client error.
    """

    retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    statuses: frozenset[int] = field(default=frozenset({429, 502, 503, 504}))

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries!r}")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("retry delays must be >= 0")

    def delay(self, attempt: int, retry_after: str | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        after = parse_retry_after(retry_after)
        if after is not None:
            return min(after, self.max_retry_after)
        d = min(self.max_delay, self.base_delay * 2.0**attempt)
        return d / 2 + (rng or random).uniform(0.0, d / 2)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now (RFC 9110 §10.2.3: delay-seconds or an HTTP-date)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# The transport errors worth a retry: the request never reached the service, or the connection
# broke before an answer. Timeouts reading an answer are not among them (the service is working).
RETRY_TRANSPORT = (
    "ConnectError",
    "ConnectTimeout",
    "PoolTimeout",
    "RemoteProtocolError",
    "ReadError",
    "WriteError",
)


def transport_errors(names: Sequence[str]) -> tuple[type[BaseException], ...]:
    """httpx's exception classes of these names, plus httpx2's when it is loaded (an injected
    starlette TestClient raises those)."""
    mods = [httpx, *([sys.modules["httpx2"]] if "httpx2" in sys.modules else [])]
    return tuple(getattr(m, n) for m in mods for n in names if hasattr(m, n))
