"""What the sync and async clients share: configuration, the request type and response handling.

An endpoint call is built once as a :class:`_Call` (method, path, body, headers, parser) by the
endpoint methods both clients inherit (:class:`~medaudit.clients.endpoints.Endpoints`);
:class:`~medaudit.clients.sync.MedauditClient` and :class:`~medaudit.clients.aio.AsyncMedauditClient`
differ only in how they send it (their ``_call``) and wait between retries.

The HTTP client can be injected: anything with httpx's ``request``/``close`` shape (:class:`SyncHTTP`,
:class:`AsyncHTTP`), e.g. an ``httpx.Client`` with custom TLS, or starlette's ``TestClient`` for
in-process tests (which, in starlette 1.x, is an ``httpx2.Client``, not an ``httpx.Client``: hence a
protocol, not a type). A client object closes only the HTTP client it created itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from medaudit.clients.api_version import API_HEADER
from medaudit.clients.errors import (
    MedauditClientError,
    MedauditConnectionError,
    MedauditHTTPError,
    MedauditTimeoutError,
    ResponseFormatError,
    check_api_version,
    error_class,
)
from medaudit.clients.retry import RETRY_TRANSPORT, RetryPolicy, transport_errors

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_URL", "AsyncHTTP", "SyncHTTP"]

DEFAULT_URL = "http://127.0.0.1:3000"
#: Seconds per attempt: an audit on a CPU takes seconds, a cold one more.
DEFAULT_TIMEOUT = 60.0

T = TypeVar("T")


class _Response(Protocol):
    """The part of an httpx (or httpx2) response the client reads."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    @property
    def content(self) -> bytes: ...
    def json(self) -> Any: ...


def _http_error(r: _Response) -> MedauditHTTPError:
    """The error for a >= 400 response: the service's JSON when there is one, else the text."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    status = r.status_code
    code = str(body.get("error") or f"http_{status}")
    detail = str(body.get("detail") or r.text.strip()[:300] or "(empty body)")
    rid = body.get("request_id") or r.headers.get("x-request-id")
    return error_class(status, code)(status, code, detail, str(rid) if rid else None, body)


class SyncHTTP(Protocol):
    """What the sync client needs of an HTTP client: ``httpx.Client`` and starlette's
    ``TestClient`` both fit."""

    def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = ...,
        params: dict[str, str] | None = ...,
        headers: dict[str, str] | None = ...,
        timeout: float = ...,
    ) -> Any: ...

    def close(self) -> None: ...


class AsyncHTTP(Protocol):
    """What the async client needs of an HTTP client: ``httpx.AsyncClient`` fits."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = ...,
        params: dict[str, str] | None = ...,
        headers: dict[str, str] | None = ...,
        timeout: float = ...,
    ) -> Any: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One endpoint call, built once and sent (and resent) by either client; ``parse`` turns the
    answer's JSON into a ``T`` (with ``raw``, the answer's ``{"content": bytes, "content_type"}``:
    DICOM)."""

    method: str
    path: str
    parse: Callable[[Mapping[str, Any]], T]
    content: bytes | None = None
    params: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bool = False


class _ClientBase:
    """Configuration, sending and response handling shared by both clients."""

    user_agent: ClassVar[str] = "medaudit-client/0.1"

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | None,
        retries: int | RetryPolicy,
        http: Any,
    ) -> None:
        url = base_url or (str(http.base_url) if http is not None else DEFAULT_URL)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        # An injected client keeps its own timeouts unless one is given (starlette's TestClient
        # even warns when a request names one).
        self.timeout: float | None = float(timeout) if timeout is not None else None
        if self.timeout is None and http is None:
            self.timeout = DEFAULT_TIMEOUT
        self.base_url = url.rstrip("/")
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries=retries)
        self._api_key = api_key or None
        self._owns_http = http is None

    def __repr__(self) -> str:  # never the key
        auth = "with key" if self._api_key else "no key"
        return f"{type(self).__name__}({self.base_url!r}, {auth}, retries={self.retry.retries})"

    def _headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": self.user_agent}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return {**h, **extra}

    @staticmethod
    def _ready_call() -> _Call[dict[str, Any]]:
        # Only the status is read; the body is whatever /readyz says.
        return _Call("GET", "/readyz", dict)

    def _url(self, call: _Call[Any]) -> str:
        return self.base_url + call.path

    def _request_kwargs(self, call: _Call[Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "content": call.content,
            "params": call.params,
            "headers": self._headers(call.headers),
        }
        if self.timeout is not None:
            kw["timeout"] = self.timeout
        return kw

    def _should_retry(self, attempt: int, status: int) -> bool:
        return status in self.retry.statuses and attempt < self.retry.retries

    def _result(self, call: _Call[T], r: _Response) -> T:
        check_api_version(self.base_url, r.headers.get(API_HEADER))
        if r.status_code >= 400:
            raise _http_error(r)
        try:
            if call.raw:
                return call.parse({"content": r.content, "content_type": r.headers.get("content-type", "")})
            body = r.json()
            return call.parse(body)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            snippet = r.text.strip()[:120]
            raise ResponseFormatError(
                f"{call.method} {self._url(call)} answered {r.status_code} with a body that is not "
                f"medaudit's JSON ({type(e).__name__}: {e}); does the URL point at the medaudit "
                f"service? Body starts: {snippet!r}"
            ) from e

    def _transport_error(
        self, call: _Call[Any], attempt: int, e: BaseException, retry: bool
    ) -> MedauditClientError | None:
        """The error to raise for a transport exception, or ``None`` to retry it."""
        if isinstance(e, transport_errors(RETRY_TRANSPORT)):
            if retry and attempt < self.retry.retries:
                return None
            return MedauditConnectionError(self.base_url, attempt + 1, e)
        if isinstance(e, transport_errors(("TimeoutException",))):
            return MedauditTimeoutError(self._url(call), self.timeout)
        return MedauditConnectionError(self.base_url, attempt + 1, e)  # e.g. a protocol httpx refuses
