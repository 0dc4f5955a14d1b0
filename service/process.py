"""Run ``bentoml serve medaudit.service.api:MedAudit`` as a child process and wait until it is ready.

What the tier-3 tests, the live Prometheus check and ``benchmarks/serve.py`` share: start a real
server on a free port, poll ``/readyz``, hand back its base URL, and always stop it (SIGTERM, then
SIGKILL after a grace period). The server's output goes to a log file whose tail is quoted in
every error, so a failed start says why.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ServeError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log's tail."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM (a server drains and runs its shutdown hooks), then SIGKILL after ``grace_s``; then
    SIGKILL to any of its descendants still running, so that no worker outlives its arbiter (one
    whose shutdown hung was orphaned and kept serving, and burning CPU, in later benchmark phases)."""
    descendants = _tree(proc.pid)[1:]
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for p in descendants:
        with suppress(Exception):  # gone meanwhile (psutil checks the pid was not reused)
            p.kill()


def _tree(pid: int) -> list[Any]:
    """``psutil.Process`` of ``pid`` and all its descendants; ``[]`` when ``pid`` is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> tuple[int, int]:
    """Summed RSS (bytes) of process ``pid`` and all its descendants, and how many they are.

    For ``bentoml serve``: the arbiter, the entry service and its dependency services' workers.
    Shared pages (the torch libraries every worker maps) count once per process, so compare the
    sum with itself over time rather than with a machine's memory. Processes that exit meanwhile
    are skipped; (0, 0) when ``pid`` is gone.
    """
    import psutil

    total = n = 0
    for p in _tree(pid):
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
            n += 1
    return total, n


def process_cpu_seconds(pid: int) -> list[tuple[str, int, float]]:
    """``(role, pid, CPU seconds)`` of process ``pid`` and each descendant.

    The role of a ``bentoml serve`` worker is its ``--service-name`` (``medaudit`` for the entry
    service, ``medaudit-predictor``, ``medaudit-auditor``); a process a worker started (the
    auditor's LRP processes, :mod:`medaudit.service.audit_pool`) takes its worker's role; other processes
    (the arbiter) count as ``other``. A role with several processes has one row per process.
    Processes that exit meanwhile are skipped; ``[]`` when ``pid`` is gone.
    """
    import psutil

    own: dict[int, str] = {}  # workers' roles, from their command lines
    parent: dict[int, int] = {}
    rows: list[tuple[int, float]] = []
    for p in _tree(pid):
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            cmd = p.cmdline()
            if "--service-name" in cmd[:-1]:
                own[p.pid] = cmd[cmd.index("--service-name") + 1]
            parent[p.pid] = p.ppid()
            t = p.cpu_times()
            rows.append((p.pid, t.user + t.system))

    def role(q: int) -> str:
        while q not in own and q in parent:  # up to the nearest worker, if any
            q = parent[q]
        return own.get(q, "other")

    return [(role(q), q, seconds) for q, seconds in rows]


def spawned_pids(pid: int) -> set[int]:
    """Descendants of ``pid`` that multiprocessing's spawn started (the auditor's LRP processes;
    its resource tracker is not one)."""
    import psutil

    out = set()
    for p in _tree(pid)[1:]:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if "spawn_main" in " ".join(p.cmdline()):
                out.add(p.pid)
    return out


def tree_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of process ``pid`` and its descendants, by role (see
    :func:`process_cpu_seconds`). Two readings around a load phase give each role's CPU per
    request, which says where a served request's time goes (benchmarks/serve.py).
    """
    out: dict[str, float] = {}
    for role, _, seconds in process_cpu_seconds(pid):
        out[role] = out.get(role, 0.0) + seconds
    return out


@dataclass(frozen=True)
class Server:
    """A running ``bentoml serve``: its base URL, its process and the log it writes."""

    base: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def rss_bytes(self) -> int:
        """Resident memory of the server's whole process tree (see :func:`tree_rss`)."""
        return tree_rss(self.proc.pid)[0]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the server's processes, by role (see :func:`tree_cpu_seconds`)."""
        return tree_cpu_seconds(self.proc.pid)

    def worker_cpu_seconds(self, role: str) -> dict[int, float]:
        """CPU seconds so far of each process of one role (e.g. each auditor worker), by pid."""
        return {pid: s for r, pid, s in process_cpu_seconds(self.proc.pid) if r == role}

    def spawned_cpu_seconds(self, role: str) -> dict[int, float]:
        """CPU seconds so far of each process that a worker of ``role`` started through
        multiprocessing's spawn (the auditor's LRP processes, :mod:`medaudit.service.audit_pool`), by pid."""
        spawned = spawned_pids(self.proc.pid)
        return {pid: s for pid, s in self.worker_cpu_seconds(role).items() if pid in spawned}

    def log_tail(self, n: int = 3000) -> str:
        return _tail(self.log_path, n)


@contextmanager
def serving(
    env: Mapping[str, str],
    log_path: Path,
    *,
    port: int | None = None,
    target: str = "medaudit.service.api:MedAudit",
    ready_timeout: float = 180.0,
    python: Path | None = None,
) -> Iterator[Server]:
    """A ``bentoml serve`` process with ``env`` added to this one's, ready; stopped on exit.

    Args:
        python: The interpreter whose installation serves (``python -m bentoml``); default this
            process's environment.

    Raises:
        ServeError: The process exited before it was ready, or ``ready_timeout`` passed.
    """
    port = port or free_port()
    if python is None:
        command = [str(Path(sys.executable).parent / "bentoml")]
    else:
        command = [str(python), "-m", "bentoml"]
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **env}
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "serve", target, "--port", str(port), "--host", "127.0.0.1"],
            cwd=log_path.parent,  # a neutral folder: the installed package is what serves
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + ready_timeout
            while not _ready(base):
                if proc.poll() is not None:
                    raise ServeError(f"bentoml serve exited with {proc.returncode}:\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise ServeError(f"not ready after {ready_timeout:.0f} s:\n{_tail(log_path)}")
                time.sleep(0.5)
            yield Server(base, proc, log_path)
        finally:
            stop(proc)


@contextmanager
def served(
    env: Mapping[str, str],
    log_path: Path,
    *,
    port: int | None = None,
    target: str = "medaudit.service.api:MedAudit",
    ready_timeout: float = 180.0,
    python: Path | None = None,
) -> Iterator[str]:
    """:func:`serving`, yielding only the base URL ``http://127.0.0.1:PORT``."""
    with serving(
        env, log_path, port=port, target=target, ready_timeout=ready_timeout, python=python
    ) as server:
        yield server.base


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False
