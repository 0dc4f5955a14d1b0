"""The offline audit of one model version: concepts, retrieval, localization and discovery (issue 4).

:func:`run_audit` is the batch job a quality team runs on a model and a dataset with artifact
annotations. It chains the XAI core:

1. **One pass** of the :class:`~models.xai.lrp.Explainer` over the audited samples of the train,
   val and test splits, collecting per image the max-pooled activations φ(x) at every CAV layer,
   the input heatmap of the predicted class and the channel relevance at ℓ (method.md §0 step 2:
   ``cavs_max``, ``hm``, ``rels_max``).
2. **Concepts**: a :class:`~models.xai.concepts.ConceptBank` per CAV layer, fitted on the training
   split (labels from the dataset's artifact membership, inside each concept's class scope,
   method.md §1.1) and calibrated on clean validation images.
3. **Retrieval**: AUROC/AP/Kendall τ of s(x) = ⟨φ(x), v⟩ on the test split (held out) and on
   every audited sample ("all", the authors' optimistic number; method.md §1.5, §11.14).
4. **Localization**: CAV-conditioned heatmaps (initial relevance ReLU(A) ⊙ v at ℓ, method.md §2.1)
   of test images that carry the artifact, binarised (§2.2) and scored by IoU and ρ against the
   ground-truth masks (§2.3), where the dataset has masks.
5. **Discovery** (method.md §6): SpRAy outliers among the input heatmaps of each class (data
   perspective) and outlying channels of the relevance at ℓ (model perspective), each ranked with
   its evidence. Artifacts that the dataset annotates but the audit did not declare are counted
   among the top-ranked outliers: that is how a planted, undeclared shortcut is shown to be found.

The result is an :class:`AuditReport` (frozen), whose :meth:`AuditReport.to_json` is the
``metrics.json`` of the report folder; ``medaudit.cli.report`` renders the rest.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from medaudit.models.data.folder import ImageDataset
from medaudit.models.data.synthetic import LABELS as SYNTH_LABELS
from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
from medaudit.models.errors import ConfigError, InvalidArrayError
from medaudit.models.registry import ModelCfg
from medaudit.models.train import TrainConfig, normalize
from medaudit.models.xai.concepts import CAV_KINDS, ConceptBank, cav_score
from medaudit.models.xai.localize import artifact_relevance_rho, binarize, iou
from medaudit.models.xai.lrp import ConceptTarget, Explainer
from medaudit.models.xai.metrics import RetrievalMetrics, retrieval_metrics
from medaudit.models.xai.reveal import (
    OUTLIER_Z,
    ChannelRanking,
    OutlierRanking,
    channel_outliers,
    downsample,
    spray_outliers,
)

Progress = Callable[[str, int], Callable[[int], None]]
AuditDataset = SynthDerm | ImageDataset

REPORT_FORMAT = "medaudit.audit"
REPORT_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
#: SpRAy shows up to 24 outliers (method.md §6); the acceptance counts hits among them.
TOP_K = 24


#: Per-concept CAV/localization layer where it differs from the architecture's default ℓ; see
#: :func:`default_concept_layers`. Measured on resnet18 at 128 px (demo data config, trained 6
#: epochs), 50 artifact test images per cell, svm CAVs — held-out AUROC / mean IoU:
#:
#: ============  =====================  =====================  =====================
#: concept       identity_0 (32²)       identity_1 (16²)       identity_2 (8²)
#: ============  =====================  =====================  =====================
#: band_aid      1.000 / 0.17           1.000 / 0.27           0.998 / 0.14
#: ruler         –                      0.999 / 0.57           0.991 / 0.20
#: skin_marker   –                      0.972 / 0.13           0.916 / 0.08
#: ============  =====================  =====================  =====================
#:
#: Those figures are synthderm generator 4. Generator 5 (the light beige plaster, see
#: models/data/artifacts.py), default build, all 180 band-aid test images: band_aid at identity_0
#: 1.000 / 0.647, identity_1 1.000 / 0.688, identity_2 1.000 / 0.302.
#:
#: identity_1 wins for every concept. At 128 px its 16×16 grid is the resolution the paper's
#: identity_2 has at 224 px (14×14, method.md §9); identity_2 at 128 px is 8×8, too coarse to
#: outline a ruler, and identity_0 spreads positive relevance over the skin texture.
DEFAULT_CONCEPT_LAYERS: dict[str, str] = {
    "band_aid": "identity_1",
    "ruler": "identity_1",
    "skin_marker": "identity_1",
}


def default_concept_layers(cfg: ModelCfg, artifacts: Sequence[str]) -> dict[str, str]:
    """The built-in per-concept layers that apply to ``cfg``'s hook points and the declared concepts."""
    return {a: ln for a, ln in DEFAULT_CONCEPT_LAYERS.items() if a in artifacts and ln in cfg.hook_points}


