"""medaudit-client: the typed HTTP client of the medaudit service and the ``medaudit
predict|audit|compare`` commands. Needs httpx, typer and rich alone.

Usage::

    from medaudit.clients import MedauditClient, UnknownVersion

    with MedauditClient("http://127.0.0.1:3000", api_key=os.environ["MEDAUDIT_API_KEY"]) as mc:
        res = mc.audit("lesion.png", version="vanilla")

One module per concern, like redis-py's client:

* :mod:`~medaudit.clients.endpoints`: one method per endpoint of the service, written once for
  both clients (a mixin, like redis-py's command classes);
* :mod:`~medaudit.clients.sync` and :mod:`~medaudit.clients.aio`: :class:`MedauditClient` and
  :class:`AsyncMedauditClient`, which inherit those methods and differ in how they send
  (:mod:`~medaudit.clients._base` holds what they share);
* :mod:`~medaudit.clients.responses`: the answers as frozen dataclasses, and their parsers;
* :mod:`~medaudit.clients.errors`: one error tree under :class:`MedauditClientError`;
* :mod:`~medaudit.clients.retry`: :class:`RetryPolicy`, backoff with jitter and ``Retry-After``;
* :mod:`~medaudit.clients.images`: what an image may be, and how it goes on the wire;
* :mod:`~medaudit.clients.dicom`: DICOM answers (multipart/related parts) and the STOW-RS answer;
* :mod:`~medaudit.clients.service_cmd` and :mod:`~medaudit.clients.cli`: the commands.
"""

from __future__ import annotations

from medaudit.clients._base import DEFAULT_TIMEOUT, DEFAULT_URL
from medaudit.clients.aio import AsyncMedauditClient
from medaudit.clients.api_version import API_VERSION
from medaudit.clients.dicom import DicomObjectRef, StowInstance, StowResponse
from medaudit.clients.errors import (
    Conflict,
    Forbidden,
    IncompatibleServer,
    InvalidInput,
    MedauditClientError,
    MedauditConnectionError,
    MedauditHTTPError,
    MedauditTimeoutError,
    NotFound,
    RateLimited,
    ResponseFormatError,
    ServerError,
    Unauthorized,
    UnknownVersion,
    check_api_version,
)
from medaudit.clients.images import ImageInput, encode_image, sniff_content_type
from medaudit.clients.responses import (
    AuditResponse,
    CompareResponse,
    ConceptScore,
    FlagDecision,
    FlagThresholds,
    ModelCard,
    ModelInfo,
    ModelsResponse,
    Prediction,
    PredictResponse,
    Review,
    ReviewPage,
    RouteInfo,
    ShadowAgreement,
    ShadowInfo,
)
from medaudit.clients.retry import RetryPolicy
from medaudit.clients.sync import MedauditClient

__all__ = [
    "API_VERSION",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "AsyncMedauditClient",
    "AuditResponse",
    "CompareResponse",
    "ConceptScore",
    "Conflict",
    "DicomObjectRef",
    "FlagDecision",
    "FlagThresholds",
    "Forbidden",
    "ImageInput",
    "IncompatibleServer",
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
    "RetryPolicy",
    "Review",
    "ReviewPage",
    "RouteInfo",
    "ServerError",
    "ShadowAgreement",
    "ShadowInfo",
    "StowInstance",
    "StowResponse",
    "Unauthorized",
    "UnknownVersion",
    "check_api_version",
    "encode_image",
    "sniff_content_type",
]
