"""medaudit.service.audit_pool: the auditor's queue and its LRP processes.

The queue's scheduling (what a free lane takes, shedding, cancellation, crashes) is tested on
``GateLane``, a lane whose batches the test releases one at a time, so each step is deterministic.
What the audits are is tested on real spawned LRP processes over the tiny store: their answers
equal this process's, in job order, through a process killed mid-life and its replacement.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from medaudit.service.audit import AuditEngine
from medaudit.service.audit_pool import AuditPool, LaneSpec, LocalLane, ProcessLane, audit_jobs
from medaudit.service.errors import LaneCrashedError, PoolOverloadedError


class GateLane:
    """A lane that answers each job with its ``n`` doubled, one batch per :meth:`release`.

    ``crash_on``: job numbers whose batch dies as a crashed process's would (every time);
    ``crash_once``: the same, the first time only; ``fail_on``: job numbers whose batch raises an
    ordinary error.
    """

    def __init__(
        self,
        name: str,
        crash_on: set[int] | None = None,
        crash_once: set[int] | None = None,
        fail_on: set[int] | None = None,
    ) -> None:
        self.name = name
        self.batches: list[list[int]] = []
        self.crash_on = crash_on or set()
        self.crash_once = crash_once or set()
        self.fail_on = fail_on or set()
        self.restarts = 0
        self._gate = threading.Semaphore(0)
        self.taken = threading.Semaphore(0)  # released once per batch taken

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._gate.release()

    def run(self, jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        ns = [int(j["n"]) for j in jobs]
        self.batches.append(ns)
        self.taken.release()
        assert self._gate.acquire(timeout=20), "the test never released this batch"
        if self.crash_on & set(ns) or self.crash_once & set(ns):
            self.crash_once -= set(ns)
            raise LaneCrashedError(f"{self.name} died")
        if self.fail_on & set(ns):
            raise ValueError(f"bad job in {ns}")
        return [{"n2": 2 * n} for n in ns]

    def restart(self) -> None:
        self.restarts += 1

    def close(self) -> None:
        self.release(100)


def _job(n: int) -> dict[str, Any]:
    return {"version": "v", "n": n}


def _taken(lane: GateLane, batches: int = 1) -> None:
    for _ in range(batches):
        assert lane.taken.acquire(timeout=20), f"{lane.name} took no batch"


def test_a_free_lane_takes_everything_queued_up_to_max_batch() -> None:
    """Idle, a lane takes a job the moment it comes (batch 1, no waiting for a batch to fill);
    busy, jobs queue and the lane's next take is all of them, at most ``max_batch``."""
    lane = GateLane("a")
    pool = AuditPool([lane], max_batch=4)
    try:
        first = pool.submit(_job(0))
        _taken(lane)
        rest = [pool.submit(_job(n)) for n in range(1, 7)]
        assert pool.queued == 6
        lane.release()
        assert first.result(5) == {"n2": 0}
        _taken(lane)
        lane.release(2)
        assert [f.result(5)["n2"] for f in rest] == [2 * n for n in range(1, 7)]
        assert lane.batches == [[0], [1, 2, 3, 4], [5, 6]]
    finally:
        pool.close()


def test_every_lane_works_while_jobs_are_queued() -> None:
    """What several BentoML workers on one socket could not promise (BentoML #5426): a second job
    goes to the idle lane, not behind the busy one."""
    lanes = [GateLane("a"), GateLane("b")]
    pool = AuditPool(lanes, max_batch=16)
    try:
        futures = [pool.submit(_job(0))]
        taker = next(lane for lane in lanes if lane.taken.acquire(timeout=20))
        futures.append(pool.submit(_job(1)))
        other = lanes[1] if taker is lanes[0] else lanes[0]
        _taken(other)  # taken while the first lane still holds its batch
        assert taker.batches == [[0]] and other.batches == [[1]]
        for lane in lanes:
            lane.release()
        assert [f.result(5)["n2"] for f in futures] == [0, 2]
    finally:
        pool.close()