@dataclass(frozen=True)
class AuditOptions:
    """Knobs of :func:`run_audit` beyond the model, the data and the concepts.

    Attributes:
        concept_layers: Per-concept CAV/localization layer, overriding ``layer`` (method.md §9
            localizes each artifact at its own layer).
        cav_scope: Per-concept class indices whose samples fit the CAV (method.md §1.1);
            concepts not named use every class.
        max_per_split: Audit at most this many samples of a split (seeded random subset; the
            report says so). Missing splits are audited whole.
        max_localize: At most this many artifact test images per concept for IoU/ρ.
        n_gallery: Top-ranked test samples per concept whose localization the report shows.
        top_k: Outliers per discovery method shown and counted.
        spray_size: Side to which input heatmaps are area-averaged for SpRAy (and stored).
        batch_size: Images per Explainer call.
        target_fpr: False-positive rate of the concept bank's presence threshold.
        seed: Seeds subsampling, CV folds and the spectral embedding.
        discovery_layer: Layer of the channel (model) view; the default layer ℓ when None.
        channel_features: What the channel view clusters: ``"relevance"`` (max-pooled LRP relevance,
            the CRP ``rels_max`` of method.md §6) or ``"activation"`` (max-pooled activations,
            the ``cavs_max`` alternative §6 lists).
        exclude_declared: Run discovery on the samples that carry none of the declared artifacts:
            those are already modelled, and the Reveal step is after what is not.
    """

    concept_layers: Mapping[str, str] = field(default_factory=dict)
    cav_scope: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    max_per_split: Mapping[str, int] = field(default_factory=dict)
    max_localize: int = 200
    n_gallery: int = 6
    top_k: int = TOP_K
    spray_size: int = 32
    batch_size: int = 32
    target_fpr: float = 0.05
    seed: int = 0
    discovery_layer: str | None = None
    channel_features: str = "relevance"
    exclude_declared: bool = True


# ------------------------------------------------------------------------------------------ results


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
class AuditReport:
    """What :func:`run_audit` returns; :meth:`to_json` is ``metrics.json``.

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
        dataset_config: The synthderm config, when the data is synthderm.
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
        return cast(dict[str, Any], _finite(out))

    def to_json(self) -> str:
        """``metrics.json``: every number of the report, NaN written as null."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


# ------------------------------------------------------------------------------------------ data


class _Source:
    """Uniform access to synthderm and image-folder datasets at the model's input size."""

    def __init__(self, dataset: AuditDataset, size: int) -> None:
        self.ds = dataset
        self.size = size
        if isinstance(dataset, SynthDerm):
            self.label_names: tuple[str, ...] = SYNTH_LABELS
            self.has_masks = True
        else:
            self.label_names = tuple(dataset.label_names)
            self.has_masks = (dataset.root / "masks").is_dir()
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        self.split_of = np.asarray(dataset.split_of)
        n = len(self.labels)
        self.membership: dict[str, np.ndarray] = {}
        for art, ids in dataset.artifact_ids("all").items():
            m = np.zeros(n, dtype=bool)
            m[np.asarray(ids, dtype=np.int64)] = True
            self.membership[art] = m

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split_of == split)

    def image(self, i: int) -> np.ndarray:
        if isinstance(self.ds, SynthDerm):
            return _resize(self.ds.sample(i).image, self.size)
        return self.ds.load_image(i, self.size)

    def images(self, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        arr = np.stack([self.image(int(i)) for i in idx])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def mask(self, i: int, artifact: str) -> np.ndarray | None:
        """Ground-truth mask of ``artifact`` in image ``i``; None when the dataset has none."""
        if not self.has_masks:
            return None
        if isinstance(self.ds, SynthDerm):
            m = self.ds.sample(i).masks.get(artifact)
            if m is None:
                return None
            return m if m.shape[0] == self.size else _resize(m.astype(np.uint8) * 255, self.size) > 127
        return self.ds.mask(i, artifact, self.size)

    def carried(self, i: int) -> tuple[str, ...]:
        return tuple(a for a, m in self.membership.items() if m[i])


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    resample = Image.Resampling.NEAREST if img.ndim == 2 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(img).resize((size, size), resample))


