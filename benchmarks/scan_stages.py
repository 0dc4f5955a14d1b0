"""``benchmarks/scan.py --stages``: the audit engine's stages in a scan, against a baseline checkout.

Each contender is one in-process scan (``--workers 0``, one torch thread on the CPU) in a fresh
spawned process, so every contender starts from the same imports, and a ``--baseline-tree`` one
imports the package from that checkout instead of this one (the editable install's mapping is
pointed there before anything of ``medaudit`` is imported). Contenders:

* ``heatmaps, encode 0`` / ``heatmaps, encode 1``: ``--heatmaps`` audits, masks binarised and
  PNG-encoded between batches, or on one thread while the engine runs the next batch;
* ``screen`` / ``screen, cuda graphs``: screens, plain or replayed at the fixed batch size (the
  second only with ``--device cuda``: on the CPU the option picks the plain path);
* with ``--baseline-tree``: ``baseline: heatmaps`` and ``baseline: screen``, the checkout's scans.

Per contender, medians over ``--repeats`` interleaved rounds: images/s end to end (engine load
included) and steady (first shard written to the last), CPU seconds per image of the process. The
rows of every contender are compared with the first heatmaps scan's (decisions, scores, and the
heatmap and mask bytes of ``--heatmaps`` scans).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.machine import cpu_name, write_results


def _point_package_at(tree: Path) -> None:
    """Imports of ``medaudit.<pkg>`` from ``tree/<pkg>`` (the editable install's finder)."""
    import importlib

    finder = importlib.import_module("__editable___medaudit_0_1_0_finder")
    for name in list(finder.MAPPING):
        finder.MAPPING[name] = str(tree / name.split(".", 1)[1])


def _scan_child(
    tree: str | None, source: str, out: str, opts: dict[str, Any], shard: int, conn: Connection
) -> None:
    if tree:
        _point_package_at(Path(tree))
    import torch

    torch.set_num_threads(int(opts.get("threads", 1)))
    import medaudit.cli.scan.worker as worker
    from medaudit.cli.scan.run import scan
    from medaudit.cli.scan.runners import InProcessRunner

    assert worker.__file__ is not None
    known = {k: v for k, v in opts.items() if k in worker.ScanOptions.__dataclass_fields__}
    options = worker.ScanOptions(**known)
    times: list[float] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    runner = InProcessRunner(options)
    graphs = getattr(runner.scanner, "graphs", None)
    try:
        summary = scan(
            source,
            out,
            options,
            runner=runner,
            shard_size=shard,
            on_shard=lambda k, r: times.append(time.perf_counter()),
        )
    finally:
        runner.close()
    wall = time.perf_counter() - t0
    n = summary.n_items
    conn.send(
        {
            "package": str(Path(worker.__file__).parents[2]),
            "ignored_options": sorted(set(opts) - set(known)),
            "graphs": None if graphs is None else graphs.reason,
            "images": n,
            "wall_s": wall,
            "images_per_s": n / wall,
            "steady_images_per_s": (n - shard) / (times[-1] - times[0]) if len(times) > 1 else float("nan"),
            "cpu_s_per_image": (time.process_time() - cpu0) / n,
        }
    )


def _run(tree: Path | None, source: Path, out: Path, opts: dict[str, Any], shard: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(
        target=_scan_child, args=(str(tree) if tree else None, str(source), str(out), opts, shard, child)
    )
    p.start()
    child.close()
    res = parent.recv()
    p.join()
    assert p.exitcode == 0, f"scan process exited with {p.exitcode}"
    return dict(res)


def compare_bytes(out: Path, ref: Path) -> dict[str, Any]:
    """Rows of ``--heatmaps`` scans: how many have the reference's heatmap and mask bytes."""
    from medaudit.cli.scan.output import ScanFolder

    a, b = ScanFolder(out).read().to_pylist(), ScanFolder(ref).read().to_pylist()
    same = sum(
        all(x[k] == y[k] for k in x if k == "heatmap" or k.endswith("_mask_png"))
        for x, y in zip(a, b, strict=True)
    )
    masks = sum(1 for y in b for k in y if k.endswith("_mask_png") and y[k] is not None)
    return {"rows_same_bytes": same, "masks": masks}


def main_stages(
    args: argparse.Namespace, prepare: Callable[..., None], compare: Callable[..., dict[str, Any]]
) -> None:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="scan_stages_"))
    t = time.perf_counter()
    prep = multiprocessing.get_context("spawn").Process(
        target=prepare, args=(tmp, args.images, args.size, args.arch)
    )
    prep.start()
    prep.join()
    assert prep.exitcode == 0, "preparing the store and the archive failed"
    print(f"archive of {args.images} images at {args.size} px in {time.perf_counter() - t:.1f} s", flush=True)
    gpu = args.device.startswith("cuda")
    base = {
        "version": "vanilla",
        "home": str(tmp / "bentoml"),
        "device": args.device,
        "batch_size": args.batch_size,
        "decode_threads": args.decode_threads or (8 if gpu else 1),
        "fpr": args.fpr,
    }
    heat = {**base, "heatmaps": True}
    contenders: list[tuple[str, Path | None, dict[str, Any]]] = [
        ("heatmaps, encode 0", None, {**heat, "encode_threads": 0}),
        ("heatmaps, encode 1", None, {**heat, "encode_threads": 1}),
        ("screen", None, base),
    ]
    if gpu:  # on the CPU the option picks the plain path (tests/unit/test_audit_stages.py)
        contenders.append(("screen, cuda graphs", None, {**base, "cuda_graphs": True}))
    if args.baseline_tree:
        contenders += [
            ("baseline: heatmaps", args.baseline_tree.resolve(), heat),
            ("baseline: screen", args.baseline_tree.resolve(), base),
        ]
    if args.contenders:
        contenders = [c for c in contenders if c[0] in args.contenders]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in contenders}
    checks: dict[str, dict[str, Any]] = {}
    loads = [os.getloadavg()]
    ref = tmp / "ref"
    for r in range(args.repeats):
        for name, tree, opts in contenders:
            out = tmp / f"scan-{r}-{name.replace(' ', '').replace(',', '-').replace(':', '')}"
            res = _run(tree, tmp / "archive", out, opts, args.shard_size)
            runs[name].append(res)
            if not ref.exists():
                out.rename(ref)
            elif name not in checks:
                checks[name] = compare(out, ref)
                if opts.get("heatmaps"):
                    checks[name] |= compare_bytes(out, ref)
            print(
                f"[{r + 1}/{args.repeats}] {name:22s} {res['images_per_s']:7.1f} img/s "
                f"(steady {res['steady_images_per_s']:7.1f}), {1e3 * res['cpu_s_per_image']:.1f} ms CPU/img",
                flush=True,
            )
        loads.append(os.getloadavg())
    med = {
        name: {k: statistics.median(x[k] for x in rs) for k in rs[0] if isinstance(rs[0][k], float)}
        for name, rs in runs.items()
    }
    res = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "load_average": loads,
        "images": args.images,
        "size": args.size,
        "arch": args.arch,
        "device": args.device,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "fpr": args.fpr,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "baseline_tree": str(args.baseline_tree) if args.baseline_tree else None,
        "median": med,
        "runs": runs,
        "checks": checks,
    }
    write_results(args.out, res, report)


