"""The auditor's own queue: continuous batching of audits over LRP processes.

One queue of audit jobs and a few *lanes*, each one LRP process (or, with a single lane, this
process). A lane that is free takes everything queued, up to ``max_batch``, and audits it in one
LRP call per version (:func:`audit_jobs`). Nothing waits for a batch to fill: when traffic is
light a lane takes one job the moment it arrives; when lanes are busy jobs pile up and the next
free lane takes them together, so the batch grows with the load (what an adaptive batcher is
for), and every lane keeps working as long as anything is queued.

Why a queue of its own rather than BentoML's adaptive batching, which the predictor uses:

* **Not several BentoML auditor workers.** They share one listening socket, and the worker that
  wakes first accepts every pending connection (asyncio accepts a whole backlog per wake-up;
  BentoML issue #5426). The entry service holds a few keep-alive connections, so they pile onto
  one worker, which then does every audit while the others idle (/audit at 14 req/s instead of
  ~26 on 2 cores). Here one BentoML worker accepts every request, and the lanes share its queue.
* **Not one BentoML worker cutting each batch across helper processes.** BentoML's dispatcher
  hands a worker one batch at a time, so every batch would wait for its slowest chunk before the
  next began, and chunks of one image would run at batch 1 (/audit at 4 clients 16.6 req/s
  against 24.2 with this queue). Here a lane never waits for another.

Jobs are pure functions of their pixels, so a batch whose process died is queued again, each job
once (:data:`CRASH_RETRIES`) and alone, for the next free lane while the dead lane starts a
replacement: a job that kills processes fails by itself, without its batch mates.
A job whose estimated wait (queued images x seconds per image / lanes) would pass ``max_wait_s``
is refused at once (:class:`PoolOverloadedError`, a 503 to the caller): the same load shedding
BentoML's dispatcher does with ``max_latency_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

from medaudit.service import metrics
from medaudit.service.audit import AuditEngine
from medaudit.service.config import DEFAULT_MODEL_NAME, version_tag
from medaudit.service.errors import LaneCrashedError, PoolOverloadedError

log = logging.getLogger(__name__)

#: How long an LRP process may take to load its versions and warm up.
LANE_START_TIMEOUT_S = 600.0
#: Times a job is queued again after the process auditing it died (a job that kills two processes
#: is failed, not allowed to take down every lane in turn).
CRASH_RETRIES = 1
#: Weight of the newest batch in the running seconds-per-image estimate that load shedding uses.
EWMA_WEIGHT = 0.2


def by_version(jobs: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Job indices grouped by version, in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        out.setdefault(str(job["version"]), []).append(i)
    return out


def is_screen(job: Mapping[str, Any]) -> bool:
    """Whether ``job`` asks for a screen (:meth:`AuditEngine.screen`) rather than an audit."""
    return job.get("detail") == "scores"


def audit_jobs(engines: Mapping[str, AuditEngine], jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One :meth:`AuditEngine.audit` call per version over a batch of jobs, and one
    :meth:`AuditEngine.screen` call per version over its screens; results in job order.

    A job is ``{"version", "pixels": (H, W, 3) uint8, "raw_heatmap": bool}``, plus
    ``"detail": "scores"`` for a screen (:mod:`medaudit.service.screening`) and, for an audit, the
    ``"reason"`` it was asked for (the heatmap metric's label; default ``requested``). Its result is
    ``{"result": audit JSON, "features", "heatmap"}``: the pooled activations and the raw class
    heatmap (float16 (H, W), None for a screen or a withheld heatmap), which the flags store, travel
    beside the JSON, not in it (the JSON holds the heatmap only when the job asked for it).

    It is :func:`run_jobs` (the engines' device stage) then :func:`finish_jobs` (the host stage:
    masks, PNGs, JSON), which a :class:`LocalLane` may run on another thread.
    """
    return finish_jobs(engines, jobs, run_jobs(engines, jobs))


#: A batch between its stages: per (version, screen) group, its job indices and the screens'
#: results or the audits' :class:`~medaudit.service.audit_stages.RawAudit`.
Staged = list[tuple[str, bool, list[int], Any]]


