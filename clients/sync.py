"""The synchronous client, :class:`MedauditClient`: the endpoint methods of
:class:`~medaudit.clients.endpoints.Endpoints`, sent with an ``httpx.Client`` (or an injected one),
sleeping between retries.

Usage::

    with MedauditClient("http://127.0.0.1:3000", api_key=os.environ["MEDAUDIT_API_KEY"]) as mc:
        res = mc.audit("lesion.png", version="vanilla")
        if res.flag.flagged:
            Path("heatmap.png").write_bytes(res.heatmap_png)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import httpx

from medaudit.clients._base import SyncHTTP, _Call, _ClientBase, _Response
from medaudit.clients.endpoints import Endpoints
from medaudit.clients.errors import MedauditConnectionError, MedauditTimeoutError
from medaudit.clients.retry import RetryPolicy, transport_errors

__all__ = ["MedauditClient"]

T = TypeVar("T")


class MedauditClient(Endpoints, _ClientBase):
    """Synchronous client of one medaudit service: one method per endpoint (:class:`Endpoints`:
    :meth:`predict`, :meth:`audit`, :meth:`compare`, :meth:`models`, ...), returning its answer.

    Args:
        base_url: The service, e.g. ``http://127.0.0.1:3000``; default: the injected client's
            ``base_url``, else :data:`DEFAULT_URL`.
        api_key: Sent as ``Authorization: Bearer <key>``; ``None`` for a service with auth off.
        timeout: Seconds per attempt (default :data:`DEFAULT_TIMEOUT`; an injected client keeps
            its own unless this is given).
        retries: Retries after the first attempt, or a full :class:`RetryPolicy`.
        http: An HTTP client to send with (``httpx.Client``, starlette's ``TestClient``); it is
            not closed by :meth:`close`. Default: a new ``httpx.Client``, closed by :meth:`close`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retries: int | RetryPolicy = 3,
        http: SyncHTTP | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries, http)
        self._http: SyncHTTP = http if http is not None else httpx.Client()

    def __enter__(self) -> MedauditClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the HTTP client if this object created it."""
        if self._owns_http:
            self._http.close()

    def _send(self, call: _Call[Any], retry: bool = True) -> _Response:
        attempt = 0
        while True:
            try:
                r: _Response = self._http.request(call.method, self._url(call), **self._request_kwargs(call))
            except transport_errors(("TransportError",)) as e:
                err = self._transport_error(call, attempt, e, retry)
                if err is not None:
                    raise err from e
                time.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            if retry and self._should_retry(attempt, r.status_code):
                time.sleep(self.retry.delay(attempt, r.headers.get("retry-after")))
                attempt += 1
                continue
            return r

    def _call(self, build: Callable[[], _Call[T]]) -> T:
        """Builds an endpoint's request, sends it and returns its parsed answer."""
        call = build()
        return self._result(call, self._send(call))

    def ready(self) -> bool:
        """Whether every version is loaded and warm (``/readyz``). One attempt, no retries.

        Raises:
            MedauditConnectionError: Nothing answers at ``base_url``.
        """
        return self._send(self._ready_call(), retry=False).status_code == 200

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Blocks until :meth:`ready`, e.g. right after starting ``bentoml serve``.

        Raises:
            MedauditTimeoutError: Not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ready():
                    return
            except MedauditConnectionError:
                pass
            if time.monotonic() >= deadline:
                raise MedauditTimeoutError(self.base_url + "/readyz", timeout)
            time.sleep(interval)
