"""Per-style concept metrics: does a concept recognise its artifact in looks it never saw?

Where the dataset records each image's artifact style (``styled`` and ``artifact_styles()``: a
synthderm built with ``styles=split``, or data on disk with an ``artifact_styles.json`` beside its
annotations), :func:`style_audit` reads, per declared concept and per style among the held-out
test images that carry the artifact (in the concept's class scope; a carrier with no style on file
is in no style's row):

* **detection**: the share on which the concept is present, s(x) > the bank's threshold at its
  target FPR (method.md §1.4);
* **AUROC** of their scores against every held-out image in scope without the artifact;
* **localization IoU**, mean over those of them the audit localized (its ``max_localize`` subset);
* **confusion**: the share on which another declared concept is present whose artifact the image
  does not carry;
* **effect** (datasets that render an image without one of its artifacts: synthderm's
  ``without``): how far the artifact moves the model, the total-variation distance
  ½‖p(x) − p(x without it)‖₁ of the class probabilities, averaged; and **effect-weighted
  detection**, Σ eᵢ·presentᵢ / Σ eᵢ, the share of that pull the concept catches. The CAVs read the
  audited model's own features (method.md §1.1), so a style the model hardly reacts to may stay
  below the threshold without hiding a shortcut; a style it reacts to should not.

A style is *seen* when images of the training split carry it (the model trained on them and the
CAV was fitted on them) and *unseen* otherwise; the ``seen`` and ``unseen`` rows pool the styles of
each kind. Clean held-out images (no annotated artifact) give the rate at which any concept fires
where there is nothing to find. Each style keeps a few images with their masks for the report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from medaudit.models.audit.collect import Collected
from medaudit.models.audit.options import AuditOptions, Progress
from medaudit.models.audit.results import ConceptAudit, StyleAudit, StyleExample, StyleRow
from medaudit.models.audit.sources import AuditSource
from medaudit.models.data.protocol import AnnotatedDataset
from medaudit.models.xai.concepts import ConceptBank, cav_score
from medaudit.models.xai.localize import iou

#: Images per style in the report's gallery.
STYLE_GALLERY = 3
#: Images per forward when measuring effects.
_EFFECT_BATCH = 64

#: Class probabilities of uint8 (N, 3, H, W) images, (N, K).
Probs = Callable[[torch.Tensor], np.ndarray]


def dataset_styles(dataset: AnnotatedDataset) -> dict[str, dict[int, str]] | None:
    """``{artifact: {index: style}}`` of a dataset that records artifact styles; None otherwise."""
    fn = getattr(dataset, "artifact_styles", None)
    if not getattr(dataset, "styled", False) or not callable(fn):
        return None
    styles: dict[str, dict[int, str]] = fn("all")
    return styles


@dataclass(frozen=True, eq=False)
class _Concept:
    """One concept's arrays over the collected samples, for its rows."""

    name: str
    score: np.ndarray
    present: np.ndarray
    negatives: np.ndarray  # held-out, in scope, without the artifact
    confused: np.ndarray  # another concept present whose artifact the sample lacks
    other_present: Mapping[str, np.ndarray]  # per other concept: present & not carried, where not carried
    not_carried: Mapping[str, np.ndarray]
    loc_iou: Mapping[int, float]
    effect: Mapping[int, float]  # dataset index -> the artifact's effect on the model


