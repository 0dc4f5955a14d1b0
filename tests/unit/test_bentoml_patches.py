"""medaudit.service.bentoml_patches (applied by ``medaudit.service.bootstrap``, which
``medaudit.service.api`` imports first).

cancel_request_timers: BentoML's per-request timeout timer is cancelled once the response has
started, and the timeout still answers 504 when nothing is sent in time.

Driven through BentoML's own ``TimeoutMiddleware`` (patched on import of ``medaudit.service.api``) with a
minimal ASGI app; the served effect (the entry service's heap no longer grows with every request
of the last 300 s) is measured in benchmarks/serve.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")


def middleware(delay_s: float, timeout_s: float, ends: str = "answered") -> Any:
    """BentoML's patched TimeoutMiddleware around an app that, after ``delay_s``, answers 200,
    returns without sending (``ends="silent"``: its client went away) or raises (``"raises"``)."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    import medaudit.service.api  # noqa: F401  (applies the patches)
    from medaudit.service import bentoml_patches

    assert bentoml_patches.cancel_request_timers()  # in place (and idempotent)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(delay_s)
        if ends == "silent":
            return
        if ends == "raises":
            raise ConnectionResetError("dependency went away")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return TimeoutMiddleware(app, timeout=timeout_s)


async def serve_one(mw: Any) -> tuple[list[dict[str, Any]], list[asyncio.TimerHandle]]:
    """One request through ``mw``: what it sent, and the loop's timers still live afterwards."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await mw({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)
    await asyncio.sleep(0)  # a cancelled app task unwinds (its own timers) on the next iteration
    loop = asyncio.get_running_loop()
    live = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    return sent, live


def test_answered_requests_leave_no_timer_behind() -> None:
    """The request is answered; no timer of its 300 s timeout stays scheduled (unpatched BentoML
    leaves one per request, holding the request's objects for 300 s)."""
    sent, live = asyncio.run(serve_one(middleware(delay_s=0.0, timeout_s=300.0)))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    assert live == []


def test_timeout_still_answers_504() -> None:
    sent, live = asyncio.run(serve_one(middleware(delay_s=5.0, timeout_s=0.05)))
    assert sent[0]["status"] == 504
    assert b"0.05 seconds" in sent[1]["body"]
    assert live == []


def test_an_app_that_ends_without_answering_ends_the_request_at_once() -> None:
    """A request whose app returns without sending (its client went away) or raises is over when
    the app is, not when the 300 s timer fires: BentoML's own middleware waited for the timer,
    and such requests held a served process's shutdown that long (uvicorn waits for its tasks)."""

    async def timed(ends: str) -> tuple[float, list[dict[str, Any]], list[asyncio.TimerHandle]]:
        mw = middleware(0.01, 300.0, ends)
        t0 = asyncio.get_running_loop().time()
        sent, live = await serve_one(mw)  # unpatched: 300 s
        return asyncio.get_running_loop().time() - t0, sent, live

    took, sent, live = asyncio.run(timed("silent"))
    assert took < 5 and sent == [] and live == []
    with pytest.raises(ConnectionResetError, match="went away"):
        asyncio.run(timed("raises"))


class _Root:
    """Stand-ins for the root types of the endpoints (each its own class: its own cache entry)."""


def test_root_schemas_are_built_once_per_class_and_handed_out_as_copies() -> None:
    """BentoML's per-request ``IORootModel.model_json_schema``: built once per class and
    arguments, equal to what BentoML builds, and a copy each time (mutating one changes no other)."""
    from pathlib import Path
    from typing import Annotated

    from _bentoml_sdk.io_models import IORootModel
    from bentoml.validators import ContentType
    from pydantic import TypeAdapter

    import medaudit.service.api  # noqa: F401  (applies the patches)
    from medaudit.service import bentoml_patches

    assert bentoml_patches.cache_root_schemas()  # in place (and idempotent)
    typ = Annotated[Path, ContentType("application/octet-stream")]

    class Image(IORootModel[typ]):  # type: ignore[valid-type]
        __root_input__ = True

    class Count(IORootModel[int]):
        pass

    unpatched = IORootModel.__dict__["model_json_schema"].__func__.__wrapped__
    want = unpatched(Image)
    assert want["type"] == "file" and want["root_input"] is True
    built: list[type] = []
    original = TypeAdapter.__init__

    def counting(self: Any, *a: Any, **kw: Any) -> None:
        built.append(a[0] if a else None)
        original(self, *a, **kw)

    TypeAdapter.__init__ = counting  # type: ignore[method-assign]
    try:
        first = Image.model_json_schema()
        first["mutated"] = True
        again = Image.model_json_schema()
        count = Count.model_json_schema()
        Count.model_json_schema()
    finally:
        TypeAdapter.__init__ = original  # type: ignore[method-assign]
    assert again == want and "mutated" not in again
    assert count == unpatched(Count) == {"type": "integer"}
    assert len(built) == 2  # one per class, none for the repeats
    # bodies still parse through the cached schema (JSON for a non-file root)
    assert Count.model_validate_json(b"3").root == 3
