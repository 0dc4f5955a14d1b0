"""Process-tree readings the served benchmarks rely on (service.process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from service.process import tree_cpu_seconds

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
