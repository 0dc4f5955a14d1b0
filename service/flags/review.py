"""Reviewing flags: list the open ones, show one with its heatmap, resolve it with a verdict.

Plain functions on a Redis client (bytes client, :func:`medaudit.service.flags.redis_conn.connect`) that
return JSON-ready dicts and raise :class:`medaudit.service.errors.AuditError` subclasses carrying their HTTP
status, plus :func:`review_app`, a small Starlette app the HTTP service mounts behind the reviewer
role::

    GET  /reviews?status=open|resolved&limit=50&offset=0   list (open: oldest first)
    GET  /reviews/{flag_id}?images=1                        one flag (+ base64 heatmap/mask PNGs)
    POST /reviews/{flag_id}/resolve  {"verdict", "note"}    resolve it

Verdicts: ``artifact_confirmed`` (the artifact is there and drove the answer), ``false_alarm``
(no artifact, or not the concept flagged) and ``other`` (the flag is right for another reason, or
unclear). Resolving is atomic (:data:`RESOLVE_LUA`): a flag is resolved once; the second attempt
gets 409 with who resolved it and how. Resolving also removes the TTL of the flag's feature
vector, so reviewed samples stay available to ``medaudit refine-cav`` after the 7-day blob TTL.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import redis
from PIL import Image

from medaudit.service.endpoints import RESOLVE, REVIEW, REVIEWS
from medaudit.service.errors import (
    AlreadyResolvedError,
    AuditError,
    InvalidReviewError,
    ReviewStoreUnavailableError,
    UnknownFlagError,
    error_response,
)
from medaudit.service.flags.events import FlagKeys

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request

VERDICTS = ("artifact_confirmed", "false_alarm", "other")
STATUSES = ("open", "resolved")
MAX_NOTE = 4000
MAX_LIMIT = 500
#: Largest page offset: Redis ranks are 64-bit, and no review queue reaches a billion flags.
MAX_OFFSET = 10**9

#: KEYS: [review, open index, resolved index, feature key…]; ARGV: [flag id, verdict, note,
#: reviewer, resolved_at, score ms]. Returns {"ok", kept features (0/1)}, {"missing"} or
#: {"resolved", verdict, reviewer, resolved_at}.
RESOLVE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local st = redis.call('HMGET', KEYS[1], 'status', 'verdict', 'reviewer', 'resolved_at')
if st[1] ~= 'open' then return {'resolved', st[2] or '', st[3] or '', st[4] or ''} end
redis.call('HSET', KEYS[1], 'status', 'resolved', 'verdict', ARGV[2], 'note', ARGV[3],
           'reviewer', ARGV[4], 'resolved_at', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
local kept = 0
for k = 4, #KEYS do
  redis.call('PERSIST', KEYS[k])
  kept = kept + redis.call('EXISTS', KEYS[k])
end
redis.call('HSET', KEYS[1], 'features_kept', tostring(kept))
return {'ok', tostring(kept)}
"""


# --------------------------------------------------------------------------------- functions

_SUMMARY = (
    "flag_id",
    "request_id",
    "model_version",
    "concept",
    "severity",
    "score",
    "percentile",
    "relevance_share",
    "label",
    "probability",
    "created_at",
    "status",
    "verdict",
    "reviewer",
    "resolved_at",
)
_FLOATS = {"score", "threshold", "percentile", "relevance_share", "probability"}
_INTS = {"created_ms", "features_dim", "schema", "features_kept"}


def _record(raw: dict[Any, Any]) -> dict[str, Any]:
    """A review hash as JSON-ready values (numbers parsed, reasons a list)."""
    d: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
    for k in _FLOATS & d.keys():
        d[k] = float(d[k])
    for k in _INTS & d.keys():
        d[k] = int(d[k])
    if "reasons" in d:
        d["reasons"] = json.loads(d["reasons"])
    cd = d.get("corrected_disagrees", "")
    d["corrected_disagrees"] = None if cd == "" else cd == "1"
    if "corrected_probability" in d:  # "" when no corrected version answered
        d["corrected_probability"] = float(d["corrected_probability"]) if d["corrected_probability"] else None
    return d


