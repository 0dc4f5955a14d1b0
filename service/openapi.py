"""The service's OpenAPI 3.1 document, served at ``GET /openapi.json``.

BentoML publishes its own document at ``/docs.json`` (its Swagger UI and ``bentoml.SyncHTTPClient``
read it, so it stays as it is), but from BentoML's view of the service: every response is ``{}``,
only 400/404/500 are listed, the image endpoints' headers and query parameters and the routes we
mount (``/models``, ``/reviews``) are absent. This module writes the contract clients actually
get: every route, its parameters, every status it can answer with and the JSON schema of each
body. ``tests/live`` fuzzes the running service against this document (schemathesis) and fails on
any response that is a 5xx or does not match it, so the document cannot drift from the code
unnoticed.

The document depends on the deployment: the served versions (an enum for ``X-Model-Version`` and
``/models/{version}``), whether keys are required (``security``), and whether the review queue is
on (``/reviews`` only when ``MEDAUDIT_FLAGS`` is on). The middleware
:class:`~service.middleware.OpenAPIDocument` serves it, built once on the first request from the
same :class:`~service.config.Settings` the service reads.

Its paths are the routes of :mod:`medaudit.service.endpoints`, each with the operation
:func:`_operations` writes for it under the endpoint's name; a route without one is an error here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medaudit.service.endpoints import API_VERSION, documented
from medaudit.service.flags.review import MAX_LIMIT, STATUSES, VERDICTS
from medaudit.service.inputs import FORMATS

#: Where the document is served (not itself an operation of the contract).
PATH = "/openapi.json"
JSON = "application/json"

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, **extra: Any) -> Schema:
    """An object schema: ``required`` properties must be there, ``optional`` ones may."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
        **extra,
    }


STR: Schema = {"type": "string"}
NUM: Schema = {"type": "number"}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}
UNIT: Schema = {"type": "number", "minimum": 0, "maximum": 1}
B64_PNG: Schema = {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}


def _nullable(s: Schema) -> Schema:
    return {"anyOf": [s, {"type": "null"}]}


def _schemas() -> dict[str, Schema]:
    prediction = _obj(
        {
            "version": STR,
            "label": STR,
            "class_index": {"type": "integer", "minimum": 0},
            "probabilities": {"type": "object", "additionalProperties": UNIT},
        }
    )
    concept = _obj(
        {
            "concept": STR,
            "score": NUM,
            "percentile": {"type": "number", "minimum": 0, "maximum": 100},
            "present": BOOL,
            "threshold": NUM,
            "relevance_share": UNIT,
            "mask_png": _nullable(B64_PNG),
        },
        description="One artifact concept on this image (method.md §1.4).",
    )
    policy_flag = _obj(
        {
            "concept": STR,
            "severity": {"enum": ["low", "medium", "high"]},
            "reasons": {"type": "array", "items": STR},
            "relied_on": {"type": "array", "items": STR},
        }
    )
    flag = _obj(
        {
            "flagged": BOOL,
            "severity": _nullable({"enum": ["low", "medium", "high"]}),
            "flags": {"type": "array", "items": policy_flag},
            "concepts": {"type": "array", "items": STR},
            "reasons": {"type": "array", "items": STR},
        },
        description="The flag policy's decision; flagged audits go to the review queue.",
    )
    raw_heatmap = _obj(
        {
            "dtype": {"const": "float16"},
            "shape": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2},
            "data": {"type": "string", "contentEncoding": "base64"},
        }
    )
    audit_core = {
        "prediction": _ref("Prediction"),
        "heatmap_png": B64_PNG,
        "heatmap": _nullable(raw_heatmap),
        "layer": STR,
        "concepts": {"type": "array", "items": _ref("ConceptScore")},
        "flag": _ref("Flag"),
    }
    answer = {
        "request_id": STR,
        "version": STR,
        "via": {"enum": ["explicit", "hash", "random"]},
        "shadow": _nullable(_obj({"version": STR, "label": STR, "agree": BOOL})),
        "notes": {"type": "array", "items": STR},
    }
    version_info = _obj(
        {
            "version": STR,
            "tag": STR,
            "weight": UNIT,
            "concepts": {"type": "array", "items": STR},
            "cav_layer": STR,
            "input_size": {"type": "array", "items": INT},
            "labels": {"type": "array", "items": STR},
        }
    )
    review_summary = _obj(
        {"flag_id": STR, "status": {"enum": list(STATUSES)}},
        {
            "request_id": STR,
            "model_version": STR,
            "concept": STR,
            "severity": STR,
            "score": NUM,
            "percentile": NUM,
            "relevance_share": NUM,
            "label": STR,
            "probability": NUM,
            "verdict": STR,
            "reviewer": STR,
        },
    )
    return {
        "Error": _obj(
            {"error": STR, "detail": STR},
            {"request_id": STR},
            description="Every 4xx/5xx body: a stable machine code, a sentence for people, and the "
            "request id where the request got one; some codes add fields (e.g. valid_versions).",
        ),
        "Prediction": prediction,
        "ConceptScore": concept,
        "Flag": flag,
        "PredictResponse": _obj({**answer, "prediction": _ref("Prediction")}),
        "AuditResponse": _obj({**answer, **audit_core}),
        "CompareResponse": _obj(
            {
                "request_id": STR,
                "versions": {"type": "array", "items": STR, "minItems": 1},
                "results": {"type": "object", "additionalProperties": _obj(audit_core)},
                "agreement": _obj({"label": BOOL, "flag": BOOL}),
                "notes": {"type": "array", "items": STR},
            }
        ),
        "ModelsIndex": _obj(
            {
                "request_id": STR,
                "versions": {"type": "array", "items": version_info},
                "shadow": _nullable(STR),
                "shadow_agreement": {
                    "type": "array",
                    "items": _obj({"version": STR, "shadow": STR, "agree": INT, "disagree": INT}),
                },
                "flag_thresholds": _obj({"relevance_share": UNIT, "fpr": _nullable(UNIT)}),
            }
        ),
        "Route": _obj(
            {
                "request_id": STR,
                "version": STR,
                "shadow": _nullable(STR),
                "via": {"enum": ["explicit", "hash", "random"]},
            }
        ),
        "ModelCard": _obj({"request_id": STR, "version": STR, "tag": STR, "card": {"type": "object"}}),
        "ReviewPage": _obj(
            {
                "status": {"enum": list(STATUSES)},
                "total": {"type": "integer", "minimum": 0},
                "offset": {"type": "integer", "minimum": 0},
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                "items": {"type": "array", "items": review_summary},
            }
        ),
        "Review": review_summary,
        "Verdict": _obj(
            {"verdict": {"enum": list(VERDICTS)}},
            {"note": {"type": "string", "maxLength": 2000}},
        ),
    }


