"""Benchmark: how much of the logit each LRP composite conserves, and how much the biases absorb.

For each model and composite (models/xai/composite.py ``COMPOSITES``), the input heatmap's sum over
the explained logit, ``Σ R_input / logit`` (1 = conserved), in float64 on random weights with
trained-like BatchNorm statistics (``medaudit.testing.models.trained_like``), per input size:

* **bias-free**: every conv/linear bias and BatchNorm shift zeroed (scales kept), input ×100 so
  that the ε = 1e-6 stabilisers are negligible next to the pre-activations: what the rules
  themselves lose;
* **trained-like**: the biases as they are: ``1 − share`` is what the biases absorb.

    python benchmarks/lrp_conservation.py                     # EfficientNet-B0 and DenseNet-121
    python benchmarks/lrp_conservation.py --archs efficientnet_b0 --sizes 64

Writes ``benchmarks/results/lrp_conservation_cpu.md`` and ``.json``. A sum, not a speed: the
figures do not depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="*", default=["efficientnet_b0", "densenet121"], help="timm names")
    p.add_argument("--sizes", nargs="*", type=int, default=[64, 224])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lrp_conservation_cpu")
    return p.parse_args()


def bias_free(model: Any) -> Any:
    """Every conv/linear bias and BatchNorm shift zeroed (BatchNorm scales kept)."""
    from torch import nn

    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
            m.bias.data.zero_()
        elif isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
            m.bias.data.zero_()
    return model


def shares(model: Any, kind: str, composite: str, x: Any) -> list[float]:
    """``Σ R_input / logit`` per image for class 1, float64."""
    from medaudit.models.registry import ModelCfg
    from medaudit.models.xai import Explainer

    cfg = ModelCfg(arch="bench", source="bench", canonizer=kind)
    e = Explainer(model.double(), cfg, composite=composite).explain(x.double(), [1])
    return (e.heatmaps[0].flatten(1).sum(1) / e.logits[:, 1]).tolist()


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import timm
    import torch

    from medaudit.models.xai.canonizers import detect_canonizer
    from medaudit.models.xai.composite import COMPOSITES, family_composite
    from medaudit.testing.models import trained_like

    rows = []
    for arch in args.archs:
        torch.manual_seed(0)
        model = trained_like(timm.create_model(arch, pretrained=False, num_classes=3)).eval()
        model.requires_grad_(False)
        kind = detect_canonizer(model)
        for size in args.sizes:
            x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1))
            for composite in COMPOSITES:
                t0 = time.perf_counter()
                row = {
                    "arch": arch,
                    "size": size,
                    "composite": composite,
                    "default": composite == family_composite(kind),
                    "bias_free": shares(bias_free(model), kind, composite, x * 100),
                    "trained_like": shares(model, kind, composite, x),
                }
                row["seconds"] = round(time.perf_counter() - t0, 1)
                print(row, flush=True)
                rows.append(row)
    return rows


def report(res: dict[str, Any]) -> str:
    lines = ["# LRP conservation per composite: Σ input relevance / logit (CPU, float64)", ""]
    lines += [f"- {k}: {v}" for k, v in res["machine"].items()]
    lines += [
        "",
        "Random weights with trained-like BatchNorm statistics, class 1 of 3, "
        f"{res['batch']} images each. **bias-free**: biases and BatchNorm shifts zeroed, input ×100 "
        "(what the rules lose); **trained-like**: biases kept (1 − share is what they absorb).",
        "",
        "| model | px | composite | bias-free | trained-like (absorbed by biases) |",
        "|---|---:|---|---|---|",
    ]
    for r in res["rows"]:
        bf = ", ".join(f"{v:.6f}" for v in r["bias_free"])
        tl = ", ".join(f"{v:.3g}" for v in r["trained_like"])
        absorbed = ", ".join(f"{1 - v:.4f}" for v in r["trained_like"])
        name = r["composite"] + (" (default)" if r["default"] else "")
        lines.append(f"| {r['arch']} | {r['size']} | {name} | {bf} | {tl} ({absorbed}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.machine import cpu_name, write_results

    torch.set_num_threads(args.threads)
    machine = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
        "command": " ".join(["python benchmarks/lrp_conservation.py", *sys.argv[1:]]),
    }
    rows = measure(args)
    write_results(args.out, {"machine": machine, "batch": args.batch, "rows": rows}, report)


if __name__ == "__main__":
    main()
