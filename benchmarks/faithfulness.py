"""Benchmark: how faithful each heatmap is, by region perturbation, on synthderm-trained models.

Region perturbation, most relevant first (Samek et al. 2017, "Evaluating the visualization of
what a deep neural network has learned", IEEE TNNLS): the image is cut into r×r regions, ranked by
their summed relevance; the regions are replaced, most relevant first, by uniform noise (the same
noise for every method, so only the order differs) and the explained logit is read after each
step. The area over the perturbation curve,

    AOPC = 1/(L+1) · Σ_{k=0..L} ( f(x⁽⁰⁾) − f(x⁽ᵏ⁾) ),

averaged over images, is larger when the heatmap put first what the model relied on. Contenders:
the engine's LRP (every attention rule for a ViT, the default marked), gradient×input, Integrated
Gradients (captum, zero baseline) and a random ranking.

For each model it also measures the band-aid concept's localization the way ``medaudit audit``
does (method.md §2): an svm CAV on max-pooled training activations at the concept layer, its
concept-conditioned heatmaps on the band-aid test images, binarised (§2.2) and scored by IoU
against the drawn masks (§2.3); and how well the ViT's class heatmaps conserve the logit.

    python benchmarks/faithfulness.py                        # resnet18 + vit_tiny, trained here
    python benchmarks/faithfulness.py --weights resnet18=DIR/out/resnet18-synthderm/model.pt

Models are trained by ``models.train.train`` into ``--work`` (resumed and reused on a second
run); ``--weights arch=PATH`` takes a checkpoint instead. Writes
``benchmarks/results/faithfulness_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="*", default=["resnet18", "vit_tiny_patch16_224"])
    p.add_argument("--weights", nargs="*", default=[], help="arch=PATH: use this checkpoint, do not train")
    p.add_argument("--size", type=int, default=128, help="image size (the demo's: 128)")
    p.add_argument("--n-train", type=int, default=900)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--band-aid",
        type=float,
        nargs=2,
        metavar=("BENIGN", "MALIGNANT"),
        help="band-aid rates per class (synthderm's default 0.5 0.03); a stronger shortcut is "
        "learnt in fewer epochs",
    )
    p.add_argument("--images", type=int, default=32, help="test images perturbed per method")
    p.add_argument("--region", type=int, default=8, help="side of a perturbed region, pixels")
    p.add_argument("--regions", type=int, default=64, help="regions perturbed in all (L)")
    p.add_argument("--per-step", type=int, default=4, help="regions perturbed per curve point")
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--cav-images", type=int, default=400, help="training images the CAV is fitted on")
    p.add_argument("--localize", type=int, default=60, help="band-aid test images localized (IoU)")
    p.add_argument(
        "--shapley",
        type=int,
        default=0,
        help="also localize the first N of those by the authors' ViT method, Shapley value sampling "
        "over SLIC superpixels (method.md §2.4); 0: not run (it costs samples × 100 forwards an image)",
    )
    p.add_argument("--shapley-samples", type=int, default=150, help="Shapley permutations (the paper's: 150)")
    p.add_argument(
        "--composites",
        nargs="*",
        default=[],
        help="composites to compare (models/xai/composite.py COMPOSITES; a ViT's under each attention "
        "rule); default: the family's",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "faithfulness")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="suffix of the result files: faithfulness_cpu<tag>.md")
    return p.parse_args()


def data_config(args: argparse.Namespace) -> Any:
    from medaudit.models.data.synthetic import SynthDermConfig

    n = args.n_train
    cfg = SynthDermConfig(size=args.size, n_train=n, n_val=max(100, n // 4), n_test=max(200, n // 3))
    return cfg.with_spec(band_aid=tuple(args.band_aid)) if args.band_aid else cfg


def trained(arch: str, args: argparse.Namespace, weights: dict[str, str]) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, cfg, how)``: the given checkpoint, or one trained (and cached) in ``--work``."""
    from medaudit.models.registry import create_model
    from medaudit.models.train import TrainConfig, train

    if arch in weights:
        model, cfg = create_model(arch, weights=weights[arch])
        return model.eval(), cfg, {"weights": weights[arch]}
    tcfg = TrainConfig(
        arch=arch, epochs=args.epochs, lr=args.lr, threads=args.threads, data=data_config(args)
    )
    # One folder per training config (threads included: they change what a ViT learns), so a
    # rerun with other settings trains beside a cached model instead of over it.
    key = hashlib.sha256(json.dumps(tcfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    out = args.work / f"{arch}-{args.size}{'-band_aid' if args.band_aid else ''}-{key}"
    print(f"{arch}: model folder {out}", flush=True)
    t0 = time.perf_counter()
    card = train(tcfg, out, cache_dir=args.work / "cache", log=lambda m: print(m, flush=True))
    model, cfg = create_model(arch, weights=out / "model.pt")
    return (
        model.eval(),
        cfg,
        {
            "trained": tcfg.to_dict(),
            "train_seconds": card.get("train_seconds_this_run"),
            "wall_seconds_this_run": round(time.perf_counter() - t0, 1),
            "test": card.get("test"),
        },
    )


def perturbation_curves(
    model: Any, cfg: Any, x01: Any, target: Any, heat: dict[str, Any], args: argparse.Namespace
) -> dict[str, list[float]]:
    """Mean ``f(x⁽⁰⁾) − f(x⁽ᵏ⁾)`` of the target logit per curve point, per method."""
    import torch
    import torch.nn.functional as F

    n, _, size, _ = x01.shape
    r = args.region
    grid = size // r
    noise = torch.rand(x01.shape, generator=torch.Generator().manual_seed(7))
    rows = torch.arange(n)
    steps = list(range(0, args.regions + 1, args.per_step))
    out = {}
    for name, h in heat.items():
        score = F.avg_pool2d(h[:, None].float(), r)[:, 0].flatten(1)  # (n, grid²)
        order = score.argsort(1, descending=True)
        drops = []
        with torch.no_grad():
            f0 = model(cfg.normalize(x01))[rows, target]
            for k in steps:
                keep = torch.ones(n, grid * grid)
                keep[rows[:, None], order[:, :k]] = 0
                m = F.interpolate(keep.reshape(n, 1, grid, grid), scale_factor=r, mode="nearest")
                xk = x01 * m + noise * (1 - m)
                drops.append(float((f0 - model(cfg.normalize(xk))[rows, target]).mean()))
        out[name] = drops
    return out


def lrp_variants(cfg: Any, args: argparse.Namespace) -> list[tuple[str, dict[str, str]]]:
    """``(method name, Explainer keyword arguments)``: every attention rule of a ViT, the chosen
    composites of a CNN (``--composites``), else the engine's default; the default marked."""
    from medaudit.models.xai.composite import ATTENTION_RULES, DEFAULT_ATTENTION, family_composite

    if cfg.canonizer == "vit":  # every attention rule, under each --composites (else the family's)
        family = family_composite("vit")
        composites = args.composites or [family]
        return [
            (
                f"LRP (engine, {a}{'' if c == family and not args.composites else f', {c}'}"
                f"{', default' if (a, c) == (DEFAULT_ATTENTION, family) else ''})",
                {"attention": a, "composite": c},
            )
            for c in composites
            for a in ATTENTION_RULES
        ]
    if not args.composites:
        return [("LRP (engine)", {})]
    default = family_composite(cfg.canonizer)
    return [
        (f"LRP (engine, {c}{', default' if c == default else ''})", {"composite": c}) for c in args.composites
    ]


def heatmaps(
    model: Any, cfg: Any, x01: Any, target: Any, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each method's (n, H, W) heatmap of the target class, and the ViT's conservation figures."""
    import torch

    from medaudit.models.xai import Explainer

    x = cfg.normalize(x01)
    out: dict[str, Any] = {}
    conservation: dict[str, Any] = {}
    for name, kwargs in lrp_variants(cfg, args):
        e = Explainer(model, cfg, **kwargs).explain(x, ["pred"])
        assert torch.equal(e.class_indices[0], target)
        out[name] = e.heatmaps[0]
        sums, logit = e.heatmaps[0].flatten(1).sum(1), e.logits[torch.arange(len(target)), target]
        rel = ((sums - logit).abs() / logit.abs()).double()
        conservation[name] = {
            "median_sum_over_logit": float((sums / logit).double().median()),  # signed: 1 = conserved
            "median_rel_diff_sum_vs_logit": float(rel.median()),
            "mean_rel_diff_sum_vs_logit": float(rel.mean()),
            "max_rel_diff_sum_vs_logit": float(rel.max()),
            "nonzero_fraction": float((e.heatmaps[0] != 0).double().mean()),
        }
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xi)[torch.arange(len(target)), target].sum(), xi)
    out["gradient×input"] = (g * x).sum(1)
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model).attribute(
        x, baselines=0.0, target=target, n_steps=args.ig_steps, internal_batch_size=len(x)
    )
    out[f"Integrated Gradients ({args.ig_steps} steps)"] = ig.sum(1).detach()
    out["random"] = torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(11))
    return out, conservation


def relevance_budget(model: Any, cfg: Any, x01: Any, target: Any) -> dict[str, Any]:
    """Where a ViT's class relevance goes, as median fractions of the logit, per attention rule.

    ``embedding``: at the first block's input (patch tokens + position embedding, with the class
    token in row 0); ``class-token row``: the part on the class token's own stream, which ends at
    a learned parameter, not a pixel; ``pixels``: the input heatmap's sum.
    """
    from dataclasses import replace

    import torch

    from medaudit.models.xai import Explainer
    from medaudit.models.xai.composite import ATTENTION_RULES

    cfg = replace(cfg, hook_points={**cfg.hook_points, "embedding": "pos_sum"})
    out = {}
    for attention in ATTENTION_RULES:
        e = Explainer(model, cfg, attention=attention).explain(
            cfg.normalize(x01), ["pred"], relevance_layers=["embedding"]
        )
        logit = e.logits[torch.arange(len(target)), target].double()
        r = e.relevance["embedding"][0].double()

        def frac(v: Any, logit: Any = logit) -> float:
            return float((v / logit).median())

        out[attention] = {
            "pixels": frac(e.heatmaps[0].double().flatten(1).sum(1)),
            "embedding": frac(r.sum((1, 2))),
            "class-token row": frac(r[:, 0].sum(1)),
            "patch rows": frac(r[:, 1:].sum((1, 2))),
        }
    return out


def localization(
    model: Any, cfg: Any, ds: Any, Xtr: Any, tr_idx: Any, X: Any, te_idx: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Band-aid IoU as ``medaudit audit`` measures it, per attention rule for a ViT."""
    import numpy as np
    import torch

    from medaudit.models.audit.options import default_concept_layers
    from medaudit.models.xai import ConceptTarget, Explainer
    from medaudit.models.xai.cav import fit_cav
    from medaudit.models.xai.localize import (
        artifact_relevance_rho,
        binarize,
        family_mask_pooling,
        iou,
        pool_superpixels,
        superpixels,
    )

    layer = default_concept_layers(cfg, ["band_aid"]).get("band_aid", cfg.default_cav_layer)
    carries = np.zeros(len(ds), dtype=bool)
    carries[ds.artifact_ids("all").get("band_aid", [])] = True
    pick = np.random.default_rng(0).permutation(len(tr_idx))[: args.cav_images]
    explainer = Explainer(model, cfg)
    acts = []
    for b0 in range(0, len(pick), 64):
        xb = cfg.normalize(Xtr[pick[b0 : b0 + 64]])
        acts.append(explainer.explain(xb, ["pred"], cav_layers=[layer]).activations[layer].double().numpy())
    cav = fit_cav(np.concatenate(acts), carries[tr_idx[pick]].astype(np.int64), kind="svm")
    v = torch.tensor(np.asarray(cav.v), dtype=torch.float32)
    rows = [j for j, i in enumerate(te_idx) if carries[i]][: args.localize]
    masks = [ds.mask(int(te_idx[j]), "band_aid", args.size) for j in rows]
    # mean_iou: Otsu on the pixels (method.md §2.2); mean_iou_superpixels: on the heatmap summed
    # over the SLIC superpixels of the authors' ViT features (§2.4); the audit uses the family's.
    pooling = family_mask_pooling(cfg.canonizer)
    out: dict[str, Any] = {"layer": layer, "n": len(rows), "cav": cav.meta(), "audit_mask_pooling": pooling}
    shown: list[tuple[str, Any]] = []  # (variant, first GALLERY heatmaps) for the picture
    per_image: dict[str, list[float]] = {}  # variant -> IoU per image, for the Shapley comparison
    segments = [superpixels(X[j].permute(1, 2, 0).numpy()) for j in rows]
    for _name, kwargs in lrp_variants(cfg, args):
        e = Explainer(model, cfg, **kwargs)
        key = ", ".join(kwargs[k] for k in ("attention", "composite") if k in kwargs) or "engine"
        ious, rhos, pooled = [], [], []
        for b0 in range(0, len(rows), 32):
            xb = cfg.normalize(X[rows[b0 : b0 + 32]])
            hm = e.explain(xb, [ConceptTarget(layer, v)], logits=False).heatmaps[0].double().numpy()
            if b0 == 0:
                shown.append((key, hm[:GALLERY]))
            for i, (h, gt) in enumerate(zip(hm, masks[b0 : b0 + 32], strict=True)):
                ious.append(iou(binarize(h), gt))
                rhos.append(artifact_relevance_rho(h, gt))
                pooled.append(iou(binarize(pool_superpixels(h, segments[b0 + i])), gt))
        out[key] = {
            "mean_iou": float(np.mean(ious)),
            "mean_iou_superpixels": float(np.mean(pooled)),
            "mean_rho": float(np.mean(rhos)),
        }
        out[key]["mean_iou_audit"] = out[key][
            "mean_iou_superpixels" if pooling == "superpixels" else "mean_iou"
        ]
        per_image[key] = pooled if pooling == "superpixels" else ious
    out["gallery"] = gallery(X[rows[:GALLERY]].numpy(), shown, masks[:GALLERY], pooling)
    if args.shapley:
        n = min(args.shapley, len(rows))
        shap = shapley_localization(
            model, cfg, layer, v, X[rows[:n]], masks[:n], segments[:n], args.shapley_samples
        )
        shap["lrp_iou_same_images"] = {k: float(np.mean(ious[:n])) for k, ious in per_image.items()}
        out["shapley"] = shap
    return out


def shapley_localization(
    model: Any,
    cfg: Any,
    layer: str,
    v: Any,
    images: Any,
    masks: list[Any],
    segments: list[Any],
    samples: int,
) -> dict[str, Any]:
    """The authors' ViT localization (method.md §2.4): captum's Shapley value sampling of the CAV
    score ``<φ(x), v>`` (their bias-free linear readout on the concept layer) over SLIC superpixels
    (100 segments, compactness 10, on the uint8 image), baseline 0 in the normalised input (the
    mean colour here, mid-grey in their 0.5/0.5 normalisation); clamped at 0 and summed over
    channels, then binarised and scored like the LRP heatmaps."""
    import numpy as np
    import torch
    from captum.attr import ShapleyValueSampling

    from medaudit.models.features import max_pool_spatial
    from medaudit.models.xai.localize import artifact_relevance_rho, binarize, iou

    store: dict[str, Any] = {}
    hook = model.get_submodule(cfg.hook_points[layer]).register_forward_hook(
        lambda _m, _i, o: store.__setitem__("a", o)
    )

    def score(x: Any) -> Any:
        model(x)
        return max_pool_spatial(store["a"]) @ v

    ious, rhos = [], []
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for img, gt, seg in zip(images, masks, segments, strict=True):
                features = torch.as_tensor(seg)[None, None].repeat(1, 3, 1, 1)
                attr = ShapleyValueSampling(score).attribute(
                    cfg.normalize(img[None]),
                    baselines=0.0,
                    feature_mask=features,
                    n_samples=samples,
                    perturbations_per_eval=32,
                )
                h = attr.clamp(min=0).sum(1)[0].double().numpy()
                ious.append(iou(binarize(h), gt))
                rhos.append(artifact_relevance_rho(h, gt))
    finally:
        hook.remove()
    return {
        "mean_iou": float(np.mean(ious)),
        "mean_rho": float(np.mean(rhos)),
        "images": len(ious),
        "samples": samples,
        "seconds_per_image": round((time.perf_counter() - t0) / max(1, len(ious)), 1),
    }


#: Band-aid test images shown in the localization picture.
GALLERY = 6


def gallery(images: Any, shown: list[tuple[str, Any]], masks: list[Any], pooling: str) -> Any:
    """A (rows, cols) uint8 picture: per image its pixels, then per variant the concept heatmap
    (red positive, blue negative) and the audit's binary mask of it (``pooling``, the family's),
    and last the drawn band-aid mask."""
    import numpy as np

    from medaudit.models.xai.localize import concept_mask

    def colour(h: Any) -> Any:
        h = h / (np.abs(h).max() or 1.0)
        return (np.stack([h.clip(0, 1), np.zeros_like(h), (-h).clip(0, 1)], -1) * 255).astype(np.uint8)

    def grey(m: Any) -> Any:
        return np.repeat((np.asarray(m) > 0)[..., None] * 255, 3, -1).astype(np.uint8)

    rows = []
    for i, img in enumerate(images):
        cells = [np.transpose(img, (1, 2, 0)).astype(np.uint8)]
        for _key, heat in shown:
            cells += [colour(heat[i].astype(np.float64)), grey(concept_mask(heat[i], cells[0], pooling))]
        cells.append(grey(masks[i]))
        rows.append(
            np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cells], 1)
        )
    return np.concatenate(rows, 0)