def artifact_effects(
    dataset: AnnotatedDataset,
    src: AuditSource,
    col: Collected,
    names: Sequence[str],
    probs: Probs,
    progress: Progress | None = None,
) -> dict[str, dict[int, float]]:
    """Per concept, ``{index: ½‖p(x) − p(x without the artifact)‖₁}`` over the audited held-out
    test images carrying it; empty when the dataset cannot render an image without one artifact."""
    without = getattr(dataset, "without", None)
    if not callable(without):
        return {}
    test = col.split == "test"
    carriers = {a: [int(i) for i in col.index[test & src.membership[a][col.index]]] for a in names}
    union = sorted({i for idx in carriers.values() for i in idx})
    total = len(union) + sum(len(idx) for idx in carriers.values())
    adv = progress("artifact effects", total) if progress else None
    natural = dict(zip(union, _batched(probs, union, src.images, adv), strict=True))
    out: dict[str, dict[int, float]] = {}
    for a, idx in carriers.items():

        def counterfactuals(b: Sequence[int], a: str = a) -> torch.Tensor:
            arr = np.stack([without(i, a, src.size) for i in b])
            return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

        cf = _batched(probs, idx, counterfactuals, adv)
        out[a] = {i: 0.5 * float(np.abs(natural[i] - p).sum()) for i, p in zip(idx, cf, strict=True)}
    return out


def _batched(
    probs: Probs,
    idx: Sequence[int],
    images: Callable[[Sequence[int]], torch.Tensor],
    adv: Callable[[int], None] | None,
) -> list[np.ndarray]:
    rows: list[np.ndarray] = []
    for s in range(0, len(idx), _EFFECT_BATCH):
        b = idx[s : s + _EFFECT_BATCH]
        rows.extend(probs(images(b)))
        if adv:
            adv(len(b))
    return rows


def style_audit(
    dataset: AnnotatedDataset,
    src: AuditSource,
    col: Collected,
    concepts: Mapping[str, ConceptAudit],
    banks: Mapping[str, ConceptBank],
    opts: AuditOptions,
    probs: Probs | None = None,
    progress: Progress | None = None,
) -> StyleAudit | None:
    """Per-style metrics of every audited concept (see the module docstring); None when the
    dataset records no styles. ``probs`` (the audited model's class probabilities) adds the
    artifacts' effects."""
    styles = dataset_styles(dataset)
    if styles is None:
        return None
    effects = artifact_effects(dataset, src, col, list(concepts), probs, progress) if probs else {}
    split_of = {s: set(int(i) for i in src.indices(s)) for s in ("train", "val", "test")}
    test = col.split == "test"
    scores, present = {}, {}
    for name, c in concepts.items():
        bank = banks[c.layer]
        scores[name] = cav_score(col.acts[c.layer], bank[name].v)
        present[name] = scores[name] > bank.threshold(name)
    carries = {a: src.membership[a][col.index] for a in concepts}
    groups: dict[str, dict[str, StyleRow]] = {}
    rows: dict[str, tuple[StyleRow, ...]] = {}
    for name, c in concepts.items():
        art_styles = styles.get(name, {})
        seen = {s for i, s in art_styles.items() if i in split_of["train"]}
        where = {
            s: tuple(sp for sp in ("train", "val", "test") if any(i in split_of[sp] for i in ids))
            for s, ids in _by_style(art_styles).items()
        }
        in_scope = test & np.isin(col.label, c.scope)
        pos = in_scope & carries[name]
        others = [b for b in concepts if b != name]
        confused = np.zeros(len(col.index), dtype=bool)
        for b in others:
            confused |= present[b] & ~carries[b]
        ctx = _Concept(
            name=name,
            score=scores[name],
            present=present[name],
            negatives=in_scope & ~carries[name],
            confused=confused,
            other_present={b: present[b] for b in others},
            not_carried={b: ~carries[b] for b in others},
            loc_iou=dict(zip((int(i) for i in c.iou_indices), (float(x) for x in c.iou), strict=True)),
            effect=effects.get(name, {}),
        )
        style_of = np.array([art_styles.get(int(i), "") for i in col.index])
        pos &= style_of != ""  # a carrier whose look is not on file is in no style's row
        per_style = []
        for sty in sorted({str(s) for s in style_of[pos]}):
            sel = pos & (style_of == sty)
            gallery = _gallery(src, c, [int(i) for i in col.index[sel]], ctx, col)
            per_style.append(
                replace(_row(ctx, col, sty, sel, sty in seen, where.get(sty, ())), gallery=gallery)
            )
        rows[name] = tuple(per_style)
        seen_sel = pos & np.isin(style_of, sorted(seen))
        groups[name] = {
            "seen": _row(ctx, col, "seen", seen_sel, True, ()),
            "unseen": _row(ctx, col, "unseen", pos & ~seen_sel, False, ()),
        }
    any_art = np.zeros(len(col.index), dtype=bool)
    for m in src.membership.values():
        any_art |= m[col.index]
    clean = test & ~any_art
    fired = np.zeros(len(col.index), dtype=bool)
    for p in present.values():
        fired |= p
    n_clean = int(clean.sum())
    partial = any("localization on" in c.note for c in concepts.values())  # max_localize subsampled
    return StyleAudit(
        groups=groups,
        rows=rows,
        clean_any_present=float(fired[clean].mean()) if n_clean else None,
        clean_present={n: float(p[clean].mean()) for n, p in present.items()} if n_clean else {},
        n_clean=n_clean,
        note=f"per-style IoU over at most {opts.max_localize} localized images per concept"
        if partial
        else "",
    )


