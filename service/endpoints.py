"""The service's HTTP contract, listed once: every route it answers, what its OpenAPI operation
says, and the contract's version.

Each :class:`Endpoint` row is a route *and* its documentation: name, method, path and the app that
serves it, then its summary, parameters, JSON request body, answer schema and the error statuses it
can answer. The routes are built from this table (the entry service's BentoML APIs and its mounted
GET apps in :mod:`medaudit.service.api`, the reviewer app in :mod:`medaudit.service.flags.review`),
and whatever else needs the list reads it here: the OpenAPI document
(:mod:`medaudit.service.openapi` assembles one operation per row, and writes nothing per endpoint
itself), the upload middleware (size limit and multipart handling of the image endpoints) and the
tests. A new endpoint is its row here and its handler; tests/unit/test_openapi.py fails when the
served routes and the table disagree.

Schemas are JSON Schema (OpenAPI 3.1) dicts, written with the small vocabulary below (:data:`STR`,
:func:`obj`, :func:`ref`...). An answer names a component schema (``answer="ModelsIndex"``); one
that is new can come with its row (:attr:`Endpoint.schemas`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The HTTP contract's version (the OpenAPI document's ``info.version``, the ``X-Medaudit-API``
#: header). Bump the major when a route, field or status changes meaning or disappears (and
#: medaudit-client's ``API_VERSION`` with it); the minor for additions.
API_VERSION = "1.1"

#: Where an endpoint is served from (:attr:`Endpoint.app`).
SERVICE = "service"  # a BentoML API of the entry service (``@bentoml.api``)
BENTOML = "bentoml"  # BentoML's own route (probes, metrics)
MODELS_MOUNT = "/models"
REVIEWS_MOUNT = "/reviews"
DICOMWEB_MOUNT = "/dicomweb"

#: Who may call an endpoint (:attr:`Endpoint.auth`).
KEY = "key"  # an API key, where the deployment requires keys (its 401 is documented only there)
REVIEWER = "reviewer"  # the reviewer role: the reviewer app authorizes every request
OPEN = "open"  # anyone (``security: []``): BentoML's probes and metrics

# ------------------------------------------------------------------------- schema vocabulary

Schema = dict[str, Any]

STR: Schema = {"type": "string"}
NUM: Schema = {"type": "number"}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}
UNIT: Schema = {"type": "number", "minimum": 0, "maximum": 1}
B64_PNG: Schema = {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}


def ref(name: str) -> Schema:
    """A reference to the component schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, **extra: Any) -> Schema:
    """An object schema: ``required`` properties must be there, ``optional`` ones may."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
        **extra,
    }


def nullable(s: Schema) -> Schema:
    """``s`` or ``null``."""
    return {"anyOf": [s, {"type": "null"}]}


#: Parameter schemas only the document can write, named by a :class:`Param` and filled in by
#: :mod:`medaudit.service.openapi`: the deployment's versions, and the review queue's statuses and
#: page size and offset (defined in :mod:`medaudit.service.flags.review`, which imports this module).
SERVED_VERSION = "served_version"  # {"enum": [the served versions]}
REVIEW_STATUS = "review_status"  # {"enum": STATUSES}
PAGE_LIMIT = "page_limit"  # an integer, 1 to MAX_LIMIT
PAGE_OFFSET = "page_offset"  # an integer, 0 to MAX_OFFSET


@dataclass(frozen=True)
class Param:
    """One parameter of an endpoint (an OpenAPI Parameter Object).

    Attributes:
        name: The header, query or path parameter's name.
        where: ``header``, ``query`` or ``path``.
        schema: Its JSON schema, or the name of one the document writes (:data:`SERVED_VERSION`,
            :data:`REVIEW_STATUS`, :data:`PAGE_LIMIT`); default: a string.
        description: What it does, for people.
        required: Whether it must be sent (a path parameter must be); ``None`` leaves it unsaid
            (OpenAPI's default: optional).
    """

    name: str
    where: str
    schema: Schema | str | None = field(default=None, hash=False)
    description: str | None = None
    required: bool | None = None

    def __post_init__(self) -> None:
        if self.where not in ("header", "query", "path"):
            raise ValueError(f"parameter {self.name!r}: where={self.where!r}, expected header, query or path")
        if self.where == "path" and self.required is not True:
            raise ValueError(f"path parameter {self.name!r} must be required=True (OpenAPI)")


REQUEST_ID = Param(
    "X-Request-ID",
    "header",
    description="Echoed in the response and its logs; generated when absent.",
    required=False,
)
#: The headers that choose the answering version (and the request id).
ROUTING = (
    REQUEST_ID,
    Param(
        "X-Model-Version",
        "header",
        SERVED_VERSION,
        "Answer with this served version (wins over A/B routing).",
        required=False,
    ),
    Param(
        "X-Subject-Key",
        "header",
        description="A/B routing key (e.g. a pseudonymous patient id): same key, same version.",
        required=False,
    ),
)
FLAG_ID = Param("flag_id", "path", required=True)

#: What an answer holds (``?detail=``; :mod:`medaudit.service.screening`): the prediction alone, the
#: screen (prediction, concept scores, relevance shares and the flag decision, no heatmap) or the
#: full audit (heatmap and masks too). ``/predict`` takes all three, ``/audit`` the last two.
PREDICT_DETAILS = ("prediction", "scores", "full")
AUDIT_DETAILS = ("scores", "full")

#: What an image endpoint can answer besides 200 (401 only where keys are required).
IMAGE_ERRORS = (400, 401, 404, 413, 415, 422, 503)
#: What a reviewer route can always answer (no reviewer key, another role, Redis down).
REVIEW_ERRORS = (401, 403, 503)
#: A probe's answers (BentoML's, no JSON body).
PROBE = {"200": {"description": "OK"}, "503": {"description": "Not ready"}}


@dataclass(frozen=True)
class Endpoint:
    """One route of the contract, with its OpenAPI operation.

    Attributes:
        name: Its ``operationId`` in the OpenAPI document (and the client method's name).
        method: The HTTP method.
        path: The full path as served, in Starlette's syntax (``/models/{version}``).
        app: :data:`SERVICE`, :data:`BENTOML`, or the path a Starlette app serving it is
            mounted at (:data:`MODELS_MOUNT`, :data:`REVIEWS_MOUNT`).
        image: The body is an image upload (size limit, multipart: ``UploadNormalizer``; the
            document writes the image request body).
        reviews: In the contract only while the review queue is on (``MEDAUDIT_FLAGS``).
        summary: The operation's one-line summary.
        params: Its parameters, in order.
        answer: The component schema of its 200 JSON body (``"ModelsIndex"``).
        errors: The error statuses it can answer, each with the ``Error`` body. A :data:`KEY`
            endpoint's 401 is documented only for a deployment that requires keys.
        auth: :data:`KEY`, :data:`REVIEWER` or :data:`OPEN`.
        body: The component schema of a JSON request body (required), if it takes one.
        responses: Literal OpenAPI responses, for a route that does not answer the service's JSON
            (BentoML's probes and metrics); replaces ``answer`` and ``errors``.
        schemas: Component schemas this row brings to the document (a new answer's), by name.
    """

    name: str
    method: str
    path: str
    app: str = SERVICE
    image: bool = False
    reviews: bool = False
    summary: str = ""
    params: tuple[Param, ...] = ()
    answer: str | None = None
    errors: tuple[int, ...] = ()
    auth: str = KEY
    body: str | None = None
    responses: Mapping[str, Any] | None = field(default=None, hash=False)
    schemas: Mapping[str, Schema] = field(default_factory=dict, hash=False)

    @property
    def route(self) -> str:
        """The path inside the mounted app that serves it (``/models/{version}`` -> ``/{version}``)."""
        if self.app.startswith("/") and self.path.startswith(self.app + "/"):
            return self.path[len(self.app) :]
        return self.path


PREDICT = Endpoint(
    "predict",
    "POST",
    "/predict",
    image=True,
    summary="Prediction for one image (adaptively batched; ONNX Runtime), or its screen or audit",
    params=(
        *ROUTING,
        Param(
            "detail",
            "query",
            {"enum": list(PREDICT_DETAILS)},
            "prediction: the prediction; scores: a screen (prediction, concept scores, relevance "
            "shares, flag decision; the heatmap only where the screen flags); full: the audit. "
            "Default: the deployment's (MEDAUDIT_PREDICT_DETAIL; prediction unless set).",
            required=False,
        ),
    ),
    answer="PredictAnswer",
    errors=IMAGE_ERRORS,
    schemas={
        "PredictAnswer": {
            "anyOf": [ref("PredictResponse"), ref("ScreenResponse"), ref("AuditResponse")],
            "description": "By detail: PredictResponse, ScreenResponse or AuditResponse.",
        }
    },
)
AUDIT = Endpoint(
    "audit",
    "POST",
    "/audit",
    image=True,
    summary="Prediction, LRP heatmap, artifact-concept scores, masks and flag decision",
    params=(
        *ROUTING,
        Param(
            "raw_heatmap",
            "query",
            description="1/true/yes adds the raw float16 heatmap; anything else does not.",
            required=False,
        ),
        Param(
            "detail",
            "query",
            {"enum": list(AUDIT_DETAILS)},
            "full (default): the audit; scores: a screen, as /predict?detail=scores answers.",
            required=False,
        ),
        Param(
            "frames",
            "query",
            description='Asked with Accept: multipart/related; type="application/dicom" (the audit as '
            "DICOM objects, docs/dicom.md): a multi-frame DICOM's first (default), all, or 1,3.",
            required=False,
        ),
    ),
    answer="AuditAnswer",
    errors=(*IMAGE_ERRORS, 406),
    schemas={
        "AuditAnswer": {
            "anyOf": [ref("AuditResponse"), ref("ScreenResponse")],
            "description": "By detail: AuditResponse or ScreenResponse.",
        }
    },
)
COMPARE = Endpoint(
    "compare",
    "POST",
    "/compare",
    image=True,
    summary="Audits of one image by several versions, side by side",
    params=(
        REQUEST_ID,
        Param(
            "versions",
            "query",
            description="Comma-separated versions; default: every served one.",
            required=False,
        ),
    ),
    answer="CompareResponse",
    errors=IMAGE_ERRORS,
)
MODELS = Endpoint(
    "models",
    "GET",
    "/models/",
    app=MODELS_MOUNT,
    summary="Served versions, A/B weights, shadow agreement, flag thresholds",
    params=(REQUEST_ID,),
    answer="ModelsIndex",
    errors=(401,),
)
# Version names start with a letter or digit (service.config), so "_route" is never one.
ROUTE = Endpoint(
    "route",
    "GET",
    "/models/_route",
    app=MODELS_MOUNT,
    summary="Which version these headers would get (no model runs)",
    params=ROUTING,
    answer="Route",
    errors=(401, 404),
)
MODEL_CARD = Endpoint(
    "model_card",
    "GET",
    "/models/{version}",
    app=MODELS_MOUNT,
    summary="One served version's model card",
    params=(REQUEST_ID, Param("version", "path", SERVED_VERSION, required=True)),
    answer="ModelCard",
    errors=(401, 404),
)
REVIEWS = Endpoint(
    "reviews",
    "GET",
    "/reviews/",
    app=REVIEWS_MOUNT,
    reviews=True,
    summary="One page of the review queue (reviewer role)",
    params=(
        Param("status", "query", REVIEW_STATUS),
        Param("limit", "query", PAGE_LIMIT),
        Param("offset", "query", PAGE_OFFSET),
    ),
    answer="ReviewPage",
    errors=(*REVIEW_ERRORS, 422),
    auth=REVIEWER,
)
REVIEW = Endpoint(
    "review",
    "GET",
    "/reviews/{flag_id}",
    app=REVIEWS_MOUNT,
    reviews=True,
    summary="One flag's record, with its heatmap and mask (reviewer role)",
    params=(FLAG_ID, Param("images", "query")),
    answer="Review",
    errors=(*REVIEW_ERRORS, 404),
    auth=REVIEWER,
)
RESOLVE = Endpoint(
    "resolve",
    "POST",
    "/reviews/{flag_id}/resolve",
    app=REVIEWS_MOUNT,
    reviews=True,
    summary="Record a reviewer's verdict on a flag, once (reviewer role)",
    params=(FLAG_ID,),
    body="Verdict",
    answer="Review",
    errors=(*REVIEW_ERRORS, 404, 409, 422),
    auth=REVIEWER,
)
READYZ = Endpoint(
    "readyz",
    "GET",
    "/readyz",
    app=BENTOML,
    summary="200 once every version is loaded and warmed",
    auth=OPEN,
    responses=PROBE,
)
LIVEZ = Endpoint(
    "livez", "GET", "/livez", app=BENTOML, summary="200 while the process serves", auth=OPEN, responses=PROBE
)
HEALTHZ = Endpoint(
    "healthz",
    "GET",
    "/healthz",
    app=BENTOML,
    summary="200 while the process serves",
    auth=OPEN,
    responses=PROBE,
)
METRICS = Endpoint(
    "metrics",
    "GET",
    "/metrics",
    app=BENTOML,
    summary="Prometheus exposition (medaudit_* and bentoml_* series)",
    auth=OPEN,
    responses={"200": {"description": "OK", "content": {"text/plain": {"schema": STR}}}},
)

#: DICOMweb (service/dicomweb.py): STOW-RS in, WADO-RS out; multipart bodies, so literal responses.
_DICOM_PARTS = {
    'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
}
_DICOM_ERRORS = {
    str(s): {"description": d, "content": {"application/json": {"schema": ref("Error")}}}
    for s, d in (
        (401, "No or wrong API key (where keys are required)"),
        (404, "Never created here, or expired"),
    )
}
STOW = Endpoint(
    "stow",
    "POST",
    "/dicomweb/studies",
    app=DICOMWEB_MOUNT,
    summary="STOW-RS: audit each DICOM instance of a multipart/related body; per-instance results",
    params=(
        REQUEST_ID,
        *ROUTING[1:],
        Param("frames", "query", description="first (default), all, or frame numbers such as 1,3."),
    ),
    responses={
        **{
            s: {"description": d, "content": {"application/json": {"schema": {"type": "object"}}}}
            for s, d in (
                ("200", "Every instance audited"),
                ("202", "Some instances failed (each entry says why)"),
                ("409", "No instance could be audited"),
            )
        },
        **{
            str(s): {"description": "Error", "content": {"application/json": {"schema": ref("Error")}}}
            for s in (400, 401, 413, 422)
        },
    },
)
WADO_STUDY = Endpoint(
    "wado_study",
    "GET",
    "/dicomweb/studies/{study}",
    app=DICOMWEB_MOUNT,
    summary="WADO-RS: the DICOM objects created here for a study (while they are kept)",
    params=(REQUEST_ID, Param("study", "path", required=True)),
    responses={"200": {"description": "The objects", "content": _DICOM_PARTS}, **_DICOM_ERRORS},
)
WADO_SERIES = Endpoint(
    "wado_series",
    "GET",
    "/dicomweb/studies/{study}/series/{series}",
    app=DICOMWEB_MOUNT,
    summary="WADO-RS: one created series",
    params=(REQUEST_ID, Param("study", "path", required=True), Param("series", "path", required=True)),
    responses={"200": {"description": "The objects", "content": _DICOM_PARTS}, **_DICOM_ERRORS},
)
WADO_INSTANCE = Endpoint(
    "wado_instance",
    "GET",
    "/dicomweb/studies/{study}/series/{series}/instances/{instance}",
    app=DICOMWEB_MOUNT,
    summary="WADO-RS: one created instance (multipart/related, or application/dicom if asked)",
    params=(
        REQUEST_ID,
        Param("study", "path", required=True),
        Param("series", "path", required=True),
        Param("instance", "path", required=True),
    ),
    responses={
        "200": {
            "description": "The instance",
            "content": {
                **_DICOM_PARTS,
                "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **_DICOM_ERRORS,
    },
)

ENDPOINTS: tuple[Endpoint, ...] = (
    PREDICT,
    AUDIT,
    COMPARE,
    MODELS,
    ROUTE,
    MODEL_CARD,
    READYZ,
    LIVEZ,
    HEALTHZ,
    METRICS,
    REVIEWS,
    REVIEW,
    RESOLVE,
    STOW,
    WADO_STUDY,
    WADO_SERIES,
    WADO_INSTANCE,
)
#: Paths of the endpoints whose body is an image.
IMAGE_PATHS: tuple[str, ...] = tuple(e.path for e in ENDPOINTS if e.image)


def documented(*, reviews: bool) -> tuple[Endpoint, ...]:
    """The endpoints of a deployment's contract (the reviewer routes only with ``reviews``)."""
    return tuple(e for e in ENDPOINTS if reviews or not e.reviews)


def mounted(app: str) -> tuple[Endpoint, ...]:
    """The endpoints the Starlette app mounted at ``app`` serves."""
    return tuple(e for e in ENDPOINTS if e.app == app)
