"""The audit's one Explainer pass over the audited samples (method.md §0 step 2).

Per image it keeps the max-pooled activations φ(x) at every CAV layer (``cavs_max``), the
predicted-class input heatmap, area-averaged for SpRAy (``hm``), and the max-pooled relevance at
the discovery layer, clamped at 0 (``rels_max``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medaudit.models.audit.options import SPLITS, AuditOptions, Progress
from medaudit.models.audit.sources import AuditSource
from medaudit.models.features import max_pool_spatial
from medaudit.models.registry import ModelCfg
from medaudit.models.xai.lrp import Explainer
from medaudit.models.xai.reveal import downsample


@dataclass(frozen=True, eq=False)
class Collected:
    """What the one Explainer pass gathered, one row per audited sample."""

    index: np.ndarray
    split: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    acts: dict[str, np.ndarray]  # layer -> (N, C) max-pooled activations
    heat: np.ndarray  # (N, s, s) area-averaged predicted-class input heatmaps
    rels_max: np.ndarray  # (N, C) max-pooled relevance at the discovery layer, clamped at 0


def collect(
    explainer: Explainer,
    src: AuditSource,
    cfg: ModelCfg,
    chosen: Mapping[str, np.ndarray],
    layers: Sequence[str],
    layer: str,
    opts: AuditOptions,
    progress: Progress | None,
) -> Collected:
    """Explains the ``chosen`` samples split by split, ``opts.batch_size`` images per call.

    Args:
        explainer: The audited model's explainer.
        src: The dataset.
        cfg: The model's registry config (input normalisation).
        chosen: Audited indices per split (:func:`~medaudit.models.audit.sources.choose_samples`).
        layers: Layers whose φ(x) is kept.
        layer: The discovery layer, whose relevance is kept.
        opts: Batch size and SpRAy heatmap size.
        progress: Called once per split.
    """
    idx_all, split_all, preds = [], [], []
    acts: dict[str, list[np.ndarray]] = {ln: [] for ln in layers}
    heat, rels = [], []
    for split in SPLITS:
        idx = chosen[split]
        if len(idx) == 0:
            continue
        adv = progress(f"explain {split}", len(idx)) if progress else None
        for s in range(0, len(idx), opts.batch_size):
            b = idx[s : s + opts.batch_size]
            e = explainer.explain(
                cfg.normalize(src.images(b)), ["pred"], cav_layers=layers, relevance_layers=[layer]
            )
            for ln in layers:
                acts[ln].append(e.activations[ln].float().numpy())
            preds.append(e.logits.argmax(1).numpy())
            heat.append(downsample(e.heatmaps[0].double().numpy(), opts.spray_size).astype(np.float32))
            r = e.relevance[layer][0]
            rels.append(max_pool_spatial(r.clamp(min=0)).float().numpy())
            if adv:
                adv(len(b))
        idx_all.append(idx)
        split_all.append(np.full(len(idx), split))
    index = np.concatenate(idx_all)
    return Collected(
        index=index,
        split=np.concatenate(split_all),
        label=src.labels[index],
        pred=np.concatenate(preds),
        acts={ln: np.concatenate(a) for ln, a in acts.items()},
        heat=np.concatenate(heat),
        rels_max=np.concatenate(rels),
    )
