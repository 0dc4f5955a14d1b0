"""Benchmark: what a screen costs per image, against the full audit and a plain forward, in-process.

A screen (``AuditEngine.screen``, ``Explainer.explain(heatmaps=False)``) is the flag decision's
inputs: the prediction, the concept scores at the CAV layer ℓ and the class relevance at ℓ, so
its LRP backward runs through the layers above ℓ only and its forward records no autograd graph
below ℓ. Contenders, on one model and batch, interleaved round-robin over the repeats (the CPU
machine is shared) and reported as medians:

* ``forward``: the eager model under ``inference_mode`` (what ``/predict`` costs on torch);
* ``screen LRP``: ``explain(["pred"], cav_layers=[ℓ], relevance_layers=[ℓ], heatmaps=False)``;
* ``audit LRP, clean``: ``/audit``'s LRP call on images showing no concept (its concept seed is
  zero and skipped: one backward from the logits to the input);
* ``audit LRP, concept``: the same with a concept present on every image (the class and concept
  seeds share the backward below ℓ);
* ``rule forward, graph`` / ``rule forward, no graph``: the LRP rule model's forward alone, with
  and without the autograd graph, to split each LRP call into forward and backward.

The backward a screen skips: ``1 − (screen − rule forward, no graph) / (audit clean − rule forward,
graph)``. With ``--engine`` (ResNet-18 at 128 px by default), also the whole engine on synthderm
images through a random-weight version (``medaudit.testing.versions``): ``AuditEngine.predict``
(ONNX Runtime), ``.screen`` and ``.audit`` (heatmap overlay and masks PNG-encoded).

    python benchmarks/screen.py                  # resnet18@128:8, resnet50@224:4, engine 128 px
    python benchmarks/screen.py --cases resnet18@128:1 --repeats 9
    python benchmarks/screen.py --store artifacts/bentoml   # + identity on the demo's versions

With ``--store`` (a built store: ``make demo``), each of ``--versions`` screens and audits
``--identity-images`` synthderm test images (every other one with the band-aid) in batches of 16,
and the table says on how many the two agree exactly (prediction, scores, percentiles, presence,
flag decision under the service's default policy) and the largest relevance-share difference.

Weights are random with trained-like BatchNorm statistics (the cost does not depend on them).
Writes ``benchmarks/results/screen_cpu.md`` and ``.json``.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402

LAYER = "identity_2"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cases", nargs="*", default=["resnet18@128:8", "resnet50@224:4"], help="model@size:batch"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per contender (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: one auditor LRP process)")
    p.add_argument("--engine", type=int, default=128, help="image size of the engine case (0: none)")
    p.add_argument("--engine-batch", type=int, default=8)
    p.add_argument("--store", type=Path, help="BENTOML_HOME of a built store: screen = audit on its versions")
    p.add_argument("--versions", nargs="+", default=["vanilla", "pclarc-band_aid", "rrclarc-band_aid"])
    p.add_argument("--identity-images", type=int, default=512)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "screen_cpu")
    return p.parse_args()


def timed(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each contender, interleaved round-robin after one warm-up each."""
    for f in contenders.values():
        f()
    runs: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, f in contenders.items():
            t0 = time.perf_counter()
            f()
            runs[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in runs.items()}


