"""How the entry service calls its BentoML dependencies (:class:`~service.api.Predictor`,
:class:`~service.api.Auditor`): a deadline per attempt, a retry policy for failures on the way,
and the dependency's load shedding turned into the client's 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import aiohttp
from bentoml.exceptions import BentoMLException

from medaudit.service.errors import ServiceOverloadedError
from medaudit.service.retry import LinearBackoff, Retry

log = logging.getLogger(__name__)

#: How long one dependency call may take before it is abandoned and sent again. The predictor's
#: dispatcher sheds what would queue past ``max_latency_ms`` and the auditor's queue what would
#: wait past ``service.api.AUDIT_MAX_WAIT_S`` (fast 503s), so a call still unanswered after this
#: long was lost on the way (seen about once in a few thousand requests under load: the internal
#: client's pooled connection; BentoML issue #4971), not slow.
PREDICT_DEADLINE_S = 15.0
AUDIT_DEADLINE_S = 120.0

#: Dependency calls that fail on the way are sent again: a pooled keep-alive connection the
#: other side closed (aiohttp's ServerDisconnectedError, seen under load), and a call unanswered
#: after its deadline. Safe: predictions and audits are pure functions of the job.
DEPENDENCY_RETRY = Retry(LinearBackoff(0.01), retries=2, errors=(aiohttp.ClientConnectionError, TimeoutError))


def _why(e: BaseException) -> str:
    return "unanswered" if isinstance(e, TimeoutError) else "connection dropped"


async def call_dependency(
    call: Callable[[Any], Awaitable[Any]], payload: Any, deadline_s: float, retry: Retry = DEPENDENCY_RETRY
) -> Any:
    """One call of a dependency (``[job]`` to the predictor's batched API, ``job`` to the
    auditor's), each attempt abandoned after ``deadline_s`` and retried by ``retry``.

    * Failures on the way that outlast the retries: :class:`ServiceOverloadedError`.
    * The dependency shedding load (its 503): :class:`ServiceOverloadedError`, a 503 with
      ``Retry-After`` for the client, at once; retrying inside would only add to the queue.
    """

    def on_retry(e: BaseException, attempt: int) -> None:
        log.warning("dependency call %s; retrying (attempt %d)", _why(e), attempt)

    try:
        return await retry.call(lambda: asyncio.wait_for(call(payload), deadline_s), on_retry)
    except BentoMLException as e:
        if e.error_code == HTTPStatus.SERVICE_UNAVAILABLE:
            raise ServiceOverloadedError(
                "the model service is at capacity and refused this request; retry after 1 s"
            ) from e
        raise
    except retry.errors as e:
        raise ServiceOverloadedError(
            f"the model service did not answer ({_why(e)}, {retry.attempts} tries); retry after 1 s"
        ) from e


def keep_sessions(dependency: Any) -> None:
    """Stop BentoML 1.4.40's internal client from recycling its aiohttp session mid-traffic.

    Its ``SessionManager`` closes the session every 100 requests (and every 300 s) while other
    requests are still in flight on it; each of those fails with a connection error and is sent
    again by :func:`call_dependency` (the predictor may already have computed it). Under the locust mix
    that was ~2 retries a second (1166 in the 10-minute soak). The dependencies here are local
    sockets with nothing to re-resolve, so the session lives as long as the process. Best effort:
    a BentoML without these attributes is left as it is.
    """
    for client in (getattr(dependency, "_async", None), getattr(dependency, "_sync", None)):
        manager = getattr(client, "_session_manager", None)
        if manager is not None and hasattr(manager, "max_requests") and hasattr(manager, "max_age"):
            manager.max_requests = 2**62
            manager.max_age = float("inf")