def test_a_job_that_would_wait_too_long_is_refused_not_queued() -> None:
    """Load shedding: queued images x seconds per image / lanes past ``max_wait_s`` -> refused at
    once with the reason; the queue is untouched and takes jobs again once it drains."""
    lane = GateLane("a")
    pool = AuditPool([lane], max_batch=1, max_wait_s=2.5)
    try:
        pool.submit(_job(0))
        _taken(lane)
        lane.release()
        deadline = time.monotonic() + 5
        while pool.seconds_per_image is None and time.monotonic() < deadline:
            time.sleep(0.01)
        pool.seconds_per_image = 1.0  # as if each image took a second
        held = pool.submit(_job(1))
        _taken(lane)
        queued = [pool.submit(_job(n)) for n in (2, 3)]  # 2 s of work queued: still under 2.5 s
        assert pool.estimated_wait_s() == pytest.approx(2.0)
        pool.submit(_job(4))  # 2 s before it: admitted, now 3 s queued
        with pytest.raises(PoolOverloadedError, match=r"3 audits queued, about 3 s .* 1 LRP process"):
            pool.submit(_job(5))
        assert pool.queued == 3
        lane.release(4)
        assert held.result(5) == {"n2": 2} and [f.result(5)["n2"] for f in queued] == [4, 6]
    finally:
        pool.close()


def test_a_job_cancelled_while_queued_never_runs() -> None:
    lane = GateLane("a")
    pool = AuditPool([lane])
    try:
        first = pool.submit(_job(0))
        _taken(lane)
        dropped, kept = pool.submit(_job(1)), pool.submit(_job(2))
        assert dropped.cancel()
        lane.release(2)
        assert first.result(5) == {"n2": 0} and kept.result(5) == {"n2": 4}
        assert lane.batches == [[0], [2]]
    finally:
        pool.close()


def test_a_crashed_lanes_batch_is_retried_job_by_job_once() -> None:
    """A batch whose process died goes back to the front of the queue and its jobs run again,
    one per batch, while the lane restarts; a job that kills a second process fails alone."""
    lane = GateLane("a", crash_once={0}, crash_on={2})
    pool = AuditPool([lane], max_batch=16)
    try:
        first = pool.submit(_job(9))
        _taken(lane)
        futures = [pool.submit(_job(n)) for n in (0, 1, 2)]
        lane.release(5)
        assert first.result(5) == {"n2": 18}
        assert [f.result(5)["n2"] for f in futures[:2]] == [0, 2]
        with pytest.raises(LaneCrashedError, match="a died"):
            futures[2].result(5)
        assert lane.batches == [[9], [0, 1, 2], [0], [1], [2]]
        assert lane.restarts == 2 and pool.live_lanes == 1
        later = pool.submit(_job(3))
        lane.release()
        assert later.result(5) == {"n2": 6}
    finally:
        pool.close()


def test_an_error_fails_its_batch_and_the_lane_goes_on() -> None:
    lane = GateLane("a", fail_on={1})
    pool = AuditPool([lane], max_batch=16)
    try:
        futures = [pool.submit(_job(0))]
        _taken(lane)
        futures += [pool.submit(_job(n)) for n in (1, 2)]
        lane.release(2)
        assert futures[0].result(5) == {"n2": 0}
        with pytest.raises(ValueError, match=r"bad job in \[1, 2\]"):
            futures[1].result(5)
        with pytest.raises(ValueError):
            futures[2].result(5)
        later = pool.submit(_job(3))
        lane.release()
        assert later.result(5) == {"n2": 6}
    finally:
        pool.close()


def test_close_fails_what_is_queued_and_refuses_more() -> None:
    lane = GateLane("a")
    pool = AuditPool([lane])
    first = pool.submit(_job(0))
    _taken(lane)
    queued = pool.submit(_job(1))
    closer = threading.Thread(target=pool.close)  # while the lane still holds the first job
    closer.start()
    with pytest.raises(RuntimeError, match="closed before this audit ran"):
        queued.result(5)
    lane.release()  # the batch a lane holds is finished, not dropped
    closer.join(30)
    assert not closer.is_alive()
    assert first.result(5) == {"n2": 0}
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(_job(2))


