"""service.audit_pool: a batch spread over LRP helper processes gives the answers of one process,
in job order, and survives a helper that dies. Real spawned helpers on the tiny store."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from service.audit import AuditEngine, FlagThresholds
from service.audit_pool import AuditPool, audit_jobs, chunks


@pytest.mark.parametrize(("n", "parts"), [(0, 2), (1, 2), (2, 2), (5, 2), (5, 4), (16, 3), (3, 8)])
def test_chunks_cover_the_batch_in_order(n: int, parts: int) -> None:
    got = chunks(n, parts)
    assert [i for r in got for i in r] == list(range(n))
    assert len(got) <= max(1, min(parts, n)) and all(len(r) > 0 for r in got)
    if got:
        assert max(map(len, got)) - min(map(len, got)) <= max(1, len(got[0]) - 1)


@pytest.fixture(scope="module")
def pool_env(tiny_store):
    """The helpers find the store through BENTOML_HOME, as the served auditor's do."""
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(tiny_store)
    yield tiny_store
    if old is None:
        os.environ.pop("BENTOML_HOME", None)
    else:
        os.environ["BENTOML_HOME"] = old


def _jobs(n: int) -> list[dict]:
    rng = np.random.default_rng(7)
    versions = ("vanilla", "pclarc-band_aid")
    return [
        {
            "version": versions[i % 2],
            "pixels": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "raw_heatmap": i == 1,
        }
        for i in range(n)
    ]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        px, py = x["result"]["prediction"], y["result"]["prediction"]
        assert (px["version"], px["label"]) == (py["version"], py["label"])
        for k in px["probabilities"]:  # float sums may differ in the last bits between processes
            assert px["probabilities"][k] == pytest.approx(py["probabilities"][k], rel=1e-6)
        assert [c["concept"] for c in x["result"]["concepts"]] == [
            c["concept"] for c in y["result"]["concepts"]
        ]
        np.testing.assert_allclose(
            [c["score"] for c in x["result"]["concepts"]],
            [c["score"] for c in y["result"]["concepts"]],
            rtol=1e-5,
        )
        np.testing.assert_allclose(x["features"], y["features"], rtol=1e-5, atol=1e-6)
        assert (x["result"]["heatmap"] is None) == (y["result"]["heatmap"] is None)


def test_pool_answers_like_one_process_and_survives_a_dead_helper(pool_env) -> None:
    thresholds = FlagThresholds()
    engines = {
        v: AuditEngine.from_store(v, thresholds=thresholds, ort_threads=1)
        for v in ("vanilla", "pclarc-band_aid")
    }
    jobs = _jobs(5)
    want = audit_jobs(engines, jobs, observe=False)
    pool = AuditPool(engines, helpers=1, thresholds=thresholds)
    try:
        assert pool.processes == 2 and len(pool.helper_pids()) == 1
        _same(pool.audit(jobs), want)  # chunks [0:3] here, [3:5] in the helper, back in order
        _same(pool.audit(jobs[:1]), want[:1])  # a batch of one stays here
        # a helper killed between batches: the next batch still comes back whole (run here) ...
        dead = pool.helper_pids()[0]
        os.kill(dead, signal.SIGKILL)
        time.sleep(0.5)
        _same(pool.audit(jobs), want)
        # ... and a replacement starts, which takes chunks again once it is ready
        (fresh,) = pool.helper_pids()
        assert fresh != dead
        deadline = time.monotonic() + 120
        while not pool._ready_helpers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pool._ready_helpers()
        _same(pool.audit(jobs), want)
    finally:
        pool.close()


def test_a_helper_that_cannot_load_refuses_the_start(pool_env) -> None:
    """A helper that fails to load its versions stops the service from starting, with the reason."""
    thresholds = FlagThresholds()
    engines = {"vanilla": AuditEngine.from_store("vanilla", thresholds=thresholds, ort_threads=1)}
    with pytest.raises(RuntimeError, match="failed to start.*no-such-version|no-such-version"):
        AuditPool({**engines, "no-such-version": engines["vanilla"]}, helpers=1, thresholds=thresholds)
