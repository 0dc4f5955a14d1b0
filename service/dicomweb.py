"""DICOM in, DICOM out over HTTP, in DICOMweb's conventions (PS3.18).

* ``POST /audit`` with ``Accept: multipart/related; type="application/dicom"`` (and a DICOM body):
  the audit as DICOM objects (:mod:`medaudit.service.dicom_out`: SEG, Parametric Map, Comprehensive
  SR), one part each, instead of JSON. A bare ``Accept: application/dicom`` is a 406: an audit
  creates up to three instances, and one part holds one.
* ``POST /dicomweb/studies`` (STOW-RS): a ``multipart/related; type="application/dicom"`` body of up
  to ``MEDAUDIT_STOW_MAX_INSTANCES`` instances, each audited (concurrently: the auditor batches
  them) and answered in JSON, one entry per instance in order: what was created, with its WADO-RS
  URL, or why the instance failed (a truncated file, an unsupported transfer syntax), without
  failing the others. 200 when all were audited, 202 when some failed, 409 when none was.
* ``GET /dicomweb/studies/{study}[/series/{series}[/instances/{instance}]]`` (WADO-RS): the created
  objects, for ``MEDAUDIT_DICOM_TTL_S`` seconds (:class:`~service.dicom_store.InstanceStore`), as
  ``multipart/related; type="application/dicom"``; one instance also as ``application/dicom``.

``?frames=first`` (default), ``all`` (up to ``MEDAUDIT_DICOM_MAX_FRAMES``) or ``1,3`` picks the
frames of a multi-frame instance to audit; every frame of one instance is audited by one version.
DICOM out is always the full audit: ``/audit?detail=scores`` (a screen, no heatmap or masks) asking
for DICOM is a 406 naming the choice.

No patient identifier leaves the instance: none is logged, used as a metric label, put in an error
body or in a flag. Without ``X-Subject-Key``, an instance is routed by a keyed hash of its Patient
ID when ``MEDAUDIT_SUBJECT_SECRET`` is set (the flag then stores an HMAC of that keyed hash).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from medaudit.service import metrics
from medaudit.service.dicom_out import Algorithm, DicomObject, FrameAudit, Geometry, write_objects
from medaudit.service.dicom_store import (
    DICOM,
    MULTIPART_RELATED,
    DicomWebSettings,
    InstanceStore,
    content_type_params,
    multipart_related,
    parse_multipart_related,
)
from medaudit.service.endpoints import DICOMWEB_MOUNT, STOW, WADO_INSTANCE, WADO_SERIES, WADO_STUDY
from medaudit.service.errors import (
    AuditError,
    InvalidParameterError,
    InvalidUploadError,
    NotAcceptableError,
    UnknownInstanceError,
    UnsupportedMediaTypeError,
    error_response,
)
from medaudit.service.inputs import Limits, check_body_size, decode_dicom, detect_format
from medaudit.service.uploads import BodyTooLargeError, limited, read_body, too_large

log = logging.getLogger(__name__)

#: The request headers an audit reads (routing and the request id); nothing else is passed on.
_ROUTING_HEADERS = ("x-model-version", "x-subject-key")


class DicomWeb:
    """The DICOMweb side of one service instance: its settings and its instance store."""

    def __init__(self, settings: DicomWebSettings) -> None:
        self.settings = settings
        self.store = InstanceStore(settings.store_dir, settings.ttl_s)
        self.store.start_sweeping()


def state(svc: Any) -> DicomWeb:
    """The service's :class:`DicomWeb`, built from the environment on first use."""
    web = svc.__dict__.get("_dicomweb")
    if web is None:
        web = svc.__dict__["_dicomweb"] = DicomWeb(DicomWebSettings.from_env(os.environ))
    return web


# ------------------------------------------------------------------------------- negotiation


def _accepted(headers: Mapping[str, str]) -> list[tuple[str, dict[str, str]]]:
    return [content_type_params(a) for a in headers.get("accept", "").split(",") if a.strip()]


