"""A typed HTTP client for the medaudit service, sync (:class:`MedauditClient`) and async
(:class:`AsyncMedauditClient`), on httpx.

Usage::

    with MedauditClient("http://127.0.0.1:3000", api_key=os.environ["MEDAUDIT_API_KEY"]) as mc:
        res = mc.audit("lesion.png", version="vanilla")
        if res.flag.flagged:
            Path("heatmap.png").write_bytes(res.heatmap_png)

Design:

* **Responses are frozen dataclasses** parsed from the JSON of ``service/api.py`` (shapes in
  :mod:`medaudit.service.audit`): base64 PNGs arrive as bytes, the raw float16 heatmap as a read-only array.
  A 200 whose body is not that JSON (a proxy page, another service on the port) raises
  :class:`ResponseFormatError` rather than a ``KeyError`` deep inside a caller.
* **Errors are one tree** (:class:`MedauditClientError`, a :class:`medaudit.models.errors.MedauditError`):
  :class:`MedauditHTTPError` carries the service's ``{"error", "detail", ..., "request_id"}`` body,
  with a subclass per status callers branch on (:class:`Unauthorized`, :class:`UnknownVersion`
  with ``valid_versions``, :class:`InvalidInput`, ...); an unreachable service is a
  :class:`MedauditConnectionError` naming the URL.
* **Retries are a policy object** (:class:`RetryPolicy`, redis-py's habit): connection failures and
  502/503/504/429 are retried with exponential backoff and jitter, ``Retry-After`` honoured; other
  4xx never are, since the same request would fail the same way. Every endpoint is a pure
  computation (apart from the shadow agreement counters), so retrying a POST is safe.
* **The HTTP client can be injected**: anything with httpx's ``request``/``close`` shape, e.g. an
  ``httpx.Client`` with custom TLS, or starlette's ``TestClient`` for in-process tests (which, in
  starlette 1.x, is an ``httpx2.Client``, not an ``httpx.Client``: hence a protocol, not a type).
  A client object closes only the HTTP client it created itself.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias
from urllib.parse import quote

import anyio
import httpx

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image as PILImage

__all__ = [
    "API_VERSION",
    "Conflict",
    "IncompatibleServer",
    "Review",
    "ReviewPage",
    "check_api_version",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "AsyncMedauditClient",
    "AuditResponse",
    "CompareResponse",
    "ConceptScore",
    "FlagDecision",
    "FlagThresholds",
    "Forbidden",
    "ImageInput",
    "InvalidInput",
    "MedauditClient",
    "MedauditClientError",
    "MedauditConnectionError",
    "MedauditHTTPError",
    "MedauditTimeoutError",
    "ModelCard",
    "ModelInfo",
    "ModelsResponse",
    "NotFound",
    "PredictResponse",
    "Prediction",
    "RateLimited",
    "ResponseFormatError",
    "RouteInfo",
    "RetryPolicy",
    "ServerError",
    "ShadowAgreement",
    "ShadowInfo",
    "Unauthorized",
    "UnknownVersion",
    "encode_image",
    "sniff_content_type",
]

DEFAULT_URL = "http://127.0.0.1:3000"
#: The API this client speaks. The service names its own in the ``X-Medaudit-API`` header of every
#: answer; a different major version is refused (:class:`IncompatibleServer`), a newer minor is fine.
API_VERSION = "1.0"
API_HEADER = "x-medaudit-api"
#: Seconds per attempt: an audit on a CPU takes seconds, a cold one more.
DEFAULT_TIMEOUT = 60.0

#: What :func:`encode_image` accepts: a path, encoded bytes, a PIL image or a uint8/uint16 array.
ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | PILImage | np.ndarray"


# ============================================================================================ errors


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


class _Response(Protocol):
    """The part of an httpx (or httpx2) response the client reads."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


