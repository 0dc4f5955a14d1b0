"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(out: Path, res: dict[str, Any], report: Callable[[dict[str, Any]], str]) -> None:
    """``<out>.json`` (the figures) and ``<out>.md`` (``report(res)``, also printed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    text = report(res)
    out.with_suffix(".md").write_text(text)
    print(text)
