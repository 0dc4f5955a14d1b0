"""The asynchronous client, :class:`AsyncMedauditClient`: the same endpoint methods as
:class:`~medaudit.clients.sync.MedauditClient` (both inherit
:class:`~medaudit.clients.endpoints.Endpoints`), sent with an ``httpx.AsyncClient`` and awaited, so
many audits run concurrently under ``asyncio.gather``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import httpx

from medaudit.clients._base import AsyncHTTP, _Call, _ClientBase, _Response
from medaudit.clients.endpoints import Endpoints
from medaudit.clients.errors import MedauditConnectionError, MedauditTimeoutError
from medaudit.clients.retry import RetryPolicy, transport_errors

__all__ = ["AsyncMedauditClient"]

T = TypeVar("T")


class AsyncMedauditClient(Endpoints, _ClientBase):
    """Asynchronous client of one medaudit service: the same methods as :class:`MedauditClient`,
    awaited. Run many audits concurrently with ``asyncio.gather``.

    Args:
        base_url: As for :class:`MedauditClient`.
        api_key: As for :class:`MedauditClient`.
        timeout: As for :class:`MedauditClient`.
        retries: As for :class:`MedauditClient`.
        http: An ``httpx.AsyncClient`` to send with (not closed by :meth:`aclose`); default: a new
            one, closed by :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retries: int | RetryPolicy = 3,
        http: AsyncHTTP | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries, http)
        self._http: AsyncHTTP = http if http is not None else httpx.AsyncClient()

    async def __aenter__(self) -> AsyncMedauditClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the HTTP client if this object created it."""
        if self._owns_http:
            await self._http.aclose()

    async def _send(self, call: _Call[Any], retry: bool = True) -> _Response:
        attempt = 0
        while True:
            try:
                r: _Response = await self._http.request(
                    call.method, self._url(call), **self._request_kwargs(call)
                )
            except transport_errors(("TransportError",)) as e:
                err = self._transport_error(call, attempt, e, retry)
                if err is not None:
                    raise err from e
                await anyio.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            if retry and self._should_retry(attempt, r.status_code):
                await anyio.sleep(self.retry.delay(attempt, r.headers.get("retry-after")))
                attempt += 1
                continue
            return r

    async def _call(self, build: Callable[[], _Call[T]]) -> T:
        """Builds an endpoint's request (when awaited, as an ``async def`` would), sends it and
        returns its parsed answer."""
        call = build()
        return self._result(call, await self._send(call))

    async def ready(self) -> bool:
        """See :meth:`MedauditClient.ready`."""
        return (await self._send(self._ready_call(), retry=False)).status_code == 200

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """See :meth:`MedauditClient.wait_ready`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.ready():
                    return
            except MedauditConnectionError:
                pass
            if time.monotonic() >= deadline:
                raise MedauditTimeoutError(self.base_url + "/readyz", timeout)
            await anyio.sleep(interval)