def _http_error(r: _Response) -> MedauditHTTPError:
    """The error for a >= 400 response: the service's JSON when there is one, else the text."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    status = r.status_code
    code = str(body.get("error") or f"http_{status}")
    detail = str(body.get("detail") or r.text.strip()[:300] or "(empty body)")
    rid = body.get("request_id") or r.headers.get("x-request-id")
    if status == 404 and code == "unknown_model_version":
        cls: type[MedauditHTTPError] = UnknownVersion
    else:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else MedauditHTTPError)
    return cls(status, code, detail, str(rid) if rid else None, body)


# ============================================================================================ retries


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a request again.

    Attempt ``n`` (0-based) waits ``d/2 + U(0, d/2)`` with ``d = min(max_delay, base_delay * 2**n)``
    ("equal jitter": clients that failed together do not retry together, and the wait still grows),
    unless the response said ``Retry-After``, which wins, capped at ``max_retry_after``.

    Attributes:
        retries: Retries after the first attempt (0: never retry).
        base_delay: Seconds; the first retry waits between half of this and this.
        max_delay: Cap of the exponential part, seconds.
        max_retry_after: Cap on a server's ``Retry-After``, seconds.
        statuses: Statuses that are retried: overload and gateway errors, never a client error.
    """

    retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    statuses: frozenset[int] = field(default=frozenset({429, 502, 503, 504}))

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries!r}")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("retry delays must be >= 0")

    def delay(self, attempt: int, retry_after: str | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        after = parse_retry_after(retry_after)
        if after is not None:
            return min(after, self.max_retry_after)
        d = min(self.max_delay, self.base_delay * 2.0**attempt)
        return d / 2 + (rng or random).uniform(0.0, d / 2)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now (RFC 9110 §10.2.3: delay-seconds or an HTTP-date)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# The transport errors worth a retry: the request never reached the service, or the connection
# broke before an answer. Timeouts reading an answer are not among them (the service is working).
_RETRY_TRANSPORT = (
    "ConnectError",
    "ConnectTimeout",
    "PoolTimeout",
    "RemoteProtocolError",
    "ReadError",
    "WriteError",
)


def _transport_errors(names: Sequence[str]) -> tuple[type[BaseException], ...]:
    """httpx's exception classes of these names, plus httpx2's when it is loaded (an injected
    starlette TestClient raises those)."""
    mods = [httpx, *([sys.modules["httpx2"]] if "httpx2" in sys.modules else [])]
    return tuple(getattr(m, n) for m in mods for n in names if hasattr(m, n))


# ============================================================================================ images

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
_SUFFIXES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".gif": "image/gif",
    ".dcm": "application/dicom",
    ".dicom": "application/dicom",
}
OCTET = "application/octet-stream"


def sniff_content_type(data: bytes, suffix: str = "") -> str:
    """The content type of encoded image bytes: magic bytes first, then the file suffix.

    The service decodes by magic bytes too, so the declared type is a courtesy; bytes that are none
    of the five formats go as ``application/octet-stream`` and get the service's 415.
    """
    # DICOM first: its 128-byte preamble is free-form, and dual-format files put a TIFF header there.
    if data[128:132] == b"DICM":
        return "application/dicom"
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return ctype
    return _SUFFIXES.get(suffix.lower(), OCTET)


def encode_image(image: ImageInput) -> tuple[bytes, str]:
    """Request body and content type for an image given as a path, bytes, PIL image or array.

    Files and bytes are sent as they are (the service reads DICOM, TIFF, ... itself); PIL images
    and arrays are encoded as PNG, which is lossless.

    Raises:
        FileNotFoundError: A path that does not exist.
        TypeError: Anything else than the types above.
        ValueError: An array PNG cannot hold (float, wrong shape).
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return data, sniff_content_type(data)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        data = path.read_bytes()
        return data, sniff_content_type(data, path.suffix)
    # numpy and Pillow are optional (medaudit-client[arrays]): an array or PIL image can only have
    # been passed in if its module is already imported.
    numpy = sys.modules.get("numpy")
    pil = sys.modules.get("PIL.Image")
    if numpy is not None and isinstance(image, numpy.ndarray):
        return _array_png(image), "image/png"
    if pil is not None and isinstance(image, pil.Image):
        return _pil_png(image), "image/png"
    raise TypeError(f"image must be a path, bytes, a PIL image or a numpy array, got {type(image).__name__}")


def _array_png(arr: np.ndarray) -> bytes:
    import numpy as np

    Image = _pillow()

    ok_shape = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    ok_dtype = arr.dtype == np.uint8 or (arr.dtype == np.uint16 and arr.ndim == 2)
    if not (ok_shape and ok_dtype):
        raise ValueError(
            f"array images must be uint8 (H, W), (H, W, 3) or (H, W, 4), or uint16 (H, W); got "
            f"{arr.dtype} {arr.shape}: scale to uint8 first"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return _pil_png(Image.fromarray(np.ascontiguousarray(arr)))


def _pil_png(img: PILImage) -> bytes:
    buf = io.BytesIO()
    if img.mode not in ("1", "L", "LA", "I;16", "P", "RGB", "RGBA"):
        img = img.convert("RGB")  # CMYK, YCbCr, float...: modes PNG cannot store
    img.save(buf, format="PNG")
    return buf.getvalue()


# ============================================================================================ responses


@dataclass(frozen=True)
class Prediction:
    """One version's prediction: the label, its index, and every class's probability."""

    version: str
    label: str
    class_index: int
    probabilities: Mapping[str, float]

    @property
    def probability(self) -> float:
        """Probability of the predicted label."""
        return self.probabilities[self.label]


@dataclass(frozen=True)
class ShadowInfo:
    """The shadow version's label for the same request, and whether it agrees."""

    version: str
    label: str
    agree: bool


