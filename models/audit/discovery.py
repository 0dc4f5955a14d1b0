"""Outlier discovery, the Reveal step of the audit (method.md §6).

Two perspectives, each ranked with its evidence: SpRAy outliers among the input heatmaps of each
class (data perspective) and outlying channels of the relevance at the discovery layer (model
perspective). Artifacts that the dataset annotates but the audit did not declare are counted
among the top-ranked outliers: that is how a planted, undeclared shortcut is shown to be found.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medaudit.models.audit.collect import Collected
from medaudit.models.audit.options import AuditOptions, Progress
from medaudit.models.audit.results import Discovery, Outlier
from medaudit.models.audit.sources import AuditSource
from medaudit.models.errors import InvalidArrayError
from medaudit.models.registry import ModelCfg
from medaudit.models.xai.lrp import Explainer
from medaudit.models.xai.reveal import (
    OUTLIER_Z,
    ChannelRanking,
    OutlierRanking,
    channel_outliers,
    spray_outliers,
)


def discover(
    col: Collected,
    src: AuditSource,
    arts: Sequence[str],
    layer: str,
    explainer: Explainer,
    cfg: ModelCfg,
    opts: AuditOptions,
    progress: Progress | None,
) -> Discovery:
    """Both Reveal perspectives over the audited samples in ``col`` (see the module docstring).

    With ``opts.exclude_declared`` only samples carrying none of the declared ``arts`` are
    ranked; ``layer`` is the channel view's layer.
    """
    k = opts.top_k
    notes = []
    pool = np.ones(len(col.index), dtype=bool)
    if opts.exclude_declared:
        for a in arts:
            pool &= ~src.membership[a][col.index]
        notes.append(
            f"discovery ran on the {int(pool.sum())} audited samples that carry none of the declared "
            "artifacts"
        )
    # Data perspective: SpRAy per class (the authors run it on each class's heatmaps, method.md
    # §6), then one list over all classes by outlier factor, since LOF factors are comparable
    # (≈1 inlier, >1 outlier) across runs.
    spray: dict[str, OutlierRanking] = {}
    spray_idx: dict[str, np.ndarray] = {}
    pooled: list[tuple[float, int, str]] = []
    for c, cname in enumerate(src.label_names):
        rows = np.flatnonzero((col.label == c) & pool)
        if len(rows) < 4:
            notes.append(f"SpRAy skipped class {cname}: {len(rows)} samples")
            continue
        r = spray_outliers(col.heat[rows], size=opts.spray_size, seed=opts.seed)
        spray[cname] = r
        spray_idx[cname] = col.index[rows]
        pooled += [
            (float(r.scores[j]), int(col.index[rows[r.indices[j]]]), cname) for j in range(min(k, len(rows)))
        ]
    pooled.sort(key=lambda t: -t[0])
    spray_pick = [(i, sc, f"class {cname}, LOF {sc:.2f}") for sc, i, cname in pooled[:k]]

    # Model perspective: channels ranked by how strongly a few samples drive them (tail
    # concentration, :func:`channel_outliers`); a reviewer looks at the samples that make the top
    # channels outliers (robust z > OUTLIER_Z), the top channel's first, until k are shown.
    ranking: ChannelRanking | None = None
    channel_pick: list[tuple[int, float, str]] = []
    rows = np.flatnonzero(pool)
    feats = col.rels_max if opts.channel_features == "relevance" else col.acts[layer]
    try:
        ranking = channel_outliers(feats[rows], n_top=k)
    except InvalidArrayError as e:
        notes.append(f"channel clustering skipped: {e}")
    if ranking is not None:
        seen: set[int] = set()
        for ci in range(len(ranking.channels)):
            for row, z in zip(ranking.top_samples[ci], ranking.top_z[ci], strict=True):
                i = int(col.index[rows[row]])
                if z > OUTLIER_Z and i not in seen and len(channel_pick) < k:
                    seen.add(i)
                    channel_pick.append(
                        (
                            i,
                            float(z),
                            f"channel {int(ranking.channels[ci])}: z {z:.1f} (tail {ranking.tail[ci]:.1f}, "
                            f"LOF {ranking.lof[ci]:.2f}, cluster of {int(ranking.cluster_size[ci])})",
                        )
                    )
            if len(channel_pick) >= k:
                break

    todo = list(dict.fromkeys(i for i, _, _ in [*spray_pick, *channel_pick]))
    images, heatmaps = _heatmaps(explainer, src, cfg, todo, opts, progress)

    def outliers(pick: Sequence[tuple[int, float, str]]) -> tuple[Outlier, ...]:
        return tuple(
            Outlier(
                index=i,
                rank=r + 1,
                score=sc,
                label=int(src.labels[i]),
                evidence=ev,
                artifacts=src.carried(i),
                image=images[i],
                heatmap=heatmaps[i],
            )
            for r, (i, sc, ev) in enumerate(pick)
        )

    spray_top, channel_top = outliers(spray_pick), outliers(channel_pick)
    undeclared = [a for a, m in src.membership.items() if a not in arts and m[col.index].any()]
    # what a random pick from the pool the methods ranked would give
    base = {a: float(src.membership[a][col.index[pool]].mean()) for a in undeclared}
    hits = {
        a: {
            "spray": sum(a in o.artifacts for o in spray_top),
            "channels": sum(a in o.artifacts for o in channel_top),
        }
        for a in undeclared
    }
    return Discovery(
        spray=spray,
        spray_indices=spray_idx,
        spray_top=spray_top,
        channels=ranking,
        channel_top=channel_top,
        hits=hits,
        base_rate=base,
        top_k=k,
        layer=layer,
        features=opts.channel_features,
        note="; ".join(notes),
    )


def _heatmaps(
    explainer: Explainer,
    src: AuditSource,
    cfg: ModelCfg,
    idx: Sequence[int],
    opts: AuditOptions,
    progress: Progress | None,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Full-resolution predicted-class heatmaps of a few samples (the pass kept them pooled)."""
    images, heatmaps = {}, {}
    adv = progress("heatmaps of outliers", len(idx)) if progress and idx else None
    for b0 in range(0, len(idx), opts.batch_size):
        b = list(idx[b0 : b0 + opts.batch_size])
        X = src.images(b)
        hm = explainer.explain(cfg.normalize(X), ["pred"]).heatmaps[0].float().numpy()
        for j, i in enumerate(b):
            images[i] = X[j].permute(1, 2, 0).numpy().copy()
            heatmaps[i] = hm[j]
        if adv:
            adv(len(b))
    return images, heatmaps
