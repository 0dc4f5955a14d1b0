"""The client's errors: one tree under :class:`MedauditClientError`, caught by category.

:class:`MedauditHTTPError` carries the service's ``{"error", "detail", ..., "request_id"}`` body,
with a subclass per status callers branch on (:class:`Unauthorized`, :class:`UnknownVersion` with
``valid_versions``, :class:`InvalidInput`, ...); :func:`error_class` is the one table from status to
class. An unreachable service is a :class:`MedauditConnectionError` naming the URL; a 200 whose body
is not medaudit's JSON (a proxy page, another service on the port) is a :class:`ResponseFormatError`
rather than a ``KeyError`` deep inside a caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medaudit.clients.api_version import API_VERSION

__all__ = [
    "Conflict",
    "Forbidden",
    "IncompatibleServer",
    "InvalidInput",
    "MedauditClientError",
    "MedauditConnectionError",
    "MedauditHTTPError",
    "MedauditTimeoutError",
    "NotFound",
    "RateLimited",
    "ResponseFormatError",
    "ServerError",
    "Unauthorized",
    "UnknownVersion",
    "check_api_version",
    "error_class",
]


class MedauditClientError(Exception):
    """Base of every error the client raises on purpose."""


class MedauditConnectionError(MedauditClientError):
    """The service could not be reached (refused, reset, DNS, TLS), after every retry.

    Attributes:
        url: The URL that was tried.
        attempts: How many times.
    """

    def __init__(self, url: str, attempts: int, cause: BaseException) -> None:
        reason = str(cause) or type(cause).__name__
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"cannot reach the medaudit service at {url}{tries}: {reason}")
        self.url = url
        self.attempts = attempts


class MedauditTimeoutError(MedauditClientError):
    """The service accepted the connection but did not answer within the timeout (not retried:
    a slow audit sent again would only add load)."""

    def __init__(self, url: str, timeout: float | None) -> None:
        within = f"within {timeout:g} s" if timeout is not None else "within the HTTP client's timeout"
        super().__init__(f"no answer from {url} {within}")
        self.url = url
        self.timeout = timeout


class IncompatibleServer(MedauditClientError):
    """The service speaks another major version of the API than this client.

    Attributes:
        url: The service's base URL.
        server_version: What its ``X-Medaudit-API`` header said.
    """

    def __init__(self, url: str, server_version: str) -> None:
        super().__init__(
            f"the medaudit service at {url} speaks API {server_version}, this client speaks {API_VERSION}: "
            f"install a medaudit-client {server_version.split('.')[0]}.x (pip install "
            f"'medaudit-client=={server_version.split('.')[0]}.*')"
        )
        self.url = url
        self.server_version = server_version


def check_api_version(url: str, server_version: str | None) -> None:
    """Raises :class:`IncompatibleServer` when ``server_version``'s major differs from ours.

    No header (a proxy's own answer, an older service) is not a refusal.
    """
    if server_version is None:
        return
    if server_version.strip().split(".")[0] != API_VERSION.split(".")[0]:
        raise IncompatibleServer(url, server_version.strip())


class ResponseFormatError(MedauditClientError):
    """A successful response whose body is not the JSON medaudit sends: usually the URL points at
    something else (a proxy, another service on the port)."""


class MedauditHTTPError(MedauditClientError):
    """The service answered with an error status.

    Attributes:
        status: HTTP status code.
        code: The service's machine-readable ``error`` field (``unknown_model_version``, ...);
            ``http_<status>`` when the body is not medaudit's error JSON.
        detail: Human-readable message from the service.
        request_id: The request's id (body or ``X-Request-ID``), for the service logs.
        body: The whole JSON body (empty when it was not JSON).
    """

    def __init__(
        self, status: int, code: str, detail: str, request_id: str | None, body: Mapping[str, Any]
    ) -> None:
        rid = f" (request {request_id})" if request_id else ""
        super().__init__(f"{status} {code}: {detail}{rid}")
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.body = dict(body)


class InvalidInput(MedauditHTTPError):
    """400/413/415/422: the image was empty, too large, of an unsupported format or undecodable."""


class Unauthorized(MedauditHTTPError):
    """401: no API key, or one the service does not know."""


class Forbidden(MedauditHTTPError):
    """403: a valid key whose role does not allow the endpoint."""


class NotFound(MedauditHTTPError):
    """404."""


class UnknownVersion(NotFound):
    """404 ``unknown_model_version``: the deployment does not serve that version.

    Attributes:
        version: The version asked for.
        valid_versions: The versions the deployment serves.
    """

    def __init__(
        self, status: int, code: str, detail: str, request_id: str | None, body: Mapping[str, Any]
    ) -> None:
        super().__init__(status, code, detail, request_id, body)
        self.version = str(body.get("version", ""))
        self.valid_versions = tuple(str(v) for v in body.get("valid_versions") or ())


class Conflict(MedauditHTTPError):
    """409, e.g. ``already_resolved``: the flag has a verdict already (the body names it)."""


class RateLimited(MedauditHTTPError):
    """429 after every retry."""


class ServerError(MedauditHTTPError):
    """5xx (after every retry for 502/503/504)."""


_BY_STATUS: dict[int, type[MedauditHTTPError]] = {
    400: InvalidInput,
    413: InvalidInput,
    415: InvalidInput,
    422: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
}


def error_class(status: int, code: str) -> type[MedauditHTTPError]:
    """The error class for an answer of ``status`` whose body's ``error`` field is ``code``."""
    if status == 404 and code == "unknown_model_version":
        return UnknownVersion
    return _BY_STATUS.get(status, ServerError if status >= 500 else MedauditHTTPError)