@dataclass(frozen=True)
class ConceptScore:
    """One concept (artifact) on the image.

    Attributes:
        concept: Concept name.
        score: CAV score at the bank's layer.
        percentile: Among clean validation images (0-100).
        present: ``score`` above ``threshold``.
        threshold: The presence threshold at the configured false-positive rate.
        relevance_share: Share of the predicted class's relevance along the concept, [0, 1].
        mask_png: PNG bytes of the concept's localization mask (present concepts only).
    """

    concept: str
    score: float
    percentile: float
    present: bool
    threshold: float
    relevance_share: float
    mask_png: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class FlagDecision:
    """Whether the result goes to review, one reason per flagging concept."""

    flagged: bool
    reasons: tuple[str, ...] = ()
    concepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class PredictResponse:
    """``POST /predict``.

    Attributes:
        request_id: The request's id (sent or assigned by the service).
        version: The version that answered.
        via: How it was chosen: ``explicit`` (asked for), ``hash`` (subject key) or ``random``.
        prediction: Its prediction.
        shadow: The shadow version's answer, if the deployment has one.
        notes: What the service did to the image (format mismatch, upscaling, DICOM windowing...).
    """

    request_id: str
    version: str
    via: str
    prediction: Prediction
    shadow: ShadowInfo | None
    notes: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class AuditResponse:
    """``POST /audit``, or one version's entry of ``POST /compare``.

    Attributes:
        request_id: The request's id.
        version: The version that audited.
        via: How it was chosen; ``None`` in a comparison (every version there was asked for).
        prediction: The prediction the heatmap explains.
        heatmap_png: PNG bytes: the model-size input with the class heatmap overlaid (red
            positive, blue negative relevance).
        heatmap: The raw (H, W) float16 heatmap, read-only, when asked for (``raw_heatmap=True``).
        layer: The concept bank's layer.
        concepts: One score per concept of the version's bank.
        flag: The flag decision.
        shadow: The shadow version's answer (``None`` without a shadow, and in comparisons).
        notes: What the service did to the image.
    """

    request_id: str
    version: str
    via: str | None
    prediction: Prediction
    heatmap_png: bytes = field(repr=False)
    heatmap: np.ndarray | None = field(repr=False)
    layer: str
    concepts: tuple[ConceptScore, ...]
    flag: FlagDecision
    shadow: ShadowInfo | None
    notes: tuple[str, ...]

    def concept(self, name: str) -> ConceptScore:
        """The score of concept ``name``.

        Raises:
            KeyError: A concept the version's bank does not have (the message lists those it has).
        """
        for c in self.concepts:
            if c.concept == name:
                return c
        raise KeyError(
            f"no concept {name!r}; this version scores: {', '.join(c.concept for c in self.concepts)}"
        )


@dataclass(frozen=True, eq=False)
class CompareResponse:
    """``POST /compare``: audits by several versions, in the order asked, with their agreement."""

    request_id: str
    versions: tuple[str, ...]
    results: Mapping[str, AuditResponse]
    labels_agree: bool
    flags_agree: bool
    notes: tuple[str, ...]


