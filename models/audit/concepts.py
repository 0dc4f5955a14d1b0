"""The declared concepts' part of the audit: CAVs, retrieval and localization.

:func:`fit_banks` fits a :class:`~medaudit.models.xai.concepts.ConceptBank` per CAV layer on the
training split (labels from the dataset's artifact membership inside each concept's class scope,
method.md §1.1), calibrated on clean validation images. :func:`audit_concept` scores retrieval by
AUROC/AP/Kendall τ of s(x) = ⟨φ(x), v⟩ on the held-out test split and on every audited sample
(method.md §1.5, §11.14), and localizes the concept in the test images that carry it:
CAV-conditioned heatmaps (§2.1), binarised (§2.2), scored by IoU and ρ against the ground-truth
masks (§2.3) where the dataset has masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from medaudit.models.audit.collect import Collected
from medaudit.models.audit.options import AuditOptions, Progress
from medaudit.models.audit.results import ConceptAudit, LocalizedSample
from medaudit.models.audit.sources import AuditSource
from medaudit.models.errors import ConfigError
from medaudit.models.registry import ModelCfg
from medaudit.models.xai.concepts import ConceptBank, cav_score
from medaudit.models.xai.localize import artifact_relevance_rho, concept_mask, family_mask_pooling, iou
from medaudit.models.xai.lrp import ConceptTarget, Explainer
from medaudit.models.xai.metrics import RetrievalMetrics, retrieval_metrics


def _scope(opts: AuditOptions, artifact: str, n_classes: int) -> tuple[int, ...]:
    scope = tuple(opts.cav_scope.get(artifact, range(n_classes)))
    bad = [k for k in scope if not 0 <= k < n_classes]
    if bad or not scope:
        raise ConfigError(f"cav_scope[{artifact!r}] = {scope}: class indices must lie in [0, {n_classes})")
    return scope


def fit_banks(
    col: Collected,
    src: AuditSource,
    arts: Sequence[str],
    concept_layer: Mapping[str, str],
    cav_kind: str,
    model_version: str,
    opts: AuditOptions,
    dataset_name: str | None,
) -> tuple[dict[str, ConceptBank], dict[str, tuple[int, ...]]]:
    """One concept bank per layer in ``concept_layer``'s values, and each concept's class scope.

    Raises:
        ConfigError: No clean validation image, a scope outside the classes, or a concept without
            audited training samples of both labels in its scope.
    """
    train = col.split == "train"
    # clean = carries none of the declared artifacts (the audit cannot know the undeclared ones)
    declared = np.zeros(len(col.index), dtype=bool)
    for a in arts:
        declared |= src.membership[a][col.index]
    val_clean = (col.split == "val") & ~declared
    if not val_clean.any():
        raise ConfigError("no clean validation image among the audited samples: cannot calibrate the CAVs")
    scopes = {a: _scope(opts, a, len(src.label_names)) for a in arts}
    banks = {}
    for ln in dict.fromkeys(concept_layer.values()):
        names = [a for a in arts if concept_layer[a] == ln]
        labels = {}
        for a in names:
            t = src.membership[a][col.index[train]].astype(np.int64)
            t[~np.isin(col.label[train], scopes[a])] = -1
            if (t == 1).sum() == 0 or (t == 0).sum() == 0:
                raise ConfigError(
                    f"artifact {a!r} needs audited training samples with and without it in scope "
                    f"{scopes[a]}; has {(t == 1).sum()} with and {(t == 0).sum()} without"
                )
            labels[a] = t
        banks[ln] = ConceptBank.fit(
            model_version,
            ln,
            col.acts[ln][train],
            labels,
            col.acts[ln][val_clean],
            kind=cav_kind,
            dataset=dataset_name or "unspecified",
            seed=opts.seed,
            target_fpr=opts.target_fpr,
            provenance={"pooling": "max", "cav_scope": {a: list(scopes[a]) for a in names}},
        )
    return banks, scopes


def audit_concept(
    name: str,
    bank: ConceptBank,
    scope: tuple[int, ...],
    col: Collected,
    src: AuditSource,
    explainer: Explainer,
    cfg: ModelCfg,
    opts: AuditOptions,
    progress: Progress | None,
) -> ConceptAudit:
    """Retrieval and localization of concept ``name`` of ``bank`` (see the module docstring)."""
    entry = bank[name]
    ln = bank.layer
    s = cav_score(col.acts[ln], entry.v)
    y = src.membership[name][col.index].astype(np.int64)
    in_scope = np.isin(col.label, scope)
    test = (col.split == "test") & in_scope
    retrieval: dict[str, RetrievalMetrics] = {}
    notes = []
    for key, sel in (("held_out", test), ("all", in_scope)):
        if len(np.unique(y[sel])) == 2:
            retrieval[key] = retrieval_metrics(s[sel], y[sel])
        else:
            notes.append(f"no {key} retrieval: the set lacks samples with or without {name}")

    # Localization: test images carrying the artifact (IoU against their masks), plus the
    # top-ranked test images for the gallery, whether they carry it or not.
    t_idx, t_s, t_y = col.index[test], s[test], y[test]
    order = np.argsort(-t_s, kind="stable")
    rank_of = {int(t_idx[j]): r + 1 for r, j in enumerate(order)}
    carriers = t_idx[t_y == 1]
    if len(carriers) > opts.max_localize:
        rng = np.random.default_rng([opts.seed, 0x10C])
        carriers = np.sort(rng.choice(carriers, size=opts.max_localize, replace=False))
        notes.append(f"localization on {opts.max_localize} of {int(t_y.sum())} artifact test images")
    gallery_idx = [int(t_idx[j]) for j in order[: opts.n_gallery]]
    todo = list(dict.fromkeys([*(int(i) for i in carriers), *gallery_idx]))
    target = ConceptTarget(ln, torch.tensor(np.asarray(entry.v), dtype=torch.float32))
    pooling = family_mask_pooling(cfg.canonizer)
    ious, rhos, gallery = [], [], {}
    iou_idx: list[int] = []
    pred_masks: dict[int, np.ndarray] = {}
    adv = progress(f"localize {name}", len(todo)) if progress and todo else None
    carrier_set = set(int(i) for i in carriers)
    for b0 in range(0, len(todo), opts.batch_size):
        b = todo[b0 : b0 + opts.batch_size]
        X = src.images(b)
        hm = explainer.explain(cfg.normalize(X), [target], logits=False).heatmaps[0].double().numpy()
        for j, i in enumerate(b):
            h = hm[j]
            mask = concept_mask(h, X[j].permute(1, 2, 0).numpy(), pooling)
            gt = src.mask(i, name) if src.membership[name][i] else None
            score_iou = None
            if gt is not None and gt.any():
                score_iou = iou(mask, gt)
                if i in carrier_set:
                    ious.append(score_iou)
                    rhos.append(artifact_relevance_rho(h, gt))
                    iou_idx.append(i)
                    pred_masks[i] = mask
            if i in gallery_idx:
                gallery[i] = LocalizedSample(
                    index=i,
                    image=X[j].permute(1, 2, 0).numpy().copy(),
                    heatmap=h.astype(np.float32),
                    mask=mask,
                    gt_mask=gt,
                    score=float(s[col.index == i][0]),
                    rank=rank_of[i],
                    carries=bool(src.membership[name][i]),
                    iou=score_iou,
                )
        if adv:
            adv(len(b))
    return ConceptAudit(
        name=name,
        layer=ln,
        scope=scope,
        cav=entry.cav.meta(),
        threshold=bank.threshold(name),
        retrieval=retrieval,
        test_scores=t_s,
        test_labels=t_y,
        test_indices=t_idx,
        iou=np.asarray(ious, dtype=np.float64),
        rho=np.asarray(rhos, dtype=np.float64),
        n_localized=len(ious),
        gallery=tuple(gallery[i] for i in gallery_idx if i in gallery),
        note="; ".join(notes),
        iou_indices=np.asarray(iou_idx, dtype=np.int64),
        pred_masks=pred_masks,
    )
