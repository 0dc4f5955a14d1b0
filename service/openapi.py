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

Its paths are the routes of :mod:`medaudit.service.endpoints`, and each operation is written from
its route's row there (summary, parameters, request body, answer schema, error statuses): this
module only assembles them, and holds what rows share: the component schemas (:func:`_schemas`;
a row may bring new ones), one description per error status, the image request body and the
parameter schemas that depend on the deployment. A row without a summary or an answer is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy
from typing import Any

from medaudit.service.endpoints import (
    API_VERSION,
    B64_PNG,
    BOOL,
    ENDPOINTS,
    INT,
    KEY,
    NUM,
    OPEN,
    PAGE_LIMIT,
    PAGE_OFFSET,
    REVIEW_STATUS,
    SERVED_VERSION,
    STR,
    UNIT,
    Endpoint,
    Param,
    Schema,
    documented,
    nullable,
    obj,
    ref,
)
from medaudit.service.flags.review import MAX_LIMIT, MAX_OFFSET, STATUSES, VERDICTS
from medaudit.service.inputs import FORMATS

#: Where the document is served (not itself an operation of the contract).
PATH = "/openapi.json"
JSON = "application/json"


def _schemas() -> dict[str, Schema]:
    prediction = obj(
        {
            "version": STR,
            "label": STR,
            "class_index": {"type": "integer", "minimum": 0},
            "probabilities": {"type": "object", "additionalProperties": UNIT},
        }
    )
    concept = obj(
        {
            "concept": STR,
            "score": NUM,
            "percentile": {"type": "number", "minimum": 0, "maximum": 100},
            "present": BOOL,
            "threshold": NUM,
            "relevance_share": UNIT,
            "mask_png": nullable(B64_PNG),
        },
        description="One artifact concept on this image (method.md §1.4).",
    )
    policy_flag = obj(
        {
            "concept": STR,
            "severity": {"enum": ["low", "medium", "high"]},
            "reasons": {"type": "array", "items": STR},
            "relied_on": {"type": "array", "items": STR},
        }
    )
    flag = obj(
        {
            "flagged": BOOL,
            "severity": nullable({"enum": ["low", "medium", "high"]}),
            "flags": {"type": "array", "items": policy_flag},
            "concepts": {"type": "array", "items": STR},
            "reasons": {"type": "array", "items": STR},
        },
        description="The flag policy's decision; flagged audits go to the review queue.",
    )
    raw_heatmap = obj(
        {
            "dtype": {"const": "float16"},
            "shape": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2},
            "data": {"type": "string", "contentEncoding": "base64"},
        }
    )
    audit_core = {
        "prediction": ref("Prediction"),
        "heatmap_png": nullable(B64_PNG),  # null with heatmap_note: the family's rules are not validated
        "heatmap": nullable(raw_heatmap),
        "layer": STR,
        "concepts": {"type": "array", "items": ref("ConceptScore")},
        "flag": ref("Flag"),
    }
    screen_core = {
        **audit_core,
        "heatmap_png": nullable(B64_PNG),
        "detail": {"const": "scores"},
        "heatmap_reason": nullable({"enum": ["flagged", "sampled"]}),
    }
    answer = {
        "request_id": STR,
        "version": STR,
        "via": {"enum": ["explicit", "hash", "random"]},
        "shadow": nullable(obj({"version": STR, "label": STR, "agree": BOOL})),
        "notes": {"type": "array", "items": STR},
    }
    version_info = obj(
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
    review_summary = obj(
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
        "Error": obj(
            {"error": STR, "detail": STR},
            {"request_id": STR},
            description="Every 4xx/5xx body: a stable machine code, a sentence for people, and the "
            "request id where the request got one; some codes add fields (e.g. valid_versions).",
        ),
        "Prediction": prediction,
        "ConceptScore": concept,
        "Flag": flag,
        "PredictResponse": obj(
            {**answer, "prediction": ref("Prediction")}, {"detail": {"const": "prediction"}}
        ),
        "AuditResponse": obj(
            {**answer, **audit_core},
            {"detail": {"const": "full"}, "heatmap_reason": {"const": "requested"}, "heatmap_note": STR},
        ),
        "ScreenResponse": obj(
            {**answer, **screen_core},
            description="A screen (detail=scores): the audit's prediction, concept scores, relevance "
            "shares and flag decision, without heatmap or masks (heatmap_png null, heatmap_reason "
            "null); or, where heatmap_reason says why (flagged, sampled), the full audit's answer.",
        ),
        "CompareResponse": obj(
            {
                "request_id": STR,
                "versions": {"type": "array", "items": STR, "minItems": 1},
                "results": {"type": "object", "additionalProperties": obj(audit_core, {"heatmap_note": STR})},
                "agreement": obj({"label": BOOL, "flag": BOOL}),
                "notes": {"type": "array", "items": STR},
            }
        ),
        "ModelsIndex": obj(
            {
                "request_id": STR,
                "versions": {"type": "array", "items": version_info},
                "shadow": nullable(STR),
                "shadow_agreement": {
                    "type": "array",
                    "items": obj({"version": STR, "shadow": STR, "agree": INT, "disagree": INT}),
                },
                "flag_thresholds": obj({"relevance_share": UNIT, "fpr": nullable(UNIT)}),
            }
        ),
        "Route": obj(
            {
                "request_id": STR,
                "version": STR,
                "shadow": nullable(STR),
                "via": {"enum": ["explicit", "hash", "random"]},
            }
        ),
        "ModelCard": obj({"request_id": STR, "version": STR, "tag": STR, "card": {"type": "object"}}),
        "ReviewPage": obj(
            {
                "status": {"enum": list(STATUSES)},
                "total": {"type": "integer", "minimum": 0},
                "offset": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                "items": {"type": "array", "items": review_summary},
            }
        ),
        "Review": review_summary,
        "Verdict": obj(
            {"verdict": {"enum": list(VERDICTS)}},
            {"note": {"type": "string", "maxLength": 2000}},
        ),
    }


_DESCRIPTIONS = {
    400: "Empty body or malformed upload",
    401: "Missing or wrong API key",
    403: "The key's role may not use this endpoint",
    404: "Unknown model version, or unknown flag",
    406: "DICOM asked for (Accept) where it cannot be given: a non-DICOM image, or a single part",
    409: "The flag was already resolved",
    413: "Body or declared image size over the limits",
    415: "The bytes are not a supported image format, or a DICOM transfer syntax has no decoder",
    422: "The image cannot be used (corrupt, several frames, too small), or invalid parameters",
    503: "Temporarily unavailable: the model service is at capacity (retry after Retry-After seconds), "
    "or the review queue's Redis does not answer",
}


def _responses(ok: str, statuses: tuple[int, ...], *, request_id: bool) -> dict[str, Any]:
    headers = {"X-Request-ID": {"schema": STR, "required": True}} if request_id else {}
    out: dict[str, Any] = {
        "200": {"description": "OK", "headers": headers, "content": {JSON: {"schema": ref(ok)}}}
    }
    for s in statuses:
        out[str(s)] = {"description": _DESCRIPTIONS[s], "content": {JSON: {"schema": ref("Error")}}}
    return out


def _image_body() -> dict[str, Any]:
    binary: Schema = {"type": "string", "format": "binary"}
    content: dict[str, Any] = {ct: {"schema": binary} for ct in FORMATS.values()}
    content["application/octet-stream"] = {"schema": binary}
    content["multipart/form-data"] = {"schema": obj({"image": binary})}
    return {
        "required": True,
        "description": "The image file itself (PNG, JPEG, TIFF, GIF or DICOM Part 10); the format is "
        "read from the bytes. A multipart form with an `image` (or `file`) part works too.",
        "content": content,
    }


def _named(versions: list[str]) -> dict[str, Schema]:
    """The parameter schemas a :class:`~medaudit.service.endpoints.Param` may name."""
    return {
        SERVED_VERSION: {"type": "string", "enum": list(versions)},
        REVIEW_STATUS: {"enum": list(STATUSES)},
        PAGE_LIMIT: {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
        PAGE_OFFSET: {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
    }


def _parameter(e: Endpoint, p: Param, named: dict[str, Schema]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.name, "in": p.where}
    if p.required is not None:
        out["required"] = p.required
    if p.description is not None:
        out["description"] = p.description
    if isinstance(p.schema, str):
        try:
            out["schema"] = named[p.schema]
        except KeyError:
            raise KeyError(
                f"endpoint {e.name!r}: parameter {p.name!r} names schema {p.schema!r}; "
                f"the document writes {', '.join(named)}"
            ) from None
    else:
        out["schema"] = deepcopy(p.schema) if p.schema is not None else STR
    return out


def _operation(e: Endpoint, named: dict[str, Schema], *, auth: bool) -> dict[str, Any]:
    """The OpenAPI operation of ``e``, from its row alone (and the deployment: ``named``, ``auth``)."""
    if not e.summary or (e.answer is None and e.responses is None):
        raise ValueError(
            f"endpoint {e.name!r} ({e.method} {e.path}) documents no operation: its row needs a "
            "summary, and an answer schema or literal responses"
        )
    op: dict[str, Any] = {"summary": e.summary}
    if e.auth == OPEN:
        op["security"] = []
    if e.params:
        op["parameters"] = [_parameter(e, p, named) for p in e.params]
    if e.image:
        op["requestBody"] = _image_body()
    elif e.body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(e.body)}}}
    if e.responses is not None:
        op["responses"] = deepcopy(dict(e.responses))
    else:
        assert e.answer is not None  # checked above
        # Without keys nothing answers 401 for want of one; the reviewer app authorizes anyway.
        errors = tuple(s for s in e.errors if auth or e.auth != KEY or s != 401)
        # The reviewer app's answers do not promise an X-Request-ID header.
        op["responses"] = _responses(e.answer, errors, request_id=not e.reviews)
    return op


