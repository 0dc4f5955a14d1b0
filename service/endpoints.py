"""The service's HTTP contract, listed once: every route it answers, and the contract's version.

The routes are built from this table (the entry service's BentoML APIs and its mounted GET apps in
:mod:`medaudit.service.api`, the reviewer app in :mod:`medaudit.service.flags.review`), and
whatever else needs the list reads it here: the OpenAPI document (:mod:`medaudit.service.openapi`:
one operation per endpoint), the upload middleware (size limit and multipart handling of the
image endpoints) and the tests. A new endpoint is a row here, its handler, its OpenAPI operation
and its client method; tests/unit/test_openapi.py fails when a served route has no operation in
the document, or the document an operation no route serves.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The HTTP contract's version (the OpenAPI document's ``info.version``, the ``X-Medaudit-API``
#: header). Bump the major when a route, field or status changes meaning or disappears (and
#: medaudit-client's ``API_VERSION`` with it); the minor for additions.
API_VERSION = "1.0"

#: Where an endpoint is served from (:attr:`Endpoint.app`).
SERVICE = "service"  # a BentoML API of the entry service (``@bentoml.api``)
BENTOML = "bentoml"  # BentoML's own route (probes, metrics)
MODELS_MOUNT = "/models"
REVIEWS_MOUNT = "/reviews"


@dataclass(frozen=True)
class Endpoint:
    """One route of the contract.

    Attributes:
        name: Its ``operationId`` in the OpenAPI document (and the client method's name).
        method: The HTTP method.
        path: The full path as served, in Starlette's syntax (``/models/{version}``).
        app: :data:`SERVICE`, :data:`BENTOML`, or the path a Starlette app serving it is
            mounted at (:data:`MODELS_MOUNT`, :data:`REVIEWS_MOUNT`).
        image: The body is an image upload (size limit, multipart: ``UploadNormalizer``).
        reviews: In the contract only while the review queue is on (``MEDAUDIT_FLAGS``).
    """

    name: str
    method: str
    path: str
    app: str = SERVICE
    image: bool = False
    reviews: bool = False

    @property
    def route(self) -> str:
        """The path inside the mounted app that serves it (``/models/{version}`` -> ``/{version}``)."""
        if self.app.startswith("/") and self.path.startswith(self.app + "/"):
            return self.path[len(self.app) :]
        return self.path


PREDICT = Endpoint("predict", "POST", "/predict", image=True)
AUDIT = Endpoint("audit", "POST", "/audit", image=True)
COMPARE = Endpoint("compare", "POST", "/compare", image=True)
MODELS = Endpoint("models", "GET", "/models/", app=MODELS_MOUNT)
# Version names start with a letter or digit (service.config), so "_route" is never one.
ROUTE = Endpoint("route", "GET", "/models/_route", app=MODELS_MOUNT)
MODEL_CARD = Endpoint("model_card", "GET", "/models/{version}", app=MODELS_MOUNT)
REVIEWS = Endpoint("reviews", "GET", "/reviews/", app=REVIEWS_MOUNT, reviews=True)
REVIEW = Endpoint("review", "GET", "/reviews/{flag_id}", app=REVIEWS_MOUNT, reviews=True)
RESOLVE = Endpoint("resolve", "POST", "/reviews/{flag_id}/resolve", app=REVIEWS_MOUNT, reviews=True)
READYZ = Endpoint("readyz", "GET", "/readyz", app=BENTOML)
LIVEZ = Endpoint("livez", "GET", "/livez", app=BENTOML)
HEALTHZ = Endpoint("healthz", "GET", "/healthz", app=BENTOML)
METRICS = Endpoint("metrics", "GET", "/metrics", app=BENTOML)

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
)
#: Paths of the endpoints whose body is an image.
IMAGE_PATHS: tuple[str, ...] = tuple(e.path for e in ENDPOINTS if e.image)


def documented(*, reviews: bool) -> tuple[Endpoint, ...]:
    """The endpoints of a deployment's contract (the reviewer routes only with ``reviews``)."""
    return tuple(e for e in ENDPOINTS if reviews or not e.reviews)


def mounted(app: str) -> tuple[Endpoint, ...]:
    """The endpoints the Starlette app mounted at ``app`` serves."""
    return tuple(e for e in ENDPOINTS if e.app == app)
