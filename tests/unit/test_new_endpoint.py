"""A new endpoint touches two places (docs/extending.md, "(d) An endpoint"): its row in
service/endpoints.py (the route and its OpenAPI operation) and its method in clients/endpoints.py
(one definition for the sync and the async client). This builds a toy one, ``GET /models/_echo``,
through those two mechanisms alone, and checks the document and both clients pick it up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from medaudit.clients import AsyncMedauditClient, MedauditClient
from medaudit.clients._base import _Call
from medaudit.clients.endpoints import Endpoints, endpoint
from medaudit.service import endpoints as table
from medaudit.service import openapi
from medaudit.service.endpoints import (
    API_VERSION,
    ENDPOINTS,
    MODELS_MOUNT,
    REQUEST_ID,
    STR,
    Endpoint,
    Param,
    obj,
)

# ------------------------------------------------------------------ the route: one row

ECHO = Endpoint(
    "echo",
    "GET",
    "/models/_echo",
    app=MODELS_MOUNT,
    summary="Says the text back",
    params=(REQUEST_ID, Param("text", "query", required=True)),
    answer="Echo",
    errors=(401, 422),
    schemas={"Echo": obj({"request_id": STR, "text": STR})},
)


async def _echo(request: Request) -> JSONResponse:  # the handler (service/api.py's part)
    body = {"request_id": "rid-1", "text": request.query_params["text"]}
    return JSONResponse(body, headers={"X-Medaudit-API": API_VERSION})


def _app() -> Starlette:
    return Starlette(routes=[Mount(ECHO.app, routes=[Route(ECHO.route, _echo, methods=[ECHO.method])])])


# ------------------------------------------------------------------ the client: one method


@dataclass(frozen=True)
class Echo:
    """``GET /models/_echo``."""

    request_id: str
    text: str


def parse_echo(d: Mapping[str, Any]) -> Echo:
    return Echo(str(d["request_id"]), str(d["text"]))


class EchoEndpoints(Endpoints):
    """What clients/endpoints.py's ``Endpoints`` would get: the method, once."""

    @endpoint
    def echo(self, text: str) -> _Call[Echo]:
        """Says ``text`` back."""
        return _Call("GET", "/models/_echo", parse_echo, params={"text": text})


class EchoClient(EchoEndpoints, MedauditClient):
    pass


class AsyncEchoClient(EchoEndpoints, AsyncMedauditClient):
    pass


# ------------------------------------------------------------------ checks


@pytest.fixture
def with_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint table with the toy row added (as if it were written there)."""
    rows = (*ENDPOINTS, ECHO)
    monkeypatch.setattr(table, "ENDPOINTS", rows)
    monkeypatch.setattr(openapi, "ENDPOINTS", rows)


def test_the_row_alone_documents_the_operation(with_echo: None) -> None:
    doc = openapi.build(["vanilla"], auth=True, reviews=True)
    op = doc["paths"]["/models/_echo"]["get"]
    assert op["operationId"] == "echo" and op["summary"] == "Says the text back"
    assert [(p["name"], p["in"]) for p in op["parameters"]] == [("X-Request-ID", "header"), ("text", "query")]
    assert set(op["responses"]) == {"200", "401", "422"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Echo"
    }
    assert doc["components"]["schemas"]["Echo"]["required"] == ["request_id", "text"]
    # Without keys, no 401; every other operation is as it was.
    assert set(
        openapi.build(["vanilla"], auth=False, reviews=True)["paths"]["/models/_echo"]["get"]["responses"]
    ) == {
        "200",
        "422",
    }
    doc.pop("info")
    del doc["paths"]["/models/_echo"], doc["components"]["schemas"]["Echo"]
    rows = tuple(e for e in table.ENDPOINTS if e is not ECHO)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(table, "ENDPOINTS", rows)
        mp.setattr(openapi, "ENDPOINTS", rows)
        plain = openapi.build(["vanilla"], auth=True, reviews=True)
    plain.pop("info")
    assert json.dumps(doc) == json.dumps(plain)


def test_a_row_without_an_answer_or_a_taken_schema_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for row, message in (
        (Endpoint("bare", "GET", "/bare"), "documents no operation"),
        (
            Endpoint("dup", "GET", "/dup", summary="s", answer="Error", schemas={"Error": STR}),
            "exists already",
        ),
    ):
        monkeypatch.setattr(table, "ENDPOINTS", (*ENDPOINTS, row))
        monkeypatch.setattr(openapi, "ENDPOINTS", (*ENDPOINTS, row))
        with pytest.raises(ValueError, match=message):
            openapi.build(["vanilla"], auth=True, reviews=True)
    with pytest.raises(ValueError, match="must be required"):
        Param("flag_id", "path")


def test_the_method_alone_serves_both_clients() -> None:
    with TestClient(_app()) as tc, EchoClient(http=tc, retries=0) as c:
        assert c.echo("hello") == Echo("rid-1", "hello")
        assert c.predict.__doc__ == MedauditClient.predict.__doc__  # the shared methods are there too

    async def main() -> Echo:
        transport = httpx.ASGITransport(app=_app())
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://toy") as http,
            AsyncEchoClient(http=http, retries=0) as c,
        ):
            pending = c.echo("hi")
            assert asyncio.iscoroutine(pending)
            return await pending

    assert asyncio.run(main()) == Echo("rid-1", "hi")


def test_the_async_client_builds_the_request_when_awaited(tmp_path: Any) -> None:
    """As an ``async def`` method did: a bad image fails at ``await``, so gather can collect it."""

    async def main() -> list[Any]:
        async with AsyncMedauditClient("http://127.0.0.1:9", retries=0) as c:
            return await asyncio.gather(c.predict(tmp_path / "missing.png"), return_exceptions=True)

    (err,) = asyncio.run(main())
    assert isinstance(err, Exception) and "missing.png" in str(err)
