"""The from-scratch demo build, timed by stage (a benchmark, not a test; the goal is ≤ 8 min on 2 cores).

Runs ``medaudit build`` (the default synthderm build: train, concept banks, every correction,
evaluation, ONNX export and parity, registration) in a fresh folder as a subprocess, so that
nothing cached in this process or a previous output is reused, then reads the stage times the build
itself records in ``comparison.json`` and writes a table with the correction acceptance rows
(:func:`medaudit.models.pipeline.acceptance`).

    .venv/bin/python benchmarks/build.py                 # fresh temp folder, removed afterwards
    .venv/bin/python benchmarks/build.py --keep /tmp/b   # keep the build (a store to serve)

Writes ``benchmarks/results/build_cpu.md`` and ``.json``. One run takes the whole machine for
about 8 minutes; the load average before and after is recorded, since another process on the
2 cores changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name, write_results  # noqa: E402

GOAL_S = 8 * 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="build here and keep it (must not exist)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "build_cpu")
    args = ap.parse_args()
    if args.keep is not None and args.keep.exists():
        sys.exit(f"{args.keep} exists; the benchmark times a build from scratch")
    work = args.keep or Path(tempfile.mkdtemp(prefix="medaudit-build-"))
    medaudit = Path(sys.executable).with_name("medaudit")
    cmd = [str(medaudit), "build", "--out", str(work / "out"), "--bentoml-home", str(work / "bentoml")]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    if proc.returncode != 0:
        sys.exit(f"build failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    comparison = json.loads(next((work / "out").glob("*/comparison.json")).read_text())
    stages = comparison["stages"]
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(cmd[1:]),
        "wall_s": round(wall, 1),
        "goal_s": GOAL_S,
        "stages": stages,
        "acceptance": comparison["rows"],
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
    }
    write_results(args.out, res, report)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


def report(res: dict) -> str:
    cores = res["machine"]["cores"]
    lines = [
        f"# Demo build from scratch ({res['date']}, {cores} CPUs)",
        "",
        f"`medaudit build` wall time, process start to exit: **{res['wall_s'] / 60:.1f} min** "
        f"({res['wall_s']:.0f} s; goal ≤ {res['goal_s'] // 60} min).",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {s['stage']} | {s['seconds']:.1f} |" for s in res["stages"]]
    lines += [
        f"| **sum of stages** | **{sum(s['seconds'] for s in res['stages']):.1f}** |",
        "",
        "| version | malignant gap recovered % | clean Δ pts | relevance cut % | meets criteria |",
        "|---|---:|---:|---:|---|",
    ]
    for r in res["acceptance"]:
        gap = next((v for k, v in r.items() if k.endswith("gap recovered %") and "all" not in k), None)
        cells = [gap, r.get("clean Δ pts"), r.get("relevance cut %")]
        txt = ["–" if c is None else f"{c:.1f}" for c in cells]
        lines.append(
            f"| {r['version']} | " + " | ".join(txt) + f" | {'yes' if r['meets criteria'] else 'no'} |"
        )
    la, lb = res["machine"]["load_average_before"], res["machine"]["load_average_after"]
    lines += [
        "",
        f"Load average (1/5/15 min) before {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, after "
        f"{lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}. Reproduce: `.venv/bin/python benchmarks/build.py`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
