"""The online side's error tree: every public error the service raises on purpose is defined here.

Those a caller sees are :class:`AuditError` subclasses carrying their HTTP status. One rule
translates them, :func:`error_response`, wherever the service answers (its endpoints, the mounted
apps, the upload middleware): an :class:`AuditError` becomes ``exc.status`` with body
``{**exc.to_json(), "request_id"}`` and ``exc.headers()``; anything else is a 500 (given the same
body shape by :class:`~service.middleware.JsonErrorBodies`). Messages name the bad value and the
valid choices, never a secret (API keys are never echoed: see :mod:`medaudit.service.auth`).

The errors at the end (model store, Redis, flag stream and spool, the auditor's queue) are not
HTTP errors: they are raised and caught inside the service or the CLI, which translates or logs
them where it catches them. Configuration errors are start-up errors, not HTTP ones: they are
:class:`medaudit.models.errors.ConfigError`.

Everything imports this module: it imports nothing heavy at module level.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from medaudit.models.errors import MedauditError

if TYPE_CHECKING:
    from pathlib import Path

    from starlette.responses import JSONResponse


class AuditError(MedauditError):
    """Base of every error the service maps to an HTTP response.

    Attributes:
        status: HTTP status code (class-level, per subclass).
        code: Stable machine-readable error code: clients branch on it, never on ``detail``.
        detail: Human-readable message naming the bad value and the valid choices.
        extra: JSON-serialisable fields added to the body (valid choices, limits, …).
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "audit_error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = {k: _jsonable(v) for k, v in extra.items()}

    def __str__(self) -> str:
        return self.detail

    def to_json(self) -> dict[str, Any]:
        """The response body: ``{"error": code, "detail": message, **extra}``."""
        return {"error": self.code, "detail": self.detail, **self.extra}

    def headers(self) -> dict[str, str]:
        """Extra response headers this error needs (``WWW-Authenticate`` for 401)."""
        return {}


def error_response(error: AuditError, request_id: str) -> JSONResponse:
    """The HTTP answer to ``error``: its status, ``{"error", "detail", ..., "request_id"}``, its
    headers and ``X-Request-ID``. (A JSONResponse is also an ASGI app: middleware sends it.)"""
    # Imported here: this module sits under the service's transport-free groundwork (config, auth).
    from starlette.responses import JSONResponse

    return JSONResponse(
        {**error.to_json(), "request_id": request_id},
        status_code=error.status,
        headers={"X-Request-ID": request_id, **error.headers()},
    )


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list, set, frozenset)):
        items = sorted(v) if isinstance(v, (set, frozenset)) else v
        return [_jsonable(x) for x in items]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


# -- request body / image --------------------------------------------------------------------------


class InvalidImageError(AuditError):
    """A body in a supported format that cannot be used: truncated, corrupt, animated, multi-frame,
    a DICOM without pixel data, an unsupported colour model."""

    status = 422
    code = "invalid_image"


class EmptyImageError(InvalidImageError):
    """The request carried no bytes at all."""

    status = 400
    code = "empty_body"


class UnsupportedMediaTypeError(InvalidImageError):
    """The bytes (or the declared content type) are not a format the service decodes, or a DICOM
    transfer syntax for which no decoder is installed."""

    status = 415
    code = "unsupported_media_type"


class PayloadTooLargeError(InvalidImageError):
    """More bytes than the configured maximum (``MEDAUDIT_MAX_BYTES``)."""

    status = 413
    code = "payload_too_large"


class ImageTooLargeError(InvalidImageError):
    """More pixels than the configured maximum, judged from the header before any decoding
    (decompression-bomb guard, ``MEDAUDIT_MAX_PIXELS``)."""

    status = 413
    code = "image_too_large"


class ImageTooSmallError(InvalidImageError):
    """A side shorter than the configured minimum (``MEDAUDIT_MIN_IMAGE_SIDE``)."""

    status = 422
    code = "image_too_small"


class InvalidUploadError(AuditError):
    """A multipart/form-data body that cannot be parsed (no boundary, truncated, …)."""

    status = 400
    code = "invalid_upload"


class InvalidParameterError(AuditError):
    """A query parameter outside its valid set (``?detail=``); the body names the valid values."""

    status = 422
    code = "invalid_parameter"


class NotAcceptableError(AuditError):
    """An ``Accept`` header asking for a representation the route cannot give (DICOM out of a PNG,
    one ``application/dicom`` part for an audit that creates several)."""

    status = 406
    code = "not_acceptable"


