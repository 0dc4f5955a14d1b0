"""The reviewer workbench's HTTP side: one static page, its script and style, and a JSON API.

Routes, relative to the mount (``/ui``)::

    GET  /                          the page (static HTML; the script does the rest)
    GET  /static/{file}             ui.js, ui.css
    POST /session     {"key"}       reviewer key -> session cookie (client key: 403)
    POST /logout                    ends the session
    GET  /api/me                    who is signed in, the CSRF token, versions, concepts, verdicts
    GET  /api/queue?status&concept&severity&version&since&until&offset&limit
    GET  /api/flags/{ref}           one flag: record, other flags of its request, earlier verdicts
    GET  /api/flags/{ref}/image.png, /heat_layer.png, /mask.png, /heatmap.png (the blend)
    POST /api/flags/{ref}/resolve   {"verdict", "note"}
    GET  /api/concepts/{concept}?top=
    GET  /api/refit, POST /api/refit {"version"}

Every answer carries a strict Content-Security-Policy (scripts and styles from this origin only,
no inline script or style, no framing) and ``Cache-Control: no-store``. Every route but the page,
its assets and ``/session`` needs a session (:mod:`~medaudit.service.ui.sessions`); every POST
needs the session's CSRF token and a same-origin request. The page and its API are left out of
the OpenAPI document on purpose: it describes the machine contract, and this is a browser's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medaudit.service.auth import Principal, Role
from medaudit.service.errors import (
    AuditError,
    InvalidParameterError,
    ReviewStoreUnavailableError,
    error_response,
)
from medaudit.service.flags.events import FlagKeys
from medaudit.service.flags.review import VERDICTS, get_review, resolve_review, review_images
from medaudit.service.ui import queries, refit, sessions

if TYPE_CHECKING:
    from collections.abc import Awaitable

#: A flag's PNGs: the bare input, the heatmap alone (RGBA), the concept's mask (grey levels), and
#: the heatmap blended into the input (composed from the first two; records stored before those
#: were kept hold only the blend).
IMAGES = ("image", "heat_layer", "mask", "heatmap")

#: The page's security headers. ``img-src 'self'``: the overlays are this origin's PNGs; the mask
#: is recoloured in a canvas, which needs nothing more.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATIC = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
SEVERITIES = ("low", "medium", "high")


@dataclass
class Backend:
    """What the workbench needs of the service, per request.

    Attributes:
        client: The review queue's Redis (bytes client).
        keys: Its key layout.
        authenticate: ``authenticate(key) -> Principal``; raises ``AuthError`` for a bad key.
        versions: Served versions (the refit's choices, the version filter's).
        concepts: Concepts of the served banks.
        model_name: The served model's name (``refine-cav --model-name``).
        env: The environment the refit runs in (None: this process's).
        refit_dir: Where refits write their output (``MEDAUDIT_UI_REFIT_DIR``; None: a temp folder).
    """

    client: redis.Redis
    keys: FlagKeys
    authenticate: Callable[[str], Principal]
    versions: list[str]
    concepts: list[str]
    model_name: str = "resnet18-synthderm"
    env: dict[str, str] | None = field(default=None)
    refit_dir: str | None = None


def service_backend(request: Request) -> Backend:
    """The backend of the served :class:`~medaudit.service.api.MedAudit` answering ``request``
    (``request.state.service``, set by :class:`~medaudit.service.middleware.ServiceState`)."""
    svc = getattr(request.state, "service", None)
    if svc is None or svc.review_client is None:
        raise ReviewStoreUnavailableError("the review queue is off on this service (MEDAUDIT_FLAGS=off)")
    return Backend(
        client=svc.review_client,
        keys=svc.settings.flags.keys,
        authenticate=lambda key: svc.authenticate({"authorization": f"Bearer {key}"}, Role.CLIENT),
        versions=list(svc.engines),
        concepts=sorted({c for e in svc.engines.values() for c in e.bank.concepts}),
        model_name=svc.settings.model_name,
        refit_dir=svc.settings.ui_refit_dir,
    )


def _json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=SECURITY_HEADERS)


def _date_ms(value: str | None, name: str, end: bool = False) -> int | None:
    """``YYYY-MM-DD`` (UTC) -> ms at the day's start, or the next day's start for ``end``."""
    if not value:
        return None
    try:
        day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidParameterError(f"{name} must be a date YYYY-MM-DD; got {value[:40]!r}") from None
    return int(((day + timedelta(days=1)) if end else day).timestamp() * 1000) - (1 if end else 0)


def _int(q: Any, name: str, default: int) -> int:
    try:
        return int(q.get(name, default))
    except ValueError:
        raise InvalidParameterError(f"{name} must be an integer; got {q.get(name)[:40]!r}") from None


def ui_app(backend: Callable[[Request], Backend] = service_backend) -> Starlette:
    """The workbench as a Starlette app, to mount at ``/ui``.

    Args:
        backend: ``backend(request) -> Backend``, called per request (the served service's by
            default; tests and benchmarks pass their own).
    """
    import anyio.to_thread

    # The page's files are package data (pyproject.toml); "page-assets" is no identifier, so
    # setuptools does not take the folder for a package it was not told about.
    page = resources.files("medaudit.service.ui").joinpath("page-assets/index.html").read_bytes()
    assets = {
        name: resources.files("medaudit.service.ui").joinpath(f"page-assets/{name}").read_bytes()
        for name in STATIC
    }

    Handler = Callable[[Request, Backend, sessions.Session | None], Any]

    def endpoint(
        fn: Handler, *, session: bool = True, post: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            rid = request.headers.get("x-request-id") or ""
            try:
                be = backend(request)
                if post:
                    host = request.headers.get("x-forwarded-host") or request.headers.get("host", "")
                    sessions.check_same_origin(request.headers, host)
                    try:
                        request.state.body = await request.json()
                    except ValueError:
                        raise InvalidParameterError("the body must be JSON") from None
                s = None
                if session:
                    token = request.cookies.get(sessions.COOKIE)
                    s = await anyio.to_thread.run_sync(sessions.current, be.client, be.keys, token)
                    if post:
                        sessions.check_csrf(s, request.headers.get("x-csrf-token"))
                result = await anyio.to_thread.run_sync(fn, request, be, s)
            except AuditError as e:
                resp = error_response(e, rid or "ui")
                resp.headers.update(SECURITY_HEADERS)
                return resp
            return result if isinstance(result, Response) else _json(result)

        return run

    async def index(_request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            return _json({"error": "not_found", "detail": f"no asset {name[:40]!r}"}, 404)
        return Response(assets[name], media_type=STATIC[name], headers=SECURITY_HEADERS)

    def login(request: Request, be: Backend, _s: sessions.Session | None) -> Response:
        body = request.state.body
        key = body.get("key") if isinstance(body, dict) else None
        if not isinstance(key, str) or not key.strip() or len(key) > 512:
            raise InvalidParameterError('the body must be {"key": "<your reviewer API key>"}')
        principal = be.authenticate(key.strip())
        principal.require(Role.REVIEWER)
        token, s = sessions.start(be.client, be.keys, principal.key_id)
        resp = _json({"key_id": s.key_id, "csrf": s.csrf})
        tls = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
        resp.set_cookie(
            sessions.COOKIE,
            token,
            max_age=sessions.MAX_AGE_S,
            path=request.scope.get("root_path") or "/ui",
            httponly=True,
            samesite="strict",
            secure=tls,
        )
        return resp

    def logout(request: Request, be: Backend, _s: sessions.Session | None) -> Response:
        sessions.end(be.client, be.keys, request.cookies.get(sessions.COOKIE))
        resp = _json({"signed_out": True})
        resp.delete_cookie(sessions.COOKIE, path=request.scope.get("root_path") or "/ui")
        return resp

    def me(_request: Request, be: Backend, s: sessions.Session | None) -> dict[str, Any]:
        assert s is not None
        return {
            "key_id": s.key_id,
            "csrf": s.csrf,
            "versions": be.versions,
            "concepts": be.concepts,
            "severities": list(SEVERITIES),
            "verdicts": list(VERDICTS),
        }

    def queue(request: Request, be: Backend, _s: sessions.Session | None) -> dict[str, Any]:
        q = request.query_params
        f = queries.QueueFilter(
            status=q.get("status", "open"),
            concept=q.get("concept", ""),
            severity=q.get("severity", ""),
            version=q.get("version", ""),
            since_ms=_date_ms(q.get("since"), "since"),
            until_ms=_date_ms(q.get("until"), "until", end=True),
            offset=_int(q, "offset", 0),
            limit=_int(q, "limit", 25),
        )
        return queries.queue_page(be.client, be.keys, f, queries.Refs(be.client, be.keys))

    def flag(request: Request, be: Backend, _s: sessions.Session | None) -> dict[str, Any]:
        refs = queries.Refs(be.client, be.keys)
        fid = refs.resolve(request.path_params["ref"])
        rec = get_review(be.client, fid, be.keys)
        request_id, concept = rec["request_id"], rec["concept"]
        siblings = [f"{request_id}:{c}" for c in be.concepts if c != concept]
        with be.client.pipeline(transaction=False) as pipe:
            for sid in siblings:
                pipe.exists(be.keys.review(sid))
            present = [sid for sid, n in zip(siblings, pipe.execute(), strict=True) if n]
        out = {
            k: v for k, v in rec.items() if not k.endswith("_key") and k not in ("flag_id", "subject_hash")
        }
        out["ref"] = request.path_params["ref"]
        out["same_request"] = queries._summaries(be.client, be.keys, present, refs)
        out["history"] = queries.history(be.client, be.keys, rec, refs)
        return out

    def image(request: Request, be: Backend, _s: sessions.Session | None) -> Response:
        fid = queries.Refs(be.client, be.keys).resolve(request.path_params["ref"])
        kind = request.path_params["kind"]
        if kind not in IMAGES:
            detail = "images are " + ", ".join(f"{k}.png" for k in IMAGES)
            return _json({"error": "not_found", "detail": detail}, 404)
        data = review_images(be.client, fid, be.keys).get(kind)
        if data is None:
            return _json(
                {"error": "not_found", "detail": f"this flag's {kind} expired or was never stored"}, 404
            )
        return Response(data, media_type="image/png", headers=SECURITY_HEADERS)

    def resolve(request: Request, be: Backend, s: sessions.Session | None) -> dict[str, Any]:
        assert s is not None
        body = request.state.body
        if not isinstance(body, dict) or not isinstance(body.get("verdict"), str):
            raise InvalidParameterError('the body must be {"verdict": …, "note": …}', valid=list(VERDICTS))
        note = body.get("note") or ""
        fid = queries.Refs(be.client, be.keys).resolve(request.path_params["ref"])
        rec = resolve_review(be.client, fid, body["verdict"], note, reviewer=s.key_id, keys=be.keys)
        return {"ref": request.path_params["ref"], "status": rec["status"], "verdict": rec["verdict"]}

    def concept(request: Request, be: Backend, _s: sessions.Session | None) -> dict[str, Any]:
        name = request.path_params["concept"]
        if name not in be.concepts:
            raise InvalidParameterError(
                f"unknown concept {name[:60]!r}; served: {', '.join(be.concepts)}", valid=be.concepts
            )
        top = _int(request.query_params, "top", 24)
        return queries.concept_ranking(be.client, be.keys, name, queries.Refs(be.client, be.keys), top)

    def refit_status(_request: Request, be: Backend, _s: sessions.Session | None) -> dict[str, Any]:
        return refit.status(be.client, be.keys)

    def refit_start(request: Request, be: Backend, s: sessions.Session | None) -> dict[str, Any]:
        assert s is not None
        body = request.state.body
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, str):
            raise InvalidParameterError('the body must be {"version": …}', valid=be.versions)
        return refit.start(
            be.client,
            be.keys,
            version,
            versions=be.versions,
            model_name=be.model_name,
            reviewer=s.key_id,
            env=be.env,
            out_root=be.refit_dir,
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        return _json({"error": "not_found", "detail": f"no page {request.url.path[:80]!r}"}, 404)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/session", endpoint(login, session=False, post=True), methods=["POST"]),
        Route("/logout", endpoint(logout, post=True), methods=["POST"]),
        Route("/api/me", endpoint(me), methods=["GET"]),
        Route("/api/queue", endpoint(queue), methods=["GET"]),
        Route("/api/flags/{ref}", endpoint(flag), methods=["GET"]),
        Route("/api/flags/{ref}/{kind:str}.png", endpoint(image), methods=["GET"]),
        Route("/api/flags/{ref}/resolve", endpoint(resolve, post=True), methods=["POST"]),
        Route("/api/concepts/{concept}", endpoint(concept), methods=["GET"]),
        Route("/api/refit", endpoint(refit_status), methods=["GET"]),
        Route("/api/refit", endpoint(refit_start, post=True), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found})


__all__ = ["Backend", "service_backend", "ui_app"]
