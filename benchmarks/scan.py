"""Benchmark: ``medaudit scan`` throughput on this machine's cores: in-process, local pool, Ray.

One random-weight ResNet-18 version (``medaudit.testing.versions``, the demo's 128 px by default)
in a temporary store, and ``--images`` synthderm images in a mixed folder (PNG, JPEG, DICOM and a
few corrupt files, ``medaudit.testing.scan``). Contenders, each a whole scan into a fresh folder,
interleaved round-robin over ``--repeats`` (the machine is shared) and reported as medians:

* ``in-process, 1 thread`` / ``in-process, N threads``: the engine in this process (``--workers
  0``); with N torch threads it is what the offline audit (``medaudit audit``) does, one process
  using torch's threads;
* ``local pool, k``: ``k`` worker processes, one torch thread each (k = 1 .. cores);
* ``ray, k``: ``k`` Ray actors on a local Ray started once (``ray.init(num_cpus=cores)``).

Per contender: wall-clock images/s end to end (worker start included), the steady rate (from the
first shard written to the last), CPU seconds per image (this process plus the workers' utime +
stime from /proc, start-up included; Ray's own daemons not counted), and peak RSS (this process,
and the largest worker's VmHWM). The rows of every scan are checked against the first
in-process scan's (same labels and flag decisions, largest score difference).

    python benchmarks/scan.py                         # 2,000 images at 128 px, 3 repeats
    python benchmarks/scan.py --images 500 --repeats 1

With ``--device cuda`` the contenders are one engine on the GPU: in this process, in one pool
worker and in one Ray actor (``num_gpus=1``), each decoding on ``--decode-threads`` (8) threads.
The issue's H100 figure (ResNet-50 @224, screens, decode from local files included, ≥ 1,000 img/s):

    python benchmarks/scan.py --device cuda --arch resnet50 --size 224 --images 20000 \
        --shard-size 1000 --batch-size 64 --repeats 2 --out benchmarks/results/scan_cuda_h100

Writes ``benchmarks/results/scan_cpu.md`` and ``.json`` (``--out`` elsewhere).

``--stages`` times the engine's stages instead: in-process scans, each in a fresh process, of
``--heatmaps`` audits with the masks encoded between batches (``encode_threads=0``) and on a thread
while the next batch runs (1), and of screens with and without ``--cuda-graphs`` (which only
changes anything on CUDA); ``--baseline-tree DIR`` adds the same scans by another checkout of the
package (``git archive HEAD | tar -x -C DIR``), the "before" of a change, in the same run:

    python benchmarks/scan.py --stages --images 2000 --repeats 3 --baseline-tree /tmp/base \
        --out benchmarks/results/scan_stages_cpu
    python benchmarks/scan.py --stages --device cuda --arch resnet50 --size 224 --images 20000 \
        --shard-size 1000 --batch-size 64 --repeats 2 --out benchmarks/results/scan_stages_cuda_h100
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name, write_results  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=128, help="Model input and image size (px).")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=0, help="Most workers tried (0: usable cores).")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--arch", default="resnet18", help="Registered architecture (random weights).")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda: the GPU figures (in-process, one pool worker, one actor).",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decode-threads", type=int, default=0, help="Per worker (0: 1 on cpu, 8 on cuda).")
    p.add_argument("--out", type=Path, default=None, help="Result stem (default scan_cpu / scan_stages_cpu).")
    p.add_argument("--stages", action="store_true", help="Time the engine's stages (see above).")
    p.add_argument("--baseline-tree", type=Path, help="With --stages: a checkout to time as the baseline.")
    p.add_argument("--fpr", type=float, default=None, help="Presence FPR (more masks to encode when higher).")
    p.add_argument("--contenders", nargs="*", help="With --stages: only these contenders (by name).")
    args = p.parse_args()
    if args.out is None:
        args.out = ROOT / (
            "benchmarks/results/scan_stages_cpu" if args.stages else "benchmarks/results/scan_cpu"
        )
    return args


def _proc(pid: int) -> tuple[float, int]:
    """(utime + stime seconds, VmHWM bytes) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return cpu, hwm


