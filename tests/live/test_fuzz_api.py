"""Property-based fuzzing of the live service against its own OpenAPI document (issue #9).

schemathesis reads ``/openapi.json`` (:mod:`medaudit.service.openapi`) from the running service and, for
every documented operation, generates requests: valid ones (positive mode) and ones that break the
schema on purpose (negative mode: wrong types, missing parts, out-of-range numbers, odd headers).
Every response must

* not be a 5xx (``not_a_server_error``),
* have a documented status code and content type,
* match the documented JSON schema of that status, headers included.

The requests carry the reviewer's key (a reviewer may call everything), so the generated data, not
authentication, decides the answer; tests/live/test_auth_live.py covers the keys themselves.
The pytest plugin of schemathesis (``from_fixture``) does not work under pytest 9, so each
operation × mode is one parametrized test driving the operation's hypothesis strategy itself.
Generation is derandomized: CI runs the same cases every time, and a failure names its case.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from live_support import Live
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from medaudit.service.openapi import build

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.redis]

MIN_CASES = 500
EXAMPLES_PER_OPERATION = 40
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
#: (method path) -> count of each status answered; the summary test reads it.
SEEN: Counter[tuple[str, int]] = Counter()


#: Every operation of the document the live service publishes (tests/live/conftest.py: two
#: versions, keys on, review queue on), built here the way the service builds it, and checked
#: against the live one below: the parametrization cannot silently miss an operation.
DOC = build(["vanilla", "pclarc-band_aid"], auth=True, reviews=True)
OPERATIONS = [
    (method.upper(), path, mode)
    for path, ops in DOC["paths"].items()
    for method, op in ops.items()
    # An operation with no parameters and no body has nothing to make invalid.
    for mode in (("positive", "negative") if op.get("parameters") or op.get("requestBody") else ("positive",))
]


@pytest.fixture(scope="session")
def live_schema(live: Live) -> Any:
    loaded = schemathesis.openapi.from_url(f"{live.base}/openapi.json")
    assert live.openapi() == DOC, "the live document differs from service.openapi.build's"
    return loaded


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS, ids=[" ".join(o) for o in OPERATIONS])
def test_every_generated_request_gets_a_documented_answer(
    method: str, path: str, mode: str, live: Live, live_schema: Any
) -> None:
    operation = live_schema[path][method]
    auth = {"Authorization": f"Bearer {live.reviewer_key}"}

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: Any) -> None:
        response = case.call(headers=auth, timeout=120)
        SEEN[(f"{method} {path}", response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)

    fuzz()


def test_fuzzing_covered_every_operation_with_enough_cases(live: Live) -> None:
    if not SEEN:
        pytest.skip("the fuzzing test did not run in this session (run the whole module)")
    total = sum(SEEN.values())
    by_op: Counter[str] = Counter()
    for (op, _status), n in SEEN.items():
        by_op[op] += n
    print(f"\nfuzzed: {total} cases over {len(by_op)} operations")
    for op in sorted(by_op):
        statuses = {s: n for (o, s), n in sorted(SEEN.items()) if o == op}
        print(f"  {op:<36} {by_op[op]:>4}  {statuses}")
    documented = {f"{method} {path}" for method, path, _mode in OPERATIONS}
    assert set(by_op) == documented, f"operations not fuzzed: {documented - set(by_op)}"
    assert total >= MIN_CASES, f"only {total} cases"
    assert not [k for k in SEEN if k[1] >= 500], "a 5xx got past the checks"
