"""Where a scan's shards run: this process, a local process pool, or Ray actors.

Every runner takes shards ``(k, start, items)`` and yields ``(k, rows)`` as shards finish, in any
order; rows come from the same :class:`~medaudit.cli.scan.worker.ShardScanner` everywhere, and
the caller (:mod:`.run`) writes each shard once. A runner never writes output itself, so a
shard retried after a crash cannot appear twice.

* :class:`InProcessRunner`: one engine in this process (``--workers 0``; the baseline).
* :class:`LocalPoolRunner`: one process per core, each with its own engine and one torch
  thread, as the service's auditor runs one LRP process per core. A worker that dies breaks a
  ``ProcessPoolExecutor``; the runner then starts a new pool and runs again every shard not yet
  returned (at most :data:`MAX_RESTARTS` times).
* :class:`RayRunner`: Ray actors, one per CPU (``num_cpus=1``) or per GPU (``num_gpus=1``), each
  holding an engine; shards are actor tasks, two in flight per actor. Ray restarts a killed actor
  and retries its task (``max_restarts``, ``max_task_retries``). Why actors and not ``ray.data``:
  the unit of resumption is a shard with a fixed item range and a file of its own, which actor
  tasks give directly; ``ray.data``'s streaming executor plans its own blocks, writes its own
  files, and has no notion of a shard that is already done. Actors also keep the model loaded
  across shards (a task would load it per call).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from medaudit.cli.scan.sources import Item
from medaudit.cli.scan.worker import ScanOptions, ShardScanner
from medaudit.models.errors import MedauditError

Shard = tuple[int, int, list[Item]]
#: Times a local pool is restarted after a worker died, and Ray restarts an actor / retries a task.
MAX_RESTARTS = 3
#: Shards in flight per Ray actor: one running, one queued behind it, so an actor never idles.
IN_FLIGHT = 2


class ScanRunError(MedauditError):
    """Workers kept dying; finished shards are kept and a rerun resumes."""


class Runner(Protocol):
    name: str

    def run(self, shards: Sequence[Shard]) -> Iterator[tuple[int, list[dict[str, Any]]]]: ...

    def pids(self) -> list[int]:
        """Process ids of the workers (for tests that kill one)."""
        ...

    def close(self) -> None: ...


class InProcessRunner:
    name = "in-process"

    def __init__(self, options: ScanOptions) -> None:
        import torch

        torch.set_num_threads(options.threads)
        self.scanner = ShardScanner(options)

    def run(self, shards: Sequence[Shard]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        for k, start, items in shards:
            yield k, self.scanner.scan(start, items)

    def pids(self) -> list[int]:
        return [os.getpid()]

    def close(self) -> None:
        self.scanner.close()


_SCANNER: ShardScanner | None = None


def _init_worker(options: ScanOptions) -> None:
    global _SCANNER
    _SCANNER = ShardScanner(options)


def _scan_in_worker(k: int, start: int, items: list[Item]) -> tuple[int, list[dict[str, Any]], int]:
    assert _SCANNER is not None, "the pool's initializer builds the scanner"
    return k, _SCANNER.scan(start, items), os.getpid()


class LocalPoolRunner:
    """``workers`` processes forked from a forkserver (never from this process: a forked
    torch/OpenMP runtime that has run is not safe)."""

    name = "local pool"

    def __init__(self, options: ScanOptions, workers: int, max_restarts: int = MAX_RESTARTS) -> None:
        if workers < 1:
            raise ValueError(f"a local pool needs at least one worker, got {workers}")
        self.options, self.workers, self.max_restarts = options, workers, max_restarts
        self.restarts = 0
        self._seen: dict[int, None] = {}
        self._pool: ProcessPoolExecutor | None = None

    def _start(self) -> ProcessPoolExecutor:
        # forkserver: one clean process imports torch and the engine's modules once and forks each
        # worker from there, so a worker (or a replacement for a killed one) starts without a
        # spawn's seconds of imports; nothing of this process's threads is inherited.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["medaudit.cli.scan.worker"])
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self.options,)
        )
        return self._pool

    def run(self, shards: Sequence[Shard]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        pending = {k: (k, start, items) for k, start, items in shards}
        while pending:
            pool = self._start()
            futures: dict[Future[Any], int] = {
                pool.submit(_scan_in_worker, *s): k for k, s in pending.items()
            }
            try:
                for f in as_completed(futures):
                    k, rows, pid = f.result()
                    self._seen[pid] = None
                    del pending[k]
                    yield k, rows
            except BrokenProcessPool as e:
                self.restarts += 1
                if self.restarts > self.max_restarts:
                    raise ScanRunError(
                        f"scan workers died {self.restarts} times ({e}); the finished shards are kept: "
                        "run the same command again to resume"
                    ) from e
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def pids(self) -> list[int]:
        """The live pool's worker pids, once it has started them."""
        pool = self._pool
        procs = getattr(pool, "_processes", None) or {}  # no public listing of a pool's processes
        return sorted(int(p) for p in procs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _ScanActor:
    """A Ray actor's body: one engine, shards until it is killed."""

    def __init__(self, options: ScanOptions) -> None:
        import torch

        torch.set_num_threads(options.threads)
        self.scanner = ShardScanner(options)

    def pid(self) -> int:
        return os.getpid()

    def scan(self, k: int, start: int, items: list[Item]) -> tuple[int, list[dict[str, Any]], int]:
        return k, self.scanner.scan(start, items), os.getpid()


def connect_ray(address: str, num_cpus: int | None = None) -> bool:
    """Joins Ray: ``local`` starts a private instance on this machine, ``auto`` joins the cluster
    running here (``ray start``), anything else is a cluster address (``ray://host:10001``,
    ``host:6379``). A Ray already initialised in this process is used as it is. Returns whether
    this call started it (and so should shut it down)."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        return True
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise ScanRunError(
            f"--ray {address}: no Ray cluster answers ({e}); start one with `ray start --head`, or use "
            "--ray local to start one for this scan"
        ) from e
    return True


class RayRunner:
    """Ray actors (see the module docstring). ``workers`` 0: one per CPU (or GPU) of the cluster."""

    name = "ray"

    def __init__(
        self, options: ScanOptions, workers: int = 0, address: str = "local", max_restarts: int = MAX_RESTARTS
    ) -> None:
        import ray

        self._ray = ray
        gpu = options.device.startswith("cuda")
        self.started = connect_ray(address, num_cpus=workers or None)
        resource = "GPU" if gpu else "CPU"
        n = workers or int(ray.cluster_resources().get(resource, 0))
        if n < 1:
            raise ScanRunError(f"the Ray cluster offers no {resource}; it has {ray.cluster_resources()}")
        # each actor sees its own GPU as cuda:0 (Ray sets CUDA_VISIBLE_DEVICES per actor)
        actor_options = options.on("cuda:0") if gpu else options
        actor = ray.remote(
            num_cpus=1 if not gpu else max(1, options.decode_threads),
            num_gpus=1 if gpu else 0,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
        )(_ScanActor)
        self.max_restarts = max_restarts
        self.actors: list[Any] = [actor.remote(actor_options) for _ in range(n)]

    def run(self, shards: Sequence[Shard]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        queue = deque(shards)
        inflight: dict[Any, int] = {}

        def submit(a: int) -> None:
            if queue:
                inflight[self.actors[a].scan.remote(*queue.popleft())] = a

        for a in range(len(self.actors)):
            for _ in range(IN_FLIGHT):
                submit(a)
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            a = inflight.pop(ref)
            try:
                k, rows, _pid = ray.get(ref)
            except RayTaskError as e:  # an exception inside the scan: the cause, as raised there
                raise e.as_instanceof_cause() from None
            except RayActorError as e:
                raise ScanRunError(
                    f"a Ray scan worker died more than {self.max_restarts} times ({e}); the finished shards "
                    "are kept: run the same command again to resume"
                ) from e
            yield k, rows
            submit(a)

    def pids(self) -> list[int]:
        return [int(p) for p in self._ray.get([a.pid.remote() for a in self.actors])]

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
        if self.started:
            self._ray.shutdown()
