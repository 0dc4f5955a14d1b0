"""Benchmark: what a concept mask costs on the host, binarised on pixels (method.md §2.2, CNNs)
against summed over SLIC superpixels first (method.md §2.4, the ViT family's pooling).

A mask is made per present concept per image, in the audit's host stage
(``AuditEngine.finish``), in ``medaudit audit``'s localization and in derived masks. Synthderm
images at each ``--sizes`` side, one heatmap of random relevance each (the cost does not depend
on the values); per size, the median milliseconds of each way over ``--images`` images, the
two interleaved image by image (the machine is shared), and their ratio.

    python benchmarks/masks.py                 # 128 and 224 px, 100 images

Writes ``benchmarks/results/masks_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "masks_cpu")
    args = ap.parse_args()
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
    from medaudit.models.xai.localize import concept_mask

    load_before = os.getloadavg()
    rows = []
    for size in args.sizes:
        ds = SynthDerm(SynthDermConfig(size=size, n_train=args.images, n_val=0, n_test=0))
        rng = np.random.default_rng(0)
        ms: dict[str, list[float]] = {"pixels": [], "superpixels": []}
        for i in range(args.images):
            img, heat = ds.load_image(i, size), rng.random((size, size))
            for pooling in ms:
                t0 = time.perf_counter()
                mask = concept_mask(heat, img, pooling)
                ms[pooling].append(1000 * (time.perf_counter() - t0))
                assert mask.shape == (size, size)
        px, sp = float(np.median(ms["pixels"])), float(np.median(ms["superpixels"]))
        rows.append(
            {
                "size": size,
                "pixels_ms": round(px, 3),
                "superpixels_ms": round(sp, 3),
                "ratio": round(sp / px, 1),
            }
        )
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu_name(),
        "images": args.images,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
        "command": " ".join(["python benchmarks/masks.py", *sys.argv[1:]]),
    }
    write_results(args.out, res, _markdown)


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Concept masks on the host ({r['date']}, {r['cpu']})",
        "",
        f"`{r['command']}`: medians over {r['images']} synthderm images per size; load average before "
        f"{r['load_before']}, after {r['load_after']}.",
        "",
        "| size | pixels (Otsu, method.md §2.2) ms | SLIC superpixels then Otsu (§2.4, ViTs) ms | ratio |",
        "|---:|---:|---:|---:|",
        *(f"| {x['size']} | {x['pixels_ms']} | {x['superpixels_ms']} | {x['ratio']}× |" for x in r["rows"]),
        "",
        "One mask per present concept per image. For scale: a ViT-tiny's CP-LRP costs ~147 ms an "
        "image at 224 px on this CPU (benchmarks/results/lrp_cpu_vit.md, batch 8).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