@dataclass(frozen=True)
class ModelInfo:
    """One served version, from ``GET /models/``."""

    version: str
    tag: str
    weight: float
    concepts: tuple[str, ...]
    cav_layer: str
    input_size: tuple[int, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ShadowAgreement:
    """Counted agreement of one (answering version, shadow version) pair since the service started."""

    version: str
    shadow: str
    agree: int
    disagree: int


@dataclass(frozen=True)
class FlagThresholds:
    """The deployment's flag rule: relevance share above which a present concept flags, and FPR."""

    relevance_share: float
    fpr: float | None


@dataclass(frozen=True)
class ModelsResponse:
    """``GET /models/``: the served versions with their A/B weights, the shadow and its agreement."""

    request_id: str
    versions: tuple[ModelInfo, ...]
    shadow: str | None
    shadow_agreement: tuple[ShadowAgreement, ...]
    flag_thresholds: FlagThresholds

    def __getitem__(self, version: str) -> ModelInfo:
        for m in self.versions:
            if m.version == version:
                return m
        raise KeyError(f"{version!r} is not served; served: {', '.join(m.version for m in self.versions)}")


@dataclass(frozen=True, eq=False)
class ModelCard:
    """``GET /models/{version}``: one version's model card (its JSON as a dict)."""

    request_id: str
    version: str
    tag: str
    card: Mapping[str, Any]


@dataclass(frozen=True)
class RouteInfo:
    """``GET /models/_route``: which version would answer these headers, and how it was chosen."""

    request_id: str
    version: str
    shadow: str | None
    via: str


@dataclass(frozen=True, eq=False)
class Review:
    """One flag of the review queue (``GET /reviews/{flag_id}``, or an item of a page).

    The typed fields are the ones every record has; ``record`` is the whole JSON record (scores,
    reasons, thresholds, the corrected version's answer...). ``heatmap_png``/``mask_png`` are set
    when the flag was fetched with its images and they have not expired.
    """

    flag_id: str
    request_id: str
    model_version: str
    concept: str
    status: str
    verdict: str | None
    reviewer: str | None
    record: Mapping[str, Any] = field(repr=False)
    heatmap_png: bytes | None = field(default=None, repr=False)
    mask_png: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class ReviewPage:
    """``GET /reviews/``: one page of flags (``open`` oldest first, ``resolved`` newest first)."""

    request_id: str
    status: str
    total: int
    offset: int
    limit: int
    items: tuple[Review, ...]


def _b64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


def _prediction(d: Mapping[str, Any]) -> Prediction:
    return Prediction(
        version=str(d["version"]),
        label=str(d["label"]),
        class_index=int(d["class_index"]),
        probabilities={str(k): float(v) for k, v in d["probabilities"].items()},
    )


def _shadow(d: Mapping[str, Any] | None) -> ShadowInfo | None:
    return None if d is None else ShadowInfo(str(d["version"]), str(d["label"]), bool(d["agree"]))


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "encoding an array as PNG needs Pillow: pip install 'medaudit-client[arrays]'"
        ) from e
    return Image


def _raw_heatmap(d: Mapping[str, Any] | None) -> np.ndarray | None:
    if d is None:
        return None
    try:
        import numpy as np
    except ImportError as e:
        raise ImportError(
            "the raw float16 heatmap is returned as a numpy array: pip install 'medaudit-client[arrays]'"
        ) from e
    if d.get("dtype") != "float16":
        raise ValueError(f"raw heatmap dtype {d.get('dtype')!r}, expected float16")
    return np.frombuffer(base64.b64decode(d["data"]), dtype="<f2").reshape([int(n) for n in d["shape"]])


def _audit(
    d: Mapping[str, Any],
    *,
    request_id: str,
    version: str,
    via: str | None,
    shadow: ShadowInfo | None,
    notes: tuple[str, ...],
) -> AuditResponse:
    return AuditResponse(
        request_id=request_id,
        version=version,
        via=via,
        prediction=_prediction(d["prediction"]),
        heatmap_png=base64.b64decode(d["heatmap_png"]),
        heatmap=_raw_heatmap(d.get("heatmap")),
        layer=str(d["layer"]),
        concepts=tuple(
            ConceptScore(
                concept=str(c["concept"]),
                score=float(c["score"]),
                percentile=float(c["percentile"]),
                present=bool(c["present"]),
                threshold=float(c["threshold"]),
                relevance_share=float(c["relevance_share"]),
                mask_png=_b64(c.get("mask_png")),
            )
            for c in d["concepts"]
        ),
        flag=FlagDecision(
            flagged=bool(d["flag"]["flagged"]),
            reasons=tuple(str(r) for r in d["flag"]["reasons"]),
            concepts=tuple(str(c) for c in d["flag"]["concepts"]),
        ),
        shadow=shadow,
        notes=notes,
    )


def parse_predict(d: Mapping[str, Any]) -> PredictResponse:
    """``POST /predict`` JSON -> :class:`PredictResponse`."""
    return PredictResponse(
        request_id=str(d["request_id"]),
        version=str(d["version"]),
        via=str(d["via"]),
        prediction=_prediction(d["prediction"]),
        shadow=_shadow(d.get("shadow")),
        notes=tuple(str(n) for n in d.get("notes") or ()),
    )


def parse_audit(d: Mapping[str, Any]) -> AuditResponse:
    """``POST /audit`` JSON -> :class:`AuditResponse`."""
    return _audit(
        d,
        request_id=str(d["request_id"]),
        version=str(d["version"]),
        via=str(d["via"]),
        shadow=_shadow(d.get("shadow")),
        notes=tuple(str(n) for n in d.get("notes") or ()),
    )


def parse_compare(d: Mapping[str, Any]) -> CompareResponse:
    """``POST /compare`` JSON -> :class:`CompareResponse`."""
    rid, notes = str(d["request_id"]), tuple(str(n) for n in d.get("notes") or ())
    versions = tuple(str(v) for v in d["versions"])
    return CompareResponse(
        request_id=rid,
        versions=versions,
        results={
            v: _audit(d["results"][v], request_id=rid, version=v, via=None, shadow=None, notes=notes)
            for v in versions
        },
        labels_agree=bool(d["agreement"]["label"]),
        flags_agree=bool(d["agreement"]["flag"]),
        notes=notes,
    )


