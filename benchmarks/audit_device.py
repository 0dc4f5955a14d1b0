"""The whole ``/audit`` engine on the CPU and on a GPU: where its time goes on each.

``AuditEngine.audit`` is one LRP call (forward + batched backward, seeded at the predicted class
and at each image's first present concept) followed by host work: concept scoring, relevance
shares, float16 maps, and PNG encoding of the overlay and masks. On the CPU the LRP call is nearly
all of it; on a GPU it is not, which decides how far ``MEDAUDIT_AUDIT_DEVICE=cuda`` can take the
auditor. This runs one random-weight version (:mod:`medaudit.testing.versions`: the shapes and code paths
of a served ResNet-18, no training and no BentoML store needed) on each device and times, per
batch size, the whole audit and its LRP call alone, round-robin over repeats (medians).

    python benchmarks/audit_device.py                     # cpu, and cuda when torch sees a GPU
    python benchmarks/audit_device.py --devices cpu --batches 1 8

Writes ``benchmarks/results/audit_engine_<tag>.md`` and ``.json`` (tag: ``--tag``, default the
devices timed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", nargs="*", help="torch devices to time (default: cpu, and cuda if present)")
    p.add_argument("--size", type=int, default=128, help="input side in px (the served models: 128)")
    p.add_argument("--batches", nargs="*", type=int, default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (after one warm-up)")
    p.add_argument(
        "--home", type=Path, help="a built store (BENTOML_HOME): time its trained --version instead"
    )
    p.add_argument("--version", default="vanilla", help="with --home: the stored version to time")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument(
        "--tag",
        default="",
        help="result file name: audit_engine_<tag> (default: the devices timed, e.g. cpu_cuda)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args()


def time_engine(eng: Any, images: list[Any], batches: list[int], repeats: int) -> list[dict[str, Any]]:
    """Per batch size: whole ``eng.audit`` calls, and the time each spent in its own LRP calls
    (the class + first-concept call, and the masks' call when an image shows more concepts)."""
    import torch

    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    explain = eng.explainer.explain
    in_lrp = [0.0]

    def timed_explain(*a: Any, **kw: Any) -> Any:
        sync()
        t0 = time.perf_counter()
        out = explain(*a, **kw)
        sync()
        in_lrp[0] += time.perf_counter() - t0
        return out

    eng.explainer.explain = timed_explain
    rows = []
    for batch in batches:
        ims = images[:batch]
        eng.audit(ims)  # warm-up (and cuDNN's choice of kernels for this shape)
        whole, only = [], []
        for _ in range(repeats):
            in_lrp[0] = 0.0
            sync()
            t0 = time.perf_counter()
            eng.audit(ims)
            sync()
            whole.append(time.perf_counter() - t0)
            only.append(in_lrp[0])
        med_w, med_l = statistics.median(whole), statistics.median(only)
        rows.append(
            {
                "device": str(eng.device),
                "host_work": "thread pool" if eng.parallel_host else "serial",
                "batch": batch,
                "audit_ms": med_w * 1e3,
                "lrp_ms": med_l * 1e3,
                "audit_img_s": batch / med_w,
                "lrp_share": med_l / med_w,
                "audit_runs_ms": [r * 1e3 for r in whole],
                "lrp_runs_ms": [r * 1e3 for r in only],
            }
        )
        print(
            f"{eng.device} ({'pool' if eng.parallel_host else 'serial'}) b{batch}: "
            f"audit {med_w * 1e3:.1f} ms ({batch / med_w:.0f} img/s), "
            f"in LRP {med_l * 1e3:.1f} ms ({100 * med_l / med_w:.0f} %)",
            flush=True,
        )
    eng.explainer.explain = explain
    return rows


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.machine import cpu_name
    from medaudit.service.audit import AuditEngine, version_tag
    from medaudit.service.store import load_version
    from medaudit.testing.versions import load_version_files, synthderm_images, write_version_files

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if any(d.startswith("cuda") for d in devices):
        if not torch.cuda.is_available():
            raise SystemExit("cuda asked for but torch sees no GPU")
        torch.backends.cudnn.benchmark = True  # fixed shapes per batch size: pick kernels once
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "size": args.size,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.home:
            loaded = load_version(version_tag(args.version), home=args.home)
            info["weights"] = f"trained: {loaded.tag} from {args.home}"
        else:
            loaded = load_version_files(write_version_files(Path(tmp) / "v", "bench", 0, args.size), "bench")
            info["weights"] = "random (medaudit.testing.versions)"
        info["size"] = int(loaded.cfg.input_size[1])
        print(f"version loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        images = synthderm_images(max(args.batches))
        rows: list[dict[str, Any]] = []
        for dev in devices:
            eng = AuditEngine(loaded, device=dev)
            # on a GPU, its default (host work on a thread pool, scores on the device) against the
            # serial host work and the host scoring (the bank's numpy code) it replaced
            variants = (
                [(False, False)] if eng.device.type == "cpu" else [(False, True), (True, False), (True, True)]
            )
            for parallel, on_device in variants:
                eng.parallel_host, eng.device_scoring = parallel, on_device
                for r in time_engine(eng, images, args.batches, args.repeats):
                    rows.append({**r, "scoring": "device" if on_device else "host"})
    tag = args.tag or "_".join(d.split(":")[0] for d in devices)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"audit_engine_{tag}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    stem.with_suffix(".md").write_text(markdown(info, rows))
    print(markdown(info, rows))


def markdown(info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# /audit engine by device (ResNet-18 @ {info['size']} px, {info['weights']} weights)",
        "",
        f"CPU {info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads); "
        f"GPU {info['gpu'] or 'none'}; torch {info['torch']}. Medians of the timed repeats; "
        "'in LRP' is the time an audit spent in its own LRP calls (synchronised), the rest of "
        "it is host work (concept scoring on the host, relevance shares, PNG encoding of overlay and "
        "masks); 'scoring' is where concept scores are computed (on a GPU: the device's default, "
        "and the bank's numpy code on the host it replaced).",
        "",
        "| device | host work | scoring | batch | audit ms | audit img/s | in LRP ms | LRP share |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r.get('host_work', 'serial')} | {r.get('scoring', 'host')} | {r['batch']} | "
            f"{r['audit_ms']:.1f} | "
            f"{r['audit_img_s']:.0f} | {r['lrp_ms']:.1f} | {100 * r['lrp_share']:.0f} % |"
        )
    cpu = {r["batch"]: r for r in rows if r["device"] == "cpu"}
    gpu = [
        r
        for r in rows
        if r["device"] != "cpu"
        and r["batch"] in cpu
        and r.get("host_work") != "serial"
        and r.get("scoring") != "host"
    ]
    gpu = gpu or [r for r in rows if r["device"] != "cpu" and r["batch"] in cpu]
    if gpu:
        lines += [
            "",
            "GPU ÷ CPU audit throughput, same run: "
            + ", ".join(
                f"batch {r['batch']} {r['audit_img_s'] / cpu[r['batch']]['audit_img_s']:.1f}×" for r in gpu
            ),
        ]
    lines += ["", "Reproduce: `python benchmarks/audit_device.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
