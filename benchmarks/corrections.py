"""The corrections on the demo build, over fine-tune seeds, and P-ClArC at every layer (issue 24).

A benchmark, not the demo: ``medaudit build`` makes one seed of each correction; this builds
each with several fine-tune seeds (``FinetuneConfig.seed``: batch order, augmentation,
RR-ClArC's random signs) on the same base model, banks and subset, and reports the correction
criteria (:func:`medaudit.models.acceptance.acceptance`) as mean ± sd. The training-free
corrections (P-ClArC, reactive P-ClArC) have no seed; their rows repeat.

``--sweep`` instead runs P-ClArC (and reactive P-ClArC) at every ResNet hook point, each with
its CAV and μ0 fitted there as the build fits them (:func:`medaudit.models.banks.fit_banks`:
counterfactual pairs, μ0 the clean renders' mean; and ``--cav-data membership``: the paper's
artifact vs clean training samples of the artifact's class), and reports attacked-gap recovery,
clean cost and artifact-relevance cut (method.md §7) at each.

    .venv/bin/python benchmarks/corrections.py --out /tmp/b            # 3 seeds, default build
    .venv/bin/python benchmarks/corrections.py --out /tmp/b --sweep    # P-ClArC layer sweep

``--out`` is a build folder (``medaudit build --out``); the base model trained there is reused.
Writes ``benchmarks/results/corrections_cpu.md`` / ``.json`` (``pclarc_layers_cpu`` with
``--sweep``), with the load average, since other processes on the 2 cores change the times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name, write_results  # noqa: E402

CRITERIA = ("gap recovered %", "clean Δ pts", "relevance cut %")
DEFAULT = ("vanilla", "vanilla-ft", "pclarc", "rpclarc", "rrclarc", "rrr")


def _gap(row: dict[str, Any]) -> float | None:
    return next((v for k, v in row.items() if k.endswith(" gap recovered %")), None)


def _cells(row: dict[str, Any]) -> dict[str, float | None]:
    return {
        "gap recovered %": _gap(row),
        "clean Δ pts": row["clean Δ pts"],
        "relevance cut %": row["relevance cut %"],
    }


def seeds(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from medaudit.models.corrections.base import FinetuneConfig
    from medaudit.models.corrections.settings import settings_from_pairs
    from medaudit.models.pipeline import BuildConfig, build

    if args.threads:
        torch.set_num_threads(args.threads)
    runs: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        cfg = BuildConfig(
            corrections=tuple(args.corrections.split(",")),
            finetune=FinetuneConfig(seed=seed),
            settings=settings_from_pairs(args.set),
        )
        t0 = time.perf_counter()
        res = build(cfg, args.out, log=lambda m: print(m, flush=True))
        runs.append(
            {
                "seed": seed,
                "seconds": round(time.perf_counter() - t0, 1),
                "best": res.best,
                "stages": [{"stage": s.stage, "seconds": s.seconds, "reused": s.reused} for s in res.stages],
                "rows": {r["version"]: {**_cells(r), "meets": r["meets criteria"]} for r in res.comparison},
                "settings": {
                    c.version: {"layer": c.correction.get("layer"), **c.correction.get("params", {})}
                    for c in res.cards
                },
            }
        )
        print(f"seed {seed}: {runs[-1]['seconds']} s, best {res.best}", flush=True)
    versions = list(runs[0]["rows"])
    summary = {}
    for v in versions:
        s: dict[str, Any] = {}
        for c in CRITERIA:
            vals = [r["rows"][v][c] for r in runs if r["rows"][v][c] is not None]
            s[c] = {
                "mean": statistics.fmean(vals) if vals else None,
                "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "values": vals,
            }
        s["meets"] = sum(bool(r["rows"][v]["meets"]) for r in runs)
        summary[v] = s
    return {"mode": "seeds", "runs": runs, "summary": summary, "n_seeds": args.seeds}


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from medaudit.models.acceptance import acceptance
    from medaudit.models.banks import fit_banks, load_banks, save_banks
    from medaudit.models.build import correct_and_evaluate
    from medaudit.models.build_data import build_data
    from medaudit.models.corrections import CorrectionData, Original, PClarc, ReactivePClarc
    from medaudit.models.corrections.io import load_version
    from medaudit.models.pipeline import BuildConfig, check_data, stage_key
    from medaudit.models.train import sha256_file

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BuildConfig()
    model_dir = args.out / cfg.model_name
    data = build_data("", cfg.train.data, cfg.train.data.size, model_dir / "cache", cfg.artifact, None)
    focus, scope, _ = check_data(cfg, data)
    model, mcfg, _ = load_version(model_dir / "model.pt")
    Xtr, ytr = data.train()
    layers = args.layers.split(",") if args.layers else list(mcfg.hook_points)
    rates = {cfg.artifact: data.rates(cfg.artifact)}
    rows: list[dict[str, Any]] = []
    work = args.out / "pclarc-sweep"
    for layer in layers:
        for cav_data in args.cav_data.split(","):
            t0 = time.perf_counter()
            # the build's bank stage key: banks a build (or an earlier sweep) fitted are reused
            key = stage_key(
                "banks", sha256_file(model_dir / "model.pt"), data.key(), layer, cfg.artifact, scope,
                list(data.train_membership()), cfg.seed, cfg.target_fpr, cav_data,
            )  # fmt: skip
            banks = load_banks(model_dir / "banks" / key)
            if banks is None:
                banks = fit_banks(
                    model, mcfg, data, layer, Xtr, ytr, artifact=cfg.artifact, scope=scope, cav_data=cav_data,
                    base_tag=f"{cfg.model_name}:vanilla", seed=cfg.seed, target_fpr=cfg.target_fpr,
                    log=lambda m: None,
                )  # fmt: skip
                save_banks(banks, model_dir / "banks" / key, {"key": key, "layer": layer, "scope": scope})
            cd = CorrectionData(
                layer=layer, cav=banks.cav, mu0=banks.mu0, cav_svm=banks.cav_svm, artifact=cfg.artifact
            )
            # the evaluation as the build runs it, at the layer under test (TCAV, retrieval there)
            ev = data.eval_data(
                mcfg, artifact=cfg.artifact, cav=banks.cav, layer=layer, max_artifact_samples=64,
                tcav_class=focus, seed=0,
            )  # fmt: skip
            cards = []
            for corr in (Original(), PClarc(), ReactivePClarc()):
                res = correct_and_evaluate(model, mcfg, corr, cd, ev, work / f"{layer}-{cav_data}")
                cards.append(res.card)
            for r in acceptance(cards, rates, cfg.artifact):
                if r["version"] == "vanilla":
                    continue
                cosine = float(np.dot(banks.cav, banks.cav_svm))
                rows.append(
                    {"layer": layer, "cav_data": cav_data, "version": r["version"], **_cells(r),
                     "meets": r["meets criteria"], "cos(v, v_svm)": cosine,
                     "seconds": round(time.perf_counter() - t0, 1)}
                )  # fmt: skip
                print(rows[-1], flush=True)
    return {"mode": "sweep", "rows": rows}


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    la, lb = m["load_average_before"], m["load_average_after"]
    if res["mode"] == "sweep":
        lines = [
            f"# P-ClArC at every layer of the demo model ({res['date']}, {m['cores']} CPUs)",
            "",
            "Each row: the correction CAV and μ0 fitted at that layer (`paired`: counterfactual renders, μ0 "
            "the clean renders' mean; `membership`: the paper's artifact vs clean training images of the "
            "band-aid's class), criteria against `vanilla` on the demo's test split (malignant attacked-gap "
            "recovery, clean accuracy change, artifact-relevance cut).",
            "",
            "| layer | CAV data | version | malignant gap recovered % | clean Δ pts | relevance cut % "
            "| meets |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        for r in res["rows"]:
            cells = ["–" if r[c] is None else f"{r[c]:.1f}" for c in CRITERIA]
            lines.append(
                f"| {r['layer']} | {r['cav_data']} | {r['version']} | " + " | ".join(cells)
                + f" | {'yes' if r['meets'] else 'no'} |"
            )  # fmt: skip
    else:
        n = res["n_seeds"]
        lines = [
            f"# Corrections on the demo build over {n} fine-tune seeds ({res['date']}, {m['cores']} CPUs)",
            "",
            "Mean ± sd over seeds of the correction criteria against `vanilla` (thresholds: gap recovered "
            "≥ 50 %, clean loss ≤ 3 points, relevance cut ≥ 50 %); *meets*: seeds meeting all three.",
            "",
            "| version | malignant gap recovered % | clean Δ pts | relevance cut % | meets |",
            "|---|---:|---:|---:|---:|",
        ]
        for v, s in res["summary"].items():
            cells = [
                "–" if s[c]["mean"] is None else f"{s[c]['mean']:.1f} ± {s[c]['sd']:.1f}" for c in CRITERIA
            ]
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {s['meets']}/{n} |")
        lines += [
            "",
            "Per seed (gap / clean Δ / cut), the best version by the criteria, and the run's time:",
            "",
        ]
        for r in res["runs"]:
            best = r["best"]
            per = "; ".join(
                f"{v} {'/'.join('–' if x[c] is None else f'{x[c]:.1f}' for c in CRITERIA)}"
                for v, x in r["rows"].items()
                if v != "vanilla"
            )
            lines.append(f"- seed {r['seed']} ({r['seconds']:.0f} s, best {best}): {per}")
        first = res["runs"][0]["settings"]
        lines += ["", "Settings (layer, schedule, λ) of each version:", ""]
        lines += [f"- {v}: `{s}`" for v, s in first.items()]
    lines += [
        "",
        f"Load average (1/5/15 min) before {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, after "
        f"{lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}. Reproduce: `.venv/bin/python benchmarks/corrections.py "
        f"{res['argv']}`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, required=True, help="build folder (the base model is trained or reused there)"
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--corrections", default=",".join(DEFAULT))
    ap.add_argument("--set", action="append", default=[], help="as medaudit build --set, repeatable")
    ap.add_argument("--sweep", action="store_true", help="P-ClArC at every layer instead of the seed study")
    ap.add_argument("--layers", default="", help="--sweep: comma-separated hook points (default: all)")
    ap.add_argument("--cav-data", default="paired,membership", help="--sweep: CAV data, comma-separated")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default="", help="results name (default corrections_cpu / pclarc_layers_cpu)")
    args = ap.parse_args()
    before = os.getloadavg()
    res = sweep(args) if args.sweep else seeds(args)
    res.update(
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        argv=" ".join(sys.argv[1:]),
        machine={"cpu": cpu_name(), "cores": os.cpu_count(), "load_average_before": before,
                 "load_average_after": os.getloadavg()},
    )  # fmt: skip
    name = args.name or ("pclarc_layers_cpu" if args.sweep else "corrections_cpu")
    write_results(ROOT / "benchmarks" / "results" / name, res, report)


if __name__ == "__main__":
    main()
