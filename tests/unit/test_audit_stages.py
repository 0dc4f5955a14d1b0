"""The audit's device stage and host stage (service/audit_stages.py, service/audit_graphs.py), on
the CPU: the same code the GPU path runs, checked against the numpy path it replaces.

* the overlay blended in torch is the numpy overlay, pixel for pixel, and an audit's JSON (its
  overlay and mask PNGs, float16 heatmaps, scores) is byte-for-byte what the engine answered before
  the stages were split (:func:`reference_audit`, that engine's code, on the same LRP calls);
* concept scores on the device agree with the bank's numpy scores (presence and percentiles
  exactly, scores and shares to float64 rounding);
* the fixed-shape screen (cut into buckets, padded, pad rows dropped) gives the plain screen's
  results, and asking for CUDA graphs on the CPU picks the plain path with its reason.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from medaudit.models.xai.concepts import relevance_share
from medaudit.models.xai.localize import binarize, concept_mask
from medaudit.models.xai.lrp import ConceptTarget
from medaudit.service.audit import AuditEngine, AuditResult, ConceptScore, _numpy, png_base64, predictions
from medaudit.service.audit_graphs import FixedShapeScreen, choose, chunks, pad_rows
from medaudit.service.audit_stages import overlay, overlay_pixels


@pytest.fixture(scope="module")
def engine(tiny_loaded: Any) -> AuditEngine:
    return AuditEngine(tiny_loaded, fpr=0.5, ort_threads=1)  # FPR 0.5: some concepts present


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(7)]
    return noise + [np.full((32, 32, 3), v, dtype=np.uint8) for v in (0, 128, 255)]


def reference_audit(eng: AuditEngine, images: list[np.ndarray], raw_heatmap: bool) -> list[AuditResult]:
    """``AuditEngine.audit`` as it was before the device and host stages (commit 8acc14a): numpy
    scoring between the forward and the backward, the float64 heatmap on the host, the numpy
    overlay, masks binarised per image."""
    rgb, x = eng._inputs(images)
    layer, names = eng.bank.layer, list(eng.bank)
    chosen: dict[str, Any] = {}

    def first_present(pooled: torch.Tensor) -> torch.Tensor:
        scores = eng.bank.score(pooled.double().cpu().numpy(), eng.fpr)
        present = np.stack([np.asarray(scores[c].present, dtype=bool) for c in names])
        pick = np.where(present.any(0), present.argmax(0), -1)
        chosen.update(scores=scores, pick=pick)
        return eng._seed_rows[torch.as_tensor(pick)]

    e = eng.explainer.explain(
        x, ["pred", ConceptTarget(layer, first_present)], cav_layers=[layer], relevance_layers=[layer]
    )
    scores, pick = chosen["scores"], chosen["pick"]
    preds = predictions(_numpy(e.logits), eng.cfg.labels, eng.version)
    pooled = _numpy(e.activations[layer])
    class_rel = e.relevance[layer][0].detach().to(torch.float64).sum(dim=(2, 3)).numpy()
    shares = {c: relevance_share(class_rel, eng.bank[c].v) for c in names}
    heat = _numpy(e.heatmaps[0])
    masks: dict[tuple[int, str], str] = {}
    seeded = _numpy(e.heatmaps[1])
    for b, k in enumerate(pick):
        if k >= 0:
            masks[(b, names[k])] = png_base64(binarize(seeded[b]) * 255)
    pairs = [
        (int(b), c)
        for c in names
        for b in np.flatnonzero(np.asarray(scores[c].present, dtype=bool))
        if (int(b), c) not in masks
    ]
    if pairs:
        target = ConceptTarget(layer, torch.stack([eng._cavs[c] for _, c in pairs]))
        rows = torch.as_tensor([b for b, _ in pairs])
        more = _numpy(eng.explainer.explain(x[rows], [target], logits=False).heatmaps[0])
        masks.update({p: png_base64(binarize(more[i]) * 255) for i, p in enumerate(pairs)})
    return [
        AuditResult(
            prediction=pred,
            heatmap_png=png_base64(overlay(rgb[b], heat[b])),
            concepts=tuple(
                ConceptScore(
                    c,
                    float(scores[c].score[b]),
                    float(scores[c].percentile[b]),
                    bool(scores[c].present[b]),
                    float(scores[c].threshold),
                    float(shares[c][b]),
                    masks.get((b, c)),
                )
                for c in names
            ),
            layer=layer,
            heatmap=heat[b].astype(np.float16) if raw_heatmap else None,
            features=pooled[b].astype(np.float32),
        )
        for b, pred in enumerate(preds)
    ]


def _json(results: list[AuditResult]) -> str:
    return json.dumps([r.to_json() for r in results], sort_keys=True)


def test_overlay_in_torch_is_the_numpy_overlay_pixel_for_pixel() -> None:
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (5, 24, 20, 3), dtype=np.uint8)
    heat = rng.standard_normal((5, 24, 20)).astype(np.float32) * np.float32(1e-3)
    heat[1] = 0.0  # a blank heatmap: the image unchanged
    heat[2] = -np.abs(heat[2])  # all negative: blue only
    heat[3, 0, 0] = 1e4  # one hot pixel: everything else rounds near the image
    got = overlay_pixels(torch.from_numpy(rgb), torch.from_numpy(heat)).numpy()
    want = np.stack([overlay(rgb[b], heat[b].astype(np.float64)) for b in range(5)])
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[1], rgb[1])
    assert (got != rgb).any()


@pytest.mark.parametrize("device_scoring", [False, True], ids=["host scoring", "device scoring"])
def test_audit_json_is_byte_for_byte_the_engine_before_the_stages(
    engine: AuditEngine, images: list[np.ndarray], device_scoring: bool
) -> None:
    """Overlay and mask PNGs, float16 heatmaps, scores, shares: the same bytes in the JSON, with
    the CPU's numpy scoring and with the device scorer run on the CPU."""
    want = reference_audit(engine, images, raw_heatmap=True)
    engine.device_scoring = device_scoring
    try:
        got = engine.audit(images, raw_heatmap=True)
    finally:
        engine.device_scoring = False
    assert any(c.mask_png for r in want for c in r.concepts), "some mask must be drawn"
    assert sum(c.present for r in want for c in r.concepts) > sum(
        1 for r in want if any(c.present for c in r.concepts)
    ), "some image must show two concepts (the masks' second call)"
    assert [r.heatmap_png for r in got] == [r.heatmap_png for r in want]
    assert [[c.mask_png for c in r.concepts] for r in got] == [[c.mask_png for c in r.concepts] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.heatmap is not None and w.heatmap is not None
        np.testing.assert_array_equal(g.heatmap, w.heatmap)
        np.testing.assert_array_equal(g.features, w.features)
    if not device_scoring:
        assert _json(got) == _json(want)
    else:  # presence and percentiles exact; scores and shares summed in torch's order
        for g, w in zip(got, want, strict=True):
            assert g.prediction == w.prediction
            for cg, cw in zip(g.concepts, w.concepts, strict=True):
                assert (cg.present, cg.percentile, cg.threshold) == (cw.present, cw.percentile, cw.threshold)
                assert cg.score == pytest.approx(cw.score, rel=1e-12, abs=1e-12)
                assert cg.relevance_share == pytest.approx(cw.relevance_share, rel=1e-10, abs=1e-15)


def test_device_scores_cross_in_one_copy_and_match_the_bank(engine: AuditEngine) -> None:
    rng = np.random.default_rng(2)
    pooled = torch.from_numpy(rng.standard_normal((9, engine.bank.n_channels)).astype(np.float32))
    rel = torch.from_numpy(rng.standard_normal((9, engine.bank.n_channels)))
    scorer = engine.scorer
    s = scorer.score(pooled)
    assert s.score.device == pooled.device and s.score.dtype == torch.float64
    host, (phi,) = scorer.to_host(s, rel, pooled)
    want = engine.bank.score(pooled.double().numpy(), engine.fpr)
    np.testing.assert_array_equal(phi, pooled.double().numpy())
    for k, c in enumerate(engine.bank):
        np.testing.assert_allclose(host.score[:, k], want[c].score, rtol=1e-13, atol=1e-13)
        np.testing.assert_array_equal(host.present[:, k], want[c].present)
        np.testing.assert_array_equal(host.percentile[:, k], want[c].percentile)
        assert host.threshold[k] == want[c].threshold
        np.testing.assert_allclose(
            host.share[:, k], relevance_share(rel.numpy(), engine.bank[c].v), rtol=1e-12, atol=1e-15
        )
    np.testing.assert_array_equal(s.pick.numpy(), host.pick)
    assert host.present.any() and not host.present.all()


def test_buckets_cut_and_pad_batches() -> None:
    assert chunks(70, [32]) == [(0, 32, 32), (32, 64, 32), (64, 70, 32)]
    assert chunks(37, [8, 32, 16]) == [(0, 32, 32), (32, 37, 8)]
    assert chunks(16, [8, 16]) == [(0, 16, 16)]
    assert chunks(3, [4]) == [(0, 3, 4)]
    for bad in ((0, [4]), (3, []), (3, [0, 4])):
        with pytest.raises(ValueError):
            chunks(*bad)
    x = torch.arange(6.0).reshape(3, 2)
    padded = pad_rows(x, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], x)
    assert torch.equal(padded[3], x[2]) and torch.equal(padded[4], x[2])
    assert pad_rows(x, 3) is x
    with pytest.raises(ValueError):
        pad_rows(x, 2)