_DESCRIPTIONS = {
    400: "Empty body or malformed upload",
    401: "Missing or wrong API key",
    403: "The key's role may not use this endpoint",
    404: "Unknown model version, or unknown flag",
    409: "The flag was already resolved",
    413: "Body or declared image size over the limits",
    415: "The bytes are not a supported image format, or a DICOM transfer syntax has no decoder",
    422: "The image cannot be used (corrupt, several frames, too small), or invalid parameters",
    503: "Temporarily unavailable: the model service is at capacity (retry after Retry-After seconds), "
    "or the review queue's Redis does not answer",
}


def _responses(ok: str | None, statuses: tuple[int, ...], *, request_id: bool = True) -> dict[str, Any]:
    headers = {"X-Request-ID": {"schema": STR, "required": True}} if request_id else {}
    out: dict[str, Any] = {}
    if ok is not None:
        out["200"] = {"description": "OK", "headers": headers, "content": {JSON: {"schema": _ref(ok)}}}
    for s in statuses:
        out[str(s)] = {"description": _DESCRIPTIONS[s], "content": {JSON: {"schema": _ref("Error")}}}
    return out


def _header(name: str, description: str, schema: Schema | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema or STR,
    }


def _image_body() -> dict[str, Any]:
    binary: Schema = {"type": "string", "format": "binary"}
    content: dict[str, Any] = {ct: {"schema": binary} for ct in FORMATS.values()}
    content["application/octet-stream"] = {"schema": binary}
    content["multipart/form-data"] = {"schema": _obj({"image": binary})}
    return {
        "required": True,
        "description": "The image file itself (PNG, JPEG, TIFF, GIF or DICOM Part 10); the format is "
        "read from the bytes. A multipart form with an `image` (or `file`) part works too.",
        "content": content,
    }


