"""The upload middleware stops reading a body at the byte limit (service/middleware.py,
service/uploads.py), on every image endpoint of the route table and on no other route."""

from __future__ import annotations

import asyncio
import json

import pytest

from medaudit.service.endpoints import ENDPOINTS, IMAGE_PATHS
from medaudit.service.middleware import UploadNormalizer
from medaudit.service.uploads import MULTIPART_OVERHEAD

MIB = 2**20


#: A multipart body's start: one file part whose content then never ends.
PART = (
    b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
)


def _run(ctype: str, n_chunks: int, limit: int, path: str = "/predict") -> tuple[list[dict], int, bool]:
    """Sends ``n_chunks`` MiB chunks without Content-Length; returns (sent messages, chunks the
    middleware pulled, whether the app behind it ran)."""
    pulled = 0
    ran = False
    head = PART if ctype.startswith("multipart") else b""

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        body = (head if pulled == 1 else b"") + b"\x00" * MIB
        return {"type": "http.request", "body": body, "more_body": pulled < n_chunks}

    async def app(scope, receive, send) -> None:
        nonlocal ran
        ran = True
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", ctype.encode()), (b"transfer-encoding", b"chunked")],
    }
    asyncio.run(UploadNormalizer(app, max_bytes=limit)(scope, receive, send))
    return sent, pulled, ran


@pytest.mark.parametrize("path", IMAGE_PATHS)
@pytest.mark.parametrize(
    "ctype", ["image/png", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_an_endless_chunked_body_is_cut_off_at_the_limit(ctype: str, path: str) -> None:
    limit = 4 * MIB
    sent, pulled, ran = _run(ctype, n_chunks=1000, limit=limit, path=path)
    assert not ran and sent[0]["status"] == 413
    body = json.loads(sent[1]["body"])
    assert body["error"] == "payload_too_large" and body["request_id"]
    allowed = limit + (MULTIPART_OVERHEAD if ctype.startswith("multipart") else 0)
    assert pulled == allowed // MIB + 1  # the chunk that crossed the limit, none after it


def test_a_chunked_body_under_the_limit_reaches_the_app_whole_with_its_length() -> None:
    sent, pulled, ran = _run("image/png", n_chunks=3, limit=4 * MIB)
    assert ran and pulled == 3 and sent[0]["status"] == 200 and sent[1]["body"] == str(3 * MIB).encode()


def test_the_image_endpoints_are_the_table_s_and_other_posts_pass_untouched() -> None:
    assert {"/predict", "/audit", "/compare"} <= set(IMAGE_PATHS)
    assert UploadNormalizer(lambda *a: None).paths == IMAGE_PATHS
    for e in ENDPOINTS:
        if e.method == "POST" and not e.image:  # e.g. a review verdict: a JSON body, not an image
            _, pulled, ran = _run("image/png", n_chunks=3, limit=MIB, path=e.path)
            assert ran and pulled == 3, e.path
