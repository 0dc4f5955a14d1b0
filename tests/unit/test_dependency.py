"""medaudit.service.dependencies.call_dependency: how the entry service handles its dependencies failing.

The calls here are plain coroutines that fail the ways BentoML's internal client does (its
exceptions, aiohttp's, a call that never returns); the real hop runs in tests/integration and
tests/live."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import aiohttp
import pytest

from medaudit.service.errors import ServiceOverloadedError

# bentoml 1.4.40 builds its IO schemas through a pydantic hook deprecated in pydantic 2.11: theirs to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")


class Flaky:
    """Fails with ``errors`` in turn (``"hang"`` never returns), then answers."""

    def __init__(self, *errors: Any) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.errors:
            e = self.errors.pop(0)
            if e == "hang":
                await asyncio.sleep(3600)
            raise e
        return {"answer": job["x"]}


def run(call: Flaky, deadline: float = 5.0) -> Any:
    from medaudit.service.dependencies import call_dependency

    return asyncio.run(call_dependency(call, {"x": 7}, deadline))


def test_dropped_connections_and_lost_calls_are_sent_again() -> None:
    call = Flaky(aiohttp.ServerDisconnectedError(), "hang")
    assert run(call, deadline=0.2) == {"answer": 7} and call.calls == 3


def test_three_failures_are_a_503_with_retry_after() -> None:
    call = Flaky("hang", "hang", "hang")
    with pytest.raises(ServiceOverloadedError) as ei:
        run(call, deadline=0.1)
    assert call.calls == 3 and ei.value.status == 503 and ei.value.headers() == {"Retry-After": "1"}
    assert "unanswered" in ei.value.detail and ei.value.to_json()["retry_after_s"] == 1


def test_a_shedding_dependency_is_a_503_at_once() -> None:
    from bentoml.exceptions import ServiceUnavailable

    call = Flaky(ServiceUnavailable("process is overloaded"))
    with pytest.raises(ServiceOverloadedError):
        run(call)
    assert call.calls == 1  # no retry: that would only lengthen the queue it refused


def test_other_dependency_errors_pass_through() -> None:
    from bentoml.exceptions import BentoMLException

    err = BentoMLException("boom", error_code=HTTPStatus.INTERNAL_SERVER_ERROR)
    with pytest.raises(BentoMLException, match="boom"):
        run(Flaky(err))