def run(arch: str, args: argparse.Namespace, weights: dict[str, str]) -> dict[str, Any]:
    import torch

    from medaudit.models.data.synthetic import SynthDerm
    from medaudit.models.train import render_split

    model, cfg, how = trained(arch, args, weights)
    model.requires_grad_(False)
    size = cfg.input_size[-1]
    if size != args.size:
        raise SystemExit(f"{arch} takes {size} px; run with --size {size}")
    ds = SynthDerm(data_config(args))
    cache = args.work / "cache"
    X, _ = render_split(ds, "test", cache_dir=cache)
    Xtr, _ = render_split(ds, "train", cache_dir=cache)
    te_idx, tr_idx = ds.indices("test"), ds.indices("train")
    x01 = X[: args.images].float() / 255
    with torch.no_grad():
        target = model(cfg.normalize(x01)).argmax(1)
    t0 = time.perf_counter()
    heat, conservation = heatmaps(model, cfg, x01, target, args)
    curves = perturbation_curves(model, cfg, x01, target, heat, args)
    aopc = {k: sum(c) / len(c) for k, c in curves.items()}
    loc = localization(model, cfg, ds, Xtr, tr_idx, X, te_idx, args)
    budget = relevance_budget(model, cfg, x01, target) if cfg.canonizer == "vit" else {}
    return {
        "relevance_budget": budget,
        "arch": arch,
        "size": size,
        "model": how,
        "images": len(x01),
        "aopc": aopc,
        "curves": curves,
        "conservation": conservation,
        "localization": loc,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def markdown(info: dict[str, Any], results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["# Heatmap faithfulness: region perturbation, most relevant first (CPU)", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        "",
        f"AOPC over {args.regions} regions of {args.region}×{args.region} px replaced by uniform noise, "
        f"{args.per_step} per step (higher: the heatmap found what the logit depends on first). "
        "Band-aid IoU: svm CAV, concept-conditioned heatmaps binarised as method.md §2.2.",
        "",
    ]
    for r in results:
        lines += [f"## {r['arch']} @ {r['size']} px, {r['images']} test images", ""]
        lines += [f"- model: `{json.dumps(r['model'])}`", ""]
        lines += ["| method | AOPC |", "|---|---:|"]
        for k, v in sorted(r["aopc"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k} | {v:.4f} |")
        lines += ["", "Conservation of the class heatmaps (Σ heatmap vs the explained logit):", ""]
        for k, v in r["conservation"].items():
            lines.append(f"- {k}: " + ", ".join(f"{a} {b:.4f}" for a, b in v.items()))
        if r["relevance_budget"]:
            lines += ["", "Where the class relevance goes (median fraction of the logit):", ""]
            for k, v in r["relevance_budget"].items():
                lines.append(f"- {k}: " + ", ".join(f"{a} {b:.3f}" for a, b in v.items()))
        loc = r["localization"]
        lines += ["", f"Band-aid localization at `{loc['layer']}`, {loc['n']} test images:", ""]
        variants = [k for k, v in loc.items() if isinstance(v, dict) and "mean_iou" in v and k != "shapley"]
        for k in variants:
            v = loc[k]
            pooled = (
                f"; summed over SLIC superpixels first, IoU **{v['mean_iou_superpixels']:.3f}**"
                if "mean_iou_superpixels" in v
                else ""
            )
            lines.append(
                f"- {k}: mean IoU on pixels **{v['mean_iou']:.3f}**, mean ρ {v['mean_rho']:.3f}{pooled}"
            )
        lines.append(
            f"- `medaudit audit` binarises this family's heatmaps on **{loc['audit_mask_pooling']}**."
        )
        if "shapley" in loc:
            sh = loc["shapley"]
            same = "; ".join(f"{k} {x:.3f}" for k, x in sh["lrp_iou_same_images"].items())
            lines += [
                "",
                f"The authors' ViT localization (method.md §2.4: Shapley value sampling over SLIC "
                f"superpixels, {sh['samples']} samples) on the first {sh['images']} of those images: "
                f"mean IoU **{sh['mean_iou']:.3f}**, mean ρ {sh['mean_rho']:.3f} "
                f"({sh['seconds_per_image']} s an image); LRP on the same images, masks as the audit makes "
                f"them: {same}.",
            ]
        lines += [
            "",
            f"![band-aid localization]({png_path(args, r['arch']).name}): per image, the image, then "
            f"for {'; '.join(variants)} the concept heatmap and the audit's binary mask of it "
            f"({loc['audit_mask_pooling']}), last the drawn mask.",
        ]
        lines.append("")
    return "\n".join(lines)


def png_path(args: argparse.Namespace, arch: str) -> Path:
    return args.out / f"faithfulness_cpu{args.tag}_{arch}.png"


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.machine import cpu_name

    torch.set_num_threads(args.threads)
    weights = dict(w.split("=", 1) for w in args.weights)
    info = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
        "command": " ".join(["python benchmarks/faithfulness.py", *sys.argv[1:]]),
    }
    results = []
    for arch in args.archs:
        t0 = time.perf_counter()
        results.append(run(arch, args, weights))
        print(f"{arch}: {time.perf_counter() - t0:.0f} s", flush=True)
    info["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for r in results:  # the localization picture beside the tables (markdown() links it)
        Image.fromarray(r["localization"].pop("gallery")).save(png_path(args, r["arch"]))
    stem = args.out / f"faithfulness_cpu{args.tag}"
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": info, "results": results}, indent=2, default=str)
    )
    text = markdown(info, results, args)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
