"""Discovery (method.md §6): planted artifacts in synthetic heatmaps and channel relevances."""

from __future__ import annotations

import numpy as np
import pytest

from medaudit.models.errors import InvalidArrayError
from medaudit.models.xai.reveal import channel_outliers, downsample, spray_outliers


def _blob(size: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def _planted_heatmaps(
    seed: int, n: int = 200, planted: int = 20, size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """A lesion blob at a random central place; ``planted`` of them also carry a corner blob."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size))
    for i in range(n):
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
        maps[i] = _blob(size, cy, cx, 6.0) + 0.01 * rng.random((size, size))
    is_planted = np.zeros(n, dtype=bool)
    is_planted[rng.choice(n, planted, replace=False)] = True
    maps[is_planted] += _blob(size, 6, 6, 4.0)
    return maps, is_planted


def test_spray_ranks_planted_corner_artifacts_first() -> None:
    maps, is_planted = _planted_heatmaps(seed=0)
    ranking = spray_outliers(maps)
    assert is_planted[ranking.top(24)].sum() >= 12
    assert sorted(ranking.indices.tolist()) == list(range(200))
    assert (np.diff(ranking.scores) <= 0).all()
    np.testing.assert_array_equal(ranking.lof[ranking.indices], ranking.scores)
    assert ranking.embedding.shape == (200, 32)


def test_downsample_averages_areas() -> None:
    maps = np.arange(2 * 4 * 4, dtype=np.float64).reshape(2, 4, 4)
    small = downsample(maps, 2)
    assert small.shape == (2, 2, 2)
    assert small[0, 0, 0] == pytest.approx(np.mean([0, 1, 4, 5]))


def test_spray_rejects_too_few_heatmaps() -> None:
    with pytest.raises(InvalidArrayError, match="at least 4"):
        spray_outliers(np.zeros((3, 8, 8)))


def _channel_relevance(
    seed: int, n: int = 300, c: int = 48, n_art: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Three latent features drive 45 channels; the last 3 channels fire only on artifact samples."""
    rng = np.random.default_rng(seed)
    load = np.zeros((3, c))
    for ch in range(c - 3):
        load[ch % 3, ch] = rng.uniform(0.5, 1.5)
    rel = rng.gamma(2.0, 1.0, size=(n, 3)) @ load + 0.1 * rng.random((n, c))
    artifact = np.zeros(n, dtype=bool)
    artifact[rng.choice(n, n_art, replace=False)] = True
    rel[np.ix_(artifact, np.arange(c - 3, c))] += 3.0 * rng.uniform(0.8, 1.2, (n_art, 3))
    rel[:, 5] = 0.0  # a dead channel
    return rel, artifact


def test_channel_outliers_rank_the_artifact_channels_first() -> None:
    rel, artifact = _channel_relevance(seed=0)
    ranking = channel_outliers(rel, rank_by="lof")
    assert set(ranking.channels[:3].tolist()) == {45, 46, 47}
    assert (ranking.cluster_size[:3] == 3).all() and len(set(ranking.cluster[:3].tolist())) == 1
    assert artifact[ranking.top_samples[:3]].all()  # their top samples carry the artifact
    assert ranking.ignored.tolist() == [5] and 5 not in ranking.channels
    assert len(ranking.channels) == 47 and (np.diff(ranking.scores) <= 0).all()


def test_channel_outliers_need_live_channels() -> None:
    with pytest.raises(InvalidArrayError, match="at least 3 channels"):
        channel_outliers(np.zeros((10, 5)))


def test_tail_concentration_finds_a_channel_a_few_samples_drive_among_correlated_activations() -> None:
    """Max-pooled activations: every channel follows one image-wide factor (so all profiles are
    close in cosine distance and cluster together); channel 7 also fires on 4 % of samples."""
    rng = np.random.default_rng(3)
    n, c = 500, 32
    contrast = rng.gamma(4.0, 1.0, size=(n, 1))
    act = contrast * rng.uniform(0.5, 1.5, size=(1, c)) + 0.3 * rng.random((n, c))
    artifact = np.zeros(n, dtype=bool)
    artifact[rng.choice(n, 20, replace=False)] = True
    act[artifact, 7] += 12.0
    ranking = channel_outliers(act, n_top=20)
    assert ranking.rank_by == "tail" and ranking.channels[0] == 7
    assert (np.diff(ranking.scores) <= 0).all() and np.array_equal(ranking.scores, ranking.tail)
    assert artifact[ranking.top_samples[0]].sum() >= 18 and (ranking.top_z[0] > 3.5).all()
    assert (ranking.cluster_size == c).all()  # the clustering alone cannot single it out
    by_lof = channel_outliers(act, n_top=20, rank_by="lof")
    assert np.array_equal(by_lof.scores, by_lof.lof) and (np.diff(by_lof.scores) <= 0).all()
    with pytest.raises(InvalidArrayError, match="rank_by"):
        channel_outliers(act, rank_by="kurtosis")


def test_robust_z_uses_median_and_mad() -> None:
    from medaudit.models.xai.reveal import robust_z

    x = np.array([[1.0, 2.0, 5.0], [2.0, 2.0, 5.0], [3.0, 2.0, 5.0], [10.0, 2.0, 6.0]])
    z = robust_z(x)
    # column 0: median 2.5, MAD 1.0 -> z = (x - 2.5) / 1.4826
    assert np.allclose(z[:, 0], (x[:, 0] - 2.5) / 1.4826)
    assert np.all(z[:, 1] == 0.0)  # constant
    assert np.allclose(z[:, 2], (x[:, 2] - 5.0) / x[:, 2].std())  # MAD 0: the standard deviation
