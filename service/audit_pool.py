"""Audits of one batch spread over single-threaded LRP processes.

Why not simply several BentoML workers of the auditor service: they share one listening socket,
and the worker that wakes first accepts every pending connection (asyncio accepts a whole backlog
per wake-up), so the entry service's few keep-alive connections pile onto one worker. Measured
with 2 workers and 4 clients of /audit: one worker did all the work, the other none, for as long
as the connections lived (14 req/s instead of ~26; BentoML issue #5426). Here one BentoML worker
receives every request, its adaptive batcher merges them, and :class:`AuditPool` cuts each batch
into one contiguous chunk per process: the worker's own and one per helper process, each with
one torch thread (torch's LRP backward gains little from a second thread, a second process gains
a whole core: :func:`service.config.audit_workers`). Helpers are spawned processes holding their
own engines (the same versions, thresholds and store); a helper that dies is replaced and its
chunk done locally, so a batch is never lost to it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import multiprocessing as mp
import os
import threading
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from service import metrics
from service.audit import AuditEngine, FlagThresholds

log = logging.getLogger(__name__)

#: How long a helper may take to load its versions and warm up before the service gives up on it.
HELPER_START_TIMEOUT_S = 600.0


def by_version(jobs: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Job indices grouped by version, in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        out.setdefault(str(job["version"]), []).append(i)
    return out


def audit_jobs(
    engines: Mapping[str, AuditEngine], jobs: Sequence[Mapping[str, Any]], *, observe: bool = True
) -> list[dict[str, Any]]:
    """One :meth:`AuditEngine.audit` call per version over a batch of jobs, results in job order.

    ``features`` (the pooled activations the flags store) travels beside the JSON, not in it.
    ``observe``: record the batch sizes (off in helpers, whose metrics nobody scrapes; the
    serving process records the whole batch).
    """
    out: list[dict[str, Any]] = [{} for _ in jobs]
    for version, idx in by_version(jobs).items():
        if observe:
            metrics.BATCH_IMAGES.labels("auditor", version).observe(len(idx))
        rgb = [np.asarray(jobs[i]["pixels"], dtype=np.uint8) for i in idx]
        raw = any(bool(jobs[i].get("raw_heatmap")) for i in idx)
        results = engines[version].audit(rgb, raw_heatmap=raw)
        for i, r in zip(idx, results, strict=True):
            body = r.to_json()
            if not jobs[i].get("raw_heatmap"):
                body["heatmap"] = None
            out[i] = {"result": body, "features": r.features}
    return out


def chunks(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into at most ``parts`` contiguous, near-equal, non-empty pieces."""
    if n <= 0:
        return []
    parts = max(1, min(parts, n))
    size = math.ceil(n / parts)
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _helper_main(
    conn: Connection, versions: Sequence[str], home: str | None, thresholds: FlagThresholds, threads: int
) -> None:
    """A helper process: load and warm the versions, then audit chunks until the pipe closes."""
    import torch

    torch.set_num_threads(threads)
    try:
        engines = {v: AuditEngine.from_store(v, home=home, thresholds=thresholds) for v in versions}
        for e in engines.values():
            e.warmup()
    except Exception as e:  # reported to the parent, which refuses to start
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    gc.collect()  # what start-up allocated lives as long as the helper: out of the GC's full passes
    gc.freeze()  # (service.api.freeze_startup_heap, why)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):  # the serving process is gone
            return
        if jobs is None:
            return
        try:
            conn.send(("ok", audit_jobs(engines, jobs, observe=False)))
        except Exception as e:  # one bad chunk must not end the helper
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Helper:
    """One helper process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, args: tuple[Any, ...]) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_helper_main, args=(child, *args), daemon=True, name="medaudit-lrp")
        self.process.start()
        child.close()
        self.ready = False

    def check_ready(self, timeout: float = 0.0) -> bool:
        """Reads the helper's start message if it has come (waiting up to ``timeout``).

        Raises:
            RuntimeError: The helper reported a failure or exited before it was ready.
        """
        if self.ready:
            return True
        try:
            if not self.conn.poll(timeout):
                return False
            kind, detail = self.conn.recv()
        except (EOFError, OSError) as e:
            raise RuntimeError(f"LRP helper {self.process.pid} exited while starting") from e
        if kind != "ready":
            raise RuntimeError(f"LRP helper {self.process.pid} failed to start: {detail}")
        self.ready = True
        return True

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()


class AuditPool:
    """The engines of this process plus ``helpers`` helper processes with their own.

    Args:
        engines: This process's engines (its share of each batch runs on them).
        helpers: Helper processes to start (0: everything runs here).
        home: BENTOML_HOME for the helpers (``None``: their environment's, inherited).
        thresholds: Flag thresholds (the helpers must flag as this process does).
        threads: Torch threads per helper.

    Raises:
        RuntimeError: A helper that failed to load its versions or did not get ready in time:
            a service that cannot start its helpers refuses to start (readiness never lies).
    """

    def __init__(
        self,
        engines: Mapping[str, AuditEngine],
        helpers: int = 0,
        *,
        home: str | None = None,
        thresholds: FlagThresholds | None = None,
        threads: int = 1,
    ) -> None:
        self.engines = engines
        self._args = (tuple(engines), home, thresholds or FlagThresholds(), threads)
        self._ctx = mp.get_context("spawn")  # never fork a process holding torch's threads
        self._lock = threading.Lock()
        self._helpers = [_Helper(self._ctx, self._args) for _ in range(helpers)]
        try:
            for h in self._helpers:
                if not h.check_ready(HELPER_START_TIMEOUT_S):
                    raise RuntimeError(
                        f"LRP helper {h.process.pid} not ready after {HELPER_START_TIMEOUT_S:.0f} s"
                    )
        except Exception:
            self.close()
            raise

    @property
    def processes(self) -> int:
        """Processes a batch may be spread over (this one and the helpers)."""
        return 1 + len(self._helpers)

    def helper_pids(self) -> list[int]:
        return [int(h.process.pid) for h in self._helpers if h.process.pid is not None]

    def audit(self, jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """:func:`audit_jobs` over ``jobs``, one contiguous chunk per ready process, in job order."""
        for version, idx in by_version(jobs).items():
            metrics.BATCH_IMAGES.labels("auditor", version).observe(len(idx))
        out: list[dict[str, Any]] = [{} for _ in jobs]
        with self._lock:  # one batch at a time: a helper has at most one chunk in flight
            helpers = self._ready_helpers()
            local, *rest = chunks(len(jobs), 1 + len(helpers)) or [range(0)]
            sent: list[tuple[_Helper, range]] = []
            for h, piece in zip(helpers, rest, strict=False):
                try:
                    h.conn.send([jobs[i] for i in piece])
                    sent.append((h, piece))
                except (OSError, ValueError):  # died since: its chunk runs here
                    self._replace(h)
                    self._run_here(jobs, piece, out)
            self._run_here(jobs, local, out)
            for h, piece in sent:
                try:
                    kind, payload = h.conn.recv()
                except (EOFError, OSError):
                    log.error(
                        "LRP helper %s died mid-batch; its %d audits run here", h.process.pid, len(piece)
                    )
                    self._replace(h)
                    self._run_here(jobs, piece, out)
                    continue
                if kind != "ok":
                    raise RuntimeError(f"LRP helper {h.process.pid}: {payload}")
                for i, r in zip(piece, payload, strict=True):
                    out[i] = r
        return out

    def _run_here(self, jobs: Sequence[Mapping[str, Any]], piece: range, out: list[dict[str, Any]]) -> None:
        for i, r in zip(
            piece, audit_jobs(self.engines, [jobs[i] for i in piece], observe=False), strict=True
        ):
            out[i] = r

    def _ready_helpers(self) -> list[_Helper]:
        """Helpers that can take a chunk now; a replacement still starting is skipped."""
        ready = []
        for h in list(self._helpers):
            try:
                if h.check_ready():
                    ready.append(h)
            except RuntimeError:
                log.exception("replacement LRP helper failed; this process goes on with one helper fewer")
                h.stop()
                self._helpers.remove(h)
        return ready

    def _replace(self, h: _Helper) -> None:
        """A new helper in place of a dead one; it takes chunks once it reports ready."""
        log.error("LRP helper %s is gone (exit code %s); starting another", h.process.pid, h.process.exitcode)
        h.stop()
        self._helpers[self._helpers.index(h)] = _Helper(self._ctx, self._args)

    def close(self) -> None:
        for h in self._helpers:
            h.stop()
        self._helpers = []
