"""Process-tree readings the served benchmarks rely on (service.process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from medaudit.service.process import tree_cpu_seconds

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(30)"


def test_tree_cpu_seconds_groups_processes_by_service_name() -> None:
    """A child started with ``--service-name demo`` is read as role ``demo``, with the CPU it
    burned; this process (no service name) is ``other``; a gone pid reads as empty."""
    child = subprocess.Popen([sys.executable, "-c", BUSY, "--service-name", "demo"])
    try:
        deadline = time.monotonic() + 20
        cpu = tree_cpu_seconds(os.getpid())
        while cpu.get("demo", 0.0) < 0.35 and time.monotonic() < deadline:
            time.sleep(0.1)
            cpu = tree_cpu_seconds(os.getpid())
        assert 0.35 <= cpu["demo"] < 5.0
        assert cpu["other"] > 0.0
    finally:
        child.kill()
        child.wait()
    assert tree_cpu_seconds(child.pid) == {}


def test_a_workers_children_take_its_role() -> None:
    """A process a worker started (the auditor's LRP processes) is charged to the worker's role,
    each with its own row; the worker's own row stays beside it."""
    from medaudit.service.process import process_cpu_seconds

    spawn_busy_child = (
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {BUSY!r}])\ntime.sleep(30)"
    )
    worker = subprocess.Popen([sys.executable, "-c", spawn_busy_child, "--service-name", "demo"])
    try:
        deadline = time.monotonic() + 20
        rows = process_cpu_seconds(os.getpid())
        while time.monotonic() < deadline:
            demo = [r for r in rows if r[0] == "demo"]
            if len(demo) == 2 and sum(s for _, _, s in demo) >= 0.35:
                break
            time.sleep(0.1)
            rows = process_cpu_seconds(os.getpid())
        demo = [r for r in rows if r[0] == "demo"]
        assert {pid for _, pid, _ in demo} >= {worker.pid} and len(demo) == 2, rows
        assert sum(s for _, _, s in demo) >= 0.35
        assert all(role == "other" for role, pid, _ in rows if pid == os.getpid())
    finally:
        for _role, pid, _ in process_cpu_seconds(worker.pid):
            if pid != worker.pid:
                os.kill(pid, 9)
        worker.kill()
        worker.wait()


def test_stop_leaves_no_descendant_behind() -> None:
    """A child that ignores SIGTERM (a worker whose shutdown hangs) dies with its parent's stop."""
    import psutil

    from medaudit.service.process import stop

    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"
    parent_code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {stubborn!r}])\n"
        "time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.monotonic() + 20
    while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = psutil.Process(parent.pid).children()
    time.sleep(0.5)  # the child has set its handler
    stop(parent, grace_s=5)
    child.wait(10)
    assert not child.is_running()
