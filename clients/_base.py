"""What the sync and async clients share: configuration, request building and response handling.

An endpoint call is built once as a :class:`_Call` (method, path, body, headers, parser) by
:class:`_ClientBase`; :class:`~medaudit.clients.sync.MedauditClient` and
:class:`~medaudit.clients.aio.AsyncMedauditClient` differ only in how they send it and wait between
retries.

The HTTP client can be injected: anything with httpx's ``request``/``close`` shape (:class:`SyncHTTP`,
:class:`AsyncHTTP`), e.g. an ``httpx.Client`` with custom TLS, or starlette's ``TestClient`` for
in-process tests (which, in starlette 1.x, is an ``httpx2.Client``, not an ``httpx.Client``: hence a
protocol, not a type). A client object closes only the HTTP client it created itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import quote

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
from medaudit.clients.images import ImageInput, encode_image
from medaudit.clients.responses import (
    parse_audit,
    parse_card,
    parse_compare,
    parse_models,
    parse_predict,
    parse_review,
    parse_reviews,
    parse_route,
)
from medaudit.clients.retry import RETRY_TRANSPORT, RetryPolicy, transport_errors

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_URL", "AsyncHTTP", "SyncHTTP"]

DEFAULT_URL = "http://127.0.0.1:3000"
#: Seconds per attempt: an audit on a CPU takes seconds, a cold one more.
DEFAULT_TIMEOUT = 60.0


class _Response(Protocol):
    """The part of an httpx (or httpx2) response the client reads."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
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
class _Call:
    """One endpoint call, built once and sent (and resent) by either client."""

    method: str
    path: str
    parse: Callable[[Mapping[str, Any]], Any]
    content: bytes | None = None
    params: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _ClientBase:
    """Configuration, request building and response handling shared by both clients."""

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
    def _image_call(
        path: str,
        image: ImageInput,
        parse: Callable[[Mapping[str, Any]], Any],
        *,
        version: str | None = None,
        subject_key: str | None = None,
        request_id: str | None = None,
        params: dict[str, str] | None = None,
    ) -> _Call:
        content, ctype = encode_image(image)
        headers = {"Content-Type": ctype}
        for name, value in (
            ("X-Model-Version", version),
            ("X-Subject-Key", subject_key),
            ("X-Request-ID", request_id),
        ):
            if value is not None:
                headers[name] = value
        return _Call("POST", path, parse, content=content, params=params, headers=headers)

    @staticmethod
    def _predict_call(
        image: ImageInput, version: str | None, subject_key: str | None, request_id: str | None
    ) -> _Call:
        return _ClientBase._image_call(
            "/predict", image, parse_predict, version=version, subject_key=subject_key, request_id=request_id
        )

    @staticmethod
    def _audit_call(
        image: ImageInput,
        version: str | None,
        subject_key: str | None,
        raw_heatmap: bool,
        request_id: str | None,
    ) -> _Call:
        return _ClientBase._image_call(
            "/audit",
            image,
            parse_audit,
            version=version,
            subject_key=subject_key,
            request_id=request_id,
            params={"raw_heatmap": "1"} if raw_heatmap else None,
        )

    @staticmethod
    def _compare_call(image: ImageInput, versions: Sequence[str] | None, request_id: str | None) -> _Call:
        if isinstance(versions, str):  # "a,b" would otherwise be iterated letter by letter
            versions = [v for v in versions.split(",") if v.strip()]
        params = {"versions": ",".join(v.strip() for v in versions)} if versions else None
        return _ClientBase._image_call("/compare", image, parse_compare, request_id=request_id, params=params)

    @staticmethod
    def _models_call() -> _Call:
        return _Call("GET", "/models/", parse_models)

    @staticmethod
    def _card_call(version: str) -> _Call:
        return _Call("GET", "/models/" + quote(version, safe=""), parse_card)

    @staticmethod
    def _route_call(version: str | None, subject_key: str | None) -> _Call:
        headers = {}
        if version is not None:
            headers["X-Model-Version"] = version
        if subject_key is not None:
            headers["X-Subject-Key"] = subject_key
        return _Call("GET", "/models/_route", parse_route, headers=headers)

    @staticmethod
    def _reviews_call(status: str, limit: int, offset: int) -> _Call:
        params = {"status": status, "limit": str(limit), "offset": str(offset)}
        return _Call("GET", "/reviews/", parse_reviews, params=params)

    @staticmethod
    def _review_call(flag_id: str, images: bool) -> _Call:
        params = {"images": "1" if images else "0"}
        return _Call("GET", "/reviews/" + quote(flag_id, safe=""), parse_review, params=params)

    @staticmethod
    def _resolve_call(flag_id: str, verdict: str, note: str) -> _Call:
        body = json.dumps({"verdict": verdict, "note": note}).encode()
        return _Call(
            "POST",
            "/reviews/" + quote(flag_id, safe="") + "/resolve",
            parse_review,
            content=body,
            headers={"Content-Type": "application/json"},
        )

    @staticmethod
    def _ready_call() -> _Call:
        # Only the status is read; the body is whatever /readyz says.
        return _Call("GET", "/readyz", dict)

    def _url(self, call: _Call) -> str:
        return self.base_url + call.path

    def _request_kwargs(self, call: _Call) -> dict[str, Any]:
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

    def _result(self, call: _Call, r: _Response) -> Any:
        check_api_version(self.base_url, r.headers.get(API_HEADER))
        if r.status_code >= 400:
            raise _http_error(r)
        try:
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
        self, call: _Call, attempt: int, e: BaseException, retry: bool
    ) -> MedauditClientError | None:
        """The error to raise for a transport exception, or ``None`` to retry it."""
        if isinstance(e, transport_errors(RETRY_TRANSPORT)):
            if retry and attempt < self.retry.retries:
                return None
            return MedauditConnectionError(self.base_url, attempt + 1, e)
        if isinstance(e, transport_errors(("TimeoutException",))):
            return MedauditTimeoutError(self._url(call), self.timeout)
        return MedauditConnectionError(self.base_url, attempt + 1, e)  # e.g. a protocol httpx refuses
