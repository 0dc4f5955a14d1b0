"""The asynchronous client, :class:`AsyncMedauditClient`: the same calls as
:class:`~medaudit.clients.sync.MedauditClient`, sent with an ``httpx.AsyncClient`` and awaited, so
many audits run concurrently under ``asyncio.gather``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import anyio
import httpx

from medaudit.clients._base import AsyncHTTP, _Call, _ClientBase, _Response
from medaudit.clients.errors import MedauditConnectionError, MedauditTimeoutError
from medaudit.clients.images import ImageInput
from medaudit.clients.responses import (
    AuditResponse,
    CompareResponse,
    ModelCard,
    ModelsResponse,
    PredictResponse,
    Review,
    ReviewPage,
    RouteInfo,
)
from medaudit.clients.retry import RetryPolicy, transport_errors

__all__ = ["AsyncMedauditClient"]


class AsyncMedauditClient(_ClientBase):
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

    async def _send(self, call: _Call, retry: bool = True) -> _Response:
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

    async def _call(self, call: _Call) -> Any:
        return self._result(call, await self._send(call))

    async def predict(
        self,
        image: ImageInput,
        *,
        version: str | None = None,
        subject_key: str | None = None,
        request_id: str | None = None,
    ) -> PredictResponse:
        """See :meth:`MedauditClient.predict`."""
        return await self._call(self._predict_call(image, version, subject_key, request_id))

    async def audit(
        self,
        image: ImageInput,
        *,
        version: str | None = None,
        subject_key: str | None = None,
        raw_heatmap: bool = False,
        request_id: str | None = None,
    ) -> AuditResponse:
        """See :meth:`MedauditClient.audit`."""
        return await self._call(self._audit_call(image, version, subject_key, raw_heatmap, request_id))

    async def compare(
        self, image: ImageInput, *, versions: Sequence[str] | None = None, request_id: str | None = None
    ) -> CompareResponse:
        """See :meth:`MedauditClient.compare`."""
        return await self._call(self._compare_call(image, versions, request_id))

    async def models(self) -> ModelsResponse:
        """See :meth:`MedauditClient.models`."""
        return await self._call(self._models_call())

    async def model_card(self, version: str) -> ModelCard:
        """See :meth:`MedauditClient.model_card`."""
        return await self._call(self._card_call(version))

    async def route(self, *, version: str | None = None, subject_key: str | None = None) -> RouteInfo:
        """See :meth:`MedauditClient.route`."""
        return await self._call(self._route_call(version, subject_key))

    async def reviews(self, status: str = "open", *, limit: int = 50, offset: int = 0) -> ReviewPage:
        """See :meth:`MedauditClient.reviews`."""
        return await self._call(self._reviews_call(status, limit, offset))

    async def review(self, flag_id: str, *, images: bool = True) -> Review:
        """See :meth:`MedauditClient.review`."""
        return await self._call(self._review_call(flag_id, images))

    async def resolve(self, flag_id: str, verdict: str, note: str = "") -> Review:
        """See :meth:`MedauditClient.resolve`."""
        return await self._call(self._resolve_call(flag_id, verdict, note))

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