class Probe:
    """Records, after each shard, the workers' CPU and peak RSS and when the shard landed."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.rows: list[int] = []
        self.workers: dict[int, tuple[float, int]] = {}

    def __call__(self, k: int, runner: Any) -> None:
        self.times.append(time.perf_counter())
        for pid in runner.pids():
            if pid != os.getpid():
                with contextlib.suppress(OSError):  # gone between listing and reading
                    self.workers[pid] = _proc(pid)


def run_one(name: str, source: Path, out: Path, options: Any, make_runner: Any, n: int) -> dict[str, Any]:
    from medaudit.cli.scan.run import scan

    probe = Probe()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    runner = make_runner()
    try:
        summary = scan(str(source), out, options, runner=runner, on_shard=probe, shard_size=SHARD)
    finally:
        runner.close()
    wall = time.perf_counter() - t0
    own_cpu = time.process_time() - cpu0
    worker_cpu = sum(c for c, _ in probe.workers.values())
    steady = (n - SHARD) / (probe.times[-1] - probe.times[0]) if len(probe.times) > 1 else float("nan")
    return {
        "contender": name,
        "images": summary.n_items,
        "errors": summary.n_errors,
        "wall_s": wall,
        "images_per_s": summary.n_items / wall,
        "steady_images_per_s": steady,
        "cpu_s_per_image": (own_cpu + worker_cpu) / summary.n_items,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": max((h for _, h in probe.workers.values()), default=0) / 2**20,
    }


SHARD = 100


def compare(out: Path, ref: Path) -> dict[str, Any]:
    import numpy as np

    from medaudit.cli.scan.output import ScanFolder

    a, b = ScanFolder(out).read().to_pylist(), ScanFolder(ref).read().to_pylist()
    assert [r["index"] for r in a] == list(range(len(b))), "every item exactly once"
    same = sum(
        x["pred_label"] == y["pred_label"] and x["flagged"] == y["flagged"] and x["error"] == y["error"]
        for x, y in zip(a, b, strict=True)
    )
    diffs = [
        abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) if x["ok"] for k in x if k.endswith("_score")
    ]
    return {"rows_same_decision": same, "rows": len(b), "max_score_diff": float(np.max(diffs))}


def prepare(tmp: Path, images: int, size: int, arch: str = "resnet18") -> None:
    """The random-weight version in a store under ``tmp`` and the mixed archive ``tmp/archive``."""
    import torch

    from medaudit.testing.scan import write_mixed_folder
    from medaudit.testing.versions import register_version_files, write_version_files

    torch.set_num_threads(1)
    src = write_version_files(tmp / "src", "vanilla", 0, img_size=size, arch=arch)
    register_version_files(src, "vanilla", tmp / "bentoml")
    write_mixed_folder(tmp / "archive", images, size=size, corrupt=6)


def main() -> None:
    args = parse_args()
    if args.stages:
        from benchmarks.scan_stages import main_stages

        return main_stages(args, prepare, compare)
    global SHARD
    SHARD = args.shard_size
    import torch

    from medaudit.cli.scan.runners import InProcessRunner, LocalPoolRunner, RayRunner
    from medaudit.cli.scan.worker import ScanOptions
    from medaudit.service.config import usable_cpus

    cores = args.workers or usable_cpus()
    tmp = Path(tempfile.mkdtemp(prefix="scan_bench_"))
    home = tmp / "bentoml"
    torch.set_num_threads(1)
    t = time.perf_counter()
    # in a child process, so that this one's peak RSS is the scans' alone
    prep = multiprocessing.get_context("spawn").Process(
        target=prepare, args=(tmp, args.images, args.size, args.arch)
    )
    prep.start()
    prep.join()
    assert prep.exitcode == 0, "preparing the store and the archive failed"
    source = tmp / "archive"
    print(f"archive of {args.images} images at {args.size} px in {time.perf_counter() - t:.1f} s", flush=True)
    gpu = args.device.startswith("cuda")
    decode = args.decode_threads or (8 if gpu else 1)
    opts = ScanOptions(
        "vanilla", home=str(home), device=args.device, batch_size=args.batch_size, decode_threads=decode
    )
    contenders: list[tuple[str, Any, Any]]
    if gpu:  # one engine per GPU: in this process, in one pool worker, in one Ray actor
        contenders = [
            (f"in-process, {args.device}", opts, lambda: InProcessRunner(opts)),
            (f"local pool, 1 ({args.device})", opts, lambda: LocalPoolRunner(opts, 1)),
        ]
    else:
        threaded = replace(opts, threads=cores)
        contenders = [
            ("in-process, 1 thread", opts, lambda: InProcessRunner(opts)),
            (f"in-process, {cores} threads", threaded, lambda: InProcessRunner(threaded)),
        ]
        contenders += [
            (f"local pool, {k}", opts, lambda k=k: LocalPoolRunner(opts, k)) for k in range(1, cores + 1)
        ]
    if not args.no_ray:
        import ray

        ray.init(num_cpus=cores, num_gpus=1 if gpu else 0, include_dashboard=False, logging_level="WARNING")
        ks = [1] if gpu else list(range(1, cores + 1))
        contenders += [(f"ray, {k}", opts, lambda k=k: RayRunner(opts, k)) for k in ks]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in contenders}
    checks: dict[str, dict[str, Any]] = {}
    ref = tmp / "ref"
    for r in range(args.repeats):
        for name, o, make in contenders:
            out = tmp / f"scan-{r}-{name.replace(' ', '').replace(',', '-')}"
            res = run_one(name, source, out, o, make, args.images + 6)
            runs[name].append(res)
            if not ref.exists():
                out.rename(ref)
            elif name not in checks:
                checks[name] = compare(out, ref)
            print(
                f"[{r + 1}/{args.repeats}] {name:24s} {res['images_per_s']:7.1f} img/s "
                f"(steady {res['steady_images_per_s']:7.1f}), {1e3 * res['cpu_s_per_image']:.1f} ms CPU/img",
                flush=True,
            )
    if not args.no_ray:
        ray.shutdown()
    med = {
        name: {k: statistics.median(x[k] for x in rs) for k in rs[0] if isinstance(rs[0][k], float)}
        for name, rs in runs.items()
    }
    res = {
        "machine": {"cpu": cpu_name(), "usable_cores": usable_cpus(), "python": platform.python_version()},
        "load_average": os.getloadavg(),
        "images": args.images,
        "corrupt": 6,
        "size": args.size,
        "arch": args.arch,
        "device": args.device,
        "batch_size": args.batch_size,
        "decode_threads": decode,
        "shard_size": SHARD,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "median": med,
        "runs": runs,
        "checks": checks,
    }
    write_results(args.out, res, report)


def report(res: dict[str, Any]) -> str:
    m = res["median"]
    first = next(iter(m))
    base = m[first]["steady_images_per_s"]
    lines = [
        f"# medaudit scan throughput ({res['machine']['cpu']}, "
        f"{res['machine']['usable_cores']} usable cores)",
        "",
        f"{res['images']} synthderm images + {res['corrupt']} corrupt files in a mixed folder (PNG, JPEG, "
        f"DICOM), random-weight {res['arch']} at {res['size']} px on {res['device']} (batch "
        f"{res['batch_size']}, {res['decode_threads']} decoding thread(s) per worker), screen (no heatmaps), "
        f"shards of {res['shard_size']}; medians of {res['repeats']} interleaved runs; load average at the "
        f"end {', '.join(f'{x:.1f}' for x in res['load_average'])}.",
        "",
        f"| contender | img/s end to end | img/s steady | × {first} (steady) | CPU ms / image "
        "| driver peak RSS MB | worker peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in m.items():
        lines.append(
            f"| {name} | {r['images_per_s']:.1f} | {r['steady_images_per_s']:.1f} | "
            f"{r['steady_images_per_s'] / base:.2f} | {1e3 * r['cpu_s_per_image']:.1f} | "
            f"{r['driver_peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "End to end includes starting the workers (imports, loading the version); steady is from the first "
        "shard written to the last. CPU counts this process and the workers (start-up included), not "
        "Ray's daemons. Driver peak RSS is this process's high-water mark over the whole run.",
        "",
        "Rows against the first in-process scan (same prediction, flag decision and error per image):",
        "",
    ]
    for name, c in res["checks"].items():
        lines.append(
            f"- {name}: {c['rows_same_decision']} of {c['rows']} rows, largest score difference "
            f"{c['max_score_diff']:.2g}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
