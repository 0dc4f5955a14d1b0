"""The service's endpoints as client methods, written once for both clients.

Like redis-py's command mixins: :class:`Endpoints` has one method per endpoint of the service
(``service/endpoints.py``; same name), and :class:`~medaudit.clients.sync.MedauditClient` and
:class:`~medaudit.clients.aio.AsyncMedauditClient` inherit them. A method only builds its request,
a :class:`~medaudit.clients._base._Call` that carries the parser of the answer; :func:`endpoint`
turns it into a method that hands the request to the client's ``_call``, which sends it and returns
the answer (sync) or a coroutine of it (async: ``await client.predict(...)``). The async client
builds the request when that coroutine runs, as an ``async def`` would, so an unreadable image
fails at the ``await`` (and ``asyncio.gather(..., return_exceptions=True)`` collects it).

Types: a decorated method keeps its parameters, and returns the answer on a
:class:`~medaudit.clients.sync.MedauditClient` and an awaitable of it on an
:class:`~medaudit.clients.aio.AsyncMedauditClient` (mypy checks both).

A new endpoint's client side is this file: its method below, and, if its answer is new, the
answer's frozen dataclass and its ``parse_<name>`` next to it (the older ones are in
:mod:`~medaudit.clients.responses`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, cast, overload
from urllib.parse import quote

from medaudit.clients._base import _Call
from medaudit.clients.dicom import DICOM, DICOM_PARTS, StowResponse, parse_parts, parse_stow, stow_body
from medaudit.clients.images import ImageInput, encode_image
from medaudit.clients.responses import (
    AuditResponse,
    CompareResponse,
    ModelCard,
    ModelsResponse,
    PredictResponse,
    Review,
    ReviewPage,
    RouteInfo,
    parse_audit,
    parse_card,
    parse_compare,
    parse_models,
    parse_predict,
    parse_review,
    parse_reviews,
    parse_route,
)

if TYPE_CHECKING:
    from medaudit.clients.aio import AsyncMedauditClient
    from medaudit.clients.sync import MedauditClient

__all__ = ["Endpoints", "endpoint"]

P = ParamSpec("P")
T = TypeVar("T")


class _Endpoint(Generic[P, T]):
    """What :func:`endpoint` makes of a request builder, for the type checker: a method with the
    builder's parameters, returning ``T`` on the sync client and a coroutine of ``T`` on the async
    one. (At run time it is a plain function.)"""

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Callable[Concatenate[Any, P], Any]: ...
    @overload
    def __get__(self, obj: AsyncMedauditClient, owner: type[Any]) -> Callable[P, Coroutine[Any, Any, T]]: ...
    @overload
    def __get__(self, obj: MedauditClient, owner: type[Any]) -> Callable[P, T]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        raise NotImplementedError  # never instantiated


def endpoint(build: Callable[Concatenate[Any, P], _Call[T]]) -> _Endpoint[P, T]:
    """Makes ``build`` (a method returning the endpoint's request) the client method that sends
    that request: ``self._call(lambda: build(self, ...))``."""

    @functools.wraps(build)
    def method(self: Any, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self._call(functools.partial(build, self, *args, **kwargs))

    return cast("_Endpoint[P, T]", method)


def _image_call(
    path: str,
    image: ImageInput,
    parse: Callable[[Mapping[str, Any]], T],
    *,
    version: str | None = None,
    subject_key: str | None = None,
    request_id: str | None = None,
    params: dict[str, str] | None = None,
) -> _Call[T]:
    """The request of an image endpoint: the encoded image as the body, and the routing headers."""
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


class Endpoints:
    """One method per endpoint of the service, for a client that defines ``_call``."""

    @endpoint
    def predict(
        self,
        image: ImageInput,
        *,
        version: str | None = None,
        subject_key: str | None = None,
        request_id: str | None = None,
    ) -> _Call[PredictResponse]:
        """Prediction for one image (adaptively batched on the service).

        Args:
            image: A path, encoded bytes, a PIL image or a uint8 array (see :func:`encode_image`).
            version: Ask for this version (wins over A/B routing); 404 :class:`UnknownVersion` if
                it is not served.
            subject_key: A stable key (patient, study): the same key always gets the same version.
            request_id: Your id for the request (echoed, and in the service logs).
        """
        return _image_call(
            "/predict", image, parse_predict, version=version, subject_key=subject_key, request_id=request_id
        )

    @endpoint
    def audit(
        self,
        image: ImageInput,
        *,
        version: str | None = None,
        subject_key: str | None = None,
        raw_heatmap: bool = False,
        request_id: str | None = None,
        detail: str | None = None,
    ) -> _Call[AuditResponse]:
        """Prediction, LRP heatmap, concept scores with masks, and the flag decision.

        Args:
            image: As for :meth:`predict`.
            version: As for :meth:`predict`.
            subject_key: As for :meth:`predict`.
            raw_heatmap: Also fetch the (H, W) float16 heatmap (``AuditResponse.heatmap``).
            request_id: As for :meth:`predict`.
            detail: ``"scores"``: a screen, at close to a prediction's cost: the same prediction,
                concept scores, relevance shares and flag, without heatmap and masks
                (``heatmap_png`` is ``None``) unless the screen flags (``heatmap_reason``).
                ``"full"`` (the service's default): the audit.
        """
        params = {"raw_heatmap": "1"} if raw_heatmap else {}
        if detail is not None:
            params["detail"] = detail
        return _image_call(
            "/audit",
            image,
            parse_audit,
            version=version,
            subject_key=subject_key,
            request_id=request_id,
            params=params or None,
        )

    @endpoint
    def compare(
        self, image: ImageInput, *, versions: Sequence[str] | None = None, request_id: str | None = None
    ) -> _Call[CompareResponse]:
        """The image audited by several versions (default: every served one), side by side."""
        if isinstance(versions, str):  # "a,b" would otherwise be iterated letter by letter
            versions = [v for v in versions.split(",") if v.strip()]
        params = {"versions": ",".join(v.strip() for v in versions)} if versions else None
        return _image_call("/compare", image, parse_compare, request_id=request_id, params=params)

    @endpoint
    def models(self) -> _Call[ModelsResponse]:
        """Served versions, A/B weights, the shadow and its agreement counters."""
        return _Call("GET", "/models/", parse_models)

    @endpoint
    def model_card(self, version: str) -> _Call[ModelCard]:
        """One version's model card (``vanilla`` or its full tag ``resnet18-synthderm:vanilla``)."""
        return _Call("GET", "/models/" + quote(version, safe=""), parse_card)

    @endpoint
    def route(self, *, version: str | None = None, subject_key: str | None = None) -> _Call[RouteInfo]:
        """Which version would answer a request with these headers, without running a model.

        Without either, the answer is a random draw with the A/B weights, like a key-less request.
        """
        headers = {}
        if version is not None:
            headers["X-Model-Version"] = version
        if subject_key is not None:
            headers["X-Subject-Key"] = subject_key
        return _Call("GET", "/models/_route", parse_route, headers=headers)

    @endpoint
    def reviews(self, status: str = "open", *, limit: int = 50, offset: int = 0) -> _Call[ReviewPage]:
        """One page of the review queue: ``open`` flags oldest first, or ``resolved`` newest first."""
        params = {"status": status, "limit": str(limit), "offset": str(offset)}
        return _Call("GET", "/reviews/", parse_reviews, params=params)

    @endpoint
    def review(self, flag_id: str, *, images: bool = True) -> _Call[Review]:
        """One flag's whole record, with its heatmap and mask PNGs unless ``images=False``."""
        params = {"images": "1" if images else "0"}
        return _Call("GET", "/reviews/" + quote(flag_id, safe=""), parse_review, params=params)

    @endpoint
    def resolve(self, flag_id: str, verdict: str, note: str = "") -> _Call[Review]:
        """Records a reviewer's verdict (``artifact_confirmed``, ``false_alarm`` or ``other``).

        Raises:
            Conflict: The flag was resolved before (a retried request that did land, too).
            InvalidInput: An unknown verdict or an over-long note.
        """
        body = json.dumps({"verdict": verdict, "note": note}).encode()
        return _Call(
            "POST",
            "/reviews/" + quote(flag_id, safe="") + "/resolve",
            parse_review,
            content=body,
            headers={"Content-Type": "application/json"},
        )

    @endpoint
    def audit_dicom(
        self,
        image: ImageInput,
        *,
        version: str | None = None,
        subject_key: str | None = None,
        frames: str | None = None,
        request_id: str | None = None,
    ) -> _Call[tuple[bytes, ...]]:
        """The audit of a DICOM image as DICOM objects (SEG, Parametric Map, Comprehensive SR):
        ``POST /audit`` with ``Accept: multipart/related; type="application/dicom"``.

        Args:
            image: A DICOM Part-10 file (path or bytes).
            version: As for :meth:`predict`.
            subject_key: As for :meth:`predict`.
            frames: Of a multi-frame image: ``first`` (default), ``all`` or ``"1,3"``.
            request_id: As for :meth:`predict`.

        Returns:
            The Part-10 files, in the order the service wrote them.
        """
        call = _image_call(
            "/audit",
            image,
            _parts,
            version=version,
            subject_key=subject_key,
            request_id=request_id,
            params={"frames": frames} if frames else None,
        )
        return dataclasses.replace(call, headers={**call.headers, "Accept": DICOM_PARTS}, raw=True)

    @endpoint
    def stow(
        self,
        files: Sequence[ImageInput],
        *,
        version: str | None = None,
        subject_key: str | None = None,
        frames: str | None = None,
        request_id: str | None = None,
    ) -> _Call[StowResponse]:
        """STOW-RS: several DICOM instances in one request, each audited; one result per instance
        (what was created, or why it failed), in order. A service that could audit none answers
        409 (:class:`Conflict`, whose ``body`` holds the per-instance errors)."""
        bodies = []
        for f in files:
            data, ctype = encode_image(f)
            if ctype != DICOM:
                raise ValueError(f"STOW-RS takes DICOM Part-10 files; {_name(f)} is {ctype}")
            bodies.append(data)
        content, ctype = stow_body(bodies)
        headers = {"Content-Type": ctype}
        for name, value in (
            ("X-Model-Version", version),
            ("X-Subject-Key", subject_key),
            ("X-Request-ID", request_id),
        ):
            if value is not None:
                headers[name] = value
        params = {"frames": frames} if frames else None
        return _Call("POST", "/dicomweb/studies", parse_stow, content=content, params=params, headers=headers)

    @endpoint
    def retrieve(
        self, study: str, series: str | None = None, instance: str | None = None
    ) -> _Call[tuple[bytes, ...]]:
        """WADO-RS: DICOM objects the service created (a study's, a series' or one instance), as
        Part-10 files, while it keeps them (``retrievable_for_s`` of the STOW answer)."""
        path = "/dicomweb/studies/" + quote(study, safe="")
        if series is not None:
            path += "/series/" + quote(series, safe="")
            if instance is not None:
                path += "/instances/" + quote(instance, safe="")
        return _Call("GET", path, _parts, headers={"Accept": DICOM_PARTS}, raw=True)


def _parts(body: Mapping[str, Any]) -> tuple[bytes, ...]:
    return parse_parts(body["content"], body["content_type"])


def _name(f: Any) -> str:
    return str(f) if isinstance(f, (str, os.PathLike)) else "an image given in memory"
