"""The published OpenAPI document (service/openapi.py) and the JSON error bodies middleware
(service/errors.py), in-process; the live service is fuzzed against the document in tests/live."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from medaudit.service.errors import JsonErrorBodies
from medaudit.service.openapi import OpenAPIDocument, build


def test_document_lists_every_route_and_its_errors() -> None:
    doc = build(["vanilla", "pclarc-band_aid"], auth=True, reviews=True)
    assert doc["openapi"].startswith("3.1")
    assert {"/predict", "/audit", "/compare", "/models/", "/models/_route", "/models/{version}"} <= set(
        doc["paths"]
    )
    audit = doc["paths"]["/audit"]["post"]
    assert {"200", "400", "401", "404", "413", "415", "422", "503"} == set(audit["responses"])
    assert {p["name"] for p in audit["parameters"]} == {
        "X-Request-ID",
        "X-Model-Version",
        "X-Subject-Key",
        "raw_heatmap",
    }
    assert doc["paths"]["/models/{version}"]["get"]["parameters"][1]["schema"]["enum"] == [
        "vanilla",
        "pclarc-band_aid",
    ]
    assert doc["security"] == [{"bearer": []}] and doc["paths"]["/metrics"]["get"]["security"] == []
    # Every $ref points at a schema that exists.
    refs: list[str] = []

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            refs.extend(v for k, v in o.items() if k == "$ref")
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(doc)
    assert refs and {r.rsplit("/", 1)[1] for r in refs} <= set(doc["components"]["schemas"])


def test_document_follows_the_deployment() -> None:
    doc = build(["a"], auth=False, reviews=False)
    assert "security" not in doc and not any(p.startswith("/reviews") for p in doc["paths"])
    assert "401" not in doc["paths"]["/predict"]["post"]["responses"]


def _app() -> Any:
    async def boom(request: Any) -> Any:
        raise RuntimeError("secret internals")

    async def ok(request: Any) -> Any:
        return JSONResponse({"ok": True})

    async def teapot(request: Any) -> Any:
        return PlainTextResponse("short and stout", status_code=418, headers={"Retry-After": "1"})

    app = Starlette(routes=[Route("/ok", ok), Route("/boom", boom), Route("/teapot", teapot)])
    return JsonErrorBodies(OpenAPIDocument(app))


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("POST", "/ok", 405, "method_not_allowed"),
        ("GET", "/teapot", 418, "http_error"),
    ],
)
def test_framework_errors_get_the_service_error_body(method: str, path: str, status: int, code: str) -> None:
    with TestClient(_app()) as c:
        r = c.request(method, path, headers={"X-Request-ID": "rid-7"})
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert r.json()["error"] == code and r.json()["request_id"] == "rid-7" and path in r.json()["detail"]
    assert r.headers["x-request-id"] == "rid-7"


def test_a_500_says_nothing_of_its_cause_and_json_passes_through() -> None:
    with TestClient(_app(), raise_server_exceptions=False) as c:
        r = c.get("/boom")
        assert r.status_code == 500 and r.json()["error"] == "internal_error"
        assert "secret" not in r.text and r.json()["request_id"] == r.headers["x-request-id"]
        assert c.get("/ok").json() == {"ok": True}
        assert c.get("/teapot").headers["retry-after"] == "1"


def test_openapi_json_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDAUDIT_VERSIONS", "vanilla")
    monkeypatch.setenv("MEDAUDIT_AUTH", "off")
    monkeypatch.setenv("MEDAUDIT_FLAGS", "off")
    with TestClient(_app()) as c:
        doc = c.get("/openapi.json").json()
    assert doc["paths"]["/models/{version}"]["get"]["parameters"][1]["schema"]["enum"] == ["vanilla"]
