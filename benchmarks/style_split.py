"""Artifact styles and the band-aid shortcut (issue 23): train the demo's base model on a synthderm
with ``styles`` and measure its band-aid attack drop per band-aid style.

Trains (or resumes) resnet18 with the demo's TrainConfig on ``SynthDermConfig(size, styles)`` into
OUT, then prints the malignant clean→attacked accuracy drop on the test split with the band-aids of
``--eval-styles`` (each style's, pooled over styles the training split has and has not), and with
house band-aids. The per-style concept metrics come from the offline audit of the same model::

    python benchmarks/style_split.py /tmp/styled --size 64 --styles split
    medaudit audit --weights /tmp/styled/model.pt --out /tmp/styled/audit
    python benchmarks/style_split.py /tmp/house --size 64 --styles house --eval-styles split
    medaudit audit --weights /tmp/house/model.pt --dataset "synthderm?size=64&styles=split" \\
        --out /tmp/house/audit_styled

``--report METRICS.json`` renders such an audit's per-style metrics as Markdown instead (with
``--command`` naming what made them); several files (audits of models trained with different
``--seed``) render the seen/unseen rows of each with their median, as
``benchmarks/results/style_split_cpu_128_seeds.md``. One file (with
``--command`` naming what made them), as ``benchmarks/results/style_split_cpu_128.md``::

    python benchmarks/style_split.py /tmp/house128 --size 128 --styles house --eval-styles split
    medaudit audit --weights /tmp/house128/model.pt --dataset "synthderm?size=128&styles=split" \\
        --out /tmp/house128/audit
    python benchmarks/style_split.py benchmarks/results/style_split_cpu_128.md \\
        --report /tmp/house128/audit/metrics.json

Figures (two training seeds, 2-core machine) are in docs/data.md ("Artifacts in many styles").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
from medaudit.models.registry import create_model
from medaudit.models.train import TrainConfig, train


def _predict(model: torch.nn.Module, mcfg: object, X: np.ndarray) -> np.ndarray:
    out = []
    with torch.no_grad():
        for b in range(0, len(X), 100):
            x = torch.from_numpy(X[b : b + 100]).permute(0, 3, 1, 2).contiguous()
            out.append(model(mcfg.normalize(x)).argmax(1).numpy())  # type: ignore[attr-defined]
    return np.concatenate(out)


def drops(weights: Path, data: SynthDermConfig, styles: str) -> dict[str, dict[str, float]]:
    """Malignant accuracy clean / attacked and the drop in points, per band-aid style group."""
    model, mcfg = create_model("resnet18", weights=weights)
    model.eval()
    res: dict[str, dict[str, float]] = {}
    styled = replace(data, styles=styles)
    train_styles = set(SynthDerm(styled).artifact_styles("train").get("band_aid", {}).values())
    for name, cfg in ((styles, styled), ("house", replace(data, styles="house", style_split={}))):
        ds = SynthDerm(cfg)
        Xs, y = ds.variant_arrays("test", ("clean", "attacked"), "band_aid")
        pc, pa = _predict(model, mcfg, Xs["clean"]), _predict(model, mcfg, Xs["attacked"])
        sty = np.array([ds.style_of(int(i), "band_aid") for i in ds.indices("test")])
        groups = {"all": np.ones(len(y), dtype=bool)}
        if name != "house":
            seen = np.isin(sty, sorted(train_styles))
            groups |= {"seen styles": seen, "unseen styles": ~seen}
            groups |= {s: sty == s for s in sorted(set(sty))}
        for g, sel in groups.items():
            m = sel & (y == 1)
            clean, attacked = float((pc[m] == 1).mean()), float((pa[m] == 1).mean())
            res[f"{name}/{g}"] = {
                "n_malignant": int(m.sum()),
                "clean": round(clean, 4),
                "attacked": round(attacked, 4),
                "drop_points": round(100 * (clean - attacked), 1),
            }
    return res


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def render_report(metrics: dict, command: str) -> str:
    """Markdown of an audit's ``metrics.json`` ``styles``: seen/unseen rows, then each style's."""
    st = metrics["styles"]
    lines = [
        f"# Concepts on artifact styles: {metrics['model_version']} on {metrics['dataset']}",
        "",
        f"Command: `{command}`" if command else "",
        "",
        "Held-out test images in each concept's scope. Detection: present at the bank's FPR (the rate at "
        "which a clean image sets off any concept); confusion: another concept present whose artifact the "
        "image lacks. Seen: a style of the training split, which fitted the CAVs. Effect: how far the "
        "artifact moves the model's class probabilities (total variation against the same image "
        "rendered without it); weighted detection: detection weighted by each image's effect.",
        "",
        "| concept | styles | n | detection | AUROC | IoU | confusion | other concepts present "
        "| effect | weighted detection |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for c, g in st["per_concept"].items():
        for r in (g["seen"], g["unseen"], *g["per_style"]):
            other = ", ".join(f"{b} {_pct(v)}" for b, v in (r.get("other_present") or {}).items())
            label = (
                r["style"]
                if r["style"] in ("seen", "unseen")
                else f"{r['style']} ({'seen' if r['seen'] else 'unseen'})"
            )
            lines.append(
                f"| {c} | {label} | {r['n']} | {_pct(r['detection'])} | {_num(r['auroc'])} | "
                f"{_num(r['iou_mean'])} | {_pct(r['confusion'])} | {other} | "
                f"{_num(r.get('effect'))} | {_pct(r.get('detection_weighted'))} |"
            )
    clean = st["clean"]
    per = ", ".join(f"{c} {_pct(v)}" for c, v in clean["present"].items())
    lines += [
        "",
        f"Clean held-out images ({clean['n']}): any concept present on {_pct(clean['any_present'])} ({per}).",
        "",
    ]
    return "\n".join(lines)


#: The seen/unseen metrics :func:`render_seeds` tabulates, with their formatters.
_SEED_COLUMNS = (
    ("detection", _pct),
    ("auroc", _num),
    ("iou_mean", _num),
    ("confusion", _pct),
    ("effect", _num),
    ("detection_weighted", _pct),
)


def render_seeds(runs: list[dict], names: list[str], command: str) -> str:
    """Markdown of several audits' seen/unseen rows: one line per audit and the median per metric."""
    lines = [
        f"# Concepts on artifact styles over {len(runs)} training runs, on {runs[0]['dataset']}",
        "",
        f"Command: `{command}`" if command else "",
        "",
        "Seen and unseen rows of each run's audit (as in the single-run files) and, last, the median "
        "over runs. Clean: any concept present on held-out images without an artifact.",
        "",
        "| concept | styles | run | n | detection | AUROC | IoU | confusion | effect "
        "| weighted detection | clean |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    concepts = list(runs[0]["styles"]["per_concept"])
    clean = [r["styles"]["clean"]["any_present"] for r in runs]
    for c in concepts:
        for group in ("seen", "unseen"):
            rows = [r["styles"]["per_concept"][c][group] for r in runs]
            for name, row, cl in zip(names, rows, clean, strict=True):
                cells = " | ".join(f(row.get(k)) for k, f in _SEED_COLUMNS)
                lines.append(f"| {c} | {group} | {name} | {row['n']} | {cells} | {_pct(cl)} |")
            med = []
            for k, f in _SEED_COLUMNS:
                vals = [row[k] for row in rows if row.get(k) is not None]
                med.append(f"**{f(float(np.median(vals)))}**" if vals else "–")
            mid = _pct(float(np.median(clean)))
            lines.append(f"| {c} | {group} | median | {rows[0]['n']} | {' | '.join(med)} | {mid} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--styles", default="split", help="house, split or all: what the model trains on")
    p.add_argument("--eval-styles", default=None, help="band-aid styles of the attack (default: --styles)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--n-train", type=int, default=SynthDermConfig.n_train)
    p.add_argument(
        "--seed", type=int, default=TrainConfig.seed, help="the training seed (data stay seed 0's)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--report",
        type=Path,
        nargs="+",
        default=None,
        help="audits' metrics.json (one, or one per training run): write OUT as Markdown",
    )
    p.add_argument("--command", default="", help="with --report: the command that made the audit")
    a = p.parse_args()
    if a.report is not None:
        runs = [json.loads(f.read_text()) for f in a.report]
        a.out.write_text(
            render_report(runs[0], a.command)
            if len(runs) == 1
            else render_seeds(runs, [r["model_version"].split(":")[0] for r in runs], a.command)
        )
        print(a.out)
        return
    data = SynthDermConfig(size=a.size, n_train=a.n_train, styles=a.styles)
    load0, t0 = os.getloadavg(), time.perf_counter()
    card = train(TrainConfig(threads=a.threads, epochs=a.epochs, seed=a.seed, data=data), a.out, log=print)
    train_s = time.perf_counter() - t0
    out = {
        "train_s": round(train_s, 1),
        "test": card["test"],
        "attack_drops": drops(a.out / "model.pt", data, a.eval_styles or a.styles),
        "load_start": load0,
        "load_end": os.getloadavg(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