def wants_dicom(headers: Mapping[str, str]) -> bool:
    """Whether ``Accept`` asks for DICOM (multipart/related of application/dicom, or application/dicom)."""
    return any(
        base == DICOM or (base == MULTIPART_RELATED and params.get("type", "").lower() == DICOM)
        for base, params in _accepted(headers)
    )


def _single_part(headers: Mapping[str, str]) -> bool:
    """``Accept: application/dicom`` without the multipart form."""
    bases = {base for base, _ in _accepted(headers)}
    return DICOM in bases and MULTIPART_RELATED not in bases


def parse_frames(value: str | None) -> list[int] | None:
    """``first`` (default) -> [1]; ``all`` -> None; ``1,3`` -> [1, 3]."""
    v = (value or "first").strip().lower()
    if v == "first":
        return [1]
    if v == "all":
        return None
    try:
        frames = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        frames = []
    if not frames or min(frames) < 1:
        raise InvalidParameterError(
            f"frames={value!r}: write first, all, or 1-based frame numbers such as 1,3",
            valid=["first", "all", "1,2,..."],
        )
    return list(dict.fromkeys(frames))


def wado_url(obj: DicomObject) -> str:
    return (
        f"{DICOMWEB_MOUNT}/studies/{obj.study_instance_uid}/series/{obj.series_instance_uid}"
        f"/instances/{obj.sop_instance_uid}"
    )


# ------------------------------------------------------------------------------- one instance


def _subject(headers: Mapping[str, str], ds: Any, secret: str | None) -> dict[str, str]:
    """The routing headers of an instance's audits: the caller's, else, with a secret, a keyed
    hash of the Patient ID (never the ID itself)."""
    out = {k: headers[k] for k in _ROUTING_HEADERS if headers.get(k)}
    patient = str(ds.get("PatientID", "") or "")
    if "x-subject-key" not in out and secret and patient:
        out["x-subject-key"] = hmac.new(secret.encode(), patient.encode(), hashlib.sha256).hexdigest()
    return out


async def audit_instance(
    svc: Any, web: DicomWeb, data: bytes, headers: Mapping[str, str], rid: str, frames: list[int] | None
) -> tuple[dict[str, Any], list[DicomObject]]:
    """Audits the asked frames of one DICOM instance and writes (and stores) its DICOM objects.

    Returns the instance's JSON entry (version, frames, each frame's prediction and flag, the
    created objects with their WADO-RS URLs, notes) and the objects.
    """
    settings = web.settings
    ds, images = await anyio.to_thread.run_sync(
        lambda: decode_dicom(data, svc.settings.limits, frames, settings.max_frames)
    )
    numbers = frames or list(range(1, len(images) + 1))
    routing = _subject(headers, ds, settings.subject_secret)
    suffix = (lambda n: "") if len(images) == 1 else (lambda n: f".f{n}")
    first = await svc.audit_async(images[0], routing, True, rid + suffix(numbers[0]))
    version = first["version"]
    pinned = {**routing, "x-model-version": version}  # every frame by the same version
    rest = await asyncio.gather(
        *(
            svc.audit_async(im, pinned, True, rid + suffix(n))
            for n, im in zip(numbers[1:], images[1:], strict=True)
        )
    )
    answers = [first, *rest]
    engine = svc.engines[version]
    algorithm = Algorithm(engine.tag, engine.card.files.get("weights", {}).get("sha256", ""))
    geometry = Geometry(engine.size, engine.cfg.resize, engine.cfg.crop_pct)
    audits = [FrameAudit(n, a) for n, a in zip(numbers, answers, strict=True)]

    def write() -> list[DicomObject]:
        objs = write_objects(ds, audits, algorithm, geometry)
        for o in objs:
            web.store.put(o.study_instance_uid, o.series_instance_uid, o.sop_instance_uid, o.to_bytes())
        return objs

    objs = await anyio.to_thread.run_sync(write)
    entry = {
        "status": "ok",
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "version": version,
        "frames": [
            {
                "frame": a.frame,
                "request_id": rid + suffix(a.frame),
                "prediction": a.answer["prediction"],
                "concepts": [{k: v for k, v in c.items() if k != "mask_png"} for c in a.answer["concepts"]],
                "flag": a.answer["flag"],
            }
            for a in audits
        ],
        "objects": [{**o.ref_json(), "url": wado_url(o)} for o in objs],
        "notes": list(images[0].notes),
    }
    return entry, objs