def test_cuda_graphs_on_the_cpu_choose_the_plain_path_with_the_reason(
    tiny_loaded: Any, images: list[np.ndarray]
) -> None:
    assert choose(torch.device("cpu"), True, [32]).graphed is False
    assert "not asked" in choose(torch.device("cpu"), False, [32]).reason
    eng = AuditEngine(tiny_loaded, fpr=0.5, ort_threads=1)
    want = eng.screen(images)
    got = eng.use_screen_graphs([4])
    assert not got.graphed and "cpu" in got.reason and "CUDA" in got.reason
    assert eng.graphs is got and not isinstance(eng._screen, FixedShapeScreen)
    assert _json(eng.screen(images)) == _json(want)


def test_padded_screen_equals_the_plain_screen(tiny_loaded: Any, images: list[np.ndarray]) -> None:
    """The cut-and-pad path the graphs replay, run eagerly: 10 images as 4 + 4 + 2 padded to 4
    (and as 8 + 2 padded to 2 with two buckets), the pad rows dropped: the plain screen's results."""
    eng = AuditEngine(tiny_loaded, fpr=0.5, ort_threads=1)
    want = eng.screen(images)
    for buckets in ([4], [2, 8]):
        eng.use_screen_graphs(buckets, pad_only=True)
        screen = eng._screen
        assert isinstance(screen, FixedShapeScreen) and not screen.capture
        got = eng.screen(images)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.prediction.label == w.prediction.label
            np.testing.assert_allclose(g.features, w.features, rtol=1e-6, atol=1e-6)
            for cg, cw in zip(g.concepts, w.concepts, strict=True):
                assert cg.present == cw.present and cg.percentile == cw.percentile
                assert cg.score == pytest.approx(cw.score, rel=1e-5, abs=1e-6)
                assert cg.relevance_share == pytest.approx(cw.relevance_share, rel=1e-5, abs=1e-7)


