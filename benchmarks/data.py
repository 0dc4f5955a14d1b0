"""synthderm rendering speed (a benchmark, not a test): images per second on one core.

    .venv/bin/python benchmarks/data.py [--size 128] [--n 400]

Writes benchmarks/results/synthderm_render.json. The goal is >= 200 images/s per core at 128 px,
so that data generation never limits training; rendering is single-threaded numpy + PIL, so one
process = one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ds = SynthDerm(SynthDermConfig(size=args.size))
    for i in range(20):  # warm-up: imports, font loading
        ds.sample(i)
    rates = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(args.n):
            ds.sample((r * args.n + i) % len(ds))
        rates.append(args.n / (time.perf_counter() - t0))
    res = {
        "size": args.size,
        "images_per_repeat": args.n,
        "median_images_per_s": round(statistics.median(rates), 1),
        "all_images_per_s": [round(x, 1) for x in rates],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
    }
    out = Path(__file__).parent / "results" / "synthderm_render.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