def macs_above(model: torch.nn.Module, layer_path: str, x: torch.Tensor) -> float:
    """Share of the model's conv and linear multiply-adds that run after the module at
    ``layer_path``: the share of an LRP backward (one adjoint per such layer, and z⁺'s one more
    conv) that a screen still runs. Counted on one forward of ``x``."""
    done = {"split": False}
    below, above = [0], [0]

    def count(m: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
        w = m.weight
        per_out = w[0].numel() if isinstance(m, torch.nn.Conv2d) else w.shape[1]
        (above if done["split"] else below)[0] += out.numel() * per_out

    def split(*_: Any) -> None:
        done["split"] = True

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    handles = [m.register_forward_hook(count) for m in layers]
    handles.append(model.get_submodule(layer_path).register_forward_hook(split))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return above[0] / (above[0] + below[0])


def lrp_case(spec: str, repeats: int) -> dict[str, Any]:
    """The LRP engine alone on one model@size:batch."""
    from medaudit.models.registry import create_model
    from medaudit.models.xai.lrp import ConceptTarget, Explainer, recording
    from medaudit.testing.models import trained_like

    arch, rest = spec.split("@")
    size, batch = (int(v) for v in rest.split(":"))
    torch.manual_seed(0)
    model, cfg = create_model(arch, img_size=size)
    model = trained_like(model).eval()
    explainer = Explainer(model, cfg)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        channels = explainer.explain(x[:1], ["pred"], cav_layers=[LAYER]).activations[LAYER].shape[1]
    v = torch.randn(channels, generator=torch.Generator().manual_seed(2))
    kw = {"cav_layers": [LAYER], "relevance_layers": [LAYER]}

    def nothing(pooled: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(pooled)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def rule_forward(graph: bool) -> None:
        with torch.enable_grad() if graph else torch.no_grad(), recording():
            explainer.model(x.detach().requires_grad_(graph))

    median = timed(
        {
            "forward": forward,
            "rule forward, graph": lambda: rule_forward(True),
            "rule forward, no graph": lambda: rule_forward(False),
            "screen LRP": lambda: explainer.explain(x, ["pred"], heatmaps=False, **kw),
            "audit LRP, clean": lambda: explainer.explain(x, ["pred", ConceptTarget(LAYER, nothing)], **kw),
            "audit LRP, concept": lambda: explainer.explain(x, ["pred", ConceptTarget(LAYER, v)], **kw),
        },
        repeats,
    )
    above = macs_above(model, cfg.hook_points[LAYER], x[:1])
    audit_bwd = median["audit LRP, clean"] - median["rule forward, graph"]
    screen_bwd = median["screen LRP"] - median["rule forward, no graph"]
    return {
        "case": spec,
        "layer": LAYER,
        "batch": batch,
        "ms_per_image": {k: 1e3 * t / batch for k, t in median.items()},
        "screen_over_forward": median["screen LRP"] / median["forward"],
        "audit_clean_over_screen": median["audit LRP, clean"] / median["screen LRP"],
        "audit_concept_over_screen": median["audit LRP, concept"] / median["screen LRP"],
        "backward_skipped": 1.0 - screen_bwd / audit_bwd if audit_bwd > 0 else None,
        "macs_above_layer": above,
    }


def engine_case(size: int, batch: int, repeats: int) -> dict[str, Any]:
    """The whole engine (ONNX prediction, screen, audit) on synthderm images at ``size`` px."""
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
    from medaudit.service.audit import AuditEngine
    from medaudit.testing.versions import load_version_files, write_version_files

    ds = SynthDerm(SynthDermConfig(size=size, n_train=8, n_val=8, n_test=batch, seed=7))
    images = [
        (ds.sample(int(i), "attacked", attack="band_aid") if k % 2 else ds.sample(int(i), "clean")).image
        for k, i in enumerate(ds.indices("test"))
    ]
    with tempfile.TemporaryDirectory() as d:
        loaded = load_version_files(
            write_version_files(Path(d) / "v", "vanilla", 0, img_size=size), "vanilla"
        )
        engine = AuditEngine(loaded, ort_threads=1)
        present = AuditEngine.__new__(AuditEngine)  # every concept present: a mask per concept
        present.__dict__.update(engine.__dict__, fpr=0.999)
        median = timed(
            {
                "predict (ONNX Runtime)": lambda: engine.predict(images),
                "screen": lambda: engine.screen(images),
                "audit": lambda: engine.audit(images),
                "audit, every concept present": lambda: present.audit(images),
            },
            repeats,
        )
    return {
        "case": f"engine resnet18@{size}:{batch}",
        "batch": batch,
        "ms_per_image": {k: 1e3 * t / batch for k, t in median.items()},
        "audit_over_screen": median["audit"] / median["screen"],
        "screen_over_predict": median["screen"] / median["predict (ONNX Runtime)"],
    }


def identity(store: Path, versions: list[str], n: int) -> list[dict[str, Any]]:
    """Screen against audit on ``n`` synthderm test images through each served version of ``store``."""
    from medaudit.service.audit import AuditEngine
    from medaudit.service.flags.policy import PolicyConfig, evaluate
    from medaudit.testing.versions import synthderm_images

    images = synthderm_images(n)
    policy = PolicyConfig()  # the service's default: share 0.2, the bank's presence FPR
    out = []
    for version in versions:
        engine = AuditEngine.from_store(version, home=store, ort_threads=1)
        same = flagged = present = 0
        worst = 0.0
        for start in range(0, n, 16):
            batch = images[start : start + 16]
            for s, a in zip(engine.screen(batch), engine.audit(batch), strict=True):
                gaps = [
                    abs(cs.relevance_share - ca.relevance_share)
                    for cs, ca in zip(s.concepts, a.concepts, strict=True)
                ]
                worst = max(worst, *gaps)
                key = [(c.concept, c.score, c.percentile, c.present, c.threshold) for c in s.concepts]
                want = [(c.concept, c.score, c.percentile, c.present, c.threshold) for c in a.concepts]
                decision = evaluate(s, policy)
                same += (
                    s.prediction == a.prediction
                    and key == want
                    and max(gaps) <= 1e-6
                    and decision.to_json() == evaluate(a, policy).to_json()
                )
                flagged += decision.flagged
                present += any(c.present for c in s.concepts)
        out.append(
            {
                "version": version,
                "images": n,
                "identical": same,
                "flagged": flagged,
                "any_present": present,
                "worst_share_gap": worst,
            }
        )
        print(out[-1], flush=True)
    return out


def markdown(meta: dict[str, Any], cases: list[dict[str, Any]], same: list[dict[str, Any]]) -> str:
    lines = [
        f"# Screening cost per image ({meta['date']}, {meta['cpu']}, {meta['cpu_count']} CPUs, "
        f"{meta['threads']} torch thread(s), medians of {meta['repeats']} interleaved repeats)",
        "",
        f"CAV layer ℓ = `{LAYER}` (the output of the third of four ResNet stages). Milliseconds per image:",
        "",
    ]
    for c in cases:
        lines += [f"## {c['case']}", "", "| contender | ms / image |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in c["ms_per_image"].items()]
        lines.append("")
        if "backward_skipped" in c:
            skipped = c["backward_skipped"]
            lines += [
                f"Screen ÷ forward **{c['screen_over_forward']:.2f}×**; audit LRP ÷ screen "
                f"**{c['audit_clean_over_screen']:.2f}×** (clean), **{c['audit_concept_over_screen']:.2f}×** "
                f"(a concept on every image); backward skipped by the screen: "
                f"**{'-' if skipped is None else f'{100 * skipped:.0f} %'}** of its time "
                f"(**{100 * (1 - c['macs_above_layer']):.0f} %** of its multiply-adds: the layers "
                f"above ℓ hold {100 * c['macs_above_layer']:.0f} %).",
                "",
            ]
        else:
            lines += [
                f"Audit ÷ screen **{c['audit_over_screen']:.2f}×**; screen ÷ ONNX prediction "
                f"**{c['screen_over_predict']:.2f}×**.",
                "",
            ]
    if same:
        lines += [
            f"## Screen = audit on the built store (`{meta['store']}`)",
            "",
            "Synthderm test images (every other one with the band-aid), batches of 16; identical: the "
            "same prediction, scores, percentiles, presence and thresholds exactly, relevance shares "
            "within 1e-6 and the same flag decision (default policy: share 0.2 at the bank's FPR).",
            "",
            "| version | images | identical | flagged | a concept present | largest share difference |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['version']} | {r['images']} | {r['identical']} | {r['flagged']} | {r['any_present']} "
            f"| {r['worst_share_gap']:.1e} |"
            for r in same
        ]
        lines.append("")
    lines += [
        "Backward skipped: 1 − (screen − rule forward without graph) / (audit clean − rule forward "
        "with graph). The cost tables use random weights (trained-like BatchNorm statistics). Load "
        f"average when the run started: {meta['load_average'][0]:.2f} on {meta['cpu_count']} CPUs "
        "(the machine is shared with other work: compare ratios within a case). Reproduce: "
        "`python benchmarks/screen.py`" + (f" `--store {meta['store']}`" if meta.get("store") else "") + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = []
    for spec in args.cases:
        cases.append(lrp_case(spec, args.repeats))
        print(json.dumps(cases[-1], indent=1), flush=True)
    if args.engine:
        cases.append(engine_case(args.engine, args.engine_batch, args.repeats))
        print(json.dumps(cases[-1], indent=1), flush=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "store": str(args.store) if args.store else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    same = identity(args.store, args.versions, args.identity_images) if args.store else []
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "cases": cases, "identity": same}, indent=2)
    )
    text = markdown(meta, cases, same)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
