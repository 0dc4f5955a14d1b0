"""The synchronous client, :class:`MedauditClient`: sends the calls :class:`_ClientBase` builds
with an ``httpx.Client`` (or an injected one) and sleeps between retries.

Usage::

    with MedauditClient("http://127.0.0.1:3000", api_key=os.environ["MEDAUDIT_API_KEY"]) as mc:
        res = mc.audit("lesion.png", version="vanilla")
        if res.flag.flagged:
            Path("heatmap.png").write_bytes(res.heatmap_png)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import httpx

from medaudit.clients._base import SyncHTTP, _Call, _ClientBase, _Response
from medaudit.clients.errors import MedauditConnectionError, MedauditTimeoutError
from medaudit.clients.images import ImageInput
from medaudit.clients.responses import (
    AuditResponse,
    CompareResponse,
    ModelCard,
    ModelsResponse,
    PredictResponse,
    Review,
    ReviewPage,
    RouteInfo,
)
from medaudit.clients.retry import RetryPolicy, transport_errors

__all__ = ["MedauditClient"]


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
            except transport_errors(("TransportError",)) as e:
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
        return self._call(self._predict_call(image, version, subject_key, request_id))

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
        return self._call(self._audit_call(image, version, subject_key, raw_heatmap, request_id))

    def compare(
        self, image: ImageInput, *, versions: Sequence[str] | None = None, request_id: str | None = None
    ) -> CompareResponse:
        """The image audited by several versions (default: every served one), side by side."""
        return self._call(self._compare_call(image, versions, request_id))

    def models(self) -> ModelsResponse:
        """Served versions, A/B weights, the shadow and its agreement counters."""
        return self._call(self._models_call())

    def model_card(self, version: str) -> ModelCard:
        """One version's model card (``vanilla`` or its full tag ``resnet18-synthderm:vanilla``)."""
        return self._call(self._card_call(version))

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
        return self._send(self._ready_call(), retry=False).status_code == 200

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
