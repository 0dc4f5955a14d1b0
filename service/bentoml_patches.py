"""Fixes for BentoML 1.4.40 behaviour that costs the served app, applied on import of
:mod:`medaudit.service.api` (each is best effort: a BentoML without the patched code is left alone).

* :func:`cancel_request_timers`: the per-request timeout timer kept every answered request alive
  for 300 s (GC pauses, p99 growth), and a request that ended without an answer held the
  server's shutdown as long;
* :func:`cache_root_schemas`: every request and every response rebuilt a pydantic JSON schema
  of the endpoint's root type.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from typing import Any

from starlette.responses import JSONResponse


def apply() -> dict[str, bool]:
    """Applies every patch here (idempotent); returns which are in place."""
    return {"cancel_request_timers": cancel_request_timers(), "cache_root_schemas": cache_root_schemas()}


def cancel_request_timers() -> bool:
    """Patch BentoML 1.4's ``TimeoutMiddleware`` to cancel each request's timeout timer once the
    response has started; returns whether the patch is in place.

    BentoML schedules ``loop.call_later(traffic.timeout, ...)`` for every request and never cancels
    it, so each request's timer lives the whole timeout (300 s in the entry service) after the
    request is answered, and with it everything the timer's context holds: the starlette request,
    BentoML's request and response contexts, the OpenTelemetry span. At ~100 requests a second
    that is ~30,000 requests' objects alive: the entry service held 420k tracked objects two
    minutes into a benchmark and each full garbage collection walked them all, up to 280 ms
    during which every request in flight waited. /predict's p99 grew with every minute served
    (198 -> 468 ms over 90 s of load, benchmarks/serve.py), and RSS with it.

    The timer's only effect is answering 504 when nothing was sent within the timeout; once the
    first message is sent it does nothing (it checks ``waiter.done()``), so cancelling it then
    changes no behaviour. The body below is BentoML 1.4.40's, plus the ``cancel()`` and the end of
    the wait when the app finishes without sending (see the comment there). Best effort:
    a BentoML without this middleware, or with a different one, is left alone.
    """
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:
        return False
    middleware = getattr(traffic, "TimeoutMiddleware", None)
    if middleware is None or not hasattr(middleware, "_set_timer_out"):
        return False
    if getattr(middleware.__call__, "_medaudit_cancels_timer", False):
        return True

    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)

        # An app that ends without sending anything (a request whose client went away, one that
        # raised before answering) also ends the wait: BentoML's own waits for the timer, and each
        # such request held the server's shutdown for the whole timeout (seen: /readyz polls that
        # timed out on the client while the auditor was starting kept the entry service alive for
        # ~300 s after SIGTERM, and circus killed the arbiter first, orphaning it).
        def _ended(_: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)

        fut.add_done_callback(_ended)
        try:
            try:
                await waiter
            finally:
                timer.cancel()  # fired, or the response has started: it can only be a no-op now
        except TimeoutError:
            if fut.cancel():
                resp = JSONResponse(
                    {"error": f"Not able to process the request in {self.timeout} seconds"},
                    status_code=504,
                )
                await resp(scope, receive, send)
        else:
            await fut

    __call__._medaudit_cancels_timer = True  # type: ignore[attr-defined]
    middleware.__call__ = __call__
    return True


def cache_root_schemas() -> bool:
    """Patch ``IORootModel.model_json_schema`` to build each class's schema once; returns whether
    the patch is in place.

    BentoML calls it twice per request on a root-input endpoint: parsing the body
    (``model_validate_json`` asks whether the root is a string or file) and answering (the
    response's ``mime_type``). Each call builds a pydantic ``TypeAdapter`` and its JSON schema
    from scratch: 7.5 % of the entry service's samples under 16 clients of /predict (py-spy), for
    a value that depends on the class alone. The schema is cached per class and arguments, and a
    copy is returned (callers may change it, as BentoML's own ``root_input`` marking does on a
    fresh one). Arguments that cannot be a cache key fall through to the original.
    """
    try:
        from _bentoml_sdk.io_models import IORootModel
    except ImportError:
        return False
    current = IORootModel.__dict__.get("model_json_schema")
    if not isinstance(current, classmethod):
        return False
    if getattr(current.__func__, "_medaudit_cached", False):
        return True
    original = current.__func__
    cache: dict[Any, dict[str, Any]] = {}

    @functools.wraps(original)
    def model_json_schema(cls: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            key = (cls, args, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:
            return original(cls, *args, **kwargs)
        schema = cache.get(key)
        if schema is None:
            schema = cache[key] = original(cls, *args, **kwargs)
        return copy.deepcopy(schema)

    model_json_schema._medaudit_cached = True  # type: ignore[attr-defined]
    IORootModel.model_json_schema = classmethod(model_json_schema)
    return True