def _operations(versions: list[str], *, auth: bool) -> dict[str, dict[str, Any]]:
    """The OpenAPI operation of every endpoint, by endpoint name (its ``operationId``)."""
    version_enum: Schema = {"type": "string", "enum": list(versions)}
    routing = [
        _header("X-Request-ID", "Echoed in the response and its logs; generated when absent."),
        _header("X-Model-Version", "Answer with this served version (wins over A/B routing).", version_enum),
        _header("X-Subject-Key", "A/B routing key (e.g. a pseudonymous patient id): same key, same version."),
    ]
    rid = [routing[0]]
    image_errors = (400, 401, 404, 413, 415, 422, 503) if auth else (400, 404, 413, 415, 422, 503)
    get_errors = (401,) if auth else ()
    review_errors = (401, 403, 503)
    flag_id = {"name": "flag_id", "in": "path", "required": True, "schema": STR}
    return {
        "predict": {
            "summary": "Prediction for one image (adaptively batched; ONNX Runtime)",
            "parameters": routing,
            "requestBody": _image_body(),
            "responses": _responses("PredictResponse", image_errors),
        },
        "audit": {
            "summary": "Prediction, LRP heatmap, artifact-concept scores, masks and flag decision",
            "parameters": [
                *routing,
                {
                    "name": "raw_heatmap",
                    "in": "query",
                    "required": False,
                    "description": "1/true/yes adds the raw float16 heatmap; anything else does not.",
                    "schema": STR,
                },
            ],
            "requestBody": _image_body(),
            "responses": _responses("AuditResponse", image_errors),
        },
        "compare": {
            "summary": "Audits of one image by several versions, side by side",
            "parameters": [
                *rid,
                {
                    "name": "versions",
                    "in": "query",
                    "required": False,
                    "description": "Comma-separated versions; default: every served one.",
                    "schema": STR,
                },
            ],
            "requestBody": _image_body(),
            "responses": _responses("CompareResponse", image_errors),
        },
        "models": {
            "summary": "Served versions, A/B weights, shadow agreement, flag thresholds",
            "parameters": rid,
            "responses": _responses("ModelsIndex", get_errors),
        },
        "route": {
            "summary": "Which version these headers would get (no model runs)",
            "parameters": routing,
            "responses": _responses("Route", (*get_errors, 404)),
        },
        "model_card": {
            "summary": "One served version's model card",
            "parameters": [
                *rid,
                {"name": "version", "in": "path", "required": True, "schema": version_enum},
            ],
            "responses": _responses("ModelCard", (*get_errors, 404)),
        },
        "readyz": _probe("200 once every version is loaded and warmed"),
        "livez": _probe("200 while the process serves"),
        "healthz": _probe("200 while the process serves"),
        "metrics": {
            "summary": "Prometheus exposition (medaudit_* and bentoml_* series)",
            "security": [],
            "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": STR}}}},
        },
        "reviews": {
            "summary": "One page of the review queue (reviewer role)",
            "parameters": [
                {"name": "status", "in": "query", "schema": {"enum": list(STATUSES)}},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                },
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
            ],
            "responses": _responses("ReviewPage", (*review_errors, 422), request_id=False),
        },
        "review": {
            "summary": "One flag's record, with its heatmap and mask (reviewer role)",
            "parameters": [flag_id, {"name": "images", "in": "query", "schema": STR}],
            "responses": _responses("Review", (*review_errors, 404), request_id=False),
        },
        "resolve": {
            "summary": "Record a reviewer's verdict on a flag, once (reviewer role)",
            "parameters": [flag_id],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Verdict")}}},
            "responses": _responses("Review", (*review_errors, 404, 409, 422), request_id=False),
        },
    }


def build(versions: list[str], *, auth: bool, reviews: bool, title: str = "medaudit") -> dict[str, Any]:
    """The OpenAPI 3.1 document of a deployment serving ``versions``: one operation per endpoint
    of :func:`medaudit.service.endpoints.documented`.

    Raises:
        KeyError: An endpoint without an operation in :func:`_operations` (a route added without
            its contract).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("medaudit")
    except PackageNotFoundError:  # running from a source tree that was never installed
        release = "0"
    operations = _operations(versions, auth=auth)
    paths: dict[str, Any] = {}
    for e in documented(reviews=reviews):
        try:
            operation = operations[e.name]
        except KeyError:
            raise KeyError(f"endpoint {e.name!r} ({e.method} {e.path}) has no OpenAPI operation") from None
        paths.setdefault(e.path, {})[e.method.lower()] = {"operationId": e.name, **operation}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": API_VERSION,
            "x-medaudit-release": release,
            "description": "Audit service for medical image classifiers: predictions, LRP heatmaps, "
            "artifact-concept scores and flags for review. Served versions: " + ", ".join(versions) + ".",
        },
        "paths": paths,
        "components": {"schemas": _schemas()},
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key from MEDAUDIT_API_KEYS"}
        }
        doc["security"] = [{"bearer": []}]
    return doc


def _probe(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [],
        "responses": {"200": {"description": "OK"}, "503": {"description": "Not ready"}},
    }


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The document of the deployment that ``environ`` configures (what the service reads)."""
    from medaudit.service.config import Settings

    settings = Settings.from_env(environ)
    return build(
        list(settings.versions), auth=settings.key_store() is not None, reviews=settings.flags_enabled
    )