class UnknownInstanceError(AuditError):
    """A DICOM study, series or instance that was never created here, or has expired."""

    status = 404
    code = "unknown_instance"


# -- routing ---------------------------------------------------------------------------------------


class UnknownModelVersionError(AuditError):
    """A model version that this deployment does not serve."""

    status = 404
    code = "unknown_model_version"

    def __init__(self, version: str, valid: Iterable[str]) -> None:
        valid = sorted(valid)
        super().__init__(
            f"unknown model version {version!r}; this deployment serves: {', '.join(valid) or '(none)'}",
            version=version,
            valid_versions=valid,
        )


# -- auth ------------------------------------------------------------------------------------------


class AuthError(AuditError):
    """No credentials, malformed credentials, or a key that matches none. Never echoes the key."""

    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="medaudit"'}


class ForbiddenError(AuditError):
    """A valid key whose role does not allow the endpoint."""

    status = 403
    code = "forbidden"


class CrossSiteRequestError(ForbiddenError):
    """A state change the reviewer workbench refuses as cross-site: another origin, or no valid
    CSRF token (:mod:`medaudit.service.ui.sessions`)."""

    code = "cross_site_request"


# -- capacity ---------------------------------------------------------------------------------------


class ServiceOverloadedError(AuditError):
    """A batched model service refused the work (its queue would wait past its latency bound) or
    did not answer in time. Nothing was computed for the request; the same request may be sent
    again after ``Retry-After`` seconds (predictions and audits have no side effects before the
    answer, so a retry is safe)."""

    status = 503
    code = "overloaded"

    def __init__(self, detail: str, retry_after_s: int = 1, **extra: Any) -> None:
        super().__init__(detail, retry_after_s=retry_after_s, **extra)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


# -- flag review (service.flags.review) -------------------------------------------------------------


class UnknownFlagError(AuditError):
    """No review record with this flag id (never flagged, or not yet handled by a worker)."""

    status = 404
    code = "unknown_flag"

    def __init__(self, flag_id: str) -> None:
        super().__init__(f"no flag {flag_id!r} in the review queue", flag_id=flag_id)


class InvalidReviewError(AuditError):
    """A verdict, status, note or paging value outside its valid set."""

    status = 422
    code = "invalid_review"


class AlreadyResolvedError(AuditError):
    """The flag was resolved before; a verdict is final."""

    status = 409
    code = "already_resolved"

    def __init__(self, flag_id: str, verdict: str, reviewer: str, resolved_at: str) -> None:
        super().__init__(
            f"flag {flag_id!r} was already resolved as {verdict!r} by {reviewer!r} at {resolved_at}; "
            "a verdict is final",
            flag_id=flag_id,
            verdict=verdict,
            reviewer=reviewer,
            resolved_at=resolved_at,
        )


class ReviewStoreUnavailableError(AuditError):
    """Redis does not answer: the review queue is temporarily unavailable."""

    status = 503
    code = "review_store_unavailable"


class RefitRunningError(AuditError):
    """The reviewer workbench's refit (``refine-cav``) is already running for this deployment."""

    status = 409
    code = "refit_running"


# -- not HTTP errors: caught inside the service or the CLI -------------------------------------------


class StoreError(MedauditError):
    """A model version that cannot be stored or loaded: unknown tag, missing file, bad name."""


class IntegrityError(StoreError):
    """A stored file whose sha256 differs from the one recorded when the version was registered."""

    def __init__(self, tag: str, file: str | Path, expected: str, actual: str) -> None:
        super().__init__(
            f"model version {tag}: {file} has been modified since it was registered "
            f"(sha256 recorded {expected}, found {actual}); refusing to load it"
        )
        self.tag, self.file, self.expected, self.actual = tag, str(file), expected, actual


class RedisUnavailableError(MedauditError):
    """No Redis answers at the configured URL (and, for
    :func:`medaudit.service.flags.redis_conn.ensure_redis`, no fallback either)."""


class EventFormatError(MedauditError, ValueError):
    """A stream entry that is not a flag event of this schema version (a poison entry)."""


class SpoolError(OSError):
    """The spool directory cannot be used (not writable, every slot taken)."""


class PoolOverloadedError(RuntimeError):
    """The auditor's queue is so long that a new job would wait past ``max_wait_s``: refused, not
    queued (the auditor answers it with a 503)."""


class LaneCrashedError(RuntimeError):
    """An LRP process of the auditor's queue died while it held a batch (killed, out of memory, a
    native crash)."""
