"""Benchmark: what a flagged request stores and costs in pixels (issue #27's workbench layers).

A flagged request used to store the heatmap blended into the input (``heatmap``). It now stores
the bare model-size input (``image``, RGB PNG) and the heatmap as its own RGBA layer
(``heat_layer``), from which ``/reviews`` and ``medaudit review`` compose the blend on reading
(service/flags/review.py ``compose_blend``). This measures, on a randomly initialised ResNet-18
at ``--size`` px auditing synthderm images: the bytes of each PNG (the old blend as the
baseline), the time to encode image + layer (the flag publisher's background thread) and the
blend's PNG (the old path, same run), and the time to compose the blend on reading. Medians over
``--images``; the load average is recorded.

    python benchmarks/flag_blobs.py                 # 224 px, 8 images

Writes ``benchmarks/results/flag_blobs_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flag_blobs_cpu"))
    args = ap.parse_args()

    import torch

    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
    from medaudit.service.audit import AuditEngine, heat_layer, overlay, png_base64
    from medaudit.service.flags.review import compose_blend
    from medaudit.testing.versions import load_version_files, write_version_files

    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    d = write_version_files(Path(tempfile.mkdtemp()) / "v", "vanilla", 0, img_size=args.size)
    engine = AuditEngine(load_version_files(d, "vanilla"), fpr=0.99)  # masks for every concept
    ds = SynthDerm(SynthDermConfig(seed=1, size=args.size, n_train=args.images, n_val=0, n_test=0))
    results = engine.audit([ds.sample(i).image for i in range(args.images)], raw_heatmap=True)

    sizes: dict[str, list[int]] = {"blend (before)": [], "image": [], "heat_layer": [], "mask": []}
    times: dict[str, list[float]] = {
        "encode blend (before)": [],
        "encode image + layer": [],
        "compose blend": [],
    }
    for r in results:
        assert r.image is not None and r.heatmap is not None
        t = time.perf_counter()
        blend = png_base64(overlay(r.image, r.heatmap))
        times["encode blend (before)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        image, layer = png_base64(r.image), png_base64(heat_layer(r.heatmap))
        times["encode image + layer"].append(time.perf_counter() - t)
        image_b, layer_b = base64.b64decode(image), base64.b64decode(layer)
        t = time.perf_counter()
        compose_blend(image_b, layer_b)
        times["compose blend"].append(time.perf_counter() - t)
        sizes["blend (before)"].append(len(base64.b64decode(blend)))
        sizes["image"].append(len(image_b))
        sizes["heat_layer"].append(len(layer_b))
        sizes["mask"] += [len(base64.b64decode(c.mask_png)) for c in r.concepts if c.mask_png]
    load1 = os.getloadavg()[0]

    report = {
        "size_px": args.size,
        "images": args.images,
        "load_average": [load0, load1],
        "bytes_median": {k: statistics.median(v) for k, v in sizes.items() if v},
        "ms_median": {k: 1000 * statistics.median(v) for k, v in times.items()},
    }
    b, ms = report["bytes_median"], report["ms_median"]
    lines = [
        f"# Flag pixels per request at {args.size} px (`python benchmarks/flag_blobs.py`)",
        "",
        f"{args.images} synthderm images, random ResNet-18, PNG zlib level 1; medians. Load average "
        f"{load0:.1f} -> {load1:.1f} (shared 2-core machine).",
        "",
        "| PNG | KiB |",
        "|---|---:|",
        *(f"| {k} | {v / 1024:.1f} |" for k, v in b.items()),
        "",
        f"Stored per request now: image + heat_layer = {(b['image'] + b['heat_layer']) / 1024:.1f} KiB, "
        f"before: blend = {b['blend (before)'] / 1024:.1f} KiB "
        f"({(b['image'] + b['heat_layer']) / b['blend (before)']:.2f}x); masks unchanged.",
        "",
        "| step | ms |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in ms.items()),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
