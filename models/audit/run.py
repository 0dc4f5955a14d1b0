"""The audit run: one model version, one dataset, the declared concepts.

:func:`run_audit` validates the request, explains the audited samples once
(:mod:`~medaudit.models.audit.collect`), audits each declared concept
(:mod:`~medaudit.models.audit.concepts`), runs discovery
(:mod:`~medaudit.models.audit.discovery`) and returns an
:class:`~medaudit.models.audit.results.AuditReport`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medaudit.models.audit.collect import collect
from medaudit.models.audit.concepts import audit_concept, fit_banks
from medaudit.models.audit.discovery import discover
from medaudit.models.audit.options import SPLITS, AuditOptions, Progress
from medaudit.models.audit.results import AuditReport, ConceptAudit
from medaudit.models.audit.sources import AuditSource, choose_samples
from medaudit.models.audit.styles import style_audit
from medaudit.models.data.protocol import AnnotatedDataset
from medaudit.models.errors import ConfigError
from medaudit.models.registry import ModelCfg
from medaudit.models.train import predict
from medaudit.models.xai.concepts import CAV_KINDS
from medaudit.models.xai.lrp import Explainer


def run_audit(
    model: nn.Module,
    cfg: ModelCfg,
    model_version: str,
    dataset: AnnotatedDataset,
    artifacts: Sequence[str] = ("band_aid", "ruler", "skin_marker"),
    layer: str | None = None,
    cav_kind: str = "svm",
    progress: Progress | None = None,
    *,
    options: AuditOptions | None = None,
    dataset_name: str | None = None,
) -> AuditReport:
    """Audits ``model`` on ``dataset`` for the declared ``artifacts`` (see :mod:`medaudit.models.audit`).

    Args:
        model: The classifier (eval mode); it is not modified.
        cfg: Its registry config (labels, input size, hook points).
        model_version: ``arch:tag`` the concept banks are keyed by.
        dataset: Any :class:`~medaudit.models.data.protocol.AnnotatedDataset` (synthderm, a
            folder dataset, ISIC 2019).
        artifacts: Declared concepts; each needs training samples of both labels in scope.
        layer: Default CAV layer ℓ; ``cfg.default_cav_layer`` when None.
        cav_kind: CAV estimator (method.md §1.3: ``svm`` for retrieval and localization).
        progress: ``progress(description, total) -> advance(n)``, called once per long step.
        options: Everything else (:class:`AuditOptions`).
        dataset_name: Name for the report; the dataset's class name by default.

    Returns:
        The report.

    Raises:
        ConfigError: An unknown layer or CAV kind, no artifacts, a label mismatch between model
            and dataset, or too few samples for a step.
    """
    opts = options or AuditOptions()
    layer = layer or cfg.default_cav_layer
    arts = tuple(dict.fromkeys(artifacts))
    if not arts:
        raise ConfigError("declare at least one artifact to audit")
    if cav_kind not in CAV_KINDS:
        raise ConfigError(f"unknown CAV kind {cav_kind!r}; valid: {', '.join(CAV_KINDS)}")
    concept_layer = {a: opts.concept_layers.get(a, layer) for a in arts}
    disc_layer = opts.discovery_layer or layer
    if opts.channel_features not in ("relevance", "activation"):
        raise ConfigError(f"channel_features={opts.channel_features!r}; valid: relevance, activation")
    for name in {layer, disc_layer, *concept_layer.values()}:
        if name not in cfg.hook_points:
            raise ConfigError(f"{cfg.arch} has no hook point {name!r}; valid: {', '.join(cfg.hook_points)}")
    src = AuditSource(dataset, cfg.input_size[-1])
    if len(src.label_names) != cfg.num_classes:
        raise ConfigError(
            f"dataset has {len(src.label_names)} classes {src.label_names}, the model {cfg.num_classes} "
            f"{cfg.labels}"
        )
    unknown = [a for a in arts if a not in src.membership]
    if unknown:
        raise ConfigError(
            f"artifacts {unknown} are not annotated in the dataset; annotated: "
            f"{', '.join(src.membership) or 'none'}"
        )
    timings: dict[str, float] = {}
    notes: list[str] = []
    chosen, counts = choose_samples(src, opts)
    for split, c in counts.items():
        if c["audited"] < c["available"]:
            notes.append(
                f"{split}: {c['audited']} of {c['available']} samples audited (seeded random subset, "
                f"seed {opts.seed}) to keep the run short"
            )
    layers = list(dict.fromkeys([layer, *concept_layer.values(), disc_layer]))
    explainer = Explainer(model, cfg)

    t0 = time.perf_counter()
    col = collect(explainer, src, cfg, chosen, layers, disc_layer, opts, progress)
    timings["explain"] = time.perf_counter() - t0
    accuracy = {
        s: float(np.mean(col.pred[col.split == s] == col.label[col.split == s]))
        for s in SPLITS
        if (col.split == s).any()
    }

    t0 = time.perf_counter()
    banks, scopes = fit_banks(col, src, arts, concept_layer, cav_kind, model_version, opts, dataset_name)
    timings["fit_cavs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    concepts: dict[str, ConceptAudit] = {}
    for a in arts:
        concepts[a] = audit_concept(
            a, banks[concept_layer[a]], scopes[a], col, src, explainer, cfg, opts, progress
        )
    timings["retrieval_localization"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    styles = style_audit(
        dataset,
        src,
        col,
        concepts,
        banks,
        opts,
        lambda x: torch.softmax(predict(model, x, cfg), 1).numpy(),
        progress,
    )
    if styles is not None:  # a dataset that records artifact styles (a styled synthderm)
        timings["styles"] = time.perf_counter() - t0
        if styles.note:
            notes.append(styles.note)
    if not src.has_masks:
        notes.append("the dataset has no artifact masks: localization IoU and ρ are not computed")

    t0 = time.perf_counter()
    discovery = discover(col, src, arts, disc_layer, explainer, cfg, opts, progress)
    timings["discovery"] = time.perf_counter() - t0

    return AuditReport(
        model_version=model_version,
        cfg=cfg,
        dataset=dataset_name or type(dataset).__name__,
        layer=layer,
        cav_kind=cav_kind,
        artifacts=arts,
        splits=counts,
        accuracy=accuracy,
        concepts=concepts,
        discovery=discovery,
        banks=banks,
        timings=timings,
        notes=tuple(notes),
        dataset_config=dataset.config(),
        styles=styles,
    )