# ------------------------------------------------------------------------------- HTTP


def _log_failure(what: str, e: BaseException) -> None:
    """Logs an unexpected failure by its type and where it was raised, not its message: a DICOM
    library's message may quote an attribute's value, and the instance carries patient data."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:])
    log.error("%s failed: %s at %s", what, type(e).__name__, where)


def _rid(headers: Mapping[str, str]) -> str:
    return headers.get("x-request-id") or uuid.uuid4().hex


def _keep_sessions(svc: Any) -> None:
    from medaudit.service.dependencies import keep_sessions

    if not getattr(svc, "_sessions_kept", True):
        for dependency in (svc.batcher, svc.auditor):
            keep_sessions(dependency)
        svc._sessions_kept = True


async def audit_response(svc: Any, ctx: Any, image: bytes) -> Response:
    """``POST /audit`` answered in DICOM (the caller checked :func:`wants_dicom`)."""
    headers = ctx.request.headers
    rid = _rid(headers)
    t0 = time.perf_counter()
    try:
        svc.authenticate(headers)
        if _single_part(headers):
            raise NotAcceptableError(
                "an audit creates up to three DICOM instances: ask for "
                'Accept: multipart/related; type="application/dicom"'
            )
        detail = ctx.request.query_params.get("detail", "full")
        if detail != "full":  # a screen has no heatmap or masks: no SEG or Parametric Map to write
            raise NotAcceptableError(
                f"DICOM output is the full audit (SEG, Parametric Map, SR); detail={detail!r} "
                "is answered in JSON only: drop detail or ask for Accept: application/json"
            )
        if detect_format(bytes(image[:132])) != "dicom":
            raise NotAcceptableError(
                "DICOM output needs a DICOM input; send a DICOM Part-10 file or ask for JSON"
            )
        web = state(svc)
        _keep_sessions(svc)
        frames = parse_frames(ctx.request.query_params.get("frames"))
        entry, objs = await audit_instance(svc, web, image, headers, rid, frames)
    except AuditError as e:
        metrics.REQUESTS.labels("/audit", "none", e.code).inc()
        return svc._error(ctx, e, rid)  # BentoML answers with the context's status: set it there
    except Exception as e:
        _log_failure(f"DICOM out of request {rid}", e)
        metrics.REQUESTS.labels("/audit", "none", "server_error").inc()
        ctx.response.status_code = 500
        return JSONResponse(
            {"error": "internal_error", "detail": "the service failed on this request; quote its request id"},
            status_code=500,
            headers={"X-Request-ID": rid},
        )
    body, ctype = multipart_related((o.to_bytes(), wado_url(o)) for o in objs)
    metrics.REQUESTS.labels("/audit", entry["version"], "ok").inc()
    metrics.STAGE_SECONDS.labels("/audit", "total").observe(time.perf_counter() - t0)
    return Response(
        body,
        media_type=ctype,
        headers={"X-Request-ID": rid, "X-Model-Version": entry["version"]},
    )


async def _stow(request: Request) -> JSONResponse:
    svc = request.state.service
    headers = request.headers
    rid = _rid(headers)
    try:
        svc.authenticate(headers)
        web = state(svc)
        limit = web.settings.max_request_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit():
            check_body_size(int(declared), Limits(max_bytes=limit))
        try:
            body = await read_body(limited(request.receive, limit))
        except BodyTooLargeError as e:
            raise too_large(e.seen, limit) from None
        try:
            parts = parse_multipart_related(body, headers.get("content-type", ""))
        except ValueError as e:
            raise InvalidUploadError(f"cannot read the STOW-RS body: {e}") from None
        if len(parts) > web.settings.max_instances:
            raise InvalidUploadError(
                f"{len(parts)} instances in one request, more than {web.settings.max_instances} "
                "(MEDAUDIT_STOW_MAX_INSTANCES); send them in several requests",
                max_instances=web.settings.max_instances,
            )
        frames = parse_frames(request.query_params.get("frames"))
        _keep_sessions(svc)
    except AuditError as e:
        metrics.REQUESTS.labels(STOW.path, "none", e.code).inc()
        return error_response(e, rid)

    async def one(i: int, ctype: str, data: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            if ctype.split(";", 1)[0].strip().lower() != DICOM:
                raise UnsupportedMediaTypeError(f"part {i} is {ctype!r}; STOW-RS parts must be {DICOM}")
            entry, _ = await audit_instance(svc, web, data, headers, f"{rid}.{i}", frames)
        except AuditError as e:
            metrics.REQUESTS.labels(STOW.path, "none", e.code).inc()
            return {"index": i, "status": "failed", "http_status": e.status, **e.to_json()}
        except Exception as e:  # one instance's failure is not the request's
            _log_failure(f"STOW-RS instance {i} of request {rid}", e)
            metrics.REQUESTS.labels(STOW.path, "none", "server_error").inc()
            return {
                "index": i,
                "status": "failed",
                "http_status": 500,
                "error": "internal_error",
                "detail": "the service failed on this instance; quote the request id",
            }
        metrics.REQUESTS.labels(STOW.path, entry["version"], "ok").inc()
        metrics.STAGE_SECONDS.labels(STOW.path, "total").observe(time.perf_counter() - t0)
        return {"index": i, **entry}

    results = await asyncio.gather(*(one(i, c, d) for i, (c, d) in enumerate(parts)))
    ok = sum(r["status"] == "ok" for r in results)
    status = 200 if ok == len(results) else 202 if ok else 409
    body_json = {
        "request_id": rid,
        "instances": results,
        "audited": ok,
        "failed": len(results) - ok,
        "retrievable_for_s": web.settings.ttl_s,
    }
    return JSONResponse(body_json, status_code=status, headers={"X-Request-ID": rid})


async def _retrieve(request: Request) -> Response:
    svc = request.state.service
    headers = request.headers
    rid = _rid(headers)
    p = request.path_params
    try:
        svc.authenticate(headers)
        found = state(svc).store.get(p["study"], p.get("series"), p.get("instance"))
        if not found:
            what = "/".join(str(p[k]) for k in ("study", "series", "instance") if k in p)
            raise UnknownInstanceError(
                f"no DICOM object {what} here: never created by this service, or older than "
                f"{state(svc).settings.ttl_s} s (MEDAUDIT_DICOM_TTL_S)"
            )
    except AuditError as e:
        return error_response(e, rid)
    if "instance" in p and _single_part(headers):
        return Response(found[0], media_type=DICOM, headers={"X-Request-ID": rid})
    body, ctype = multipart_related((f, None) for f in found)
    return Response(body, media_type=ctype, headers={"X-Request-ID": rid})


dicomweb_app = Starlette(
    routes=[
        HttpRoute(STOW.route, _stow, methods=[STOW.method]),
        HttpRoute(WADO_STUDY.route, _retrieve, methods=[WADO_STUDY.method]),
        HttpRoute(WADO_SERIES.route, _retrieve, methods=[WADO_SERIES.method]),
        HttpRoute(WADO_INSTANCE.route, _retrieve, methods=[WADO_INSTANCE.method]),
    ],
)