@dataclass(frozen=True, eq=False)
class _Collected:
    """What the one Explainer pass gathered, one row per audited sample."""

    index: np.ndarray
    split: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    acts: dict[str, np.ndarray]  # layer -> (N, C) max-pooled activations
    heat: np.ndarray  # (N, s, s) area-averaged predicted-class input heatmaps
    rels_max: np.ndarray  # (N, C) max-pooled relevance at the discovery layer, clamped at 0


def _choose(src: _Source, opts: AuditOptions) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int]]]:
    rng = np.random.default_rng([opts.seed, 0xA0D17])
    chosen, counts = {}, {}
    for split in SPLITS:
        idx = src.indices(split)
        cap = opts.max_per_split.get(split)
        if cap is not None and 0 < cap < len(idx):
            idx = np.sort(rng.choice(idx, size=cap, replace=False))
        chosen[split] = idx
        counts[split] = {"audited": int(len(idx)), "available": int(len(src.indices(split)))}
    return chosen, counts


def _collect(
    explainer: Explainer,
    src: _Source,
    cfg: ModelCfg,
    chosen: Mapping[str, np.ndarray],
    layers: Sequence[str],
    layer: str,
    opts: AuditOptions,
    progress: Progress | None,
) -> _Collected:
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
                normalize(src.images(b), cfg), ["pred"], cav_layers=layers, relevance_layers=[layer]
            )
            for ln in layers:
                acts[ln].append(e.activations[ln].float().numpy())
            preds.append(e.logits.argmax(1).numpy())
            heat.append(downsample(e.heatmaps[0].double().numpy(), opts.spray_size).astype(np.float32))
            r = e.relevance[layer][0]
            rmax = r.clamp(min=0).flatten(2).amax(-1) if r.ndim > 2 else r.clamp(min=0)
            rels.append(rmax.float().numpy())
            if adv:
                adv(len(b))
        idx_all.append(idx)
        split_all.append(np.full(len(idx), split))
    index = np.concatenate(idx_all)
    return _Collected(
        index=index,
        split=np.concatenate(split_all),
        label=src.labels[index],
        pred=np.concatenate(preds),
        acts={ln: np.concatenate(a) for ln, a in acts.items()},
        heat=np.concatenate(heat),
        rels_max=np.concatenate(rels),
    )


# ------------------------------------------------------------------------------------------ audit


