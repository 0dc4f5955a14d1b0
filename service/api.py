"""The BentoML service: HTTP <-> :mod:`medaudit.service.audit` translation, nothing else.

Endpoints (listed once, in :mod:`medaudit.service.endpoints`; every response carries
``X-Request-ID`` and, when a model answered, ``X-Model-Version``):

=======================  ====================================================================
``POST /predict``        raw image body (PNG, JPEG, TIFF, GIF, DICOM) -> prediction (``?detail=``:
                         ``scores`` screens, ``full`` audits; :mod:`~medaudit.service.screening`)
``POST /audit``          raw image body -> prediction, heatmap, concept scores, flag decision
                         (``?raw_heatmap=1`` adds the float16 map; ``?detail=scores`` screens)
``POST /compare``        raw image body -> audits by several versions (``?versions=a,b``;
                         default all served) side by side, with agreement
``GET /models``          served versions, A/B weights, shadow and its agreement counters
``GET /models/{v}``      one version's model card
``GET /models/_route``   which version would answer these headers (``X-Subject-Key``,
                         ``X-Model-Version``), without running a model: A/B debugging
``/reviews``             the review queue (:mod:`medaudit.service.flags.review`)
``/readyz``              200 only after every version is loaded and warmed (BentoML's own)
``GET /openapi.json``    the OpenAPI 3.1 contract of all of the above (:mod:`medaudit.service.openapi`);
                         BentoML's own ``/docs.json`` stays for its UI and clients
=======================  ====================================================================

The image is the whole request body (BentoML 1.4 *root input*), e.g.
``curl --data-binary @x.png -H 'Content-Type: image/png' localhost:3000/audit``; a multipart form
upload (``curl -F image=@x.png …``) works too (:class:`~service.middleware.UploadNormalizer`).
Version choice: ``X-Model-Version`` wins, else the :class:`~service.routing.Router` hashes
``X-Subject-Key`` (random with the A/B weights when there is none). A shadow version, if
configured, also predicts every request and its agreement with the answering version is counted.

Flags: the audit engine scores; the flag policy (:mod:`medaudit.service.flags.policy`, built once
from :class:`~service.config.Settings`) decides, once per answered audit.

Errors: an :class:`~service.errors.AuditError` becomes its status with body
``{"error", "detail", ..., "request_id"}`` (:func:`~service.errors.error_response`); what the
frameworks answer themselves (no such route, wrong method, BentoML's 500) is given the same body
by :class:`~service.middleware.JsonErrorBodies`.

Work is adaptively batched in two dependent BentoML services (each its own process under
``bentoml serve``): :class:`MedAudit` authenticates, decodes, routes and resizes, then awaits
:class:`Predictor` (``/predict`` and shadow predictions: one ONNX Runtime run per version per
batch) or :class:`Auditor` (``/audit`` and ``/compare``: one LRP call per version per batch).
BentoML's batchable APIs take one list argument and lose per-request headers, which is why the
split is there: everything that needs the request stays in :class:`MedAudit`.

The GET routes live in small Starlette apps mounted at ``/models`` and ``/reviews`` because
BentoML 1.4 API routes are POST-only; they reach the service instance through
``request.state.service``, which :class:`~service.middleware.ServiceState` takes from BentoML
once the service has started. Settings are read
from the environment once, in ``__init__`` (see :mod:`medaudit.service.config`;
``MEDAUDIT_AUTH=off`` for demos).
"""

from __future__ import annotations

# First: the process environment and the BentoML patches, before torch and BentoML load.
from medaudit.service import bootstrap  # noqa: F401  # isort: skip

import asyncio
import gc
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import anyio.to_thread
import bentoml
import numpy as np
import torch
from bentoml.exceptions import ServiceUnavailable
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route as HttpRoute

