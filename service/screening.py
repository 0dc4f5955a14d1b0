"""Screening: every prediction checked for reliance on an artifact, at close to a prediction's cost.

An audit (``/audit``) computes the full input heatmap and the masks of present concepts: LRP from
the logits to the input. The flag decision needs far less. The concept scores (method.md §1.4)
come from the forward pass at the CAV layer ℓ, and a concept's relevance share needs the class
relevance *at ℓ*, i.e. LRP through the layers above ℓ only (ResNet-18 at ``identity_2``: the last
of four stages). A *screen* (:meth:`~medaudit.service.audit.AuditEngine.screen`) is exactly that:
prediction, concept scores, percentiles, presence, relevance shares, and the flag policy's
decision on them, the same as the audit's on the same image and version.

The contract (``?detail=``, :data:`~medaudit.service.endpoints.PREDICT_DETAILS`):

* ``POST /predict?detail=scores`` screens; ``detail=full`` audits; ``detail=prediction`` (or no
  ``detail``) predicts. ``MEDAUDIT_PREDICT_DETAIL`` changes what ``/predict`` answers when the
  request names no ``detail``: ``scores`` screens every prediction.
* ``POST /audit?detail=scores`` screens; ``detail=full`` (the default) audits.

A screen's answer is an audit's without heatmap (``heatmap_png: null``, no masks), plus
``detail: "scores"`` and ``heatmap_reason``. Heatmaps are computed where they are needed
(:func:`heatmap_reason`), and then the answer is the full audit's:

* ``requested``: ``detail=full``, ``/audit``, ``/compare`` (counted by the auditor);
* ``flagged``: a screen the flag policy flags (``MEDAUDIT_SCREEN_HEATMAPS=flagged``, the
  default), so that the reviewer's record has its heatmap and masks;
* ``sampled``: a share of the other screens (``MEDAUDIT_SCREEN_SAMPLE_RATE``), for monitoring.

A flagged screen's heatmap is computed in the same request (a second auditor job), not queued
for later: the flag's review record is then complete when it is published (one record, one
atomic publish, :mod:`~medaudit.service.flags.producer`), and nothing new has to hold the models
(the flag worker holds none). It costs the flagged share of requests one audit more, measured in
``benchmarks/serve.py`` (docs/benchmarks.md): the throughput of mixed traffic falls with the flag
rate, from the screen's towards the audit's. The audit runs the forward again: the screen
recorded no autograd graph below ℓ, which is what makes it cheap.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio.to_thread

from medaudit.service import metrics
from medaudit.service.audit import AuditResult
from medaudit.service.dependencies import AUDIT_DEADLINE_S, PREDICT_DEADLINE_S, call_dependency
from medaudit.service.endpoints import AUDIT_DETAILS, PREDICT_DETAILS
from medaudit.service.errors import InvalidParameterError
from medaudit.service.flags.policy import PolicyConfig, PolicyDecision, evaluate

if TYPE_CHECKING:
    from starlette.requests import Request

    from medaudit.service.config import Settings
    from medaudit.service.inputs import DecodedImage
    from medaudit.service.routing import Route

PREDICTION, SCORES, FULL = PREDICT_DETAILS
#: Why a full audit was computed (the ``reason`` label of ``medaudit_heatmaps_total``).
REQUESTED, FLAGGED, SAMPLED = "requested", "flagged", "sampled"
_TRUE = ("1", "true", "yes")


def parse_detail(raw: str | None, valid: tuple[str, ...], default: str) -> str:
    """The ``?detail=`` of a request: ``default`` when absent, else one of ``valid``.

    Raises:
        InvalidParameterError: Any other value (422, naming the valid ones).
    """
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value not in valid:
        raise InvalidParameterError(
            f"detail={raw!r} is not valid here; valid: {', '.join(valid)}", valid_details=valid
        )
    return value


def sampled(request_id: str, rate: float) -> bool:
    """Whether request ``request_id`` is in the monitoring sample of ``rate`` (in [0, 1]).

    A hash of the request id, not a random draw: the same request (a retry) gets the same answer.
    """
    if rate <= 0.0:
        return False
    u = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2.0**64
    return u < rate


def heatmap_reason(decision: PolicyDecision, settings: Settings, request_id: str) -> str | None:
    """Why a screened request also gets the full audit (heatmap and masks), or ``None``:
    ``flagged`` when the policy flags it and ``MEDAUDIT_SCREEN_HEATMAPS`` is ``flagged``, else
    ``sampled`` when it falls in ``MEDAUDIT_SCREEN_SAMPLE_RATE``."""
    if decision.flagged and settings.screen_heatmaps:
        return FLAGGED
    if sampled(request_id, settings.screen_sample_rate):
        return SAMPLED
    return None


class ScreenedService(Protocol):
    """What :class:`Screening` uses of the entry service (:class:`medaudit.service.api.MedAudit`)."""

    settings: Settings
    policy: PolicyConfig
    auditor: Any
    batcher: Any

    def route(self, headers: Mapping[str, str], *, count: bool = True) -> Route: ...

    def _jobs(self, image: DecodedImage, route: Route) -> tuple[dict[str, Any], dict[str, Any] | None]: ...

    def _flag(
        self,
        route: Route,
        answer: dict[str, Any],
        headers: Mapping[str, str],
        request_id: str,
        shadow: dict[str, Any] | None,
    ) -> dict[str, Any]: ...

    def _answer(
        self, route: Route, answer: dict[str, Any], label: str, shadow: dict[str, Any] | None
    ) -> dict[str, Any]: ...

    async def predict_async(self, image: DecodedImage, headers: Mapping[str, str]) -> dict[str, Any]: ...

    async def audit_async(
        self, image: DecodedImage, headers: Mapping[str, str], raw_heatmap: bool, request_id: str
    ) -> dict[str, Any]: ...


class Screening:
    """The ``/predict`` and ``/audit`` answers by ``detail``, for the entry service.

    Args:
        service: The entry service: routing, its batched dependencies, the flag publisher.
    """

    def __init__(self, service: ScreenedService) -> None:
        self.service = service

    async def predict(self, image: DecodedImage, request: Request, request_id: str) -> dict[str, Any]:
        """``POST /predict``: the prediction, a screen or an audit, by ``?detail=`` (default:
        ``MEDAUDIT_PREDICT_DETAIL``)."""
        svc = self.service
        detail = parse_detail(
            request.query_params.get("detail"), PREDICT_DETAILS, svc.settings.predict_detail
        )
        headers = request.headers
        if detail == PREDICTION:
            return {**await svc.predict_async(image, headers), "detail": PREDICTION}
        if detail == FULL:  # what /audit answers (its raw float16 heatmap only there)
            return await self._full(image, headers, False, request_id)
        return await self.screen(image, headers, request_id, "/predict")

    async def audit(self, image: DecodedImage, request: Request, request_id: str) -> dict[str, Any]:
        """``POST /audit``: the audit, or a screen with ``?detail=scores``."""
        detail = parse_detail(request.query_params.get("detail"), AUDIT_DETAILS, FULL)
        if detail == FULL:
            return await self._full(image, request.headers, _raw(request), request_id)
        return await self.screen(image, request.headers, request_id, "/audit")

    async def _full(
        self, image: DecodedImage, headers: Mapping[str, str], raw: bool, request_id: str
    ) -> dict[str, Any]:
        body = await self.service.audit_async(image, headers, raw, request_id)
        return {**body, "detail": FULL, "heatmap_reason": REQUESTED}

    async def screen(
        self, image: DecodedImage, headers: Mapping[str, str], request_id: str, endpoint: str
    ) -> dict[str, Any]:
        """One screened request: the screen (and the shadow's prediction) from the batched
        dependencies, the policy's decision, the full audit where :func:`heatmap_reason` says so,
        then the flag published and the answer built as for an audit."""
        svc = self.service
        route = svc.route(headers)
        job, shadow_job = await anyio.to_thread.run_sync(lambda: svc._jobs(image, route))
        calls = [call_dependency(svc.auditor.to_async.audit, {**job, "detail": SCORES}, AUDIT_DEADLINE_S)]
        if shadow_job is not None:
            calls.append(
                call_dependency(svc.batcher.to_async.predict_batch, [shadow_job], PREDICT_DEADLINE_S)
            )
        t0 = time.perf_counter()
        answers = await asyncio.gather(*calls)
        metrics.STAGE_SECONDS.labels(endpoint, "screen").observe(time.perf_counter() - t0)
        answer, shadow = answers[0], (answers[1][0] if shadow_job is not None else None)
        screened = AuditResult.from_json(answer["result"], answer["features"])
        disagrees = None if shadow is None else shadow["label"] != screened.prediction.label
        reason = heatmap_reason(evaluate(screened, svc.policy, disagrees), svc.settings, request_id)
        if reason is not None:  # the full audit answers, and its heatmap and masks go to review
            t0 = time.perf_counter()
            answer = await call_dependency(
                svc.auditor.to_async.audit, {**job, "reason": reason}, AUDIT_DEADLINE_S
            )
            metrics.STAGE_SECONDS.labels(endpoint, "heatmap").observe(time.perf_counter() - t0)
        res = svc._flag(route, {**answer, **job}, headers, request_id, shadow)  # job: the pixels
        metrics.SCREENED.labels(route.version).inc()
        metrics.SCREEN_FLAGS.labels(route.version).inc(len(res["flag"]["flags"]))
        body = {**res, "detail": SCORES, "heatmap_reason": reason}
        return svc._answer(route, body, res["prediction"]["label"], shadow)


def _raw(request: Request) -> bool:
    """``?raw_heatmap=1``: the audit's answer also carries the raw float16 heatmap."""
    return request.query_params.get("raw_heatmap", "").lower() in _TRUE