def parse_models(d: Mapping[str, Any]) -> ModelsResponse:
    """``GET /models/`` JSON -> :class:`ModelsResponse`."""
    ft = d["flag_thresholds"]
    return ModelsResponse(
        request_id=str(d["request_id"]),
        versions=tuple(
            ModelInfo(
                version=str(m["version"]),
                tag=str(m["tag"]),
                weight=float(m["weight"]),
                concepts=tuple(str(c) for c in m["concepts"]),
                cav_layer=str(m["cav_layer"]),
                input_size=tuple(int(n) for n in m["input_size"]),
                labels=tuple(str(x) for x in m["labels"]),
            )
            for m in d["versions"]
        ),
        shadow=None if d.get("shadow") is None else str(d["shadow"]),
        shadow_agreement=tuple(
            ShadowAgreement(str(a["version"]), str(a["shadow"]), int(a["agree"]), int(a["disagree"]))
            for a in d.get("shadow_agreement") or ()
        ),
        flag_thresholds=FlagThresholds(
            float(ft["relevance_share"]), None if ft.get("fpr") is None else float(ft["fpr"])
        ),
    )


def parse_route(d: Mapping[str, Any]) -> RouteInfo:
    """``GET /models/_route`` JSON -> :class:`RouteInfo`."""
    shadow = d.get("shadow")
    return RouteInfo(
        str(d["request_id"]), str(d["version"]), None if shadow is None else str(shadow), str(d["via"])
    )


def parse_review(d: Mapping[str, Any]) -> Review:
    return Review(
        flag_id=str(d["flag_id"]),
        request_id=str(d.get("request_id", "")),
        model_version=str(d.get("model_version", "")),
        concept=str(d.get("concept", "")),
        status=str(d["status"]),
        verdict=str(d["verdict"]) if d.get("verdict") else None,
        reviewer=str(d["reviewer"]) if d.get("reviewer") else None,
        record=dict(d),
        heatmap_png=_b64(d.get("heatmap_png")),
        mask_png=_b64(d.get("mask_png")),
    )


def parse_reviews(d: Mapping[str, Any]) -> ReviewPage:
    return ReviewPage(
        request_id=str(d.get("request_id", "")),
        status=str(d["status"]),
        total=int(d["total"]),
        offset=int(d["offset"]),
        limit=int(d["limit"]),
        items=tuple(parse_review(x) for x in d["items"]),
    )


def parse_card(d: Mapping[str, Any]) -> ModelCard:
    """``GET /models/{version}`` JSON -> :class:`ModelCard`."""
    return ModelCard(str(d["request_id"]), str(d["version"]), str(d["tag"]), dict(d["card"]))


# ============================================================================================ clients


class SyncHTTP(Protocol):
    """What the sync client needs of an HTTP client: ``httpx.Client`` and starlette's
    ``TestClient`` both fit."""

    def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = ...,
        params: dict[str, str] | None = ...,
        headers: dict[str, str] | None = ...,
        timeout: float = ...,
    ) -> Any: ...

    def close(self) -> None: ...