from medaudit.service import dicomweb, metrics, ui
from medaudit.service.audit import (
    PREDICT_BACKENDS,
    AuditEngine,
    AuditResult,
    Comparison,
    compare,
)
from medaudit.service.audit_pool import AuditPool, LaneSpec, audit_jobs, by_version
from medaudit.service.auth import ANONYMOUS, Principal, Role
from medaudit.service.config import Settings
from medaudit.service.dependencies import AUDIT_DEADLINE_S, PREDICT_DEADLINE_S, call_dependency, keep_sessions
from medaudit.service.endpoints import (
    AUDIT,
    COMPARE,
    MODEL_CARD,
    MODELS,
    MODELS_MOUNT,
    PREDICT,
    REVIEWS_MOUNT,
    ROUTE,
)
from medaudit.service.errors import (
    AuditError,
    PoolOverloadedError,
    UnknownModelVersionError,
    error_response,
)
from medaudit.service.flags.policy import evaluate
from medaudit.service.inputs import DecodedImage, decode_image
from medaudit.service.middleware import (
    ApiVersionHeader,
    JsonErrorBodies,
    OpenAPIDocument,
    ServiceState,
    UploadNormalizer,
)
from medaudit.service.routing import Route
from medaudit.service.screening import Screening

log = logging.getLogger(__name__)

#: The batched services are internal hops: one access-log line per merged job is noise (the entry
#: service logs every request) and, at hundreds of requests a second, measurable CPU.
_INTERNAL_LOGGING: Any = {"access": {"enabled": False}}
#: The raw request body. ``bytes``, not a file type: BentoML spools a file-typed root input to a
#: temporary file (mkstemp, write, and here stat and read back: ~9 % of the entry service's
#: samples under /predict load, py-spy) although it has read the whole body into memory first;
#: a string-typed root is handed over as the bytes it read. The body's size was bounded before
#: BentoML read it (:class:`~service.middleware.UploadNormalizer`: 413 past MEDAUDIT_MAX_BYTES).
ImageBody = bytes


class ShadowStats:
    """In-memory agreement counters of (answering version, shadow version) pairs. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str, bool]] = Counter()

    def record(self, version: str, shadow: str, agree: bool) -> None:
        with self._lock:
            self._counts[(version, shadow, agree)] += 1
        metrics.SHADOW.labels(version, shadow, str(agree).lower()).inc()

    def to_json(self) -> list[dict[str, Any]]:
        with self._lock:
            pairs = sorted({(v, s) for v, s, _ in self._counts})
            return [
                {
                    "version": v,
                    "shadow": s,
                    "agree": self._counts[(v, s, True)],
                    "disagree": self._counts[(v, s, False)],
                }
                for v, s in pairs
            ]


def freeze_startup_heap() -> None:
    """Takes what a service allocated while starting (torch, BentoML, pydantic schemas, the
    models: ~520k objects in the entry service) out of the cyclic garbage collector's full passes.

    Every full (generation-2) collection walked all of them: 285 ms in the entry service, during
    which every request in flight waited. That was the /predict p99 (~420 ms against a p50 of ~100
    under load; benchmarks/serve.py). They live as long as the process, so nothing is lost by never
    scanning them again (``gc.freeze``, the documented way to do this). Call it once, last in
    ``__init__``.
    """
    gc.collect()
    gc.freeze()


@bentoml.service(name="medaudit-predictor", traffic={"timeout": 60}, logging=_INTERNAL_LOGGING)
class Predictor:
    """Predictions of every served version behind one adaptively batched API.

    BentoML's batchable APIs take one list argument and lose per-request headers, so routing, auth
    and decoding stay in :class:`MedAudit`, which sends model-size pixels here; concurrent
    requests are merged into one model run per version (``max_latency_ms`` bounds the wait).
    ONNX Runtime by default; ``MEDAUDIT_PREDICT_BACKEND=torch`` for the eager baseline.
    """

    def __init__(self) -> None:
        settings = Settings.from_env(os.environ)
        backend = PREDICT_BACKENDS[settings.predict_backend]
        if settings.predict_threads and settings.predict_backend == "torch":
            torch.set_num_threads(settings.predict_threads)
        threads = settings.predict_threads or 0
        self.predictors = {
            v: backend.from_store(settings.tag(v), ort_threads=threads) for v in settings.versions
        }
        for p in self.predictors.values():
            p.predict([np.zeros((*p.size, 3), dtype=np.uint8)])
        freeze_startup_heap()

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=32, max_latency_ms=3000)
    def predict_batch(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``[{"version", "pixels": (H, W, 3) uint8}]`` -> one prediction JSON per job, in order."""
        out: list[dict[str, Any]] = [{} for _ in jobs]
        for version, idx in by_version(jobs).items():
            metrics.BATCH_IMAGES.labels("predictor", version).observe(len(idx))
            rgb = np.stack([np.asarray(jobs[i]["pixels"], dtype=np.uint8) for i in idx])
            for i, pred in zip(idx, self.predictors[version].predict_pixels(rgb), strict=True):
                out[i] = pred.to_json()
        return out


