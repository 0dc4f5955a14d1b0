"""ASGI middleware that turns every way of uploading an image into the raw body BentoML expects.

The image endpoints take the whole body as a BentoML 1.4 *root input*. BentoML picks its body
parser by content type, so two common uploads would otherwise never reach our decoder:

* ``multipart/form-data`` (``curl -F image=@x.png``, browser forms): BentoML's multipart parser
  JSON-decodes the file part and fails with a 500. Here the first file part (or the field named
  ``image``/``file``) becomes the body and its own content type the request's.
* ``application/x-www-form-urlencoded`` (``curl --data-binary @x.png`` without ``-H``): BentoML
  would parse the image as a form. It is relabelled ``application/octet-stream``; the decoder goes
  by magic bytes anyway (:mod:`service.inputs`).

A multipart body without a file part becomes an empty body (400 ``empty_body``); a malformed one
is a 400 JSON error. Other paths and content types pass through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
FILE_FIELDS = ("image", "file")


class UploadNormalizer:
    """Rewrites form uploads on ``paths`` into a raw body with the file's content type."""

    def __init__(self, app: ASGIApp, paths: tuple[str, ...] = ("/predict", "/audit", "/compare")) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        base = ctype.split(";", 1)[0].strip().lower()
        if base == FORM:
            await self.app(_with_headers(scope, "application/octet-stream", None), receive, send)
        elif base == MULTIPART:
            try:
                body, file_ctype = await _first_file(Request(scope, receive))
            except Exception as e:  # a malformed multipart body is the client's 4xx
                await _bad_request(send, f"cannot parse the multipart/form-data body: {str(e)[:200]}")
                return
            await self.app(_with_headers(scope, file_ctype, len(body)), _replay(body), send)
        else:
            await self.app(scope, receive, send)


async def _first_file(request: Request) -> tuple[bytes, str]:
    async with request.form() as form:
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            return b"", "application/octet-stream"
        named = [v for k, v in files if k in FILE_FIELDS]
        upload = named[0] if named else files[0][1]
        return await upload.read(), upload.content_type or "application/octet-stream"


def _with_headers(scope: Scope, content_type: str, length: int | None) -> Scope:
    drop = {b"content-type"} | ({b"content-length", b"transfer-encoding"} if length is not None else set())
    hdrs = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
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


async def _bad_request(send: Send, detail: str) -> None:
    body = json.dumps({"error": "invalid_upload", "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
