"""Benchmark: fine-tuning steps of RRR, RR-ClArC and Vanilla, standard network vs the fast view.

``FinetuneConfig(fast_prefix=False)`` runs the steps on the standard network and back-propagates
to every leaf (the code before models/corrections/fast_prefix.py); ``fast_prefix=True`` (the
default) runs them on the fast view (frozen BatchNorms folded, frozen convs with a one-conv double
backward) and back-propagates to the trainable parameters only. Both run in the same process on
the same model and data, interleaved round-robin so that background load (the CPU machine is
shared) hits them alike; medians over repeats. Writes ``benchmarks/results/finetune_<device>.md``
and ``.json``.

    nice -n 10 python benchmarks/finetune.py                 # resnet18@128, batch 16, 4 steps, 2 threads
    nice -n 10 python benchmarks/finetune.py --arch resnet50d --size 224 --batch 8

A timed call is a whole ``Correction.fit`` of ``--steps`` steps; the per-step time subtracts the
median of a 0-step fit (the copy, freezing, fast-view build and optimiser set-up). Weights are
random with "trained-like" BN statistics, which does not change the cost.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="the demo schedule's batch size")
    p.add_argument("--steps", type=int, default=4, help="fine-tuning steps per timed fit")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per contender (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the build's 2 cores)")
    p.add_argument("--layer", default="", help="correction layer ℓ (default: the architecture's)")
    p.add_argument(
        "--corrections", nargs="*", default=["rrr", "rrclarc", "vanilla-ft"], help="which corrections to time"
    )
    p.add_argument("--note", default="", help="a paragraph appended to the .md (context of the run)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_cpu")
    return p.parse_args()


def machine(torch: Any) -> dict[str, Any]:
    cpu = cpu_name()
    import timm

    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }


def make_inputs(args: argparse.Namespace, torch: Any) -> tuple[Any, Any, Any]:
    import numpy as np
    from torch import nn

    from medaudit.models.corrections import CorrectionData
    from medaudit.models.registry import create_model, hook_module

    torch.manual_seed(0)
    model, cfg = create_model(args.arch, img_size=args.size)
    with torch.no_grad():  # "trained-like" BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_var is not None and m.running_mean is not None
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.2)
    layer = args.layer or cfg.default_cav_layer
    n = args.batch * args.steps
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % cfg.num_classes
    masks = torch.zeros(n, args.size, args.size)
    s = args.size
    masks[::3, s // 8 : s // 3, s // 6 : s // 2] = 1.0  # a third of the samples carry an "artifact"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # a base run's optimiser state to resume
    model(torch.randn(2, 3, s, s)).sum().backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        store: dict[str, Any] = {}
        h = hook_module(model, cfg, layer).register_forward_hook(lambda _m, _a, o: store.update(a=o))
        model(torch.zeros(1, 3, s, s))
        h.remove()
    channels = store["a"].shape[1]
    v = np.random.default_rng(0).normal(size=channels)
    data = CorrectionData(
        layer,
        v / np.linalg.norm(v),
        np.zeros(channels),
        images=images,
        labels=labels,
        masks=masks,
        optimizer_state=opt.state_dict(),
    )
    return model, cfg, data


def timed(
    fns: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Any]]:
    """One warm-up each, then round-robin timed repeats; returns wall times, this process's CPU
    times (less sensitive to other jobs on a shared machine) and the last results."""
    last = {name: fn() for name, fn in fns.items()}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            last[name] = fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu, last


def main() -> None:
    args = parse_args()
    import torch

    from medaudit.models.corrections import RRR, FinetuneConfig, RRClarc, Vanilla

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(torch)
    model, cfg, data = make_inputs(args, torch)
    classes = {"rrr": RRR, "rrclarc": RRClarc, "vanilla-ft": Vanilla}
    modes = {"standard": False, "fast": True}

    def fit(name: str, fast: bool, steps: int) -> Any:
        ft = FinetuneConfig(epochs=1, batch_size=args.batch, max_steps=steps, fast_prefix=fast)
        # finetune's opt.load_state_dict keeps the given state's tensors and Adam updates them in
        # place, so every fit gets its own copy of the base run's state
        fresh = dataclasses.replace(data, optimizer_state=copy.deepcopy(data.optimizer_state))
        return classes[name](finetune=ft).fit(model, cfg, fresh)[0]

    fns: dict[str, Callable[[], Any]] = {}
    for name in args.corrections:
        for mode, fast in modes.items():
            fns[f"{name}/{mode}"] = functools.partial(fit, name, fast, args.steps)
    for mode, fast in modes.items():
        fns[f"setup/{mode}"] = functools.partial(fit, args.corrections[0], fast, 0)
    print(
        f"{args.arch}@{args.size} batch {args.batch}, {args.steps} steps per fit, {args.repeats} repeats",
        flush=True,
    )
    runs, cpu_runs, last = timed(fns, args.repeats)

    med = {k: statistics.median(v) for k, v in runs.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_runs.items()}
    rows = []
    for name in args.corrections:
        step = {m: (med[f"{name}/{m}"] - med[f"setup/{m}"]) / args.steps for m in modes}
        cpu_step = {m: (cpu_med[f"{name}/{m}"] - cpu_med[f"setup/{m}"]) / args.steps for m in modes}
        a, b = last[f"{name}/fast"].state_dict(), last[f"{name}/standard"].state_dict()
        o = model.state_dict()
        # per tensor: |fast - standard| relative to what the fine-tuning changed
        rel = max(
            float((a[k].double() - b[k].double()).norm() / (b[k].double() - o[k].double()).norm())
            for k in b
            if float((b[k].double() - o[k].double()).norm()) > 0
        )
        rows.append(
            {
                "correction": name,
                "standard_ms_per_step": 1000 * step["standard"],
                "fast_ms_per_step": 1000 * step["fast"],
                "speedup": step["standard"] / step["fast"],
                "standard_cpu_ms_per_step": 1000 * cpu_step["standard"],
                "fast_cpu_ms_per_step": 1000 * cpu_step["fast"],
                "cpu_speedup": cpu_step["standard"] / cpu_step["fast"],
                "standard_fit_s": med[f"{name}/standard"],
                "fast_fit_s": med[f"{name}/fast"],
                "weights_diff_rel_to_change": rel,
            }
        )
        print(
            f"{name:11s} standard {1000 * step['standard']:7.1f} ms/step  "
            f"fast {1000 * step['fast']:7.1f} ms/step  ×{step['standard'] / step['fast']:.2f}  "
            f"CPU time ×{cpu_step['standard'] / cpu_step['fast']:.2f}  "
            f"weights Δ/change {rel:.1e}",
            flush=True,
        )
    info["load_average_end"] = os.getloadavg()
    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": info,
        "rows": rows,
        "setup_s": {m: med[f"setup/{m}"] for m in modes},
        "runs_s": runs,
        "cpu_runs_s": cpu_runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Fine-tuning step: standard network vs fast view ({args.arch}@{args.size}, batch {args.batch})",
        "",
        f"`{' '.join(['python', 'benchmarks/finetune.py', *sys.argv[1:]])}`; {info['cpu']}, "
        f"{info['torch_threads']} torch threads, torch {info['torch']}; load average "
        f"{info['load_average_start'][0]:.2f} → {info['load_average_end'][0]:.2f} (shared machine: "
        "compare the ratios, not the absolute times).",
        "",
        f"Medians of {args.repeats} interleaved repeats of a {args.steps}-step `fit` (ℓ = {data.layer}); "
        f"per step = (fit − 0-step fit) / {args.steps}. 0-step fit (copy, freeze, view, optimiser): "
        f"standard {med['setup/standard']:.2f} s, fast {med['setup/fast']:.2f} s.",
        "",
        "| correction | standard ms/step | fast ms/step | standard / fast | CPU ms/step standard → fast "
        "| CPU standard / fast | weights: ‖fast − standard‖ / ‖change‖ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['correction']} | {r['standard_ms_per_step']:.0f} | {r['fast_ms_per_step']:.0f} | "
            f"{r['speedup']:.2f}× | {r['standard_cpu_ms_per_step']:.0f} → {r['fast_cpu_ms_per_step']:.0f} | "
            f"{r['cpu_speedup']:.2f}× | {r['weights_diff_rel_to_change']:.1e} |"
        )
    lines += [
        "",
        "CPU: this process's CPU time (all torch threads), medians like the wall times. With 2 threads "
        "on a loaded machine both swing widely (a thread spins at OpenMP barriers while the other is "
        "descheduled); 1 thread (`--threads 1`) gives stable ratios there.",
        "",
        "The last column: after the timed steps, the largest per-tensor norm of (fast − standard) "
        "weights relative to the norm of what fine-tuning changed in that tensor (float round-off; "
        "each fit resumes its own copy of the base run's Adam state).",
    ]
    if args.note:
        lines += ["", args.note]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