@bentoml.service(
    name="medaudit-auditor",
    traffic={"timeout": 300},
    logging=_INTERNAL_LOGGING,
    # One BentoML worker, whatever MEDAUDIT_AUDIT_WORKERS says: several would share one listening
    # socket and the entry's keep-alive connections pile onto one of them (BentoML #5426). The
    # worker queues every audit for its LRP processes instead (service.audit_pool).
    workers=1,
)
class Auditor:
    """Audits (prediction + LRP heatmap + concept scores + flag), continuously batched.

    Every ``/audit`` and ``/compare`` job lands in one queue (:class:`~service.audit_pool.AuditPool`)
    served by LRP processes, by default one per usable core with one torch thread each
    (``MEDAUDIT_AUDIT_WORKERS``; :func:`medaudit.service.config.audit_workers` says why processes). Each
    process, whenever it is free, takes everything queued (up to 16) and audits it in one LRP call
    per version (one forward, one batched backward): the per-layer work of the backward is paid
    once per batch, which is what lets ``/audit`` keep up with ``/predict`` (benchmarks/serve.py).
    With one process (a GPU: ``MEDAUDIT_AUDIT_DEVICE``; or one core) LRP runs in this worker. The
    entry service's own engines, for direct calls, stay on the CPU.
    """

    def __init__(self) -> None:
        settings = Settings.from_env(os.environ)
        threads = settings.auditor_threads()
        engines = None
        if settings.audit_workers == 1:  # audits run in this process
            if threads:
                torch.set_num_threads(threads)
            engines = {
                v: AuditEngine.from_store(
                    settings.tag(v), fpr=settings.flag_fpr, device=settings.audit_device
                )
                for v in settings.versions
            }
            for e in engines.values():
                e.warmup()
        spec = LaneSpec(
            tuple(settings.versions),
            model_name=settings.model_name,
            fpr=settings.flag_fpr,
            threads=threads or 1,
            device=settings.audit_device,
        )
        self.pool = AuditPool.start(
            spec,
            settings.audit_workers,
            engines=engines,
            max_batch=AUDIT_MAX_BATCH,
            max_wait_s=AUDIT_MAX_WAIT_S,
        )
        log.info(
            "auditor: LRP on %s in %s, %s torch thread(s) each",
            settings.audit_device,
            ", ".join(lane.name for lane in self.pool.lanes),
            threads or torch.get_num_threads(),
        )
        freeze_startup_heap()

    @bentoml.on_shutdown
    async def close(self) -> None:
        """Stops the LRP processes. Async on purpose: BentoML awaits an async ``close`` of a
        dependency it created in-process (``MedAudit.to_asgi()``: tests, embedding) but never calls
        a sync one, and every in-process app start would leave its LRP processes running (in the
        test suite, ~20 of ~1.2 GB each until the OOM killer came)."""
        await anyio.to_thread.run_sync(self.pool.close)

    @bentoml.api
    async def audit(self, job: dict[str, Any]) -> dict[str, Any]:
        """``{"version", "pixels", "raw_heatmap"}`` -> ``{"result": audit JSON, "features", "heatmap"}``."""
        try:
            return await self.pool.audit_async(job)
        except PoolOverloadedError as e:
            raise ServiceUnavailable(str(e)) from e


#: The auditor's queue (service.audit_pool): most audits one LRP process takes at once, and the
#: estimated wait past which a new audit is refused with a 503 rather than queued.
AUDIT_MAX_BATCH = 16
AUDIT_MAX_WAIT_S = 20.0


