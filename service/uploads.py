"""How an uploaded image becomes the raw body BentoML expects: the body handling of the upload
middleware (:class:`~service.middleware.UploadNormalizer`), which applies it to the image
endpoints of :mod:`medaudit.service.endpoints`.

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

import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from medaudit.service.errors import AuditError, error_response
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


class BodyTooLargeError(Exception):
    def __init__(self, seen: int) -> None:
        super().__init__(f"{seen} bytes received")
        self.seen = seen


class DisconnectedError(Exception):
    pass


def too_large(size: int, limit: int) -> AuditError:
    try:
        check_body_size(size, Limits(max_bytes=limit))
    except AuditError as e:
        return e
    raise AssertionError(f"{size} bytes is not over the limit {limit}")  # pragma: no cover


def limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises once the request body has grown past ``limit`` bytes."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLargeError(seen)
        elif message["type"] == "http.disconnect":
            raise DisconnectedError()
        return message

    return counted


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def first_file(request: Request) -> tuple[bytes, str]:
    async with request.form() as form:
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            return b"", "application/octet-stream"
        named = [v for k, v in files if k in FILE_FIELDS]
        upload = named[0] if named else files[0][1]
        return await upload.read(), upload.content_type or "application/octet-stream"


def with_headers(scope: Scope, content_type: str | None, length: int | None) -> Scope:
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


def replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def refuse(scope: Scope, receive: Receive, send: Send, error: AuditError) -> None:
    """Answers with ``error`` (:func:`~service.errors.error_response`), with the request id given
    in ``X-Request-ID`` or a new one."""
    headers = {k.lower(): v for k, v in scope.get("headers", [])}
    rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
    await error_response(error, rid)(scope, receive, send)