def test_a_pipelined_lane_answers_like_audit_jobs(engine: AuditEngine, images: list[np.ndarray]) -> None:
    """The pool's two-stage lane (each batch's host stage on its own thread while the next batch
    runs) gives :func:`audit_jobs`' answers over the same batches, in job order, byte for byte,
    audits and screens mixed."""
    from medaudit.service.audit_pool import AuditPool, LocalLane, Staged, audit_jobs

    class RecordingLane(LocalLane):  # a real lane that keeps the batches it was given
        batches: list[list[Any]] = []

        def run_device(self, jobs: Any) -> Staged:
            self.batches.append(list(jobs))
            return super().run_device(jobs)

    engines = {"vanilla": engine}
    jobs = [
        {
            "version": "vanilla",
            "pixels": im,
            "raw_heatmap": i % 2 == 0,
            **({"detail": "scores"} if i % 3 == 0 else {}),
        }
        for i, im in enumerate(images * 2)
    ]
    assert LocalLane(engines).pipelined is False  # the CPU default
    lane = RecordingLane(engines, pipelined=True)
    pool = AuditPool([lane], max_batch=3)
    try:
        got = pool.audit(jobs, timeout=60)
    finally:
        pool.close()
    assert len(lane.batches) >= len(jobs) // 3
    want = {
        id(j): a for batch in lane.batches for j, a in zip(batch, audit_jobs(engines, batch), strict=True)
    }
    for job, g in zip(jobs, got, strict=True):
        w = want[id(job)]
        assert json.dumps(g["result"], sort_keys=True) == json.dumps(w["result"], sort_keys=True)
        np.testing.assert_array_equal(g["features"], w["features"])


