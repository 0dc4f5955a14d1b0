"""Discovery of suspicious samples and channels, the Reveal step (method.md §6).

Two perspectives, both on precomputed arrays:

* data: SpRAy-style outlier samples from input heatmaps (:func:`spray_outliers`);
* model: CRP-style channel relevance patterns: clustering, LOF and tail concentration
  (:func:`channel_outliers`).

Both end in a ranking for a human to inspect; neither decides what an artifact is. UMAP and
t-SNE, which the authors use only to draw a 2-D picture before LOF, are left out: LOF runs on the
spectral embedding (samples) or on the cosine distances (channels) directly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering
from sklearn.manifold import SpectralEmbedding
from sklearn.neighbors import LocalOutlierFactor

from medaudit.models.errors import InvalidArrayError


@dataclass(frozen=True, eq=False)
class OutlierRanking:
    """Samples ranked by outlier score, most suspicious first.

    Attributes:
        indices: Sample indices into the input, ranked, shape (N,).
        scores: Their LOF outlier factors (−``negative_outlier_factor_``; > 1 is outlying).
        embedding: The spectral embedding of every sample, (N, n_components), in input order.
        lof: The outlier factor of every sample, in input order.
    """

    indices: np.ndarray
    scores: np.ndarray
    embedding: np.ndarray
    lof: np.ndarray

    def top(self, k: int = 24) -> np.ndarray:
        """The k most outlying sample indices (SpRAy shows up to 24, §6)."""
        return self.indices[:k]


@dataclass(frozen=True, eq=False)
class ChannelRanking:
    """Channels ranked by how much their relevance (or activation) pattern stands apart, most
    suspicious first.

    Attributes:
        channels: Channel indices, ranked (only channels with some relevance), shape (K,).
        scores: The ranking score of each ranked channel, descending: its tail concentration
            (``rank_by="tail"``) or its LOF factor (``rank_by="lof"``).
        tail: Tail concentration of each ranked channel: the mean robust z-score of its top
            ``tail_fraction`` of samples (see :func:`channel_outliers`).
        lof: LOF outlier factor of each ranked channel on cosine distances of the profiles.
        cluster: Cluster label of each ranked channel (average-linkage on the same distances).
        cluster_size: Size of that cluster; a small cluster of outlying channels is the typical
            artifact signature (e.g. three band-aid channels, §6).
        relevance: Each ranked channel's mean relevance over samples.
        top_samples: For each ranked channel, the sample indices where it is highest, shape (K, n_top).
        top_z: Their robust z-scores on that channel, shape (K, n_top).
        ignored: Channels without any positive relevance, left out of the ranking.
        rank_by: ``"tail"`` or ``"lof"``.
    """

    channels: np.ndarray
    scores: np.ndarray
    tail: np.ndarray
    lof: np.ndarray
    cluster: np.ndarray
    cluster_size: np.ndarray
    relevance: np.ndarray
    top_samples: np.ndarray
    top_z: np.ndarray
    ignored: np.ndarray
    rank_by: str = "tail"


#: Robust z above which a sample is an outlier on a channel: the modified z-score cut-off of
#: Iglewicz and Hoaglin (1993), 0.6745·(x − median)/MAD > 3.5.
OUTLIER_Z = 3.5


def downsample(heatmaps: np.ndarray, size: int) -> np.ndarray:
    """Area-averages (N, H, W) heatmaps to (N, size, size) (SpRAy preprocessing, §6)."""
    h = np.asarray(heatmaps, dtype=np.float64)
    if h.ndim != 3 or size < 1:
        raise InvalidArrayError(f"heatmaps must be (N, H, W) and size ≥ 1; got {h.shape}, {size}")
    out = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(h))[:, None], size)
    return out[:, 0].numpy()


def spray_outliers(
    heatmaps: np.ndarray,
    *,
    size: int = 32,
    n_neighbors: int = 32,
    n_components: int = 32,
    lof_neighbors: int = 20,
    seed: int = 0,
) -> OutlierRanking:
    """SpRAy outlier samples from input heatmaps (method.md §6, data perspective).

    1. Downsample each heatmap to ``size``×``size`` and flatten.
    2. Normalise each sample by its summed absolute relevance (the authors divide by the plain
       sum, which can be ~0 for heatmaps with negative relevance).
    3. Spectral embedding of the symmetric k-nearest-neighbour graph on Euclidean distances
       (corelay's ``SparseKNN(n_neighbors=32, symmetric=True)`` + ``EigenDecomposition(32)``).
    4. Local outlier factor (``n_neighbors=20``) on the embedding; rank by outlier factor.

    Args:
        heatmaps: Input heatmaps, (N, H, W), N > ``lof_neighbors``.
        size: Side of the downsampled heatmap.
        n_neighbors: k of the affinity graph (capped at N − 1).
        n_components: Embedding dimensions (capped at N − 2).
        lof_neighbors: k of the LOF (capped at N − 1).
        seed: Seeds the eigensolver.

    Returns:
        The ranking, with the embedding and all outlier factors as evidence.
    """
    n = len(heatmaps)
    if n < 4:
        raise InvalidArrayError(f"SpRAy needs at least 4 heatmaps; got {n}")
    x = downsample(heatmaps, size).reshape(n, -1)
    x = x / (np.abs(x).sum(axis=1, keepdims=True) + 1e-12)
    embedder = SpectralEmbedding(
        n_components=min(n_components, n - 2),
        affinity="nearest_neighbors",
        n_neighbors=min(n_neighbors, n - 1),
        random_state=seed,
    )
    # A kNN graph with several components is the interesting case here (a separate cluster of
    # artifact heatmaps); sklearn warns about it, but the embedding still separates them.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Graph is not fully connected", category=UserWarning)
        emb = embedder.fit_transform(x)
    lof = _lof(emb, lof_neighbors)
    order = np.argsort(-lof, kind="stable")
    return OutlierRanking(indices=order, scores=lof[order], embedding=emb, lof=lof)


def channel_outliers(
    channel_relevance: np.ndarray,
    *,
    lof_neighbors: int = 20,
    distance_threshold: float = 0.5,
    n_top: int = 8,
    rank_by: str = "tail",
    tail_fraction: float = 0.01,
) -> ChannelRanking:
    """Outlying channels by their relevance pattern across samples (method.md §6, CRP clustering).

    1. Clamp relevance at 0 (``rels_max``); drop channels with no positive relevance.
    2. Profile of channel c = its relevance over all samples; cosine similarity between profiles,
       distance D = max(1 − sim, 0).
    3. LOF on D (``metric="precomputed"``) and average-linkage clustering on D, cut at
       ``distance_threshold``: channels that fire together on a small subset of samples (an
       artifact) form a small, tight cluster far from the rest.
    4. **Tail concentration**: each sample's robust z-score on the channel,
       (x − median) / (1.4826 · MAD) (the standard deviation where the MAD is 0), and the mean z of
       the channel's top ``tail_fraction`` of samples. A channel that an artifact on a few percent
       of the data drives is near its median on every other sample and far above it on those.
    5. Rank by tail concentration (``rank_by="tail"``, default) or by LOF (``"lof"``).

    Why tail concentration ranks by default: on max-pooled activations, whose profiles all point
    the same way (non-negative, driven by image contrast), cosine distances are small, so the
    clustering puts every channel in one cluster and LOF picks channels that are merely unusual.
    Measured on the discovery acceptance experiment (a timestamp planted in 10 % of malignant
    training images, undeclared; identity_0 activations of the 1,401 samples without a declared
    artifact, 61 of them with the timestamp): the top LOF channels' top samples held 9 of 24
    timestamps, the top tail-concentration channel's 24 of 24 (one cluster of all 64 channels).

    Args:
        channel_relevance: Per-sample channel relevance, (N, C) (max-pooled ``rels_max`` or the
            CRP ``rel`` vector), or activations.
        lof_neighbors: k of the LOF (capped at the number of kept channels − 1).
        distance_threshold: Cosine-distance cut of the clustering.
        n_top: How many top samples to list per channel.
        rank_by: ``"tail"`` or ``"lof"``.
        tail_fraction: Share of samples whose z-scores make a channel's tail concentration
            (at least one sample).

    Returns:
        The ranking with its evidence.
    """
    if rank_by not in ("tail", "lof"):
        raise InvalidArrayError(f"rank_by={rank_by!r}; valid: 'tail', 'lof'")
    r = np.maximum(np.asarray(channel_relevance, dtype=np.float64), 0.0)
    if r.ndim != 2:
        raise InvalidArrayError(f"channel_relevance must be (N, C); got {r.shape}")
    alive = r.sum(axis=0) > 0
    kept = np.flatnonzero(alive)
    if len(kept) < 3:
        raise InvalidArrayError(f"need at least 3 channels with positive relevance; got {len(kept)}")
    x = r[:, kept]
    profiles = x.T
    unit = profiles / np.linalg.norm(profiles, axis=1, keepdims=True)
    dist = np.maximum(1.0 - unit @ unit.T, 0.0)
    np.fill_diagonal(dist, 0.0)
    lof = _lof(dist, lof_neighbors, precomputed=True)
    labels = AgglomerativeClustering(
        n_clusters=None, metric="precomputed", linkage="average", distance_threshold=distance_threshold
    ).fit_predict(dist)
    sizes = np.bincount(labels)[labels]
    z = robust_z(x)
    q = max(1, math.ceil(tail_fraction * len(x)))
    tail = np.sort(z, axis=0)[-q:].mean(axis=0)
    key = tail if rank_by == "tail" else lof
    order = np.argsort(-key, kind="stable")
    n_top = min(n_top, len(x))
    top = np.argsort(-z[:, order], axis=0, kind="stable")[:n_top].T
    return ChannelRanking(
        channels=kept[order],
        scores=key[order],
        tail=tail[order],
        lof=lof[order],
        cluster=labels[order],
        cluster_size=sizes[order],
        relevance=x[:, order].mean(axis=0),
        top_samples=top,
        top_z=np.take_along_axis(z[:, order].T, top, axis=1),
        ignored=np.flatnonzero(~alive),
        rank_by=rank_by,
    )


def robust_z(x: np.ndarray) -> np.ndarray:
    """Per column, (x − median) / (1.4826 · MAD); the standard deviation where the MAD is 0, and
    z = 0 for a constant column."""
    med = np.median(x, axis=0)
    scale = 1.4826 * np.median(np.abs(x - med), axis=0)
    scale = np.where(scale > 0, scale, x.std(axis=0))
    return np.where(scale > 0, (x - med) / np.where(scale > 0, scale, 1.0), 0.0)


def _lof(x: np.ndarray, n_neighbors: int, precomputed: bool = False) -> np.ndarray:
    k = max(1, min(n_neighbors, len(x) - 1))
    lof = LocalOutlierFactor(n_neighbors=k, metric="precomputed" if precomputed else "minkowski")
    # Duplicate points make LOF warn about its k-distance; ties are legitimate in relevance data.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Duplicate values.*", category=UserWarning)
        lof.fit(x)
    return -lof.negative_outlier_factor_