def run_jobs(engines: Mapping[str, AuditEngine], jobs: Sequence[Mapping[str, Any]]) -> Staged:
    """The device stage of :func:`audit_jobs`: screens, and the audits' :meth:`AuditEngine.audit_raw`."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((str(job["version"]), is_screen(job)), []).append(i)
    staged: Staged = []
    for (version, screen), idx in groups.items():
        rgb = [np.asarray(jobs[i]["pixels"], dtype=np.uint8) for i in idx]
        engine = engines[version]
        # the raw heatmap always (a float16 copy of what the overlay is made of): a flagged
        # request stores it as its own layer over the bare image (service/flags/producer.py)
        staged.append(
            (version, screen, idx, engine.screen(rgb) if screen else engine.audit_raw(rgb, raw_heatmap=True))
        )
    return staged


def finish_jobs(
    engines: Mapping[str, AuditEngine], jobs: Sequence[Mapping[str, Any]], staged: Staged
) -> list[dict[str, Any]]:
    """The host stage of :func:`audit_jobs`: each audit's :meth:`AuditEngine.finish`, every answer."""
    out: list[dict[str, Any]] = [{} for _ in jobs]
    for version, screen, idx, got in staged:
        results = got if screen else engines[version].finish(got)
        for i, r in zip(idx, results, strict=True):
            body = (r if jobs[i].get("raw_heatmap") else replace(r, heatmap=None)).to_json()
            out[i] = {"result": body, "features": r.features, "heatmap": r.heatmap}
    return out


# ------------------------------------------------------------------------------------- lanes