def list_reviews(
    client: redis.Redis,
    keys: FlagKeys | None = None,
    status: str = "open",
    limit: int = 50,
    offset: int = 0,
) -> dict[str, Any]:
    """One page of flags: ``open`` oldest first (a queue), ``resolved`` newest first.

    Returns:
        ``{"status", "total", "offset", "limit", "items": [summary…]}``.

    Raises:
        InvalidReviewError: Unknown status, or limit/offset out of range (422).
        ReviewStoreUnavailableError: Redis does not answer (503).
    """
    keys = keys or FlagKeys()
    if status not in STATUSES:
        raise InvalidReviewError(f"unknown status {status!r}; valid: {', '.join(STATUSES)}", valid=STATUSES)
    if not 1 <= limit <= MAX_LIMIT or not 0 <= offset <= MAX_OFFSET:
        raise InvalidReviewError(
            f"limit must be in [1, {MAX_LIMIT}] and offset in [0, {MAX_OFFSET}]; got {limit}, {offset}"
        )
    index = keys.open_index if status == "open" else keys.resolved_index
    with _available():
        total = int(client.zcard(index))
        ids = client.zrange(index, offset, offset + limit - 1, desc=status == "resolved")
        pipe = client.pipeline(transaction=False)
        for fid in ids:
            pipe.hmget(keys.review(_text(fid)), _SUMMARY)
        rows = pipe.execute()
    items = []
    for values in rows:
        rec = _record({k: v for k, v in zip(_SUMMARY, values, strict=True) if v is not None})
        items.append(rec)
    return {"status": status, "total": total, "offset": offset, "limit": limit, "items": items}


def get_review(
    client: redis.Redis, flag_id: str, keys: FlagKeys | None = None, *, images: bool = False
) -> dict[str, Any]:
    """One flag's full record; with ``images``, its heatmap and mask PNGs as base64 (None if expired).

    Raises:
        UnknownFlagError: No such flag (404).
        ReviewStoreUnavailableError: Redis does not answer (503).
    """
    keys = keys or FlagKeys()
    with _available():
        raw = client.hgetall(keys.review(flag_id))
        if not raw:
            raise UnknownFlagError(flag_id)
        rec = _record(raw)
        names = ("heatmap", "mask", "features", "image", "heat_layer")
        blob_keys = [rec.get(f"{n}_key", "") for n in names]
        present = dict(zip(names, (bool(k) and bool(client.exists(k)) for k in blob_keys), strict=True))
        # image and heat_layer: the bare input and the heatmap alone, from which the blend is
        # composed; records from before they were stored have the blend only
        present["heatmap"] = present["heatmap"] or (present["image"] and present["heat_layer"])
        rec["available"] = present
    if images:
        pngs = review_images(client, flag_id, keys)
        for name in ("heatmap", "mask"):
            data = pngs[name]
            rec[f"{name}_png"] = None if data is None else _b64(data)
    return rec


def review_images(client: redis.Redis, flag_id: str, keys: FlagKeys | None = None) -> dict[str, bytes | None]:
    """The flag's PNGs as bytes: ``{"heatmap", "mask", "image", "heat_layer"}`` (None where expired
    or absent; older records have no ``image`` and ``heat_layer``)."""
    keys = keys or FlagKeys()
    names = ("heatmap", "mask", "image", "heat_layer")
    with _available():
        rec = client.hmget(keys.review(flag_id), ["flag_id", *(f"{n}_key" for n in names)])
        if rec[0] is None:
            raise UnknownFlagError(flag_id)
        out: dict[str, bytes | None] = {}
        for name, key in zip(names, rec[1:], strict=True):
            out[name] = cast("bytes | None", client.get(key)) if key else None
    if out["heatmap"] is None and out["image"] is not None and out["heat_layer"] is not None:
        out["heatmap"] = compose_blend(out["image"], out["heat_layer"])
    return out


#: The heatmap layer's weight in the blend: ``medaudit.service.audit.overlay``'s ``alpha``, the
#: workbench's default heatmap opacity.
BLEND_OPACITY = 0.6


