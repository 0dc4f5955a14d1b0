"""What the offline audit returns: frozen result types and ``metrics.json``.

:class:`AuditReport` is :func:`~medaudit.models.audit.run.run_audit`'s result; its
:meth:`AuditReport.to_json` is the ``metrics.json`` of the report folder and
:mod:`medaudit.models.audit.report` renders the rest as one HTML page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from medaudit.models.audit.options import TOP_K
from medaudit.models.registry import ModelCfg
from medaudit.models.xai.concepts import ConceptBank
from medaudit.models.xai.metrics import RetrievalMetrics
from medaudit.models.xai.reveal import ChannelRanking, OutlierRanking

REPORT_FORMAT = "medaudit.audit"
REPORT_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class LocalizedSample:
    """One test image with its concept heatmap and masks, for the report's gallery.

    Attributes:
        index: Dataset index.
        image: H×W×3 uint8 as the model saw it.
        heatmap: CAV-conditioned input heatmap H (method.md §2.1 step 5), H×W float32.
        mask: The binarised localization B (§2.2), H×W uint8.
        gt_mask: The ground-truth artifact mask, H×W bool, or None (no masks / no artifact).
        score: s(x) = ⟨φ(x), v⟩.
        rank: 1-based rank among the test samples by score.
        carries: Whether the dataset says the image carries the concept's artifact.
        iou: IoU(B, gt) when a ground-truth mask exists.
    """

    index: int
    image: np.ndarray
    heatmap: np.ndarray
    mask: np.ndarray
    gt_mask: np.ndarray | None
    score: float
    rank: int
    carries: bool
    iou: float | None


@dataclass(frozen=True, eq=False)
class ConceptAudit:
    """Everything the audit found about one declared concept.

    Attributes:
        name: Artifact name.
        layer: CAV and localization layer.
        scope: Classes whose samples fitted the CAV (method.md §1.1).
        cav: The CAV's metadata (kind, regularisation, CV score, counts).
        threshold: Presence threshold at the bank's target FPR (clean validation scores).
        retrieval: ``{"held_out": ..., "all": ...}`` retrieval metrics (method.md §1.5); a key
            is missing when that set lacks one of the two labels.
        test_scores: s(x) of the audited test samples in scope, for the ROC curve.
        test_labels: Their 0/1 artifact labels.
        test_indices: Their dataset indices.
        iou: Per-sample IoU of the localized test artifact images (empty without masks).
        rho: Per-sample localization ρ (§2.3), same samples.
        n_localized: Artifact test images localized.
        gallery: The top-ranked test samples with heatmaps and masks.
        note: Why a part was skipped, if one was.
    """

    name: str
    layer: str
    scope: tuple[int, ...]
    cav: Mapping[str, Any]
    threshold: float
    retrieval: Mapping[str, RetrievalMetrics]
    test_scores: np.ndarray
    test_labels: np.ndarray
    test_indices: np.ndarray
    iou: np.ndarray
    rho: np.ndarray
    n_localized: int
    gallery: tuple[LocalizedSample, ...]
    note: str = ""
    #: Dataset index of each ``iou`` entry, and the binarised localization of each (per-style
    #: metrics and galleries read them).
    iou_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pred_masks: Mapping[int, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        loc: dict[str, Any] | None = None
        if len(self.iou):
            loc = {
                "n": int(len(self.iou)),
                "iou_mean": float(self.iou.mean()),
                "iou_sem": _sem(self.iou),
                "iou_median": float(np.median(self.iou)),
                "iou_ge_0.5": float(np.mean(self.iou >= 0.5)),
                "rho_mean": float(self.rho.mean()),
                "rho_sem": _sem(self.rho),
            }
        return {
            "layer": self.layer,
            "cav_scope": list(self.scope),
            "cav": dict(self.cav),
            "threshold": self.threshold,
            "retrieval": {k: m.as_dict() for k, m in self.retrieval.items()},
            "localization": loc,
            "note": self.note,
        }


@dataclass(frozen=True, eq=False)
class Outlier:
    """One top-ranked sample of a discovery method, with what makes it suspicious.

    Attributes:
        index: Dataset index.
        rank: 1-based rank in its method's list.
        score: The method's outlier score (LOF factor; > 1 is outlying).
        label: True class index.
        evidence: Short human-readable reason (class and LOF, or channel and cluster).
        artifacts: Artifacts the dataset annotates on this sample (declared or not).
        image: H×W×3 uint8.
        heatmap: Predicted-class input heatmap, H×W float32.
    """

    index: int
    rank: int
    score: float
    label: int
    evidence: str
    artifacts: tuple[str, ...]
    image: np.ndarray
    heatmap: np.ndarray


@dataclass(frozen=True, eq=False)
class Discovery:
    """The two Reveal perspectives (method.md §6).

    Attributes:
        spray: Per class name, the SpRAy ranking over that class's heatmaps; ranking indices are
            positions in ``spray_indices[class]``.
        spray_indices: Per class name, the dataset indices the SpRAy ranking ranks.
        spray_top: The top-k samples over all classes, ranked by LOF factor.
        channels: The channel ranking at ℓ.
        channel_top: The top-k samples of the channel view: the highest-relevance samples of the
            most outlying channels, in channel order, without repeats.
        hits: Per artifact the dataset annotates but the audit did not declare,
            ``{"spray": n, "channels": n}`` of the top-k carrying it.
        base_rate: Per such artifact, its rate among the audited samples (what chance gives).
    """

    spray: Mapping[str, OutlierRanking]
    spray_indices: Mapping[str, np.ndarray]
    spray_top: tuple[Outlier, ...]
    channels: ChannelRanking | None
    channel_top: tuple[Outlier, ...]
    hits: Mapping[str, Mapping[str, int]]
    base_rate: Mapping[str, float]
    top_k: int = TOP_K
    layer: str = ""
    features: str = "relevance"
    note: str = ""


@dataclass(frozen=True, eq=False)
class StyleExample:
    """One held-out image of one artifact style, for the report's per-style gallery.

    Attributes:
        index: Dataset index.
        image: H×W×3 uint8 as the model saw it.
        gt_mask: The artifact's ground-truth mask.
        pred_mask: The binarised CAV-conditioned localization, when the image was localized.
        score: s(x) = ⟨φ(x), v⟩.
        present: Whether the score passes the bank's presence threshold.
        iou: IoU(pred, gt) when localized.
    """

    index: int
    image: np.ndarray
    gt_mask: np.ndarray | None
    pred_mask: np.ndarray | None
    score: float
    present: bool
    iou: float | None


@dataclass(frozen=True, eq=False)
class StyleRow:
    """A concept's metrics on the held-out images of one artifact style (or a group of styles).

    Attributes:
        concept: The concept (artifact).
        style: ``artifact/style``, or ``seen`` / ``unseen`` for a group.
        seen: Whether the style occurs in the training split (the model and the CAV saw it).
        splits: The dataset splits whose images carry the style.
        n: Held-out test images in the concept's scope carrying the artifact in this style.
        detection: Share of them where the concept is present at the bank's FPR.
        auroc: AUROC of their scores against every held-out image in scope without the artifact.
        n_localized: How many of them were localized (the audit's ``max_localize`` subset).
        iou_mean: Mean localization IoU over those.
        confusion: Share where another declared concept is present whose artifact the image
            does not carry.
        other_present: The same per other concept.
        effect: Mean effect of the artifact on the model over them: the total-variation distance
            ½‖p(x) − p(x without it)‖₁ between the class probabilities of each image and of its
            counterfactual without the artifact (datasets that render one); None otherwise.
        detection_weighted: Detection weighted by that effect, Σ eᵢ·presentᵢ / Σ eᵢ: the share
            of the artifact's pull on the model that the concept catches; None when there is no
            effect to weigh.
        gallery: A few of the images with their masks.
    """

    concept: str
    style: str
    seen: bool
    splits: tuple[str, ...]
    n: int
    detection: float | None
    auroc: float | None
    n_localized: int
    iou_mean: float | None
    confusion: float | None
    other_present: Mapping[str, float]
    effect: float | None = None
    detection_weighted: float | None = None
    gallery: tuple[StyleExample, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "style": self.style,
            "seen": self.seen,
            "splits": list(self.splits),
            "n": self.n,
            "detection": self.detection,
            "auroc": self.auroc,
            "n_localized": self.n_localized,
            "iou_mean": self.iou_mean,
            "confusion": self.confusion,
            "other_present": dict(self.other_present),
            "effect": self.effect,
            "detection_weighted": self.detection_weighted,
        }


@dataclass(frozen=True, eq=False)
class StyleAudit:
    """Per-concept metrics per artifact style, seen against unseen (datasets that record styles).

    Attributes:
        groups: Per concept, the ``seen`` and ``unseen`` rows over all their styles' images.
        rows: Per concept, one row per style among its held-out carriers.
        clean_any_present: Share of held-out images carrying no annotated artifact on which any
            declared concept is present.
        clean_present: The same per concept.
        n_clean: Those images.
        note: What was left out.
    """

    groups: Mapping[str, Mapping[str, StyleRow]]
    rows: Mapping[str, tuple[StyleRow, ...]]
    clean_any_present: float | None
    clean_present: Mapping[str, float]
    n_clean: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_concept": {
                c: {
                    **{g: r.as_dict() for g, r in self.groups[c].items()},
                    "per_style": [r.as_dict() for r in self.rows[c]],
                }
                for c in self.rows
            },
            "clean": {
                "n": self.n_clean,
                "any_present": self.clean_any_present,
                "present": dict(self.clean_present),
            },
            "note": self.note,
        }


@dataclass(frozen=True, eq=False)
class AuditReport:
    """What :func:`~medaudit.models.audit.run.run_audit` returns; :meth:`to_json` is ``metrics.json``.

    Attributes:
        model_version: The audited version (``arch:tag``).
        cfg: Its registry config.
        dataset: Dataset name or spec.
        layer: The default CAV layer ℓ (discovery's channel view uses it).
        cav_kind: CAV estimator used for every concept.
        artifacts: The declared concepts, in order.
        splits: Per split, ``{"audited": n, "available": n}``.
        accuracy: Per split, accuracy of the model's predictions on the audited samples.
        concepts: Per declared concept, its audit.
        discovery: The Reveal results.
        banks: The fitted concept banks, one per layer in use.
        timings: Seconds per step.
        notes: Subsampling, skipped parts and other caveats, for the report.
        dataset_config: The dataset's generator config (``AnnotatedDataset.config``), None for
            data read from disk.
        styles: Per-style concept metrics, seen against unseen, where the dataset records each
            image's artifact styles (a styled synthderm); None otherwise, and ``metrics.json``
            then has no ``styles`` key.
    """

    model_version: str
    cfg: ModelCfg
    dataset: str
    layer: str
    cav_kind: str
    artifacts: tuple[str, ...]
    splits: Mapping[str, Mapping[str, int]]
    accuracy: Mapping[str, float]
    concepts: Mapping[str, ConceptAudit]
    discovery: Discovery
    banks: Mapping[str, ConceptBank]
    timings: Mapping[str, float]
    notes: tuple[str, ...] = ()
    dataset_config: Mapping[str, Any] | None = None
    styles: StyleAudit | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.discovery
        labels = self.cfg.labels

        def outliers(items: Sequence[Outlier]) -> list[dict[str, Any]]:
            return [
                {
                    "index": o.index,
                    "rank": o.rank,
                    "score": o.score,
                    "label": labels[o.label] if 0 <= o.label < len(labels) else o.label,
                    "evidence": o.evidence,
                    "artifacts": list(o.artifacts),
                }
                for o in items
            ]

        channels = None
        if d.channels is not None:
            r = d.channels
            channels = [
                {
                    "channel": int(r.channels[i]),
                    "tail_z": float(r.tail[i]),
                    "lof": float(r.lof[i]),
                    "cluster": int(r.cluster[i]),
                    "cluster_size": int(r.cluster_size[i]),
                    "mean_relevance": float(r.relevance[i]),
                    "top_samples": [int(x) for x in r.top_samples[i]],
                }
                for i in range(min(d.top_k, len(r.channels)))
            ]
        out = {
            "format": REPORT_FORMAT,
            "format_version": REPORT_FORMAT_VERSION,
            "model_version": self.model_version,
            "arch": self.cfg.arch,
            "labels": list(labels),
            "input_size": list(self.cfg.input_size),
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "layer": self.layer,
            "cav_kind": self.cav_kind,
            "artifacts": list(self.artifacts),
            "splits": {k: dict(v) for k, v in self.splits.items()},
            "accuracy": dict(self.accuracy),
            "concepts": {name: c.summary() for name, c in self.concepts.items()},
            "discovery": {
                "top_k": d.top_k,
                "spray": {
                    "per_class": {cls: {"n": int(len(self.discovery.spray_indices[cls]))} for cls in d.spray},
                    "top": outliers(d.spray_top),
                },
                "channels": {
                    "layer": d.layer,
                    "features": d.features,
                    "top_channels": channels,
                    "top": outliers(d.channel_top),
                },
                "undeclared_artifact_hits": {a: dict(h) for a, h in d.hits.items()},
                "undeclared_artifact_base_rate": dict(d.base_rate),
                "note": d.note,
            },
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "notes": list(self.notes),
        }
        if self.styles is not None:  # only datasets that record artifact styles
            out["styles"] = self.styles.to_dict()
        return cast(dict[str, Any], _finite(out))

    def to_json(self) -> str:
        """``metrics.json``: every number of the report, NaN written as null."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _sem(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_metrics(report: AuditReport, out_dir: str | Path) -> Path:
    """Writes ``metrics.json`` into ``out_dir`` and returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    path.write_text(report.to_json())
    return path
