"""Benchmark: LRP engine vs forward, gradient×input, zennit LRP and Integrated Gradients.

One table per run, every contender in the same process on the same model and batch; medians
over repeats, with the contenders interleaved round-robin so that background load (the CPU
machine is shared) hits them alike. Writes ``benchmarks/results/lrp_<device>.md`` and ``.json``.

    python benchmarks/lrp.py                       # CPU: resnet18@128 b16, resnet50d@224 b8,
                                                   #      densenet121@224 b4, efficientnet_b0@224 b4,
                                                   #      vit_tiny_patch16_224@224 b8
    python benchmarks/lrp.py --device cuda         # resnet50/resnet50d @224, batch 64 and 1, fp32(TF32)+bf16
    python benchmarks/lrp.py --vendor /path/wheels # add pure-python packages (zennit, captum) to sys.path

zennit and captum are optional: a missing one skips its row with a note. Weights are random
("trained-like" BN statistics), which does not change the cost.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    name: str
    median_s: float | None = None
    runs: list[float] = field(default_factory=list)
    images_per_s: float | None = None
    note: str = ""


@dataclass
class Case:
    model: str
    size: int
    batch: int
    dtype: str
    rows: list[Row]
    fidelity: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cases", nargs="*", help="model@size:batch, e.g. resnet18@128:16 (default per device)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per contender (after one warm-up)")
    p.add_argument(
        "--ig-repeats", type=int, default=1, help="timed repeats for IG-32 (it costs 32 gradients)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the CPU box is shared; 0: torch's)",
    )
    p.add_argument("--no-bf16", action="store_true", help="cuda: skip the bf16 rows")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="every contender (model, input, engine) in channels-last memory format (NHWC)",
    )
    p.add_argument("--tag", default="", help="suffix of the result files: lrp_<device><tag>.md")
    p.add_argument("--no-ig", action="store_true", help="skip Integrated Gradients")
    p.add_argument("--vendor", type=Path, help="directory with pure-python packages to put on sys.path")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args()


def machine(torch: Any, device: str) -> dict[str, Any]:
    from benchmarks.machine import cpu_name  # ROOT is on sys.path once main() runs

    cpu = cpu_name()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }
    for pkg in ("timm", "zennit", "captum"):
        try:
            module = __import__(pkg)
        except ImportError:
            info[pkg] = "missing"
            continue
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:  # vendored without metadata
            info[pkg] = getattr(module, "__version__", f"vendored at {Path(module.__file__).parent}")
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["tf32"] = True
    return info


def timed(
    fns: dict[str, Callable[[], Any]], repeats: dict[str, int], sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Warm each contender up once, then time them round-robin; returns the wall times.

    Contenders timed once (IG-32) are not warmed up: they run the same kernels as
    gradient×input, already warm, and a warm-up would double the longest row.
    """
    for name, fn in fns.items():
        if repeats[name] > 1:
            fn()
            sync()
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(max(repeats.values())):
        for name, fn in fns.items():
            if r >= repeats[name]:
                continue
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            runs[name].append(time.perf_counter() - t0)
    return runs


def aten_convs(fn: Callable[[], Any]) -> Any:
    """``fn()`` with the engine's prepacked CPU kernels turned off (``MEDAUDIT_LRP_PACKED=0``)."""
    from medaudit.models.xai.rules import PACKED_ENV

    before = os.environ.get(PACKED_ENV)
    os.environ[PACKED_ENV] = "0"
    try:
        return fn()
    finally:
        if before is None:
            del os.environ[PACKED_ENV]
        else:
            os.environ[PACKED_ENV] = before


def cosine(a: Any, b: Any) -> float:
    """Mean per-image cosine, after scaling both by ``b``'s largest |value|: ``cosine_similarity``
    floors the product of norms at 1e-8, and heatmaps whose biases absorbed all but ~1e-6 of the
    logit (EfficientNet under the γ-rule) have values near 1e-10."""
    import torch

    scale = b.abs().amax().double().clamp_min(1e-300)
    a, b = a.flatten(1).double() / scale, b.flatten(1).double() / scale
    return torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item()


