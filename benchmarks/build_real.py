"""``medaudit build --model SPEC --data KIND:PATH``, timed by stage, on a dataset read from disk
(a benchmark, not a test): the hospital case of docs/models.md, whose figures are the build's
wall time and the correction criteria on the real-data evaluation (the attacked set pasted from
the data's own annotated training images, method.md §5.4; masks as the dataset has them).

    .venv/bin/python benchmarks/derived_masks.py --keep /tmp/dm
    .venv/bin/python benchmarks/build_real.py --model /tmp/dm/derm.toml \\
        --data 'isic2019:/tmp/dm/isic?classes=NV,MEL,BCC' --cav-scope NV

``benchmarks/derived_masks.py --keep DIR`` leaves such a folder: synthderm's ISIC-like form in the
ISIC 2019 layout, the hospital's model and its spec (``derm.toml``), and masks derived from the
model's concepts (``isic/masks``, marked derived; the true masks are held back in ``held/``).
Runs in a fresh output folder as a subprocess, so nothing built earlier is reused (``--keep DIR``
keeps it, so that a later ``medaudit build --out DIR/out --set ...`` rebuilds only what a setting
changes); writes
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
    ap.add_argument("--corrections", default="vanilla,vanilla-ft,pclarc,rpclarc,rrclarc,rrr")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME.FIELD=VALUE")
    ap.add_argument("--keep", type=Path, default=None, help="build here and keep it (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "build_real_cpu")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="medaudit-build-real-"))
    if args.keep is not None:
        shutil.rmtree(work / "out", ignore_errors=True)  # a fresh build, timed from nothing
        shutil.rmtree(work / "bentoml", ignore_errors=True)
    medaudit = Path(sys.executable).with_name("medaudit")
    cmd = [
        str(medaudit), "build", "--model", str(args.model), "--data", args.data, "--artifact", args.artifact,
        "--cav-scope", args.cav_scope, "--corrections", args.corrections, "--out", str(work / "out"),
        "--bentoml-home", str(work / "bentoml"), "--threads", str(args.threads),
        *(a for s in args.settings for a in ("--set", s)),
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
    versions = {}  # per version: its layer and per-class accuracy on the clean and attacked sets
    for r in comparison["rows"]:
        c = json.loads((model_dir / "versions" / r["version"] / "card.json").read_text())
        cls = c["metrics"]["classification"]
        versions[r["version"]] = {
            "layer": c["correction"].get("layer"),
            "lamb_resolved": c["correction"].get("lamb_resolved"),
            "fine_tuned": "finetune" in c["correction"].get("params", {}),
            "artifact_relevance": c["metrics"]["artifact_relevance"]["mean"],
            **{
                f"{v} {k.removeprefix('accuracy_') if k != 'accuracy' else 'all'}": cls[v][k]
                for v in ("clean", "attacked")
                if v in cls
                for k in cls[v]
                if k.startswith("accuracy") and not k.endswith("_se")
            },
        }
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(cmd[1:]),
        "wall_s": round(wall, 1),
        "stages": comparison["stages"],
        "acceptance": comparison["rows"],
        "best": comparison.get("best"),
        "warnings": comparison.get("warnings", []),
        "versions": versions,
        "settings": args.settings,
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
    if args.keep is None:
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
    victim = gap_key.removesuffix(" gap recovered %")
    lines += [
        "",
        f"| version | layer | clean acc % | clean {victim} % | attacked {victim} % | {gap_key} | "
        "clean Δ pts | relevance cut % | meets criteria |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["acceptance"]:
        v = res.get("versions", {}).get(r["version"], {})
        acc = [v.get("clean all"), v.get(f"clean {victim}"), v.get(f"attacked {victim}")]
        cells = [None if a is None else 100 * a for a in acc]
        cells += [r.get(gap_key), r.get("clean Δ pts"), r.get("relevance cut %")]
        txt = ["–" if c is None else f"{c:.1f}" for c in cells]
        lines.append(
            f"| {r['version']} | {v.get('layer') or '–'} | "
            + " | ".join(txt)
            + f" | {'yes' if r['meets criteria'] else 'no'} |"
        )
    lines += ["", f"Best version by the criteria: {res.get('best')}."]
    lines += [f"\n**The build warned:** {w}" for w in res.get("warnings", [])]
    lines += _against_finetune(res, victim)
    la, lb = res["machine"]["load_average_before"], res["machine"]["load_average_after"]
    lines += [
        "",
        f"Load average (1/5/15 min) before {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, after "
        f"{lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}: the 2 cores were shared with other work where these are "
        "above 2. Reproduce: the command in the module docstring of `benchmarks/build_real.py`.",
        "",
    ]
    return "\n".join(lines)


def _against_finetune(res: dict, victim: str) -> list[str]:
    """The fine-tuning corrections against the paper's Vanilla baseline (method.md §4.7: the same
    fine-tuning, freezing and epochs without the correction term), the version ``vanilla-ft``:
    where fine-tuning alone moves the original's accuracy, the table above credits the
    correction with what the fine-tune did."""
    vs = res.get("versions", {})
    ft = next((v for k, v in vs.items() if k.startswith("vanilla-ft")), None)
    if ft is None or f"attacked {victim}" not in ft:
        return []
    gap = ft[f"clean {victim}"] - ft[f"attacked {victim}"]
    out = [
        "",
        f"Fine-tuning corrections against `vanilla-ft` (method.md §4.7's Vanilla: the same schedule "
        f"without the correction term; its {victim} clean→attacked gap {100 * gap:.1f} points):",
        "",
        f"| version | {victim} gap recovered % vs vanilla-ft | clean Δ pts vs vanilla-ft | "
        "relevance cut % vs vanilla-ft |",
        "|---|---:|---:|---:|",
    ]
    for name, v in vs.items():
        if not v.get("fine_tuned") or name.startswith("vanilla"):
            continue
        rec = 100 * (v[f"attacked {victim}"] - ft[f"attacked {victim}"]) / gap if gap > 0 else None
        d = 100 * (v["clean all"] - ft["clean all"])
        r0 = ft["artifact_relevance"]
        cut = 100 * (1 - v["artifact_relevance"] / r0) if r0 else None
        cells = ["–" if c is None else f"{c:.1f}" for c in (rec, d, cut)]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    main()