@contextmanager
def _stage(endpoint: str, stage: str) -> Iterator[None]:
    """Times one request stage into ``medaudit_stage_seconds`` (also when it raises)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        metrics.STAGE_SECONDS.labels(endpoint, stage).observe(time.perf_counter() - t0)


def _service(request: Request) -> MedAudit:
    """The service instance answering ``request`` (:class:`~service.middleware.ServiceState`)."""
    svc: MedAudit = request.state.service
    return svc


def _models_index(request: Request) -> JSONResponse:
    svc = _service(request)
    return svc.http_get(request, svc.models_json)


def _route(request: Request) -> JSONResponse:
    svc = _service(request)
    return svc.http_get(request, lambda: svc.route(request.headers, count=False).to_json())


def _model_card(request: Request) -> JSONResponse:
    svc = _service(request)
    return svc.http_get(request, lambda: svc.card_json(request.path_params["version"]))


models_app = Starlette(
    routes=[
        HttpRoute(MODELS.route, _models_index, methods=[MODELS.method]),
        HttpRoute(ROUTE.route, _route, methods=[ROUTE.method]),
        HttpRoute(MODEL_CARD.route, _model_card, methods=[MODEL_CARD.method]),
    ],
)


def _review_client(request: Request) -> Any:
    svc = _service(request)
    if svc.review_client is None:
        from medaudit.service.errors import ReviewStoreUnavailableError

        raise ReviewStoreUnavailableError("flags are off on this service (MEDAUDIT_FLAGS=off)")
    return svc.review_client


def _review_keys(request: Request) -> Any:
    return _service(request).settings.flags.keys


def _reviewer(request: Request) -> str:
    return _service(request).authenticate(request.headers, Role.REVIEWER).key_id


def _review_app() -> Starlette:
    from medaudit.service.flags.review import review_app

    return review_app(_review_client, _review_keys, authorize=_reviewer)


reviews_app = _review_app()


@bentoml.asgi_app(ui.ui_app(), path=ui.UI_MOUNT)  # the reviewer workbench (service/ui/)
@bentoml.asgi_app(dicomweb.dicomweb_app, path=dicomweb.DICOMWEB_MOUNT)
@bentoml.asgi_app(reviews_app, path=REVIEWS_MOUNT)
@bentoml.asgi_app(models_app, path=MODELS_MOUNT)
@bentoml.service(name="medaudit", traffic={"timeout": 300})
class MedAudit:
    """Serves every configured version: predictions, audits and comparisons."""

    batcher = bentoml.depends(Predictor)
    auditor = bentoml.depends(Auditor)

    def __init__(self) -> None:
        self.settings = Settings.from_env(os.environ)
        self.router = self.settings.router()
        self.keys = self.settings.key_store()
        self.shadow_stats = ShadowStats()
        self._ready = False
        self.engines: dict[str, AuditEngine] = {}
        for v in self.settings.versions:
            eng = AuditEngine.from_store(self.settings.tag(v), fpr=self.settings.flag_fpr)
            # Served, this process resizes and routes; audits run in Auditor. Its own LRP engine
            # serves only direct calls (audit_json, compare_json), which set it up on first use.
            eng.warmup(audit=False)
            self.engines[v] = eng
            files = eng.card.files
            metrics.MODEL_INFO.labels(
                v,
                eng.tag,
                files.get("weights", {}).get("sha256", ""),
                files.get("onnx", {}).get("sha256", ""),
            ).set(1)
            log.info("serving %s (concepts: %s)", eng.tag, ", ".join(eng.bank.concepts))
        self.policy = self.settings.policy()
        self.screening = Screening(self)  # /predict and /audit by ?detail=
        self.policy.check_concepts(sorted({c for e in self.engines.values() for c in e.bank.concepts}))
        self.publisher: Any = None
        self.review_client: Any = None
        if self.settings.flags_enabled:
            from medaudit.service.flags.producer import FlagPublisher

            self.publisher = FlagPublisher.from_settings(
                self.settings, policy=self.policy, observer=self._on_publish
            )
            self.review_client = self.publisher.client
        self._sessions_kept = False
        freeze_startup_heap()
        self._ready = True

    def _on_publish(self, outcome: str, n: int) -> None:
        """The publisher's observer: outcome counters, and the spool gauge (may run before
        ``self.publisher`` is assigned, while an old spool replays)."""
        metrics.FLAG_PUBLISH.labels(outcome).inc(n)
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            metrics.SPOOL_EVENTS.set(publisher.spool.pending)

    @bentoml.on_shutdown
    def close(self) -> None:
        """Drains the flag publisher (what Redis does not take by then stays in the spool)."""
        if self.publisher is not None:
            self.publisher.close(timeout=5.0)

    def __is_ready__(self) -> bool:
        return self._ready

    # ----------------------------------------------------------------------------- helpers

    def authenticate(self, headers: Mapping[str, str], role: Role = Role.CLIENT) -> Principal:
        principal = ANONYMOUS if self.keys is None else self.keys.authenticate(headers.get("authorization"))
        principal.require(role)
        return principal

    def route(self, headers: Mapping[str, str], *, count: bool = True) -> Route:
        """The version that answers (and the shadow); counted as an A/B assignment unless told not."""
        route = self.router.route(headers.get("x-model-version"), headers.get("x-subject-key"))
        if count:
            metrics.AB_ASSIGNMENTS.labels(route.version, route.via).inc()
        return route

    def _decode(self, headers: Mapping[str, str], image: bytes) -> DecodedImage:
        # BentoML hands an empty body to a root input as "{}": the declared length tells them apart.
        if headers.get("content-length") == "0":
            return decode_image(b"", headers.get("content-type"), self.settings.limits)
        return decode_image(image, headers.get("content-type"), self.settings.limits)

    @staticmethod
    def _error(ctx: bentoml.Context, e: AuditError, rid: str) -> JSONResponse:
        # BentoML answers with the context's status and headers over those of a returned response.
        ctx.response.status_code = e.status
        for k, v in e.headers().items():
            ctx.response.headers[k] = v
        return error_response(e, rid)

    async def _serve(
        self,
        ctx: bentoml.Context,
        image: bytes,
        work: Callable[[DecodedImage, str], Awaitable[dict[str, Any]]],
    ) -> Any:
        """Request id, auth, decoding and error translation around one POST endpoint.

        Blocking steps (decoding, resizing) run in worker threads so the event loop keeps
        accepting requests: that concurrency is what the batched dependencies merge.
        """
        headers = ctx.request.headers
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        ctx.response.headers["X-Request-ID"] = rid

        def authenticate_and_decode() -> DecodedImage:
            self.authenticate(headers)
            return self._decode(headers, image)

        endpoint = ctx.request.url.path
        if not self._sessions_kept:  # here, not in __init__: resolving a dependency there builds it
            for dependency in (self.batcher, self.auditor):
                keep_sessions(dependency)
            self._sessions_kept = True
        t0 = time.perf_counter()
        try:
            decoded = await anyio.to_thread.run_sync(authenticate_and_decode)
            metrics.STAGE_SECONDS.labels(endpoint, "decode").observe(time.perf_counter() - t0)
            body = await work(decoded, rid)
        except AuditError as e:
            metrics.REQUESTS.labels(endpoint, "none", e.code).inc()
            return self._error(ctx, e, rid)
        except Exception:
            metrics.REQUESTS.labels(endpoint, "none", "server_error").inc()
            raise
        version = body.get("version", "none")
        if "version" in body:
            ctx.response.headers["X-Model-Version"] = body["version"]
        metrics.REQUESTS.labels(endpoint, version, "ok").inc()
        metrics.STAGE_SECONDS.labels(endpoint, "total").observe(time.perf_counter() - t0)
        return {"request_id": rid, **body, "notes": list(decoded.notes)}

    def http_get(self, request: Request, work: Callable[[], dict[str, Any]]) -> JSONResponse:
        """The same translation for the mounted GET routes."""
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            self.authenticate(request.headers)
            return JSONResponse({"request_id": rid, **work()}, headers={"X-Request-ID": rid})
        except AuditError as e:
            return error_response(e, rid)

    # ----------------------------------------------------------------------------- core calls
    # Each endpoint's work in two forms: synchronous on this process's engines (``*_json``: the
    # service class called directly, tier-1 tests) and asynchronous through the batched
    # dependencies (the HTTP endpoints). Both build their jobs and answers with the same helpers.

    def _jobs(self, image: DecodedImage, route: Route) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Model-size pixels for the answering version and, if any, the shadow version."""

        def job(v: str) -> dict[str, Any]:
            return {"version": v, "pixels": self.engines[v].predictor.pixels([image])[0]}

        return job(route.version), (job(route.shadow) if route.shadow else None)

    def _answer(
        self, route: Route, answer: dict[str, Any], label: str, shadow: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The response body around one version's answer, with shadow agreement and metrics recorded."""
        metrics.PREDICTIONS.labels(route.version, label).inc()
        for c in answer.get("concepts", ()):
            metrics.CONCEPT_PERCENTILE.labels(route.version, c["concept"]).observe(c["percentile"])
            metrics.CONCEPT_SHARE.labels(route.version, c["concept"]).observe(c["relevance_share"])
            if c["present"]:
                metrics.CONCEPT_PRESENT.labels(route.version, c["concept"]).inc()
        shadow_json = None
        if shadow is not None and route.shadow is not None:
            agree = shadow["label"] == label
            self.shadow_stats.record(route.version, route.shadow, agree)
            shadow_json = {"version": route.shadow, "label": shadow["label"], "agree": agree}
        return {"version": route.version, "via": route.via, **answer, "shadow": shadow_json}

    def _shadow_sync(self, job: dict[str, Any] | None) -> dict[str, Any] | None:
        if job is None:
            return None
        return self.engines[job["version"]].predictor.predict_pixels(job["pixels"][None])[0].to_json()

    def predict_json(self, image: DecodedImage, headers: Mapping[str, str]) -> dict[str, Any]:
        route = self.route(headers)
        job, shadow = self._jobs(image, route)
        pred = self.engines[route.version].predictor.predict_pixels(job["pixels"][None])[0].to_json()
        return self._answer(route, {"prediction": pred}, pred["label"], self._shadow_sync(shadow))

    def _flag(
        self,
        route: Route,
        answer: dict[str, Any],
        headers: Mapping[str, str],
        request_id: str,
        shadow: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The flag policy on the answering version's audit; flagged ones go to the publisher.

        The shadow (a corrected version, when configured) disagreeing is one of the policy's
        reasons. Publishing never blocks or fails the request (:class:`FlagPublisher.submit`).
        """
        t0 = time.perf_counter()
        result = AuditResult.from_answer(answer)  # with the raw heatmap and the input's pixels
        disagrees = None if shadow is None else shadow["label"] != result.prediction.label
        if self.publisher is not None:
            decision = self.publisher.submit(
                result,
                request_id=request_id,
                version=route.version,
                subject_key=headers.get("x-subject-key"),
                corrected=shadow,
            )
        else:
            decision = evaluate(result, self.policy, disagrees)
        for f in decision.flags:
            metrics.FLAGS.labels(route.version, f.concept, str(f.severity)).inc()
        metrics.STAGE_SECONDS.labels("/audit", "flag_publish").observe(time.perf_counter() - t0)
        return {**answer["result"], "flag": decision.to_json()}

    def audit_json(
        self,
        image: DecodedImage,
        headers: Mapping[str, str],
        raw_heatmap: bool,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        route = self.route(headers)
        job, shadow_job = self._jobs(image, route)
        answer = audit_jobs(self.engines, [{**job, "raw_heatmap": raw_heatmap}])[0]
        shadow = self._shadow_sync(shadow_job)
        res = self._flag(route, {**answer, **job}, headers, request_id or uuid.uuid4().hex, shadow)
        return self._answer(route, res, res["prediction"]["label"], shadow)

    async def predict_async(self, image: DecodedImage, headers: Mapping[str, str]) -> dict[str, Any]:
        route = self.route(headers)
        job, shadow = await anyio.to_thread.run_sync(lambda: self._jobs(image, route))
        jobs = [job] if shadow is None else [job, shadow]
        with _stage("/predict", "predict"):
            answers = await asyncio.gather(
                *(call_dependency(self.batcher.to_async.predict_batch, [j], PREDICT_DEADLINE_S) for j in jobs)
            )
        pred = answers[0][0]
        return self._answer(route, {"prediction": pred}, pred["label"], answers[1][0] if shadow else None)

    async def audit_async(
        self, image: DecodedImage, headers: Mapping[str, str], raw_heatmap: bool, request_id: str
    ) -> dict[str, Any]:
        route = self.route(headers)
        job, shadow = await anyio.to_thread.run_sync(lambda: self._jobs(image, route))
        calls = [
            call_dependency(
                self.auditor.to_async.audit, {**job, "raw_heatmap": raw_heatmap}, AUDIT_DEADLINE_S
            )
        ]
        if shadow is not None:
            calls.append(call_dependency(self.batcher.to_async.predict_batch, [shadow], PREDICT_DEADLINE_S))
        with _stage("/audit", "explain"):
            answers = await asyncio.gather(*calls)
        shadow_pred = answers[1][0] if shadow else None
        res = self._flag(route, {**answers[0], **job}, headers, request_id, shadow_pred)
        return self._answer(route, res, res["prediction"]["label"], shadow_pred)

    async def compare_async(self, image: DecodedImage, versions: list[str]) -> dict[str, Any]:
        versions = list(dict.fromkeys(versions or self.engines))
        for v in versions:
            if v not in self.engines:
                raise UnknownModelVersionError(v, self.engines)
        pixels = await anyio.to_thread.run_sync(
            lambda: {v: self.engines[v].predictor.pixels([image])[0] for v in versions}
        )
        with _stage("/compare", "explain"):
            answers = await asyncio.gather(
                *(
                    call_dependency(
                        self.auditor.to_async.audit,
                        {"version": v, "pixels": pixels[v]},
                        AUDIT_DEADLINE_S,
                    )
                    for v in versions
                )
            )
        results = {v: AuditResult.from_json(a["result"]) for v, a in zip(versions, answers, strict=True)}
        return Comparison.decide(results, self.policy).to_json()

    def compare_json(self, image: DecodedImage, versions: list[str]) -> dict[str, Any]:
        return compare(self.engines, image, versions, self.policy).to_json()

    def models_json(self) -> dict[str, Any]:
        weights = self.router.weights
        return {
            "versions": [
                {
                    "version": v,
                    "tag": e.tag,
                    "weight": weights[v],
                    "concepts": list(e.bank.concepts),
                    "cav_layer": e.bank.layer,
                    "input_size": list(e.cfg.input_size),
                    "labels": list(e.cfg.labels),
                }
                for v, e in self.engines.items()
            ],
            "shadow": self.router.shadow,
            "shadow_agreement": self.shadow_stats.to_json(),
            "flag_thresholds": {
                "relevance_share": self.policy.default.share,
                "fpr": self.settings.flag_fpr,
            },
        }

    def card_json(self, version: str) -> dict[str, Any]:
        engine = self.engines.get(version) or next(
            (e for e in self.engines.values() if e.tag == self.settings.tag(version)), None
        )
        if engine is None:
            raise UnknownModelVersionError(version, self.engines)
        return {"version": engine.version, "tag": engine.tag, "card": engine.card.to_dict()}

    # ----------------------------------------------------------------------------- HTTP

    @bentoml.api(route=PREDICT.path)
    async def predict(self, image: ImageBody, /, ctx: bentoml.Context) -> Any:
        """Prediction for the image in the request body, adaptively batched in :class:`Predictor`."""
        return await self._serve(ctx, image, lambda d, rid: self.screening.predict(d, ctx.request, rid))

    @bentoml.api(route=AUDIT.path)
    async def audit(self, image: ImageBody, /, ctx: bentoml.Context) -> Any:
        """Prediction, LRP heatmap, concept scores, localization masks and flag decision."""
        if dicomweb.wants_dicom(ctx.request.headers):  # the audit as DICOM objects (service.dicomweb)
            return await dicomweb.audit_response(self, ctx, image)
        return await self._serve(ctx, image, lambda d, rid: self.screening.audit(d, ctx.request, rid))

    @bentoml.api(route=COMPARE.path)
    async def compare(self, image: ImageBody, /, ctx: bentoml.Context) -> Any:
        """Audits by several versions (``?versions=a,b``, default all) side by side."""
        q = ctx.request.query_params.get("versions", "")
        versions = [v.strip() for v in q.split(",") if v.strip()]
        return await self._serve(ctx, image, lambda d, _rid: self.compare_async(d, versions))


# The first added is the outermost: every answer, the OpenAPI document's and the upload
# middleware's refusals included, passes through ApiVersionHeader.
MedAudit.add_asgi_middleware(ApiVersionHeader)  # type: ignore[attr-defined]
MedAudit.add_asgi_middleware(ServiceState, current=bentoml.get_current_service)  # type: ignore[attr-defined]
MedAudit.add_asgi_middleware(UploadNormalizer)  # type: ignore[attr-defined]
MedAudit.add_asgi_middleware(OpenAPIDocument)  # type: ignore[attr-defined]
MedAudit.add_asgi_middleware(JsonErrorBodies)  # type: ignore[attr-defined]
