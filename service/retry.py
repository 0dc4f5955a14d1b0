"""Retries as a policy object (redis-py's ``Retry(backoff, retries)`` habit), not loops copied
into call sites: which errors are retried, how often, and how long to wait in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class LinearBackoff:
    """Waits ``step * n`` seconds before retry ``n`` (1-based): short, for local hops."""

    step: float = 0.01

    def compute(self, failures: int) -> float:
        return self.step * failures


@dataclass(frozen=True)
class Retry:
    """Calls an async function again when it fails with one of ``errors``.

    Attributes:
        backoff: Says how long to wait after the n-th failure (``compute(n)``, seconds).
        retries: Retries after the first attempt; the last failure is raised as it came.
        errors: The exception types worth another attempt; any other passes through at once.
    """

    backoff: LinearBackoff
    retries: int
    errors: tuple[type[BaseException], ...]

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries!r}")

    @property
    def attempts(self) -> int:
        return self.retries + 1

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        on_retry: Callable[[BaseException, int], None] | None = None,
    ) -> T:
        """``await fn()``, retried; ``on_retry(error, next_attempt)`` is told before each retry
        (attempts count from 1)."""
        failures = 0
        while True:
            try:
                return await fn()
            except self.errors as e:
                failures += 1
                if failures > self.retries:
                    raise
                if on_retry is not None:
                    on_retry(e, failures + 1)
                await asyncio.sleep(self.backoff.compute(failures))
