"""AuditEngine (tier 1: no transport): predictions, audits (scores, no flag decision), comparison.

The flag rule itself is the policy's, tested as a table in tests/flags/test_policy.py."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from medaudit.service.audit import AuditEngine, AuditResult, compare, version_tag
from medaudit.service.errors import UnknownModelVersionError
from medaudit.service.flags.policy import ConceptPolicy, PolicyConfig, evaluate


def test_presence_fpr_refuses_out_of_range_values(tiny_store) -> None:
    for fpr in (0.0, 1.0):
        with pytest.raises(ValueError, match="fpr"):
            AuditEngine.from_store("vanilla", home=tiny_store, fpr=fpr)


def test_version_tag() -> None:
    assert version_tag("vanilla") == "resnet18-synthderm:vanilla"
    assert version_tag("other-set:v2") == "other-set:v2"


@pytest.fixture(scope="module")
def engines(tiny_store):
    return {
        v: AuditEngine.from_store(v, home=tiny_store, ort_threads=1) for v in ("vanilla", "pclarc-band_aid")
    }


def _png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def test_predict_is_batched_and_matches_the_audit_forward(engines) -> None:
    eng = engines["vanilla"]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(40 + 8 * i, 36, 3), dtype=np.uint8) for i in range(3)]
    preds = eng.predict(images)
    audits = eng.audit(images, raw_heatmap=True)
    assert len(preds) == len(audits) == 3
    for p, a in zip(preds, audits, strict=True):
        assert p.version == "vanilla" and p.label in eng.cfg.labels
        assert sum(p.probabilities.values()) == pytest.approx(1.0)
        assert a.prediction.label == p.label
        for lab in eng.cfg.labels:  # ORT and torch agree to float tolerance
            assert a.prediction.probabilities[lab] == pytest.approx(p.probabilities[lab], abs=1e-4)


def test_audit_result_structure(engines) -> None:
    eng = engines["vanilla"]
    img = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    (r,) = eng.audit([img], raw_heatmap=True)
    assert _png(r.heatmap_png).shape == (32, 32, 3)
    assert r.heatmap is not None and r.heatmap.dtype == np.float16 and r.heatmap.shape == (32, 32)
    assert [c.concept for c in r.concepts] == ["band_aid", "ruler"]
    for c in r.concepts:
        assert 0.0 <= c.relevance_share <= 1.0 and 0.0 <= c.percentile <= 100.0
        assert c.present == (c.score > c.threshold)
        assert (c.mask_png is not None) == c.present
        if c.mask_png:
            assert set(np.unique(_png(c.mask_png))) <= {0, 255}
    body = r.to_json()
    assert "flag" not in body  # the engine scores; the flag policy decides
    raw = np.frombuffer(base64.b64decode(body["heatmap"]["data"]), dtype="<f2").reshape(
        body["heatmap"]["shape"]
    )
    assert np.array_equal(raw, r.heatmap)
    assert eng.audit([img])[0].to_json()["heatmap"] is None
    back = AuditResult.from_json(body, r.features)  # what the batched Auditor's JSON turns back into
    assert back.to_json() == body and np.array_equal(back.features, r.features)
    assert r.features is not None and r.features.shape == (eng.bank[eng.bank.concepts[0]].v.shape[0],)


def test_present_concepts_get_masks_and_flags_follow_thresholds(engines) -> None:
    eng = engines["vanilla"]
    img = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    always = AuditEngine.__new__(AuditEngine)
    always.__dict__.update(eng.__dict__, fpr=0.999)
    (r,) = always.audit([img])
    present = [c for c in r.concepts if c.present]
    assert present, "at FPR 0.999 the threshold is the lowest clean score"
    assert all(c.mask_png for c in present)
    share_zero = PolicyConfig(ConceptPolicy(share=0.0))
    assert evaluate(r, share_zero).flagged == any(c.relevance_share > 0 for c in present)


def test_two_phase_audit_matches_one_joint_lrp_call(engines) -> None:
    """Masks come from a second LRP call on the present (image, concept) pairs only, each seeded at
    its own concept: the same heatmaps (and so masks) as seeding class and every concept for every
    image in one call, and the same class heatmap."""
    from medaudit.models.xai.localize import binarize
    from medaudit.models.xai.lrp import ConceptTarget
    from medaudit.service.audit import png_base64

    eng = engines["vanilla"]
    wide = AuditEngine.__new__(AuditEngine)
    wide.__dict__.update(eng.__dict__, fpr=0.5)
    noise = [
        np.random.default_rng(10 + i).integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for i in range(4)
    ]
    imgs = noise + [np.full((32, 32, 3), v, dtype=np.uint8) for v in (0, 90, 180, 255)]
    results = wide.audit(imgs, raw_heatmap=True)
    present = [(b, c.concept) for b, r in enumerate(results) for c in r.concepts if c.present]
    absent = [(b, c.concept) for b, r in enumerate(results) for c in r.concepts if not c.present]
    assert present and absent, "FPR 0.5 should make some concepts present and some not"
    _, x = wide._inputs(imgs)
    targets = ["pred", *(ConceptTarget(wide.bank.layer, wide._cavs[c]) for c in wide.bank)]
    joint = wide.explainer.explain(x, targets).heatmaps.double().numpy()
    concepts = list(wide.bank)
    for b, r in enumerate(results):
        assert np.allclose(r.heatmap, joint[0, b].astype(np.float16), rtol=1e-2, atol=1e-3)
        for c in r.concepts:
            want = png_base64(binarize(joint[1 + concepts.index(c.concept), b]) * 255) if c.present else None
            assert c.mask_png == want, (b, c.concept)


def test_compare_side_by_side_and_unknown_version(engines) -> None:
    img = np.random.default_rng(3).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    cmp = compare(engines, img, ["vanilla", "pclarc-band_aid"])
    assert list(cmp.results) == ["vanilla", "pclarc-band_aid"]
    labels = {r.prediction.label for r in cmp.results.values()}
    assert cmp.labels_agree == (len(labels) == 1)
    assert cmp.to_json()["agreement"] == {"label": cmp.labels_agree, "flag": cmp.flags_agree}
    flags = {evaluate(r).flagged for r in cmp.results.values()}  # the default policy's decisions
    assert cmp.flags_agree == (len(flags) == 1)
    assert all(cmp.to_json()["results"][v]["flag"] == evaluate(r).to_json() for v, r in cmp.results.items())
    with pytest.raises(UnknownModelVersionError) as e:
        compare(engines, img, ["vanilla", "nope"])
    assert e.value.status == 404 and e.value.to_json()["valid_versions"] == ["pclarc-band_aid", "vanilla"]


def test_onnx_input_is_the_torch_input_bit_for_bit(engines, tiny_store) -> None:
    """The ONNX path normalises in numpy (no torch thread pool next to ONNX Runtime's): the same
    float32 bits as ModelCfg.normalize, so both backends see one input and agree."""
    from medaudit.service.audit import TorchPredictor

    onnx = engines["vanilla"].predictor
    torch_path = TorchPredictor.from_store("vanilla", home=tiny_store)
    rgb = np.random.default_rng(4).integers(0, 256, size=(3, *onnx.size, 3), dtype=np.uint8)
    got = onnx.normalized(rgb)
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"] and got.shape == (3, 3, *onnx.size)
    np.testing.assert_array_equal(got, torch_path._inputs(rgb).float().numpy())
    np.testing.assert_allclose(onnx.logits(rgb), torch_path.logits(rgb), atol=1e-4)


def _audit_fields(results: list[AuditResult]) -> dict[str, np.ndarray]:
    return {
        "probs": np.array(
            [[r.prediction.probabilities[k] for k in sorted(r.prediction.probabilities)] for r in results]
        ),
        "heat": np.stack([r.heatmap.astype(np.float64) for r in results]),
        "scores": np.array([[c.score for c in r.concepts] for r in results]),
        "shares": np.array([[c.relevance_share for c in r.concepts] for r in results]),
        "features": np.stack([r.features for r in results]),
    }


def _devices(eng: AuditEngine) -> set[str]:
    m = eng.explainer.model
    held = (*m.parameters(), *m.buffers(), *eng._cavs.values())
    return {t.device.type for t in held}


def test_engine_device_is_where_lrp_runs(tiny_loaded) -> None:
    """The CPU engine's rule model and concept seeds live on the device it was given, and its
    results are host arrays; the CUDA twin of this check is the next test."""
    import torch

    eng = AuditEngine(tiny_loaded, ort_threads=1, device="cpu")
    assert eng.device == torch.device("cpu")
    assert _devices(eng) == {"cpu"}
    (r,) = eng.audit([np.zeros((32, 32, 3), dtype=np.uint8)], raw_heatmap=True)
    assert isinstance(r.heatmap, np.ndarray) and r.heatmap.shape == (32, 32)


def test_host_work_on_the_pool_gives_the_serial_results(tiny_loaded) -> None:
    """The per-image host work (overlays, masks, PNG encoding) runs on a thread pool when LRP is
    on a GPU; the audit must not change by it: same PNGs, same masks, in image order."""
    from medaudit.testing.versions import synthderm_images

    images = synthderm_images(6)
    serial = AuditEngine(tiny_loaded, ort_threads=1)
    assert serial.parallel_host is False  # the CPU default
    pooled = AuditEngine(tiny_loaded, ort_threads=1)
    pooled.parallel_host = True
    want, got = serial.audit(images), pooled.audit(images)
    assert [r.heatmap_png for r in got] == [r.heatmap_png for r in want]
    assert [[c.mask_png for c in r.concepts] for r in got] == [[c.mask_png for c in r.concepts] for r in want]
    assert any(c.mask_png for r in want for c in r.concepts)  # the masks' path ran


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_matches_the_cpu_engine(tiny_loaded) -> None:
    """LRP on the GPU (MEDAUDIT_AUDIT_DEVICE) gives the CPU engine's audit: same predictions,
    concept scores, shares and heatmaps up to float32/TF32 rounding, and the same flags where a
    decision is not on its threshold. Results come back as host arrays either way."""
    import torch

    cpu = AuditEngine(tiny_loaded, ort_threads=1, device="cpu")
    gpu = AuditEngine(tiny_loaded, ort_threads=1, device="cuda")
    assert _devices(gpu) == {"cuda"}
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(6)]
    want, got = cpu.audit(images, raw_heatmap=True), gpu.audit(images, raw_heatmap=True)
    w, g = _audit_fields(want), _audit_fields(got)
    np.testing.assert_allclose(g["probs"], w["probs"], atol=1e-3)
    np.testing.assert_allclose(g["features"], w["features"], rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(g["scores"], w["scores"], rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(g["shares"], w["shares"], atol=1e-2)
    for a, b in zip(g["heat"], w["heat"], strict=True):  # float16 maps: compare their shape
        cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
        assert cos > 0.999, cos
    for r_g, r_w in zip(got, want, strict=True):
        assert r_g.prediction.label == r_w.prediction.label
        for c_g, c_w in zip(r_g.concepts, r_w.concepts, strict=True):
            if abs(c_w.score - c_w.threshold) > 1e-2 * max(1.0, abs(c_w.threshold)):
                assert c_g.present == c_w.present
    torch.cuda.synchronize()