class AsyncHTTP(Protocol):
    """What the async client needs of an HTTP client: ``httpx.AsyncClient`` fits."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = ...,
        params: dict[str, str] | None = ...,
        headers: dict[str, str] | None = ...,
        timeout: float = ...,
    ) -> Any: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class _Call:
    """One endpoint call, built once and sent (and resent) by either client."""

    method: str
    path: str
    parse: Callable[[Mapping[str, Any]], Any]
    content: bytes | None = None
    params: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _ClientBase:
    """Configuration, request building and response handling shared by both clients."""

    user_agent: ClassVar[str] = "medaudit-client/0.1"

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | None,
        retries: int | RetryPolicy,
        http: Any,
    ) -> None:
        url = base_url or (str(http.base_url) if http is not None else DEFAULT_URL)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        # An injected client keeps its own timeouts unless one is given (starlette's TestClient
        # even warns when a request names one).
        self.timeout: float | None = float(timeout) if timeout is not None else None
        if self.timeout is None and http is None:
            self.timeout = DEFAULT_TIMEOUT
        self.base_url = url.rstrip("/")
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries=retries)
        self._api_key = api_key or None
        self._owns_http = http is None

    def __repr__(self) -> str:  # never the key
        auth = "with key" if self._api_key else "no key"
        return f"{type(self).__name__}({self.base_url!r}, {auth}, retries={self.retry.retries})"

    def _headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": self.user_agent}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return {**h, **extra}

    @staticmethod
    def _image_call(
        path: str,
        image: ImageInput,
        parse: Callable[[Mapping[str, Any]], Any],
        *,
        version: str | None = None,
        subject_key: str | None = None,
        request_id: str | None = None,
        params: dict[str, str] | None = None,
    ) -> _Call:
        content, ctype = encode_image(image)
        headers = {"Content-Type": ctype}
        for name, value in (
            ("X-Model-Version", version),
            ("X-Subject-Key", subject_key),
            ("X-Request-ID", request_id),
        ):
            if value is not None:
                headers[name] = value
        return _Call("POST", path, parse, content=content, params=params, headers=headers)

    @staticmethod
    def _compare_call(image: ImageInput, versions: Sequence[str] | None, request_id: str | None) -> _Call:
        if isinstance(versions, str):  # "a,b" would otherwise be iterated letter by letter
            versions = [v for v in versions.split(",") if v.strip()]
        params = {"versions": ",".join(v.strip() for v in versions)} if versions else None
        return _ClientBase._image_call("/compare", image, parse_compare, request_id=request_id, params=params)

    @staticmethod
    def _route_call(version: str | None, subject_key: str | None) -> _Call:
        headers = {}
        if version is not None:
            headers["X-Model-Version"] = version
        if subject_key is not None:
            headers["X-Subject-Key"] = subject_key
        return _Call("GET", "/models/_route", parse_route, headers=headers)

    @staticmethod
    def _reviews_call(status: str, limit: int, offset: int) -> _Call:
        params = {"status": status, "limit": str(limit), "offset": str(offset)}
        return _Call("GET", "/reviews/", parse_reviews, params=params)

    @staticmethod
    def _review_call(flag_id: str, images: bool) -> _Call:
        params = {"images": "1" if images else "0"}
        return _Call("GET", "/reviews/" + quote(flag_id, safe=""), parse_review, params=params)

    @staticmethod
    def _resolve_call(flag_id: str, verdict: str, note: str) -> _Call:
        body = json.dumps({"verdict": verdict, "note": note}).encode()
        return _Call(
            "POST",
            "/reviews/" + quote(flag_id, safe="") + "/resolve",
            parse_review,
            content=body,
            headers={"Content-Type": "application/json"},
        )

    def _url(self, call: _Call) -> str:
        return self.base_url + call.path

    def _request_kwargs(self, call: _Call) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "content": call.content,
            "params": call.params,
            "headers": self._headers(call.headers),
        }
        if self.timeout is not None:
            kw["timeout"] = self.timeout
        return kw

    def _should_retry(self, attempt: int, status: int) -> bool:
        return status in self.retry.statuses and attempt < self.retry.retries

    def _result(self, call: _Call, r: _Response) -> Any:
        check_api_version(self.base_url, r.headers.get(API_HEADER))
        if r.status_code >= 400:
            raise _http_error(r)
        try:
            body = r.json()
            return call.parse(body)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            snippet = r.text.strip()[:120]
            raise ResponseFormatError(
                f"{call.method} {self._url(call)} answered {r.status_code} with a body that is not "
                f"medaudit's JSON ({type(e).__name__}: {e}); does the URL point at the medaudit "
                f"service? Body starts: {snippet!r}"
            ) from e

    def _transport_error(
        self, call: _Call, attempt: int, e: BaseException, retry: bool
    ) -> MedauditClientError | None:
        """The error to raise for a transport exception, or ``None`` to retry it."""
        if isinstance(e, _transport_errors(_RETRY_TRANSPORT)):
            if retry and attempt < self.retry.retries:
                return None
            return MedauditConnectionError(self.base_url, attempt + 1, e)
        if isinstance(e, _transport_errors(("TimeoutException",))):
            return MedauditTimeoutError(self._url(call), self.timeout)
        return MedauditConnectionError(self.base_url, attempt + 1, e)  # e.g. a protocol httpx refuses


class MedauditClient(_ClientBase):
    """Synchronous client of one medaudit service.

    Args:
        base_url: The service, e.g. ``http://127.0.0.1:3000``; default: the injected client's
            ``base_url``, else :data:`DEFAULT_URL`.
        api_key: Sent as ``Authorization: Bearer <key>``; ``None`` for a service with auth off.
        timeout: Seconds per attempt (default :data:`DEFAULT_TIMEOUT`; an injected client keeps
            its own unless this is given).
        retries: Retries after the first attempt, or a full :class:`RetryPolicy`.
        http: An HTTP client to send with (``httpx.Client``, starlette's ``TestClient``); it is
            not closed by :meth:`close`. Default: a new ``httpx.Client``, closed by :meth:`close`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retries: int | RetryPolicy = 3,
        http: SyncHTTP | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries, http)
        self._http: SyncHTTP = http if http is not None else httpx.Client()

    def __enter__(self) -> MedauditClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the HTTP client if this object created it."""
        if self._owns_http:
            self._http.close()

    def _send(self, call: _Call, retry: bool = True) -> _Response:
        attempt = 0
        while True:
            try:
                r: _Response = self._http.request(call.method, self._url(call), **self._request_kwargs(call))
            except _transport_errors(("TransportError",)) as e:
                err = self._transport_error(call, attempt, e, retry)
                if err is not None:
                    raise err from e
                time.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            if retry and self._should_retry(attempt, r.status_code):
                time.sleep(self.retry.delay(attempt, r.headers.get("retry-after")))
                attempt += 1
                continue
            return r

    def _call(self, call: _Call) -> Any:
        return self._result(call, self._send(call))

    def predict(
        self,
        image: ImageInput,
        *,
        version: str | None = None,
        subject_key: str | None = None,
        request_id: str | None = None,
    ) -> PredictResponse:
        """Prediction for one image (adaptively batched on the service).

        Args:
            image: A path, encoded bytes, a PIL image or a uint8 array (see :func:`encode_image`).
            version: Ask for this version (wins over A/B routing); 404 :class:`UnknownVersion` if
                it is not served.
            subject_key: A stable key (patient, study): the same key always gets the same version.
            request_id: Your id for the request (echoed, and in the service logs).
        """
        call = self._image_call(
            "/predict", image, parse_predict, version=version, subject_key=subject_key, request_id=request_id
        )
        return self._call(call)

    def audit(
        self,
        image: ImageInput,
        *,
        version: str | None = None,
        subject_key: str | None = None,
        raw_heatmap: bool = False,
        request_id: str | None = None,
    ) -> AuditResponse:
        """Prediction, LRP heatmap, concept scores with masks, and the flag decision.

        Args:
            image: As for :meth:`predict`.
            version: As for :meth:`predict`.
            subject_key: As for :meth:`predict`.
            raw_heatmap: Also fetch the (H, W) float16 heatmap (``AuditResponse.heatmap``).
            request_id: As for :meth:`predict`.
        """
        call = self._image_call(
            "/audit",
            image,
            parse_audit,
            version=version,
            subject_key=subject_key,
            request_id=request_id,
            params={"raw_heatmap": "1"} if raw_heatmap else None,
        )
        return self._call(call)

    def compare(
        self, image: ImageInput, *, versions: Sequence[str] | None = None, request_id: str | None = None
    ) -> CompareResponse:
        """The image audited by several versions (default: every served one), side by side."""
        return self._call(self._compare_call(image, versions, request_id))

    def models(self) -> ModelsResponse:
        """Served versions, A/B weights, the shadow and its agreement counters."""
        return self._call(_Call("GET", "/models/", parse_models))

    def model_card(self, version: str) -> ModelCard:
        """One version's model card (``vanilla`` or its full tag ``resnet18-synthderm:vanilla``)."""
        call = _Call("GET", "/models/" + quote(version, safe=""), parse_card)
        return self._call(call)

    def route(self, *, version: str | None = None, subject_key: str | None = None) -> RouteInfo:
        """Which version would answer a request with these headers, without running a model.

        Without either, the answer is a random draw with the A/B weights, like a key-less request.
        """
        return self._call(self._route_call(version, subject_key))

    def reviews(self, status: str = "open", *, limit: int = 50, offset: int = 0) -> ReviewPage:
        """One page of the review queue: ``open`` flags oldest first, or ``resolved`` newest first."""
        return self._call(self._reviews_call(status, limit, offset))

    def review(self, flag_id: str, *, images: bool = True) -> Review:
        """One flag's whole record, with its heatmap and mask PNGs unless ``images=False``."""
        return self._call(self._review_call(flag_id, images))

    def resolve(self, flag_id: str, verdict: str, note: str = "") -> Review:
        """Records a reviewer's verdict (``artifact_confirmed``, ``false_alarm`` or ``other``).

        Raises:
            Conflict: The flag was resolved before (a retried request that did land, too).
            InvalidInput: An unknown verdict or an over-long note.
        """
        return self._call(self._resolve_call(flag_id, verdict, note))

    def ready(self) -> bool:
        """Whether every version is loaded and warm (``/readyz``). One attempt, no retries.

        Raises:
            MedauditConnectionError: Nothing answers at ``base_url``.
        """
        return self._send(_Call("GET", "/readyz", dict), retry=False).status_code == 200

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Blocks until :meth:`ready`, e.g. right after starting ``bentoml serve``.

        Raises:
            MedauditTimeoutError: Not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ready():
                    return
            except MedauditConnectionError:
                pass
            if time.monotonic() >= deadline:
                raise MedauditTimeoutError(self.base_url + "/readyz", timeout)
            time.sleep(interval)