def compose_blend(image_png: bytes, layer_png: bytes, opacity: float = BLEND_OPACITY) -> bytes:
    """The image with its heatmap layer drawn over it at ``opacity``: the blend ``/audit`` returns as
    ``heatmap_png`` (to within a grey level of rounding), as PNG bytes (~14 ms at 224 px, 2 busy cores)."""
    rgb = np.asarray(Image.open(io.BytesIO(image_png)).convert("RGB"), dtype=np.float64)
    layer = np.asarray(Image.open(io.BytesIO(layer_png)).convert("RGBA"), dtype=np.float64)
    if layer.shape[:2] != rgb.shape[:2]:
        raise ValueError(f"heatmap layer {layer.shape[:2]} and image {rgb.shape[:2]} differ in size")
    a = opacity * layer[..., 3:] / 255.0
    out = np.clip(np.rint((1 - a) * rgb + a * layer[..., :3]), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def resolve_review(
    client: redis.Redis,
    flag_id: str,
    verdict: str,
    note: str = "",
    *,
    reviewer: str,
    keys: FlagKeys | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Records a verdict (atomically, once) and returns the resolved record.

    Raises:
        InvalidReviewError: A verdict not in :data:`VERDICTS`, an over-long note, no reviewer (422).
        UnknownFlagError: No such flag (404).
        AlreadyResolvedError: Resolved before (409), naming the earlier verdict and reviewer.
        ReviewStoreUnavailableError: Redis does not answer (503).
    """
    keys = keys or FlagKeys()
    if verdict not in VERDICTS:
        raise InvalidReviewError(f"unknown verdict {verdict!r}; valid: {', '.join(VERDICTS)}", valid=VERDICTS)
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise InvalidReviewError(f"note must be a string of at most {MAX_NOTE} characters")
    if not reviewer or not reviewer.strip():
        raise InvalidReviewError("a resolution needs the reviewer's name")
    now = now or datetime.now(UTC)
    with _available():
        features_key = client.hget(keys.review(flag_id), "features_key")
        extra = [_text(features_key)] if features_key else []
        script = client.register_script(RESOLVE_LUA)
        res = [
            _text(x)
            for x in script(
                keys=[keys.review(flag_id), keys.open_index, keys.resolved_index, *extra],
                args=[
                    flag_id,
                    verdict,
                    note,
                    reviewer.strip(),
                    now.isoformat(timespec="seconds"),
                    int(now.timestamp() * 1000),
                ],
            )
        ]
    if res[0] == "missing":
        raise UnknownFlagError(flag_id)
    if res[0] == "resolved":
        raise AlreadyResolvedError(flag_id, *res[1:4])
    return get_review(client, flag_id, keys)


# --------------------------------------------------------------------------------- HTTP


def review_app(
    client: redis.Redis | Callable[[Request], redis.Redis],
    keys: FlagKeys | Callable[[Request], FlagKeys] | None = None,
    *,
    authorize: Callable[[Request], str] | None = None,
) -> Starlette:
    """The reviewer endpoints (:mod:`medaudit.service.endpoints`) as a Starlette app, to mount at
    ``/reviews``.

    Args:
        client: A bytes Redis client shared by the app's requests, or a callable taking the
            request and returning it, called per request: so the app can be built at import
            (BentoML mounts ASGI apps at class definition) and the client in the service's
            ``__init__`` (the service reaches it through ``request.app.state``).
        keys: Key layout, or a callable taking the request and returning it (same reason).
        authorize: ``authorize(request) -> reviewer name``; raises an :class:`AuditError` (401/403)
            for a request without the reviewer role. The service passes one built on its
            :class:`~service.auth.KeyStore` (e.g. ``principal.require(Role.REVIEWER)`` and
            ``principal.key_id``). None: every request is ``"anonymous"`` (demos with auth off).
    """
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    auth = authorize or (lambda _req: "anonymous")

    def r(request: Request) -> redis.Redis:
        return client(request) if callable(client) else client

    def k(request: Request) -> FlagKeys:
        return (keys(request) if callable(keys) else keys) or FlagKeys()

    def guarded(fn: Callable[[Request, str], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> JSONResponse:
            import anyio.to_thread

            # Every answer carries X-Request-ID (the caller's, else a new one), as the service's
            # other routes do; an error body carries it too. A success body does not: a flag's own
            # ``request_id`` there is the audited request's, which reviewers look up by.
            rid = request.headers.get("x-request-id") or uuid.uuid4().hex
            try:
                reviewer = auth(request)
                body = None
                if request.method == "POST":
                    try:
                        body = await request.json()
                    except ValueError:
                        raise InvalidReviewError('the body must be JSON: {"verdict": …, "note": …}') from None
                request.state.body = body
                result = await anyio.to_thread.run_sync(fn, request, reviewer)
            except AuditError as e:
                return error_response(e, rid)
            return JSONResponse(result, headers={"X-Request-ID": rid})

        return endpoint

    def list_(request: Request, _reviewer: str) -> dict[str, Any]:
        q = request.query_params
        try:
            limit, offset = int(q.get("limit", 50)), int(q.get("offset", 0))
        except ValueError:
            raise InvalidReviewError("limit and offset must be integers") from None
        return list_reviews(r(request), k(request), q.get("status", "open"), limit, offset)

    def show(request: Request, _reviewer: str) -> dict[str, Any]:
        images = request.query_params.get("images", "1").lower() not in ("0", "false", "no", "off")
        return get_review(r(request), request.path_params["flag_id"], k(request), images=images)

    def resolve(request: Request, reviewer: str) -> dict[str, Any]:
        body = request.state.body
        if not isinstance(body, dict) or not isinstance(body.get("verdict"), str):
            raise InvalidReviewError('the body must be a JSON object with a "verdict" string', valid=VERDICTS)
        return resolve_review(
            r(request),
            request.path_params["flag_id"],
            body["verdict"],
            body.get("note") or "",
            reviewer=reviewer,
            keys=k(request),
        )

    return Starlette(
        routes=[
            Route(REVIEWS.route, guarded(list_), methods=[REVIEWS.method]),
            Route(REVIEW.route, guarded(show), methods=[REVIEW.method]),
            Route(RESOLVE.route, guarded(resolve), methods=[RESOLVE.method]),
        ]
    )


# --------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _available() -> Iterator[None]:
    """Turns Redis connection failures into a 503 :class:`ReviewStoreUnavailableError`."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise ReviewStoreUnavailableError(
            f"the review queue is unavailable: Redis does not answer ({e})"
        ) from e


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)