def run_audit(
    model: nn.Module,
    cfg: ModelCfg,
    model_version: str,
    dataset: AuditDataset,
    artifacts: Sequence[str] = ("band_aid", "ruler", "skin_marker"),
    layer: str | None = None,
    cav_kind: str = "svm",
    progress: Progress | None = None,
    *,
    options: AuditOptions | None = None,
    dataset_name: str | None = None,
) -> AuditReport:
    """Audits ``model`` on ``dataset`` for the declared ``artifacts`` (see the module docstring).

    Args:
        model: The classifier (eval mode); it is not modified.
        cfg: Its registry config (labels, input size, hook points).
        model_version: ``arch:tag`` the concept banks are keyed by.
        dataset: A :class:`SynthDerm` or an image dataset with artifact annotations.
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
    src = _Source(dataset, cfg.input_size[-1])
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
    chosen, counts = _choose(src, opts)
    for split, c in counts.items():
        if c["audited"] < c["available"]:
            notes.append(
                f"{split}: {c['audited']} of {c['available']} samples audited (seeded random subset, "
                f"seed {opts.seed}) to keep the run short"
            )
    layers = list(dict.fromkeys([layer, *concept_layer.values(), disc_layer]))
    explainer = Explainer(model, cfg)

    t0 = time.perf_counter()
    col = _collect(explainer, src, cfg, chosen, layers, disc_layer, opts, progress)
    timings["explain"] = time.perf_counter() - t0
    accuracy = {
        s: float(np.mean(col.pred[col.split == s] == col.label[col.split == s]))
        for s in SPLITS
        if (col.split == s).any()
    }

    t0 = time.perf_counter()
    banks, scopes = _fit_banks(col, src, arts, concept_layer, cav_kind, model_version, opts, dataset_name)
    timings["fit_cavs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    concepts: dict[str, ConceptAudit] = {}
    for a in arts:
        concepts[a] = _concept_audit(
            a, banks[concept_layer[a]], scopes[a], col, src, explainer, cfg, opts, progress
        )
    timings["retrieval_localization"] = time.perf_counter() - t0
    if not src.has_masks:
        notes.append("the dataset has no artifact masks: localization IoU and ρ are not computed")

    t0 = time.perf_counter()
    discovery = _discover(col, src, arts, disc_layer, explainer, cfg, opts, progress)
    timings["discovery"] = time.perf_counter() - t0

    ds_cfg = dataset.cfg.to_dict() if isinstance(dataset, SynthDerm) else None
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
        dataset_config=ds_cfg,
    )


def _scope(opts: AuditOptions, artifact: str, n_classes: int) -> tuple[int, ...]:
    scope = tuple(opts.cav_scope.get(artifact, range(n_classes)))
    bad = [k for k in scope if not 0 <= k < n_classes]
    if bad or not scope:
        raise ConfigError(f"cav_scope[{artifact!r}] = {scope}: class indices must lie in [0, {n_classes})")
    return scope


def _fit_banks(
    col: _Collected,
    src: _Source,
    arts: Sequence[str],
    concept_layer: Mapping[str, str],
    cav_kind: str,
    model_version: str,
    opts: AuditOptions,
    dataset_name: str | None,
) -> tuple[dict[str, ConceptBank], dict[str, tuple[int, ...]]]:
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


def _concept_audit(
    name: str,
    bank: ConceptBank,
    scope: tuple[int, ...],
    col: _Collected,
    src: _Source,
    explainer: Explainer,
    cfg: ModelCfg,
    opts: AuditOptions,
    progress: Progress | None,
) -> ConceptAudit:
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
    ious, rhos, gallery = [], [], {}
    adv = progress(f"localize {name}", len(todo)) if progress and todo else None
    carrier_set = set(int(i) for i in carriers)
    for b0 in range(0, len(todo), opts.batch_size):
        b = todo[b0 : b0 + opts.batch_size]
        X = src.images(b)
        hm = explainer.explain(normalize(X, cfg), [target], logits=False).heatmaps[0].double().numpy()
        for j, i in enumerate(b):
            h = hm[j]
            mask = binarize(h)
            gt = src.mask(i, name) if src.membership[name][i] else None
            score_iou = None
            if gt is not None and gt.any():
                score_iou = iou(mask, gt)
                if i in carrier_set:
                    ious.append(score_iou)
                    rhos.append(artifact_relevance_rho(h, gt))
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
        threshold=entry.threshold(bank.target_fpr),
        retrieval=retrieval,
        test_scores=t_s,
        test_labels=t_y,
        test_indices=t_idx,
        iou=np.asarray(ious, dtype=np.float64),
        rho=np.asarray(rhos, dtype=np.float64),
        n_localized=len(ious),
        gallery=tuple(gallery[i] for i in gallery_idx if i in gallery),
        note="; ".join(notes),
    )


# ------------------------------------------------------------------------------------------ discovery


def _discover(
    col: _Collected,
    src: _Source,
    arts: Sequence[str],
    layer: str,
    explainer: Explainer,
    cfg: ModelCfg,
    opts: AuditOptions,
    progress: Progress | None,
) -> Discovery:
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
    src: _Source,
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
        hm = explainer.explain(normalize(X, cfg), ["pred"]).heatmaps[0].float().numpy()
        for j, i in enumerate(b):
            images[i] = X[j].permute(1, 2, 0).numpy().copy()
            heatmaps[i] = hm[j]
        if adv:
            adv(len(b))
    return images, heatmaps


# ------------------------------------------------------------------------------------------ planted


def hidden_artifact_config(
    base: TrainConfig, artifact: str = "timestamp", rates: tuple[float, float] = (0.1, 0.0)
) -> TrainConfig:
    """``base`` with ``artifact`` planted at ``rates`` (fraction of benign, malignant) in its data.

    The discovery acceptance experiment: train on this, audit without declaring ``artifact`` and
    count how many top-ranked outliers carry it (:attr:`Discovery.hits`).
    """
    return replace(base, data=base.data.with_spec(**{artifact: rates}))


def train_with_hidden_artifact(
    out_dir: str | Path,
    artifact: str = "timestamp",
    rates: tuple[float, float] = (0.0, 0.1),
    base: TrainConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains (or resumes) the acceptance experiment's model: ``base`` (default: the demo config)
    with ``artifact`` planted at ``rates``; returns its card (see :func:`medaudit.models.train.train`)."""
    from medaudit.models.train import train

    tcfg = hidden_artifact_config(base or TrainConfig(), artifact, rates)
    return train(tcfg, out_dir, cache_dir=cache_dir, progress=progress, log=log)


def synthderm_config_from_dict(d: Mapping[str, Any]) -> SynthDermConfig:
    """The :class:`SynthDermConfig` a ``to_dict()`` (e.g. a checkpoint's ``train_cfg.data``) describes."""
    return SynthDermConfig.from_dict(d)


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
