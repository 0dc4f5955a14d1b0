"""The API version handshake: the service names its HTTP contract's version in ``X-Medaudit-API``
on every answer, and medaudit-client refuses a service of another major version."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import medaudit.clients as mc_client
from medaudit.service.middleware import API_VERSION

# bentoml 1.4.40 builds its IO schemas through a pydantic hook deprecated in pydantic 2.11.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")


def test_client_and_service_speak_the_same_api() -> None:
    assert mc_client.API_VERSION == API_VERSION


@contextmanager
def _server(api_header: str | None) -> Iterator[str]:
    """A real HTTP server answering every request 200 with an empty model list."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"versions": [], "ab_weights": {}, "shadow": None}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if api_header is not None:
                self.send_header("X-Medaudit-API", api_header)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("server_version", ["2.0", "0.9", " 3.1 "])
def test_another_major_is_refused_with_the_fix(server_version: str) -> None:
    with (
        _server(server_version) as url,
        mc_client.MedauditClient(url, retries=0) as mc,
        pytest.raises(mc_client.IncompatibleServer) as ei,
    ):
        mc.models()
    msg = str(ei.value)
    assert server_version.strip() in msg and API_VERSION in msg and "pip install" in msg
    assert ei.value.server_version == server_version.strip()


@pytest.mark.parametrize("server_version", ["1.0", "1.7", None])
def test_same_major_or_no_header_is_served(server_version: str | None) -> None:
    """A newer minor only adds; no header at all (a proxy's own page, an older service) is not a
    refusal, the body's own checks still apply."""
    with (
        _server(server_version) as url,
        mc_client.MedauditClient(url, retries=0) as mc,
        pytest.raises(mc_client.ResponseFormatError),
    ):
        mc.models()  # the stub's body is not a full /models answer: parsed after the check


def test_the_async_client_refuses_too() -> None:
    import asyncio

    async def main(url: str) -> None:
        async with mc_client.AsyncMedauditClient(url, retries=0) as mc:
            await mc.models()

    with _server("2.0") as url, pytest.raises(mc_client.IncompatibleServer):
        asyncio.run(main(url))


def test_every_answer_of_the_app_carries_the_header(live_service, new_medaudit_app) -> None:
    """Routes, the GET apps, framework errors and the OpenAPI document alike."""
    from starlette.testclient import TestClient

    with TestClient(new_medaudit_app()) as tc:
        key = {"Authorization": f"Bearer {live_service.client_key}"}
        for method, path in (("GET", "/models/"), ("GET", "/openapi.json"), ("GET", "/no-such-route")):
            r = tc.request(method, path, headers=key)
            assert r.headers.get("x-medaudit-api") == API_VERSION, (path, r.status_code)
        r = tc.post("/predict", content=b"not an image", headers={**key, "Content-Type": "image/png"})
        assert r.status_code >= 400 and r.headers.get("x-medaudit-api") == API_VERSION
        assert tc.get("/openapi.json").json()["info"]["version"] == API_VERSION