def test_audit_async_awaits_the_lane() -> None:
    lane = GateLane("a")
    lane.release(10)
    pool = AuditPool([lane])

    async def main() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(pool.audit_async(_job(n)) for n in range(5))))

    try:
        assert [r["n2"] for r in asyncio.run(main())] == [0, 2, 4, 6, 8]
    finally:
        pool.close()


# ------------------------------------------------------------------ real LRP processes


VERSIONS = ("vanilla", "pclarc-band_aid")


def _jobs(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    return [
        {
            "version": VERSIONS[i % 2],
            "pixels": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "raw_heatmap": i == 1,
        }
        for i in range(n)
    ]


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Same audits, up to float sums that differ in the last bits between batch compositions."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        px, py = x["result"]["prediction"], y["result"]["prediction"]
        assert (px["version"], px["label"]) == (py["version"], py["label"])
        for k in px["probabilities"]:
            assert px["probabilities"][k] == pytest.approx(py["probabilities"][k], rel=1e-5)
        assert [c["concept"] for c in x["result"]["concepts"]] == [
            c["concept"] for c in y["result"]["concepts"]
        ]
        np.testing.assert_allclose(
            [c["score"] for c in x["result"]["concepts"]],
            [c["score"] for c in y["result"]["concepts"]],
            rtol=1e-4,
        )
        np.testing.assert_allclose(x["features"], y["features"], rtol=1e-4, atol=1e-6)
        assert (x["result"]["heatmap"] is None) == (y["result"]["heatmap"] is None)


@pytest.fixture(scope="module")
def local_engines(tiny_store) -> dict[str, AuditEngine]:
    return {v: AuditEngine.from_store(v, home=tiny_store, ort_threads=1) for v in VERSIONS}


@pytest.mark.slow
def test_lrp_processes_answer_like_this_process_through_a_kill(tiny_store, local_engines) -> None:
    """Two spawned LRP processes: every answer equals the in-process engines', in job order; one
    killed (SIGKILL) mid-life loses no job, and a replacement with a new pid takes work again."""
    jobs = _jobs(12)
    want = audit_jobs(local_engines, jobs)
    spec = LaneSpec(VERSIONS, home=str(tiny_store), threads=1)
    pool = AuditPool.start(spec, 2, max_batch=4)
    try:
        lanes = [lane for lane in pool.lanes if isinstance(lane, ProcessLane)]
        assert len(lanes) == 2 and len({lane.pid for lane in lanes}) == 2
        _same(pool.audit(jobs, timeout=120), want)
        victim = lanes[0]
        dead = victim.pid
        os.kill(dead, signal.SIGKILL)
        victim.process.join(10)
        _same(pool.audit(jobs, timeout=120), want)  # whatever the dead lane took went to the other
        deadline = time.monotonic() + 120
        while victim.pid == dead and time.monotonic() < deadline:  # found dead once it takes work
            _same(pool.audit(jobs[:2], timeout=120), want[:2])
        while pool.live_lanes < 2 and time.monotonic() < deadline:  # its replacement loading
            time.sleep(0.2)
        assert victim.pid != dead and victim.process.is_alive() and pool.live_lanes == 2
        _same(pool.audit(jobs, timeout=120), want)
    finally:
        pool.close()
    assert not any(lane.process.is_alive() for lane in lanes)


def test_one_lane_with_engines_audits_in_this_process(local_engines) -> None:
    pool = AuditPool.start(LaneSpec(VERSIONS), 1, engines=local_engines)
    try:
        assert [type(lane) for lane in pool.lanes] == [LocalLane]
        jobs = _jobs(3)
        _same(pool.audit(jobs, timeout=60), audit_jobs(local_engines, jobs))
    finally:
        pool.close()


def test_a_process_that_cannot_load_refuses_the_start(tiny_store) -> None:
    """An LRP process that fails to load its versions stops the pool (and the service) from
    starting, with the reason; no process is left behind."""
    spec = LaneSpec(("vanilla", "no-such-version"), home=str(tiny_store))
    with pytest.raises(RuntimeError, match="failed to start: .*no-such-version"):
        AuditPool.start(spec, 2)
