"""The online side's error tree: every error the service raises on purpose carries its HTTP status.

``service/api.py`` translates with one rule: an :class:`AuditError` becomes ``exc.status`` with body
``exc.to_json()`` (and ``exc.headers()``); anything else is a 500. Messages name the bad value and
the valid choices, never a secret (API keys are never echoed: see :mod:`medaudit.service.auth`).

Configuration errors are start-up errors, not HTTP ones: they are :class:`medaudit.models.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from medaudit.models.errors import MedauditError


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


class JsonErrorBodies:
    """ASGI middleware giving the frameworks' own error responses the service's error body.

    Starlette and BentoML answer some requests before our code runs (a path no route matches,
    e.g. one with a newline; a wrong method; an unhandled exception's 500) with plain text. Clients
    parse one error shape, so any >= 400 response that is not JSON is rewritten to
    ``{"error", "detail", "request_id"}`` with its status and other headers kept. A 5xx says no
    more than that (no traceback text reaches the client); the request id finds it in the log.
    """

    CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def send_json_errors(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                # Successful answers (nearly all traffic) pass without looking at their headers.
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if not headers.get(b"content-type", b"").startswith(b"application/json"):
                    held["start"], held["body"] = message, b""
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    for m in self._rewrite(scope, held["start"], held["body"]):
                        await send(m)
                return
            await send(message)

        await self.app(scope, receive, send_json_errors)

    def _rewrite(self, scope: Any, start: Any, text: bytes) -> list[dict[str, Any]]:
        import json
        import uuid

        status = int(start["status"])
        request_headers = {k.lower(): v for k, v in scope.get("headers", [])}
        response_headers = {k.lower(): v for k, v in start.get("headers", [])}
        rid = (response_headers.get(b"x-request-id") or request_headers.get(b"x-request-id") or b"").decode(
            "latin-1"
        ) or uuid.uuid4().hex
        if status >= 500:
            code, detail = "internal_error", "the service failed on this request; quote its request id"
        else:
            code = self.CODES.get(status, "http_error")
            said = text.decode("utf-8", "replace").strip()[:300]
            detail = f"{scope.get('method', '')} {scope.get('path', '')}: {said or code}"
        body = json.dumps({"error": code, "detail": detail, "request_id": rid}).encode()
        kept = [
            (k, v)
            for k, v in start.get("headers", [])
            if k.lower() not in (b"content-type", b"content-length", b"x-request-id")
        ]
        kept += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode("latin-1")),
        ]
        return [
            {"type": "http.response.start", "status": status, "headers": kept},
            {"type": "http.response.body", "body": body},
        ]
