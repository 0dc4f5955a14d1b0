"""Retrieval metrics for concept scores: AUROC, AP and Kendall's τ (method.md §1.5, §11.14)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import kendalltau
from sklearn.metrics import average_precision_score, roc_auc_score

from medaudit.models.errors import InvalidArrayError


@dataclass(frozen=True)
class RetrievalMetrics:
    """How well a score ranks artifact samples above clean ones (method.md §1.5).

    Attributes:
        auroc: Area under the ROC curve of (labels, scores).
        ap: Average precision.
        kendall_tau: Kendall's τ (τ-b, ties handled) between scores and labels.
        kendall_p: Its two-sided p-value.
        n: Samples evaluated.
        n_pos: Artifact samples among them.
    """

    auroc: float
    ap: float
    kendall_tau: float
    kendall_p: float
    n: int
    n_pos: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def retrieval_metrics(scores: np.ndarray, labels: np.ndarray) -> RetrievalMetrics:
    """AUROC, AP and Kendall's τ of scores against 0/1 artifact labels (method.md §1.5).

    ``roc_auc_score`` gives the same number as the authors' ``roc_curve`` + ``auc``.

    Args:
        scores: Per-sample bias scores, shape (N,); higher means more artifact-like.
        labels: 1 for artifact samples, 0 for clean, shape (N,); both must occur.

    Raises:
        InvalidArrayError: Mismatched shapes, non-finite scores, or a single class.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.shape != s.shape:
        raise InvalidArrayError(f"scores and labels must both be (N,); got {s.shape} and {y.shape}")
    if not np.isfinite(s).all():
        raise InvalidArrayError("scores contain NaN or infinite values")
    if not np.isin(y, (0, 1)).all() or y.min() == y.max():
        raise InvalidArrayError(f"labels must be 0/1 with both present; got values {np.unique(y).tolist()}")
    y = y.astype(np.int64)
    tau = kendalltau(s, y)
    return RetrievalMetrics(
        auroc=float(roc_auc_score(y, s)),
        ap=float(average_precision_score(y, s)),
        kendall_tau=float(tau.statistic),
        kendall_p=float(tau.pvalue),
        n=len(y),
        n_pos=int(y.sum()),
    )


def retrieval_report(
    scores: np.ndarray, labels: np.ndarray, fitted_on: np.ndarray
) -> Mapping[str, RetrievalMetrics]:
    """Retrieval metrics on split "all" and on the held-out samples (method.md §1.5, §11.14).

    The authors report "all", which includes the samples the CAV was fitted on and is therefore
    optimistic; §11.14 asks for a held-out variant alongside.

    Args:
        scores: Bias scores of every sample, shape (N,).
        labels: 0/1 artifact labels, shape (N,).
        fitted_on: Boolean mask, shape (N,): True for samples the CAV was fitted on.

    Returns:
        ``{"all": ..., "held_out": ...}``.
    """
    mask = np.asarray(fitted_on)
    if mask.dtype != np.bool_ or mask.shape != np.shape(scores):
        raise InvalidArrayError(
            f"fitted_on must be a boolean mask shaped like scores {np.shape(scores)}; "
            f"got {mask.dtype} {mask.shape}"
        )
    s, y = np.asarray(scores), np.asarray(labels)
    return {"all": retrieval_metrics(s, y), "held_out": retrieval_metrics(s[~mask], y[~mask])}