def report(res: dict[str, Any]) -> str:
    m = res["median"]
    loads = "; ".join(", ".join(f"{x:.1f}" for x in la) for la in res["load_average"])
    lines = [
        f"# medaudit scan: the engine's stages ({res['machine']['cpu']}, {res['gpu'] or 'no GPU'})",
        "",
        f"{res['images']} synthderm images + 6 corrupt files (PNG, JPEG, DICOM), random-weight "
        f"{res['arch']} at {res['size']} px on {res['device']}, in-process scans (one torch thread on "
        f"the CPU), batch {res['batch_size']}, shards of {res['shard_size']}, presence FPR "
        f"{res['fpr'] or 'the bank’s own'}; each scan in a fresh process, medians of {res['repeats']} "
        f"interleaved rounds. Load average (1, 5, 15 min) before and after each round: {loads}.",
        "",
        "| contender | img/s end to end | img/s steady | CPU ms / image |",
        "|---|---:|---:|---:|",
    ]
    for name, r in m.items():
        lines.append(
            f"| {name} | {r['images_per_s']:.1f} | {r['steady_images_per_s']:.1f} | "
            f"{1e3 * r['cpu_s_per_image']:.1f} |"
        )
    ratios = []
    for a, b in (
        ("heatmaps, encode 1", "baseline: heatmaps"),
        ("heatmaps, encode 1", "heatmaps, encode 0"),
        ("screen", "baseline: screen"),
        ("screen, cuda graphs", "screen"),
    ):
        if a in m and b in m:
            ratios.append(
                f"- {a} ÷ {b} (steady): {m[a]['steady_images_per_s'] / m[b]['steady_images_per_s']:.3f}"
            )
    first = next(iter(m))
    lines += ["", *ratios, "", f"Rows against the first scan's (`{first}`):", ""]
    for name, c in res["checks"].items():
        extra = (
            f"; heatmap and mask bytes equal in {c['rows_same_bytes']} rows ({c['masks']} masks)"
            if "rows_same_bytes" in c
            else ""
        )
        lines.append(
            f"- {name}: {c['rows_same_decision']} of {c['rows']} rows with the same decisions, largest score "
            f"difference {c['max_score_diff']:.2g}{extra}"
        )
    graphs = {r.get("graphs") for rs in res["runs"].values() for r in rs if r.get("graphs")}
    ignored = {o for rs in res["runs"].values() for r in rs for o in r.get("ignored_options", [])}
    lines += ["", f"Screen path: {'; '.join(sorted(graphs)) or '-'}."]
    if ignored:
        lines.append(f"Options the baseline does not know (left out there): {', '.join(sorted(ignored))}.")
    return "\n".join(lines) + "\n"