def _row(
    ctx: _Concept, col: Collected, label: str, sel: np.ndarray, seen: bool, splits: tuple[str, ...]
) -> StyleRow:
    n = int(sel.sum())
    ious = [ctx.loc_iou[int(i)] for i in col.index[sel] if int(i) in ctx.loc_iou]
    other = {
        b: float(np.mean(p[sel & ctx.not_carried[b]]))
        for b, p in ctx.other_present.items()
        if (sel & ctx.not_carried[b]).any()
    }
    eff = [
        (ctx.effect[int(i)], bool(p))
        for i, p in zip(col.index[sel], ctx.present[sel], strict=True)
        if int(i) in ctx.effect
    ]
    total = sum(e for e, _ in eff)
    return StyleRow(
        concept=ctx.name,
        style=label,
        seen=seen,
        splits=splits,
        n=n,
        detection=float(np.mean(ctx.present[sel])) if n else None,
        auroc=_auroc(ctx.score[sel], ctx.score[ctx.negatives]),
        n_localized=len(ious),
        iou_mean=float(np.mean(ious)) if ious else None,
        confusion=float(np.mean(ctx.confused[sel])) if n and ctx.other_present else None,
        other_present=other,
        effect=float(np.mean([e for e, _ in eff])) if eff else None,
        detection_weighted=sum(e for e, p in eff if p) / total if total > 0 else None,
    )


def _by_style(styles: Mapping[int, str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, s in styles.items():
        out.setdefault(s, []).append(int(i))
    return out


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    if len(pos) == 0 or len(neg) == 0:
        return None
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(roc_auc_score(y, np.r_[pos, neg]))


def _gallery(
    src: AuditSource, c: ConceptAudit, idx: Sequence[int], ctx: _Concept, col: Collected
) -> tuple[StyleExample, ...]:
    """Up to :data:`STYLE_GALLERY` of the style's images, localized ones first."""
    chosen = sorted(idx, key=lambda i: (i not in c.pred_masks, i))[:STYLE_GALLERY]
    if not chosen:
        return ()
    X = src.images(chosen).permute(0, 2, 3, 1).numpy()
    pos = {int(i): j for j, i in enumerate(col.index)}
    out = []
    for k, i in enumerate(chosen):
        gt = src.mask(i, ctx.name)
        pred = c.pred_masks.get(i)
        out.append(
            StyleExample(
                index=i,
                image=X[k].copy(),
                gt_mask=gt,
                pred_mask=pred,
                score=float(ctx.score[pos[i]]),
                present=bool(ctx.present[pos[i]]),
                iou=iou(pred, gt) if pred is not None and gt is not None and gt.any() else None,
            )
        )
    return tuple(out)