def _operations(versions: list[str], *, auth: bool) -> dict[str, dict[str, Any]]:
    """The OpenAPI operation of every endpoint, by endpoint name (its ``operationId``)."""
    named = _named(versions)
    return {e.name: _operation(e, named, auth=auth) for e in ENDPOINTS}


def _components() -> dict[str, Schema]:
    """The shared schemas, and those the endpoint rows bring."""
    schemas = _schemas()
    for e in ENDPOINTS:
        for name, schema in e.schemas.items():
            if name in schemas:
                raise ValueError(f"endpoint {e.name!r} declares schema {name!r}, which exists already")
            schemas[name] = deepcopy(schema)
    return schemas


def build(versions: list[str], *, auth: bool, reviews: bool, title: str = "medaudit") -> dict[str, Any]:
    """The OpenAPI 3.1 document of a deployment serving ``versions``: one operation per endpoint
    of :func:`medaudit.service.endpoints.documented`, written from its row.

    Raises:
        ValueError: A row that documents no operation (no summary, or no answer), or brings a
            schema whose name is taken.
        KeyError: A parameter naming a schema the document does not write.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("medaudit")
    except PackageNotFoundError:  # running from a source tree that was never installed
        release = "0"
    operations = _operations(versions, auth=auth)
    paths: dict[str, Any] = {}
    for e in documented(reviews=reviews):
        paths.setdefault(e.path, {})[e.method.lower()] = {"operationId": e.name, **operations[e.name]}
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
        "components": {"schemas": _components()},
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key from MEDAUDIT_API_KEYS"}
        }
        doc["security"] = [{"bearer": []}]
    return doc


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The document of the deployment that ``environ`` configures (what the service reads)."""
    from medaudit.service.config import Settings

    settings = Settings.from_env(environ)
    return build(
        list(settings.versions), auth=settings.key_store() is not None, reviews=settings.flags_enabled
    )
