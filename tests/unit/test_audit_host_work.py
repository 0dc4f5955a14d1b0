"""The audit engine moves to the host only what a caller asks for (the GPU path's host work, run
here on the CPU): the class relevance is reduced to channels on the engine's device, overlays
are skipped when not wanted, and neither changes a score, share, mask or heatmap."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from medaudit.models.xai.concepts import relevance_share
from medaudit.service.audit import AuditEngine, _channel_relevance


@pytest.fixture(scope="module")
def engine(tiny_loaded: Any) -> AuditEngine:
    return AuditEngine(tiny_loaded, fpr=0.5)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]


def test_shares_reduced_on_the_device_equal_the_full_relevance_share(
    engine: AuditEngine, images: list[np.ndarray]
) -> None:
    _, x = engine._inputs(images)
    layer = engine.bank.layer
    e = engine.explainer.explain(x, ["pred"], cav_layers=[layer], relevance_layers=[layer], heatmaps=False)
    full = e.relevance[layer][0].detach().double().numpy()
    assert full.ndim == 4
    screened = engine.screen(images)
    for c in engine.bank:
        want = relevance_share(full, engine.bank[c].v)
        got = np.array([next(s for s in r.concepts if s.concept == c).relevance_share for r in screened])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert np.any(want > 0)


def test_channel_relevance_sums_space_in_float64_and_keeps_pooled_input() -> None:
    t = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    out = _channel_relevance(t)
    assert out.dtype == np.float64 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, t.double().numpy().sum(axis=(2, 3)))
    np.testing.assert_array_equal(_channel_relevance(t[:, :, 0, 0]), t[:, :, 0, 0].double().numpy())


def test_an_audit_without_overlays_is_the_same_audit_without_its_pngs(
    engine: AuditEngine, images: list[np.ndarray]
) -> None:
    full = engine.audit(images, raw_heatmap=True)
    bare = engine.audit(images, raw_heatmap=True, overlays=False)
    plain = engine.audit(images, overlays=False)
    assert all(r.heatmap_png for r in full) and not any(r.heatmap_png for r in bare)
    assert any(c.mask_png for r in full for c in r.concepts)  # masks stay: they are asked for
    for f, b, p in zip(full, bare, plain, strict=True):
        assert f.concepts == b.concepts == p.concepts
        assert f.heatmap is not None and b.heatmap is not None and p.heatmap is None
        np.testing.assert_array_equal(f.heatmap, b.heatmap)
        assert f.heatmap.dtype == np.float16
