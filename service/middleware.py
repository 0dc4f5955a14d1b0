"""The entry service's ASGI middleware, outermost first (as :mod:`medaudit.service.api` adds them):

* :class:`ApiVersionHeader`: every answer carries ``X-Medaudit-API: <major>.<minor>``, the version
  of the HTTP contract (the OpenAPI document's ``info.version``). medaudit-client refuses a service
  whose major differs from its own; a minor adds fields and routes and breaks nobody.
* :class:`ServiceState`: every request carries the service instance (``request.state.service``),
  for the mounted GET apps;
* :class:`UploadNormalizer`: every way of uploading an image becomes the raw body BentoML expects,
  and a body past the size limit a 413 before it is buffered (:mod:`medaudit.service.uploads`);
* :class:`OpenAPIDocument`: ``GET /openapi.json`` (:mod:`medaudit.service.openapi` builds it);
* :class:`JsonErrorBodies`: the frameworks' own error answers get the service's error body.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from medaudit.service import openapi
from medaudit.service.endpoints import API_VERSION, IMAGE_PATHS
from medaudit.service.envvars import positive_int
from medaudit.service.errors import InvalidUploadError
from medaudit.service.inputs import Limits
from medaudit.service.uploads import (
    FORM,
    MULTIPART,
    MULTIPART_OVERHEAD,
    ASGIApp,
    BodyTooLargeError,
    DisconnectedError,
    Receive,
    Scope,
    Send,
    first_file,
    limited,
    read_body,
    refuse,
    replay,
    too_large,
    with_headers,
)

__all__ = [
    "API_HEADER",
    "API_VERSION",
    "ApiVersionHeader",
    "JsonErrorBodies",
    "OpenAPIDocument",
    "UploadNormalizer",
]

API_HEADER = b"x-medaudit-api"


class ServiceState:
    """Puts the service instance into every HTTP request's state (``request.state.service``).

    The instance is taken once, when the app's startup completes (``current()``: BentoML's
    ``get_current_service``, which names the instance its lifespan has just created), and held
    by this middleware, which belongs to one app: two apps in one process (tests) each reach
    their own instance, and no module-level object holds one.
    """

    def __init__(self, app: Any, current: Callable[[], Any]) -> None:
        self.app = app
        self.current = current
        self.service: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":

            async def send_started(message: Any) -> None:
                if message["type"] == "lifespan.startup.complete":
                    self.service = self.current()
                elif message["type"].startswith("lifespan.shutdown"):
                    self.service = None
                await send(message)

            await self.app(scope, receive, send_started)
            return
        if scope["type"] == "http" and self.service is not None:
            scope["state"] = {**scope.get("state", {}), "service": self.service}
        await self.app(scope, receive, send)


class ApiVersionHeader:
    """Adds ``X-Medaudit-API`` to every HTTP response start, whoever answered (route, framework
    error, OpenAPI document)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != API_HEADER]
                message = {**message, "headers": [*headers, (API_HEADER, API_VERSION.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_version)


class JsonErrorBodies:
    """Gives the frameworks' own error responses the service's error body.

    Starlette and BentoML answer some requests before our code runs (a path no route matches,
    e.g. one with a newline; a wrong method; an unhandled exception's 500) with plain text. Clients
    parse one error shape, so any >= 400 response that is not JSON is rewritten to
    ``{"error", "detail", "request_id"}`` with its status and other headers kept. A 5xx says no
    more than that (no traceback text reaches the client); the request id finds it in the log.
    """

    CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def send_json_errors(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                # Successful answers (nearly all traffic) pass without looking at their headers.
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if not headers.get(b"content-type", b"").startswith(b"application/json"):
                    held["start"], held["body"] = message, b""
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    for m in self._rewrite(scope, held["start"], held["body"]):
                        await send(m)
                return
            await send(message)

        await self.app(scope, receive, send_json_errors)

    def _rewrite(self, scope: Any, start: Any, text: bytes) -> list[dict[str, Any]]:
        status = int(start["status"])
        request_headers = {k.lower(): v for k, v in scope.get("headers", [])}
        response_headers = {k.lower(): v for k, v in start.get("headers", [])}
        rid = (response_headers.get(b"x-request-id") or request_headers.get(b"x-request-id") or b"").decode(
            "latin-1"
        ) or uuid.uuid4().hex
        if status >= 500:
            code, detail = "internal_error", "the service failed on this request; quote its request id"
        else:
            code = self.CODES.get(status, "http_error")
            said = text.decode("utf-8", "replace").strip()[:300]
            detail = f"{scope.get('method', '')} {scope.get('path', '')}: {said or code}"
        body = json.dumps({"error": code, "detail": detail, "request_id": rid}).encode()
        kept = [
            (k, v)
            for k, v in start.get("headers", [])
            if k.lower() not in (b"content-type", b"content-length", b"x-request-id")
        ]
        kept += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode("latin-1")),
        ]
        return [
            {"type": "http.response.start", "status": status, "headers": kept},
            {"type": "http.response.body", "body": body},
        ]


class UploadNormalizer:
    """Rewrites form uploads on ``paths`` (the image endpoints) into a raw body with the file's
    content type, and refuses bodies past the size limit (see :mod:`medaudit.service.uploads`)."""

    def __init__(
        self,
        app: ASGIApp,
        paths: tuple[str, ...] = IMAGE_PATHS,
        max_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.paths = paths
        # The same limit as the decoder's (MEDAUDIT_MAX_BYTES), read once like service.config does.
        self.max_bytes = max_bytes or positive_int(os.environ, "MEDAUDIT_MAX_BYTES", Limits.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        base = ctype.split(";", 1)[0].strip().lower()
        limit = self.max_bytes + (MULTIPART_OVERHEAD if base == MULTIPART else 0)
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > limit:
            # Refused before anything buffers it (the decoder would say the same after reading).
            await refuse(scope, receive, send, too_large(int(declared), limit))
            return
        if base == MULTIPART:
            try:
                body, file_ctype = await first_file(Request(scope, limited(receive, limit)))
            except BodyTooLargeError as e:
                await refuse(scope, receive, send, too_large(e.seen, limit))
                return
            except DisconnectedError:
                return
            except Exception as e:  # a malformed multipart body is the client's 4xx
                detail = f"cannot parse the multipart/form-data body: {str(e)[:200]}"
                await refuse(scope, receive, send, InvalidUploadError(detail))
                return
            await self.app(with_headers(scope, file_ctype, len(body)), replay(body), send)
            return
        relabel = "application/octet-stream" if base == FORM else None
        if declared.isdigit():
            await self.app(scope if relabel is None else with_headers(scope, relabel, None), receive, send)
            return
        # No Content-Length (chunked transfer): read it here, counting, so that an endless body
        # is cut off at the limit with a 413 instead of being buffered whole by BentoML first.
        try:
            body = await read_body(limited(receive, limit))
        except BodyTooLargeError as e:
            await refuse(scope, receive, send, too_large(e.seen, limit))
            return
        except DisconnectedError:
            return
        await self.app(with_headers(scope, relabel or ctype or None, len(body)), replay(body), send)


class OpenAPIDocument:
    """Answers ``GET /openapi.json`` with :func:`medaudit.service.openapi.from_env`'s document.

    A middleware rather than a mounted app: a Starlette mount at ``/openapi.json`` would redirect
    the exact path to ``/openapi.json/``.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._body: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != openapi.PATH or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if self._body is None:
            self._body = json.dumps(openapi.from_env(os.environ)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", openapi.JSON.encode()),
                    (b"content-length", str(len(self._body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self._body if scope["method"] == "GET" else b""})
