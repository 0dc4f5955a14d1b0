"""The published OpenAPI document (service/openapi.py) against the routes the service serves
(service/endpoints.py), and the JSON error bodies middleware (service/middleware.py), in-process;
the live service is fuzzed against the document in tests/live."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from medaudit.service.endpoints import ENDPOINTS, documented
from medaudit.service.middleware import JsonErrorBodies, OpenAPIDocument
from medaudit.service.openapi import _operations, build

# bentoml 1.4.40 builds its IO schemas through a pydantic hook deprecated in pydantic 2.11: theirs to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")

#: BentoML's own pages, not part of the contract: its UI, its schema and OpenAPI views, their assets;
#: and the reviewer workbench (service/ui/), a browser's page and its API, left out on purpose.
FRAMEWORK_PAGES = {"/", "/docs.json", "/schema.json", "/static_content", "/ui"}


def _routes(app: Any, prefix: str = "") -> set[tuple[str, str]]:
    """``(method, path)`` of every route ``app`` serves, mounted apps' routes included."""
    out: set[tuple[str, str]] = set()
    for r in app.routes:
        path = prefix + r.path
        if path in FRAMEWORK_PAGES:
            continue
        inner = getattr(getattr(r, "app", None), "routes", None)
        if inner is not None and getattr(r, "methods", None) is None:  # a mounted app
            out |= _routes(r.app, path)
        else:
            out |= {(m, path) for m in r.methods - {"HEAD"}}
    return out


def test_every_served_route_has_an_operation_and_every_operation_a_route(new_medaudit_app) -> None:
    """The service's routes (BentoML's APIs and probes, the mounted apps) are the endpoint table's,
    and the document of a deployment with every route on has an operation for each, and no other."""
    served = _routes(new_medaudit_app())
    assert served == {(e.method, e.path) for e in ENDPOINTS}
    doc = build(["vanilla"], auth=True, reviews=True)
    operations = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert operations == served
    assert set(_operations(["vanilla"], auth=True)) == {e.name for e in ENDPOINTS}
    assert {op["operationId"] for ops in doc["paths"].values() for op in ops.values()} == {
        e.name for e in ENDPOINTS
    }


def test_document_lists_every_route_and_its_errors() -> None:
    doc = build(["vanilla", "pclarc-band_aid"], auth=True, reviews=True)
    assert doc["openapi"].startswith("3.1")
    assert {e.path for e in documented(reviews=True)} == set(doc["paths"])
    audit = doc["paths"]["/audit"]["post"]
    assert {"200", "400", "401", "404", "406", "413", "415", "422", "503"} == set(audit["responses"])
    assert {p["name"] for p in audit["parameters"]} == {
        "X-Request-ID",
        "X-Model-Version",
        "X-Subject-Key",
        "raw_heatmap",
        "detail",
        "frames",
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
    assert set(doc["paths"]) == {e.path for e in ENDPOINTS if not e.reviews}
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
