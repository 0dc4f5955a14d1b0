"""ASGI middleware that turns every way of uploading an image into the raw body BentoML expects.

The image endpoints take the whole body as a BentoML 1.4 *root input*. BentoML picks its body
parser by content type, so two common uploads would otherwise never reach our decoder:

* ``multipart/form-data`` (``curl -F image=@x.png``, browser forms): BentoML's multipart parser
  JSON-decodes the file part and fails with a 500. Here the first file part (or the field named
  ``image``/``file``) becomes the body and its own content type the request's.
* ``application/x-www-form-urlencoded`` (``curl --data-binary @x.png`` without ``-H``): BentoML
  would parse the image as a form. It is relabelled ``application/octet-stream``; the decoder goes
  by magic bytes anyway (:mod:`medaudit.service.inputs`).

A multipart body without a file part becomes an empty body (400 ``empty_body``); a malformed one
is a 400 ``invalid_upload``. Any image upload declaring more than ``MEDAUDIT_MAX_BYTES`` (plus
64 KiB of form overhead for multipart) is a 413 before it is read, and one without a length
(chunked transfer) is counted while it arrives and cut off with a 413 at the limit, instead of
being buffered whole first; all with the service's error body and request id. Raw bodies with a
length, and other paths, pass through untouched.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from medaudit.service.envvars import positive_int
from medaudit.service.errors import AuditError
from medaudit.service.inputs import Limits, check_body_size

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
FILE_FIELDS = ("image", "file")
#: Bytes a multipart body may carry beyond the image itself (boundaries, part headers, other fields).
MULTIPART_OVERHEAD = 64 * 2**10


class InvalidUploadError(AuditError):
    """A multipart/form-data body that cannot be parsed (no boundary, truncated, …)."""

    status = 400
    code = "invalid_upload"


class UploadNormalizer:
    """Rewrites form uploads on ``paths`` into a raw body with the file's content type."""

    def __init__(
        self,
        app: ASGIApp,
        paths: tuple[str, ...] = ("/predict", "/audit", "/compare"),
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
            await _refuse(send, headers, _too_large(int(declared), limit))
            return
        if base == MULTIPART:
            try:
                body, file_ctype = await _first_file(Request(scope, _limited(receive, limit)))
            except _BodyTooLarge as e:
                await _refuse(send, headers, _too_large(e.seen, limit))
                return
            except _Disconnected:
                return
            except Exception as e:  # a malformed multipart body is the client's 4xx
                detail = f"cannot parse the multipart/form-data body: {str(e)[:200]}"
                await _refuse(send, headers, InvalidUploadError(detail))
                return
            await self.app(_with_headers(scope, file_ctype, len(body)), _replay(body), send)
            return
        relabel = "application/octet-stream" if base == FORM else None
        if declared.isdigit():
            await self.app(scope if relabel is None else _with_headers(scope, relabel, None), receive, send)
            return
        # No Content-Length (chunked transfer): read it here, counting, so that an endless body
        # is cut off at the limit with a 413 instead of being buffered whole by BentoML first.
        try:
            body = await _read(_limited(receive, limit))
        except _BodyTooLarge as e:
            await _refuse(send, headers, _too_large(e.seen, limit))
            return
        except _Disconnected:
            return
        await self.app(_with_headers(scope, relabel or ctype or None, len(body)), _replay(body), send)


class _BodyTooLarge(Exception):
    def __init__(self, seen: int) -> None:
        super().__init__(f"{seen} bytes received")
        self.seen = seen


class _Disconnected(Exception):
    pass


def _too_large(size: int, limit: int) -> AuditError:
    try:
        check_body_size(size, Limits(max_bytes=limit))
    except AuditError as e:
        return e
    raise AssertionError(f"{size} bytes is not over the limit {limit}")  # pragma: no cover


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises once the request body has grown past ``limit`` bytes."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge(seen)
        elif message["type"] == "http.disconnect":
            raise _Disconnected()
        return message

    return counted


async def _read(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _first_file(request: Request) -> tuple[bytes, str]:
    async with request.form() as form:
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            return b"", "application/octet-stream"
        named = [v for k, v in files if k in FILE_FIELDS]
        upload = named[0] if named else files[0][1]
        return await upload.read(), upload.content_type or "application/octet-stream"


def _with_headers(scope: Scope, content_type: str | None, length: int | None) -> Scope:
    """``scope`` with its content type replaced (None: kept) and, given ``length``, a fixed length."""
    drop = ({b"content-type"} if content_type is not None else set()) | (
        {b"content-length", b"transfer-encoding"} if length is not None else set()
    )
    hdrs = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
    if content_type is not None:
        hdrs.append((b"content-type", content_type.encode("latin-1")))
    if length is not None:
        hdrs.append((b"content-length", str(length).encode()))
    return {**scope, "headers": hdrs}


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _refuse(send: Send, headers: dict[bytes, bytes], error: AuditError) -> None:
    """The error as the service's JSON error body, with the request id (given or generated)."""
    rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
    body = json.dumps({**error.to_json(), "request_id": rid}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", rid.encode("latin-1")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