def run_case(args: argparse.Namespace, name: str, size: int, batch: int, torch: Any) -> list[Case]:
    from torch import nn

    from medaudit.models.registry import create_model
    from medaudit.models.xai import Explainer

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, cfg = create_model(name, img_size=size)
    with torch.no_grad():  # "trained-like": non-trivial BN, so the residual branches carry signal
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.2)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).requires_grad_(False).eval()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    target = 1
    explainer = Explainer(model, cfg).to(device, memory_format=fmt)
    repeat_explainer = Explainer(model, cfg, batch_mode="repeat").to(device, memory_format=fmt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    notes: dict[str, str] = {}

    def forward() -> Any:
        with torch.no_grad():
            return model(x)

    def grad_x_input(m: nn.Module = model, xx: Any = x) -> Any:
        xi = xx.detach().clone().requires_grad_(True)
        out = m(xi)
        (g,) = torch.autograd.grad(out[:, target].sum(), xi)
        return (g * xi).sum(1)

    trainable = copy.deepcopy(model).requires_grad_(True)

    def grad_x_input_with_param_grads() -> Any:
        """The naive way: ``.backward()`` on a model whose parameters require grad (their
        gradients are computed too). Shown for context; the ratios use the row above."""
        xi = x.detach().clone().requires_grad_(True)
        trainable(xi)[:, target].sum().backward()
        trainable.zero_grad(set_to_none=True)
        return (xi.grad * xi).sum(1)

    fns: dict[str, Callable[[], Any]] = {
        "forward": forward,
        "gradient×input": grad_x_input,
        "gradient×input (+param grads)": grad_x_input_with_param_grads,
        "engine LRP (1 seed)": lambda: explainer.explain(x, [target]),
        "engine LRP (2 seeds, vmap)": lambda: explainer.explain(x, [target, 0]),
        "engine LRP (2 seeds, repeat)": lambda: repeat_explainer.explain(x, [target, 0]),
    }
    if device.type == "cpu":
        # The same engine with its z⁺ convs on aten instead of prepacked oneDNN kernels
        # (models.xai.rules.PackedConv); float32 only (the bf16 rows take aten anyway).
        fns["engine LRP (1 seed, aten convs)"] = lambda: aten_convs(lambda: explainer.explain(x, [target]))
        fns["engine LRP (2 seeds, vmap, aten convs)"] = lambda: aten_convs(
            lambda: explainer.explain(x, [target, 0])
        )
    if cfg.canonizer == "vit":  # the other attention rule (the default is the engine's rows)
        from medaudit.models.xai.composite import ATTENTION_RULES, DEFAULT_ATTENTION

        other = next(a for a in ATTENTION_RULES if a != DEFAULT_ATTENTION)
        other_explainer = Explainer(model, cfg, attention=other).to(device, memory_format=fmt)
        fns[f"engine LRP (1 seed, {other})"] = lambda: other_explainer.explain(x, [target])
        notes["engine LRP (1 seed)"] = f"attention: {DEFAULT_ATTENTION} (the default)"
    repeats = dict.fromkeys(fns, args.repeats)

    zennit_ok = cfg.canonizer != "vit"
    if not zennit_ok:
        notes["zennit LRP"] = (
            "skipped: zennit 0.5.1 passes attention (blank heatmaps with class-token pooling); "
            "the ViT rules' reference is lxt (tests/unit/test_attention_lrp.py)"
        )
    try:
        from medaudit.testing.zennit_reference import zennit_lrp
    except ImportError as e:  # pragma: no cover - depends on the machine
        zennit_ok, notes["zennit LRP"] = False, f"skipped: {e}"
    try:
        import zennit  # noqa: F401
    except ImportError as e:
        zennit_ok, notes["zennit LRP"] = False, f"skipped: zennit not importable ({e})"
    if zennit_ok:
        with torch.no_grad():
            logits = model(x)
        seed = torch.zeros_like(logits)
        seed[:, target] = logits[:, target]
        fns["zennit LRP"] = lambda: zennit_lrp(model, cfg.canonizer, x, seed)[1].sum(1)
        if cfg.canonizer in ("densenet", "efficientnet"):
            # zennit 0.5.1 has no canonizers for these; the parity tests configure zennit's own
            # canonizer classes for them (EfficientNet: on a copy with BatchNormAct2d split).
            sys.path.insert(0, str(ROOT / "tests" / "unit"))
            from test_lrp_families import no_inplace, zennit_heatmaps

            no_inplace(model)
            fns["zennit LRP"] = lambda: zennit_heatmaps(model, x, target)
            notes["zennit LRP"] = "canonizers from tests/unit/test_lrp_families.py"
        repeats["zennit LRP"] = max(1, min(args.repeats, 2 if device.type == "cpu" else args.repeats))

    if not args.no_ig:
        try:
            from captum.attr import IntegratedGradients

            ig = IntegratedGradients(model)
            fns["Captum IG-32"] = lambda: ig.attribute(
                x, baselines=0.0, target=target, n_steps=32, internal_batch_size=batch
            )
        except ImportError:
            notes["IG-32 (hand-written, captum missing)"] = "captum not importable: Riemann IG by hand"

            def hand_ig() -> Any:
                total = torch.zeros_like(x)
                for k in range(32):  # captum's default is Gauss-Legendre; this is the midpoint rule
                    xi = (x * (k + 0.5) / 32).requires_grad_(True)
                    (g,) = torch.autograd.grad(model(xi)[:, target].sum(), xi)
                    total += g
                return (x * total / 32).sum(1)

            fns["IG-32 (hand-written, captum missing)"] = hand_ig
        name_ig = next(k for k in fns if "IG-32" in k)
        repeats[name_ig] = args.ig_repeats

    if device.type == "cuda":
        try:
            captured = explainer.capture(x, [target])
            fns["engine LRP (1 seed, CUDA graph)"] = lambda: captured(x)
            repeats["engine LRP (1 seed, CUDA graph)"] = args.repeats
        except Exception as e:  # capture is best-effort; the eager rows stand without it
            notes["engine LRP (1 seed, CUDA graph)"] = f"capture failed: {type(e).__name__}: {e}"[:200]

    runs = timed(fns, repeats, sync)
    rows = [_row(k, runs[k], batch, notes.get(k, "")) for k in fns]
    rows += [Row(k, note=v) for k, v in notes.items() if k not in fns]

    fidelity: dict[str, float] = {}
    ours = explainer.explain(x, [target]).heatmaps[0]
    if "engine LRP (1 seed, CUDA graph)" in fns:
        fidelity["cuda_graph_vs_eager_mean_cosine"] = cosine(
            fns["engine LRP (1 seed, CUDA graph)"]().heatmaps[0], ours
        )
    if zennit_ok:
        theirs = fns["zennit LRP"]()
        fidelity["engine_vs_zennit_mean_cosine"] = cosine(ours, theirs)
        s_o, s_t = ours.flatten(1).sum(1), theirs.flatten(1).sum(1)
        fidelity["engine_vs_zennit_max_rel_sum_diff"] = ((s_o - s_t).abs() / s_t.abs()).max().item()
    dtype = (
        "fp32"
        + ("+tf32" if device.type == "cuda" else "")
        + (", channels-last" if args.channels_last else "")
    )
    case = Case(name, size, batch, dtype, rows, fidelity)
    case.ratios = _ratios(rows)
    cases = [case]

    if device.type == "cuda" and not args.no_bf16:
        try:
            cases.append(bf16_case(args, model, cfg, x, target, ours, grad_x_input, sync, torch))
        except Exception:  # keep the fp32 rows if bf16 fails
            traceback.print_exc()
            case.fidelity["bf16_error"] = float("nan")
    return cases


def bf16_case(
    args: argparse.Namespace, model: Any, cfg: Any, x: Any, target: int, ours: Any,
    grad_x_input: Callable[..., Any], sync: Callable[[], None], torch: Any,
) -> Case:  # fmt: skip
    """The engine and gradient×input in bfloat16; the engine's heatmaps compared with fp32's."""
    from medaudit.models.xai import Explainer

    name, (size, batch), device = cfg.arch, (x.shape[-1], x.shape[0]), x.device
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    bf_explainer = Explainer(model, cfg).to(device=device, dtype=torch.bfloat16, memory_format=fmt)
    bf_model = model.to(torch.bfloat16, memory_format=fmt)
    xb = x.to(torch.bfloat16).contiguous(memory_format=fmt)

    def bf_forward() -> Any:
        with torch.no_grad():
            return bf_model(xb)

    bf_fns: dict[str, Callable[[], Any]] = {
        "forward": bf_forward,
        "gradient×input": lambda: grad_x_input(bf_model, xb),
        "engine LRP (1 seed)": lambda: bf_explainer.explain(xb, [target]),
        "engine LRP (2 seeds, vmap)": lambda: bf_explainer.explain(xb, [target, 0]),
    }
    note = ""
    try:
        captured = bf_explainer.capture(xb, [target])
        bf_fns["engine LRP (1 seed, CUDA graph)"] = lambda: captured(xb)
    except Exception as e:  # capture is best-effort; the eager rows stand without it
        note = f"capture failed: {type(e).__name__}: {e}"[:200]
    bf_runs = timed(bf_fns, dict.fromkeys(bf_fns, args.repeats), sync)
    bf_rows = [_row(k, bf_runs[k], batch, "") for k in bf_fns]
    if note:
        bf_rows.append(Row("engine LRP (1 seed, CUDA graph)", note=note))
    bf_heat = bf_explainer.explain(xb, [target]).heatmaps[0].float()
    fidelity = {"engine_bf16_vs_fp32_mean_cosine": cosine(bf_heat, ours)}
    if "engine LRP (1 seed, CUDA graph)" in bf_fns:
        graph_heat = bf_fns["engine LRP (1 seed, CUDA graph)"]().heatmaps[0].float()
        fidelity["cuda_graph_bf16_vs_fp32_mean_cosine"] = cosine(graph_heat, ours)
    dtype = "bf16" + (", channels-last" if args.channels_last else "")
    bf_case = Case(name, size, batch, dtype, bf_rows, fidelity)
    bf_case.ratios = _ratios(bf_rows)
    return bf_case


def _row(name: str, runs: list[float], batch: int, note: str) -> Row:
    med = statistics.median(runs)
    return Row(name, med, [round(r, 5) for r in runs], batch / med, note)


def _ratios(rows: list[Row]) -> dict[str, float]:
    t = {r.name: r.median_s for r in rows if r.median_s}
    one = t["engine LRP (1 seed)"]
    ratios = {
        "engine_throughput_vs_gradient_x_input": t["gradient×input"] / one,
        "two_seeds_vmap_vs_one_seed_time": t["engine LRP (2 seeds, vmap)"] / one,
    }
    if "gradient×input (+param grads)" in t:
        ratios["engine_throughput_vs_gradient_x_input_with_param_grads"] = (
            t["gradient×input (+param grads)"] / one
        )
    if "engine LRP (2 seeds, repeat)" in t:
        ratios["two_seeds_repeat_vs_one_seed_time"] = t["engine LRP (2 seeds, repeat)"] / one
    if "engine LRP (1 seed, aten convs)" in t:
        ratios["packed_speedup_vs_aten_1_seed"] = t["engine LRP (1 seed, aten convs)"] / one
        ratios["packed_speedup_vs_aten_2_seeds"] = (
            t["engine LRP (2 seeds, vmap, aten convs)"] / t["engine LRP (2 seeds, vmap)"]
        )
    if "zennit LRP" in t:
        ratios["engine_speedup_vs_zennit"] = t["zennit LRP"] / one
    graph = t.get("engine LRP (1 seed, CUDA graph)")
    if graph:
        ratios["cuda_graph_throughput_vs_gradient_x_input"] = t["gradient×input"] / graph
        if "zennit LRP" in t:
            ratios["cuda_graph_speedup_vs_zennit"] = t["zennit LRP"] / graph
    return {k: round(v, 3) for k, v in ratios.items()}


def markdown(info: dict[str, Any], cases: list[Case], device: str) -> str:
    lines = [f"# LRP engine benchmark ({device})", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "Median wall time over repeats (n in brackets), contenders interleaved round-robin.", ""]
    for c in cases:
        lines += [f"## {c.model} @ {c.size} px, batch {c.batch}, {c.dtype}", ""]
        lines += [
            "| contender | median ms | images/s | vs engine (time) | note |",
            "|---|---:|---:|---:|---|",
        ]
        one = next(r.median_s for r in c.rows if r.name == "engine LRP (1 seed)")
        for r in c.rows:
            if r.median_s is None:
                lines.append(f"| {r.name} | – | – | – | {r.note} |")
                continue
            lines.append(
                f"| {r.name} | {1000 * r.median_s:.1f} (n={len(r.runs)}) | {r.images_per_s:.1f} "
                f"| {r.median_s / one:.2f}x | {r.note} |"
            )
        lines += [""] + [f"- {k}: **{v}**" for k, v in {**c.ratios, **c.fidelity}.items()] + [""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.vendor:
        sys.path.insert(0, str(args.vendor.resolve()))
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 allowed for every contender
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    default = {
        "cpu": [
            "resnet18@128:16",
            "resnet50d@224:8",
            "densenet121@224:4",
            "efficientnet_b0@224:4",
            "vit_tiny_patch16_224@224:8",
        ],
        "cuda": ["resnet50@224:64", "resnet50d@224:64", "resnet50@224:1", "resnet50d@224:1"],
    }
    info = machine(torch, args.device)
    cases: list[Case] = []
    for spec in args.cases or default[args.device]:
        name, rest = spec.split("@")
        size, batch = (int(v) for v in rest.split(":"))
        t0 = time.perf_counter()
        try:
            cases += run_case(args, name, size, batch, torch)
        except Exception:  # one broken case (e.g. another timm version) must not lose the others
            traceback.print_exc()
            info[f"error {spec}"] = traceback.format_exc(limit=3)
            continue
        print(f"{spec}: {time.perf_counter() - t0:.0f} s", flush=True)
    info["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"lrp_{args.device}{args.tag}"
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": info, "cases": [asdict(c) for c in cases]}, indent=2, default=str)
    )
    text = markdown(info, cases, args.device)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