class Lane(Protocol):
    """Where a batch is audited: :class:`LocalLane` (this process) or :class:`ProcessLane`."""

    name: str

    def run(self, jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """:func:`audit_jobs` over ``jobs``; :class:`LaneCrashedError` if the process died."""
        ...

    def restart(self) -> None:
        """Replace a crashed process (blocks until the new one is ready)."""
        ...

    def close(self) -> None: ...


class LocalLane:
    """Audits in this process, on engines it was given (one lane: a GPU, or one core).

    ``pipelined`` (default: when an engine is on CUDA) has the pool run each batch's host stage
    (:func:`finish_jobs`: masks, PNGs, JSON) on the lane's own thread while the engines take the
    next batch (:meth:`AuditPool._serve`); the answers are :func:`audit_jobs`' either way.
    """

    def __init__(self, engines: Mapping[str, AuditEngine], *, pipelined: bool | None = None) -> None:
        self.engines = engines
        self.name = f"local:{os.getpid()}"
        if pipelined is None:
            pipelined = any(e.device.type == "cuda" for e in engines.values())
        self.pipelined = pipelined

    def run(self, jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return audit_jobs(self.engines, jobs)

    def run_device(self, jobs: Sequence[Mapping[str, Any]]) -> Staged:
        return run_jobs(self.engines, jobs)

    def finish(self, jobs: Sequence[Mapping[str, Any]], staged: Staged) -> list[dict[str, Any]]:
        return finish_jobs(self.engines, jobs, staged)

    def restart(self) -> None:  # this process cannot crash without the pool
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class LaneSpec:
    """What an LRP process loads: the versions, where from, the presence FPR, its threads, device."""

    versions: tuple[str, ...]
    #: Store name of the versions given without one (``Settings.model_name``).
    model_name: str = DEFAULT_MODEL_NAME
    home: str | None = None
    fpr: float | None = None
    threads: int = 1
    device: str = "cpu"


def load_engines(spec: LaneSpec, *, warmup: bool = True) -> dict[str, AuditEngine]:
    """The engines an LRP process holds (``version -> AuditEngine``), with torch at ``spec.threads``
    threads: the auditor's lanes and ``medaudit scan``'s workers load them the same way."""
    import torch

    torch.set_num_threads(spec.threads)
    engines = {
        v: AuditEngine.from_store(
            version_tag(v, spec.model_name), home=spec.home, fpr=spec.fpr, device=spec.device
        )
        for v in spec.versions
    }
    if warmup:
        for e in engines.values():
            e.warmup()
    return engines


def _lane_main(conn: Connection, spec: LaneSpec) -> None:
    """An LRP process: load and warm the versions, then audit batches until the pipe closes."""
    import torch

    try:
        engines = load_engines(spec)
    except Exception as e:  # reported to the parent, which refuses to start
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    gc.collect()  # the models live as long as the process: out of the GC's full passes
    gc.freeze()  # (service.api.freeze_startup_heap says why)
    conn.send(("ready", torch.get_num_threads()))
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):  # the serving process is gone
            return
        if jobs is None:
            return
        answer: tuple[str, Any]
        try:
            answer = ("ok", audit_jobs(engines, jobs))
        except Exception as e:  # one bad batch must not end the process
            log.exception("audit of %d job(s) failed", len(jobs))
            answer = ("error", f"{type(e).__name__}: {e}")
        conn.send(answer)


class ProcessLane:
    """One spawned LRP process with its own engines, and the pipe to it.

    Raises:
        RuntimeError: The process failed to load its versions or was not ready in time.
    """

    def __init__(
        self, spec: LaneSpec, *, start_timeout_s: float = LANE_START_TIMEOUT_S, wait: bool = True
    ) -> None:
        self.spec = spec
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")  # never fork a process that holds torch's threads
        self._launch()
        if wait:
            self.wait_ready()

    def _launch(self) -> None:
        self.conn, child = self._ctx.Pipe()
        self.process = self._ctx.Process(
            target=_lane_main, args=(child, self.spec), daemon=True, name="medaudit-lrp"
        )
        self.process.start()
        child.close()
        self.name = f"lrp:{self.process.pid}"

    def wait_ready(self) -> None:
        """Block until the process has loaded and warmed its versions (``wait=False`` lanes:
        several launched first load side by side, one core each).

        Raises:
            RuntimeError: It failed to load, exited, or was not ready within the timeout.
        """
        try:
            if not self.conn.poll(self.start_timeout_s):
                raise RuntimeError(
                    f"LRP process {self.process.pid} not ready after {self.start_timeout_s:.0f} s"
                )
            kind, detail = self.conn.recv()
        except (EOFError, OSError) as e:
            self._stop()
            raise RuntimeError(f"LRP process {self.process.pid} exited while starting") from e
        except RuntimeError:
            self._stop()
            raise
        if kind != "ready":
            self._stop()
            raise RuntimeError(f"LRP process {self.process.pid} failed to start: {detail}")
        #: The torch threads the process runs with (it reports them once loaded).
        self.torch_threads = int(detail)

    @property
    def pid(self) -> int:
        return int(self.process.pid or 0)

    def run(self, jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        try:
            self.conn.send(list(jobs))
            kind, payload = self.conn.recv()
        except (EOFError, OSError) as e:
            raise LaneCrashedError(f"LRP process {self.pid} died (exit code {self.process.exitcode})") from e
        if kind != "ok":
            raise RuntimeError(f"LRP process {self.pid}: {payload}")
        return list(payload)

    def restart(self) -> None:
        self._stop()
        self._launch()
        self.wait_ready()

    def _stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()

    def close(self) -> None:
        self._stop()


# -------------------------------------------------------------------------------------- pool


@dataclass
class _Item:
    job: Mapping[str, Any]
    future: Future[dict[str, Any]]
    queued_at: float
    crashes: int = 0
    started: bool = False

    def start(self) -> bool:
        """Mark the future running; False if its caller cancelled it while it was queued."""
        if not self.started:
            self.started = self.future.set_running_or_notify_cancel()
            return self.started
        return True


class AuditPool:
    """A queue of audit jobs served by ``lanes``, each taking what is queued when it is free.

    Args:
        lanes: Where batches run (started; the pool closes them).
        max_batch: Most jobs one lane takes at once.
        max_wait_s: A job whose estimated wait passes this is refused (:class:`PoolOverloadedError`).
    """

    def __init__(self, lanes: Sequence[Lane], *, max_batch: int = 16, max_wait_s: float = 20.0) -> None:
        if not lanes:
            raise ValueError("an audit pool needs at least one lane")
        self.lanes = list(lanes)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._live = len(self.lanes)
        #: Running estimate of one lane's seconds per image (None until a batch has run).
        self.seconds_per_image: float | None = None
        self._threads = [
            threading.Thread(target=self._serve, args=(lane,), name=f"audit-lane-{i}", daemon=True)
            for i, lane in enumerate(self.lanes)
        ]
        for t in self._threads:
            t.start()

    @classmethod
    def start(
        cls,
        spec: LaneSpec,
        processes: int,
        *,
        engines: Mapping[str, AuditEngine] | None = None,
        max_batch: int = 16,
        max_wait_s: float = 20.0,
    ) -> AuditPool:
        """``processes`` LRP processes loading ``spec``; with one process and ``engines`` given,
        the one lane audits here, on them, instead (no process to start, nothing to copy).

        Raises:
            RuntimeError: An LRP process could not start (the service then refuses to start:
                readiness never lies).
        """
        if processes == 1 and engines is not None:
            return cls([LocalLane(engines)], max_batch=max_batch, max_wait_s=max_wait_s)
        lanes = [ProcessLane(spec, wait=False) for _ in range(processes)]  # loading side by side
        try:
            for lane in lanes:
                lane.wait_ready()
        except Exception:
            for lane in lanes:
                lane.close()
            raise
        return cls(lanes, max_batch=max_batch, max_wait_s=max_wait_s)

    # -- callers -----------------------------------------------------------------------------

    def submit(self, job: Mapping[str, Any]) -> Future[dict[str, Any]]:
        """Queue one job; its future gets the :func:`audit_jobs` result.

        Raises:
            PoolOverloadedError: Its estimated wait passes ``max_wait_s``.
            RuntimeError: The pool is closed or has no live lane.
        """
        item = _Item(job, Future(), time.monotonic())
        with self._cond:
            if self._closed or not self._live:
                raise RuntimeError(
                    "the audit pool is closed" if self._closed else "no LRP process is running"
                )
            wait = self.estimated_wait_s()
            if wait > self.max_wait_s:
                raise PoolOverloadedError(
                    f"{len(self._queue)} audits queued, about {wait:.0f} s of work for "
                    f"{self._live} LRP process(es): more than the {self.max_wait_s:.0f} s allowed"
                )
            self._queue.append(item)
            self._cond.notify()
        return item.future

    async def audit_async(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """One job, awaited (cancelling the await takes it out of the queue if no lane has it)."""
        return await asyncio.wrap_future(self.submit(job))

    def audit(self, jobs: Sequence[Mapping[str, Any]], timeout: float | None = None) -> list[dict[str, Any]]:
        """Every job, blocking; results in job order (the lanes may split them as they like)."""
        futures = [self.submit(j) for j in jobs]
        return [f.result(timeout) for f in futures]

    def estimated_wait_s(self) -> float:
        """Seconds of queued work per live lane, by the running seconds-per-image estimate."""
        if self.seconds_per_image is None or not self._live:
            return 0.0
        return len(self._queue) * self.seconds_per_image / self._live

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def live_lanes(self) -> int:
        return self._live

    def close(self) -> None:
        """Stop taking work, fail what is queued, stop the lanes' processes."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            if item.start():
                item.future.set_exception(RuntimeError("the audit pool closed before this audit ran"))
        for t in self._threads:
            t.join(30)
        for lane in self.lanes:
            lane.close()

    # -- lanes -------------------------------------------------------------------------------

    def _take(self) -> list[_Item] | None:
        """Everything queued, up to ``max_batch`` (blocks while nothing is); None once closed."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            # A job back from a crashed process runs alone: if it is what kills processes, it
            # takes no innocent job down with it on its second try.
            n = 1 if self._queue[0].crashes else min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _serve(self, lane: Lane) -> None:
        """A lane's thread: take, run, answer, until the pool closes. Whatever goes wrong with a
        batch fails that batch's futures; the thread itself never dies of it (a dead thread
        would leave its callers waiting)."""
        if isinstance(lane, LocalLane) and lane.pipelined:
            return self._serve_pipelined(lane)
        while (items := self._take()) is not None:
            items = [it for it in items if it.start()]  # cancelled while queued: dropped
            if not items:
                continue
            try:
                results = self._run(lane, items)
            except LaneCrashedError as e:
                self._crashed(lane, items, e)
                if not self._restart(lane):
                    return
                continue
            except Exception as e:
                log.exception("audit batch of %d failed on %s", len(items), lane.name)
                for it in items:
                    it.future.set_exception(e)
                continue
            for it, r in zip(items, results, strict=True):
                it.future.set_result(r)

    def _serve_pipelined(self, lane: LocalLane) -> None:
        """:meth:`_serve` in two stages: the engines' device stage here, each batch's host stage
        on one more thread while the next batch runs; at most one batch waits for it."""
        finishing: Future[None] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="audit-finish") as host:
            while (items := self._take()) is not None:
                items = [it for it in items if it.start()]
                if not items:
                    continue
                jobs = [it.job for it in items]
                try:
                    staged = self._run(lane, items, stage=lane.run_device)
                except Exception as e:
                    log.exception("audit batch of %d failed on %s", len(items), lane.name)
                    for it in items:
                        it.future.set_exception(e)
                    continue
                if finishing is not None:
                    finishing.result()  # never raises: _finish answers every future itself
                finishing = host.submit(self._finish, lane, items, jobs, staged)

    def _finish(
        self, lane: LocalLane, items: list[_Item], jobs: list[Mapping[str, Any]], staged: Staged
    ) -> None:
        try:
            results = lane.finish(jobs, staged)
        except Exception as e:
            log.exception("audit batch of %d failed on %s", len(items), lane.name)
            for it in items:
                it.future.set_exception(e)
            return
        for it, r in zip(items, results, strict=True):
            it.future.set_result(r)

    def _run(self, lane: Lane, items: list[_Item], stage: Any = None) -> Any:
        """One batch on ``lane`` (or its ``stage``), with its metrics and the seconds-per-image
        estimate (of the stage alone, when one is given: the part the lane is busy for)."""
        now = time.monotonic()
        jobs = [it.job for it in items]
        for it in items:
            metrics.AUDIT_QUEUE_SECONDS.observe(now - it.queued_at)
        for version, idx in by_version(jobs).items():
            metrics.BATCH_IMAGES.labels("auditor", version).observe(len(idx))
        t0 = time.perf_counter()
        results = (stage or lane.run)(jobs)
        if stage is None and len(results) != len(items):
            raise RuntimeError(f"{lane.name} answered {len(results)} of {len(items)} audits")
        per_image = (time.perf_counter() - t0) / len(items)
        with self._cond:
            old = self.seconds_per_image
            self.seconds_per_image = per_image if old is None else old + EWMA_WEIGHT * (per_image - old)
        for job in jobs:  # computed, so counted (also when its caller has stopped waiting)
            if not is_screen(job):
                metrics.HEATMAPS.labels(str(job["version"]), str(job.get("reason", "requested"))).inc()
        return results

    def _crashed(self, lane: Lane, items: list[_Item], e: LaneCrashedError) -> None:
        """Queue a dead lane's batch again, at the front, for the other lanes (once per job)."""
        log.error("%s; %d audit(s) it held are queued again", e, len(items))
        metrics.AUDIT_LANE_RESTARTS.inc()
        retry = []
        for it in items:
            if it.crashes < CRASH_RETRIES:
                # The same item (its caller holds this future) goes back, its crash counted.
                it.crashes += 1
                retry.append(it)
            else:
                it.future.set_exception(e)
        with self._cond:
            for it in reversed(retry):
                self._queue.appendleft(it)
            self._live -= 1
            self._cond.notify_all()

    def _restart(self, lane: Lane) -> bool:
        """Start a replacement process for ``lane``; False (lane retired) if it cannot start."""
        try:
            lane.restart()
        except Exception:
            log.exception("could not replace %s: the pool goes on with one LRP process fewer", lane.name)
            with self._cond:
                if not self._live:  # nobody left to take the queue: fail it rather than hang
                    pending = list(self._queue)
                    self._queue.clear()
                else:
                    pending = []
            for it in pending:
                if it.start():
                    it.future.set_exception(RuntimeError("no LRP process is running"))
            return False
        log.warning("%s replaces the crashed LRP process", lane.name)
        with self._cond:
            self._live += 1
        return True
