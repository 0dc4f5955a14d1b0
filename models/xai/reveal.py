"""Discovery of suspicious samples and channels, the Reveal step (method.md §6).

Two perspectives, both on precomputed arrays:

* data: SpRAy-style outlier samples from input heatmaps (:func:`spray_outliers`);
* model: CRP-style channel relevance-pattern clustering (:func:`channel_outliers`).

Both end in a ranking for a human to inspect; neither decides what an artifact is. UMAP and
t-SNE, which the authors use only to draw a 2-D picture before LOF, are left out: LOF runs on the
spectral embedding (samples) or on the cosine distances (channels) directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering
from sklearn.manifold import SpectralEmbedding
from sklearn.neighbors import LocalOutlierFactor

from models.errors import InvalidArrayError


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
    """Channels ranked by how much their relevance pattern stands apart, most suspicious first.

    Attributes:
        channels: Channel indices, ranked (only channels with some relevance), shape (K,).
        scores: Their LOF outlier factors on cosine distances of relevance profiles.
        cluster: Cluster label of each ranked channel (average-linkage on the same distances).
        cluster_size: Size of that cluster; a small cluster of outlying channels is the typical
            artifact signature (e.g. three band-aid channels, §6).
        relevance: Each ranked channel's mean relevance over samples.
        top_samples: For each ranked channel, the sample indices with the highest relevance on it,
            shape (K, n_top).
        ignored: Channels without any positive relevance, left out of the ranking.
    """

    channels: np.ndarray
    scores: np.ndarray
    cluster: np.ndarray
    cluster_size: np.ndarray
    relevance: np.ndarray
    top_samples: np.ndarray
    ignored: np.ndarray


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
) -> ChannelRanking:
    """Outlying channels by their relevance pattern across samples (method.md §6, CRP clustering).

    1. Clamp relevance at 0 (``rels_max``); drop channels with no positive relevance.
    2. Profile of channel c = its relevance over all samples; cosine similarity between profiles,
       distance D = max(1 − sim, 0).
    3. LOF on D (``metric="precomputed"``) gives the ranking score.
    4. Average-linkage clustering on D, cut at ``distance_threshold``, gives each channel's cluster
       and cluster size: channels that fire together on a small subset of samples (an artifact)
       form a small, tight cluster far from the rest.

    Args:
        channel_relevance: Per-sample channel relevance, (N, C) (max-pooled ``rels_max`` or the
            CRP ``rel`` vector).
        lof_neighbors: k of the LOF (capped at the number of kept channels − 1).
        distance_threshold: Cosine-distance cut of the clustering.
        n_top: How many top samples to list per channel.

    Returns:
        The ranking with its evidence.
    """
    r = np.maximum(np.asarray(channel_relevance, dtype=np.float64), 0.0)
    if r.ndim != 2:
        raise InvalidArrayError(f"channel_relevance must be (N, C); got {r.shape}")
    alive = r.sum(axis=0) > 0
    kept = np.flatnonzero(alive)
    if len(kept) < 3:
        raise InvalidArrayError(f"need at least 3 channels with positive relevance; got {len(kept)}")
    profiles = r[:, kept].T
    unit = profiles / np.linalg.norm(profiles, axis=1, keepdims=True)
    dist = np.maximum(1.0 - unit @ unit.T, 0.0)
    np.fill_diagonal(dist, 0.0)
    lof = _lof(dist, lof_neighbors, precomputed=True)
    labels = AgglomerativeClustering(
        n_clusters=None, metric="precomputed", linkage="average", distance_threshold=distance_threshold
    ).fit_predict(dist)
    sizes = np.bincount(labels)[labels]
    order = np.argsort(-lof, kind="stable")
    top = np.argsort(-r[:, kept[order]], axis=0, kind="stable")[:n_top].T
    return ChannelRanking(
        channels=kept[order],
        scores=lof[order],
        cluster=labels[order],
        cluster_size=sizes[order],
        relevance=r[:, kept[order]].mean(axis=0),
        top_samples=top,
        ignored=np.flatnonzero(~alive),
    )


def _lof(x: np.ndarray, n_neighbors: int, precomputed: bool = False) -> np.ndarray:
    k = max(1, min(n_neighbors, len(x) - 1))
    lof = LocalOutlierFactor(n_neighbors=k, metric="precomputed" if precomputed else "minkowski")
    # Duplicate points make LOF warn about its k-distance; ties are legitimate in relevance data.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Duplicate values.*", category=UserWarning)
        lof.fit(x)
    return -lof.negative_outlier_factor_