def test_a_failed_capture_leaves_its_bucket_on_the_eager_padded_path(
    tiny_loaded: Any, images: list[np.ndarray]
) -> None:
    """The graphed wrapper's fallback: a bucket whose capture fails (here: a CPU explainer, which
    ``Explainer.capture`` refuses) runs eagerly, padded, with the error kept; a CUDA device that
    torch does not see picks the plain path."""
    eng = AuditEngine(tiny_loaded, fpr=0.5, ort_threads=1)
    want = eng.screen(images)
    screen = FixedShapeScreen(eng.explainer, eng.bank.layer, [4], capture=True)
    eng._screen = screen
    got = eng.screen(images)
    assert list(screen.failed) == [4] and "CUDA" in screen.failed[4]
    for g, w in zip(got, want, strict=True):
        assert [c.present for c in g.concepts] == [c.present for c in w.concepts]
        np.testing.assert_allclose(
            [c.score for c in g.concepts], [c.score for c in w.concepts], rtol=1e-5, atol=1e-6
        )
    if not torch.cuda.is_available():
        assert choose(torch.device("cuda"), True, [8]).reason == "torch sees no CUDA device"


def test_a_vit_familys_masks_are_binarised_over_superpixels(
    engine: AuditEngine, images: list[np.ndarray]
) -> None:
    """The host stage binarises by the model family's pooling (method.md §2.4 for a ViT): the same
    raw audit finished as a ViT's gives each concept mask from the heatmap summed over the image's
    SLIC superpixels, and as a ResNet's from the pixels."""
    raw = engine.audit_raw(images)
    assert raw.concept_heat, "some concept must be present"
    as_vit = copy.copy(engine)
    as_vit.cfg = replace(engine.cfg, canonizer="vit")
    for eng, pooling in ((engine, "pixels"), (as_vit, "superpixels")):
        got = eng.finish(raw)
        for (b, name), heat in raw.concept_heat.items():
            mask_png = next(c.mask_png for c in got[b].concepts if c.concept == name)
            assert mask_png == png_base64(concept_mask(heat, raw.rgb[b], pooling) * 255)
    pooled = [concept_mask(h, raw.rgb[b], "superpixels") for (b, _), h in raw.concept_heat.items()]
    assert any((p != binarize(h)).any() for p, h in zip(pooled, raw.concept_heat.values(), strict=True))
