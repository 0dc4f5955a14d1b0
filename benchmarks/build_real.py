"""``medaudit build --model SPEC --data KIND:PATH``, timed by stage, on a dataset read from disk
(a benchmark, not a test): the hospital case of docs/models.md, whose figures are the build's
wall time and the correction criteria on the real-data evaluation (the attacked set pasted from
the data's own annotated training images, method.md §5.4; masks as the dataset has them).

    .venv/bin/python benchmarks/build_real.py --model /tmp/dm/spec.toml \\
        --data 'isic2019:/tmp/dm/isic?classes=NV,MEL,BCC' --cav-scope NV

``benchmarks/derived_masks.py --keep DIR`` leaves such a folder: synthderm's ISIC-like form in the
ISIC 2019 layout, the hospital's model and its spec, and masks derived from the model's concepts.
Runs in a fresh output folder as a subprocess, so nothing built earlier is reused; writes
``benchmarks/results/build_real_cpu.md`` and ``.json`` with the load average before and after
(another process on the 2 cores changes every figure).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the model spec (TOML)")
    ap.add_argument("--data", required=True, help="the dataset, KIND:PATH?OPTIONS")
    ap.add_argument("--artifact", default="band_aid")
    ap.add_argument("--cav-scope", default="artifact_class")
    ap.add_argument("--corrections", default="vanilla,pclarc,rrclarc,rrr")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "build_real_cpu")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medaudit-build-real-"))
    medaudit = Path(sys.executable).with_name("medaudit")
    cmd = [
        str(medaudit), "build", "--model", str(args.model), "--data", args.data, "--artifact", args.artifact,
        "--cav-scope", args.cav_scope, "--corrections", args.corrections, "--out", str(work / "out"),
        "--bentoml-home", str(work / "bentoml"), "--threads", str(args.threads),
    ]  # fmt: skip
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    if proc.returncode != 0:
        sys.exit(f"build failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    model_dir = next((work / "out").iterdir())
    comparison = json.loads((model_dir / "comparison.json").read_text())
    card = json.loads((model_dir / "versions" / "vanilla" / "card.json").read_text())
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(cmd[1:]),
        "wall_s": round(wall, 1),
        "stages": comparison["stages"],
        "acceptance": comparison["rows"],
        "data": {
            k: card["data"].get(k) for k in ("dataset", "mask_source", "cav_scope", "subsets", "attacked")
        },
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
    }
    write_results(args.out, res, report)
    shutil.rmtree(work, ignore_errors=True)


def report(res: dict) -> str:
    d = res["data"]
    lines = [
        f"# Build on data from disk ({res['date']}, {res['machine']['cores']} CPUs)",
        "",
        f"`medaudit {res['command'].split(' --out ')[0]}`",
        "",
        f"Wall time, process start to exit: **{res['wall_s'] / 60:.1f} min** ({res['wall_s']:.0f} s). "
        f"Data {d['dataset']}; masks: {d['mask_source']}; correction CAV scope {d['cav_scope']}; "
        f"test sets {d['subsets']}.",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {s['stage']} | {s['seconds']:.1f} |" for s in res["stages"]]
    gap_key = next((k for k in res["acceptance"][0] if k.endswith("gap recovered %") and "all" not in k), "")
    lines += [
        "",
        f"| version | {gap_key} | clean Δ pts | relevance cut % | meets criteria |",
        "|---|---:|---:|---:|---|",
    ]
    for r in res["acceptance"]:
        cells = [r.get(gap_key), r.get("clean Δ pts"), r.get("relevance cut %")]
        txt = ["–" if c is None else f"{c:.1f}" for c in cells]
        lines.append(
            f"| {r['version']} | " + " | ".join(txt) + f" | {'yes' if r['meets criteria'] else 'no'} |"
        )
    la, lb = res["machine"]["load_average_before"], res["machine"]["load_average_after"]
    lines += [
        "",
        f"Load average (1/5/15 min) before {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, after "
        f"{lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}: the 2 cores were shared with other work where these are "
        "above 2. Reproduce: the command in the module docstring of `benchmarks/build_real.py`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