class AsyncMedauditClient(_ClientBase):
    """Asynchronous client of one medaudit service: the same methods as :class:`MedauditClient`,
    awaited. Run many audits concurrently with ``asyncio.gather``.

    Args:
        base_url: As for :class:`MedauditClient`.
        api_key: As for :class:`MedauditClient`.
        timeout: As for :class:`MedauditClient`.
        retries: As for :class:`MedauditClient`.
        http: An ``httpx.AsyncClient`` to send with (not closed by :meth:`aclose`); default: a new
            one, closed by :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retries: int | RetryPolicy = 3,
        http: AsyncHTTP | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries, http)
        self._http: AsyncHTTP = http if http is not None else httpx.AsyncClient()

    async def __aenter__(self) -> AsyncMedauditClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the HTTP client if this object created it."""
        if self._owns_http:
            await self._http.aclose()

    async def _send(self, call: _Call, retry: bool = True) -> _Response:
        attempt = 0
        while True:
            try:
                r: _Response = await self._http.request(
                    call.method, self._url(call), **self._request_kwargs(call)
                )
            except _transport_errors(("TransportError",)) as e:
                err = self._transport_error(call, attempt, e, retry)
                if err is not None:
                    raise err from e
                await anyio.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            if retry and self._should_retry(attempt, r.status_code):
                await anyio.sleep(self.retry.delay(attempt, r.headers.get("retry-after")))
                attempt += 1
                continue
            return r

    async def _call(self, call: _Call) -> Any:
        return self._result(call, await self._send(call))

    async def predict(
        self,
        image: ImageInput,
        *,
        version: str | None = None,
        subject_key: str | None = None,
        request_id: str | None = None,
    ) -> PredictResponse:
        """See :meth:`MedauditClient.predict`."""
        call = self._image_call(
            "/predict", image, parse_predict, version=version, subject_key=subject_key, request_id=request_id
        )
        return await self._call(call)

    async def audit(
        self,
        image: ImageInput,
        *,
        version: str | None = None,
        subject_key: str | None = None,
        raw_heatmap: bool = False,
        request_id: str | None = None,
    ) -> AuditResponse:
        """See :meth:`MedauditClient.audit`."""
        call = self._image_call(
            "/audit",
            image,
            parse_audit,
            version=version,
            subject_key=subject_key,
            request_id=request_id,
            params={"raw_heatmap": "1"} if raw_heatmap else None,
        )
        return await self._call(call)

    async def compare(
        self, image: ImageInput, *, versions: Sequence[str] | None = None, request_id: str | None = None
    ) -> CompareResponse:
        """See :meth:`MedauditClient.compare`."""
        return await self._call(self._compare_call(image, versions, request_id))

    async def models(self) -> ModelsResponse:
        """See :meth:`MedauditClient.models`."""
        return await self._call(_Call("GET", "/models/", parse_models))

    async def model_card(self, version: str) -> ModelCard:
        """See :meth:`MedauditClient.model_card`."""
        call = _Call("GET", "/models/" + quote(version, safe=""), parse_card)
        return await self._call(call)

    async def route(self, *, version: str | None = None, subject_key: str | None = None) -> RouteInfo:
        """See :meth:`MedauditClient.route`."""
        return await self._call(self._route_call(version, subject_key))

    async def reviews(self, status: str = "open", *, limit: int = 50, offset: int = 0) -> ReviewPage:
        """See :meth:`MedauditClient.reviews`."""
        return await self._call(self._reviews_call(status, limit, offset))

    async def review(self, flag_id: str, *, images: bool = True) -> Review:
        """See :meth:`MedauditClient.review`."""
        return await self._call(self._review_call(flag_id, images))

    async def resolve(self, flag_id: str, verdict: str, note: str = "") -> Review:
        """See :meth:`MedauditClient.resolve`."""
        return await self._call(self._resolve_call(flag_id, verdict, note))

    async def ready(self) -> bool:
        """See :meth:`MedauditClient.ready`."""
        return (await self._send(_Call("GET", "/readyz", dict), retry=False)).status_code == 200

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """See :meth:`MedauditClient.wait_ready`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.ready():
                    return
            except MedauditConnectionError:
                pass
            if time.monotonic() >= deadline:
                raise MedauditTimeoutError(self.base_url + "/readyz", timeout)
            await anyio.sleep(interval)
