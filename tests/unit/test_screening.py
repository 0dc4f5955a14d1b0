"""Screening: the flag decision's inputs without the LRP backward below the CAV layer.

``Explainer.explain(heatmaps=False)`` (the backward stops at the relevance layers),
``AuditEngine.screen`` (identical to the full audit's scores, presence, shares and flags, on 512
synthderm images through the tiny store's versions), the auditor's mixed batches, the
``?detail=`` contract and heatmap policy (:mod:`medaudit.service.screening`), and one in-process
app that screens every ``/predict`` and publishes its flags, with their heatmaps, to Redis.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medaudit.clients.endpoints import Endpoints
from medaudit.clients.responses import parse_audit
from medaudit.models.errors import ConfigError
from medaudit.models.xai import ConceptTarget, Explainer, rules
from medaudit.service.config import Settings
from medaudit.service.errors import InvalidParameterError
from medaudit.service.flags.policy import ConceptPolicy, PolicyConfig, PolicyDecision, evaluate
from medaudit.service.openapi import build
from medaudit.service.screening import FLAGGED, SAMPLED, heatmap_reason, parse_detail, sampled
from medaudit.testing.models import branchy_resnet18

SIZE = 32
#: The real Redis of the tests (as tests/conftest.py's).
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, Explainer]:
    model, cfg = branchy_resnet18(SIZE)
    return model, Explainer(model, cfg)


def test_explain_without_heatmaps_stops_the_backward_and_keeps_the_relevance(
    resnet: tuple[nn.Module, Explainer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``heatmaps=False``: the relevance at the relevance layers (one deep, one shallow), the
    logits and the activations are bit-identical to the full call's; the heatmap is empty; the
    first layer's rule (the input's) never runs backward."""
    _, explainer = resnet
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    kw = {"cav_layers": ["identity_2"], "relevance_layers": ["identity_2", "identity_0"]}
    full = explainer.explain(x, ["pred", 1], **kw)
    calls: list[int] = []
    original = rules._FlatConvFn.backward
    monkeypatch.setattr(
        rules._FlatConvFn, "backward", staticmethod(lambda *a: calls.append(1) or original(*a))
    )
    screen = explainer.explain(x, ["pred", 1], heatmaps=False, **kw)
    assert calls == [], "the backward reached the input layer"
    explainer.explain(x, ["pred"], **kw)
    assert calls, "the patched rule is the one the engine runs"
    assert screen.heatmaps.shape == (2, 3, 0, 0)
    torch.testing.assert_close(screen.logits, full.logits, rtol=0, atol=0)
    torch.testing.assert_close(
        screen.activations["identity_2"], full.activations["identity_2"], rtol=0, atol=0
    )
    for ln in kw["relevance_layers"]:
        torch.testing.assert_close(screen.relevance[ln], full.relevance[ln], rtol=0, atol=0)
    v = torch.randn(256)
    for bad in (
        {"targets": ["pred", ConceptTarget("identity_2", v)], "relevance_layers": ["identity_2"]},
        {"targets": ["pred"], "relevance_layers": []},
        {"targets": ["pred"], "relevance_layers": ["identity_2"], "return_input_relevance": True},
    ):
        targets = bad.pop("targets")
        with pytest.raises(ConfigError, match="heatmaps=False"):
            explainer.explain(x, targets, heatmaps=False, **bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """512 synthderm test images at 32 px, every other one with the band-aid (the demo's traffic)."""
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig

    ds = SynthDerm(SynthDermConfig(size=SIZE, n_train=8, n_val=8, n_test=512, seed=7))
    idx = [int(i) for i in ds.indices("test")]
    return [
        (ds.sample(i, "attacked", attack="band_aid") if k % 2 else ds.sample(i, "clean")).image
        for k, i in enumerate(idx)
    ]


@pytest.fixture(scope="module")
def engines(tiny_store: Path) -> dict[str, object]:
    from medaudit.service.audit import AuditEngine

    return {
        v: AuditEngine.from_store(v, home=tiny_store, ort_threads=1) for v in ("vanilla", "pclarc-band_aid")
    }


POLICIES = [PolicyConfig(ConceptPolicy(share=s)) for s in (0.0, 0.05, 0.2)]


def test_screen_equals_the_full_audit_on_512_images(engines, images) -> None:
    """512 images, half through each version (the presence FPR opened to 0.5 on ``vanilla``, so
    that concepts are present and flags fall both ways): the same prediction, features, scores,
    percentiles, presence and thresholds exactly, shares within 1e-6, and the same flag decision
    under three policies. Batches of 16, as the auditor forms them; the screen has no heatmap and
    no mask."""
    from medaudit.service.audit import AuditEngine

    wide = AuditEngine.__new__(AuditEngine)
    wide.__dict__.update(engines["vanilla"].__dict__, fpr=0.5)
    half = len(images) // 2
    cases = [(wide, images[:half]), (engines["pclarc-band_aid"], images[half:])]
    flagged = {True: 0, False: 0}
    worst_share = 0.0
    for eng, imgs in cases:
        for start in range(0, len(imgs), 16):
            batch = imgs[start : start + 16]
            for s, a in zip(eng.screen(batch), eng.audit(batch), strict=True):
                assert s.heatmap_png is None and a.heatmap_png
                assert s.prediction == a.prediction and s.layer == a.layer
                np.testing.assert_array_equal(s.features, a.features)
                for cs, ca in zip(s.concepts, a.concepts, strict=True):
                    assert (cs.concept, cs.score, cs.percentile, cs.present, cs.threshold) == (
                        ca.concept,
                        ca.score,
                        ca.percentile,
                        ca.present,
                        ca.threshold,
                    )
                    assert cs.mask_png is None and (ca.mask_png is not None) == ca.present
                    worst_share = max(worst_share, abs(cs.relevance_share - ca.relevance_share))
                for policy in POLICIES:
                    ds, da = evaluate(s, policy), evaluate(a, policy)
                    assert ds.to_json() == da.to_json()
                    flagged[ds.flagged] += 1
    print(f"screen vs audit: {len(images)} images, decisions {flagged}, worst share gap {worst_share:.1e}")
    assert worst_share <= 1e-6
    assert flagged[True] > 50 and flagged[False] > 50, flagged


def test_auditor_batches_mix_screens_and_audits(engines) -> None:
    """One lane batch of screens and audits of two versions: each answered in job order, the
    screens without heatmap, and only the audits counted as heatmaps, by the reason they carry."""
    from prometheus_client import REGISTRY

    from medaudit.service.audit_pool import AuditPool, LocalLane

    rng = np.random.default_rng(0)
    pix = [rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8) for _ in range(4)]
    jobs = [
        {"version": "vanilla", "pixels": pix[0], "detail": "scores"},
        {"version": "pclarc-band_aid", "pixels": pix[1]},
        {"version": "vanilla", "pixels": pix[2], "reason": "flagged"},
        {"version": "vanilla", "pixels": pix[3], "detail": "scores"},
    ]

    def count(version: str, reason: str) -> float:
        return (
            REGISTRY.get_sample_value("medaudit_heatmaps_total", {"version": version, "reason": reason})
            or 0.0
        )

    before = {(v, r): count(v, r) for v in ("vanilla", "pclarc-band_aid") for r in ("requested", "flagged")}
    pool = AuditPool([LocalLane(engines)], max_batch=16)
    try:
        out = pool.audit(jobs, timeout=120)
    finally:
        pool.close()
    for job, got in zip(jobs, out, strict=True):
        eng = engines[job["version"]]
        want = (eng.screen if job.get("detail") else eng.audit)([job["pixels"]])[0]
        assert (got["result"]["heatmap_png"] is None) == bool(job.get("detail"))
        assert got["result"]["prediction"]["label"] == want.prediction.label
        assert [c["score"] for c in got["result"]["concepts"]] == pytest.approx(
            [c.score for c in want.concepts], rel=1e-5, abs=1e-6
        )
    after = {k: count(*k) for k in before}
    assert {k: after[k] - before[k] for k in before} == {
        ("vanilla", "requested"): 0,
        ("vanilla", "flagged"): 1,
        ("pclarc-band_aid", "requested"): 1,
        ("pclarc-band_aid", "flagged"): 0,
    }


# ------------------------------------------------------------------------------ the contract


def test_detail_is_one_of_the_valid_values() -> None:
    valid = ("prediction", "scores", "full")
    assert parse_detail(None, valid, "scores") == "scores" and parse_detail("", valid, "full") == "full"
    assert parse_detail(" Scores ", valid, "prediction") == "scores"
    with pytest.raises(InvalidParameterError, match="detail='heat'.*prediction, scores, full") as e:
        parse_detail("heat", valid, "prediction")
    assert e.value.status == 422 and e.value.to_json()["valid_details"] == list(valid)


def test_heatmaps_go_to_flagged_screens_and_a_stable_sample() -> None:
    ids = [f"req-{i}" for i in range(4000)]
    assert not any(sampled(r, 0.0) for r in ids) and all(sampled(r, 1.0) for r in ids)
    share = sum(sampled(r, 0.1) for r in ids) / len(ids)
    assert 0.085 < share < 0.115, share
    assert [sampled(r, 0.1) for r in ids[:50]] == [sampled(r, 0.1) for r in ids[:50]]  # a retry: the same
    flag = evaluate([_Score("band_aid", present=True, share=0.9)], PolicyConfig(ConceptPolicy(share=0.2)))
    assert flag.flagged
    base = Settings(auth_enabled=False)
    assert heatmap_reason(flag, base, "r") == FLAGGED
    assert heatmap_reason(PolicyDecision(), base, "r") is None
    off = Settings(auth_enabled=False, screen_heatmaps=False)
    assert heatmap_reason(flag, off, "r") is None
    every = Settings(auth_enabled=False, screen_heatmaps=False, screen_sample_rate=1.0)
    assert heatmap_reason(flag, every, "r") == SAMPLED == heatmap_reason(PolicyDecision(), every, "r")


class _Score:
    def __init__(self, concept: str, *, present: bool, share: float) -> None:
        self.concept, self.present, self.relevance_share = concept, present, share
        self.score, self.percentile, self.threshold = 2.0, 99.5, 1.0


def test_screening_settings_come_from_the_environment() -> None:
    env = {"MEDAUDIT_AUTH": "off"}
    s = Settings.from_env(env)
    assert (s.predict_detail, s.screen_heatmaps, s.screen_sample_rate) == ("prediction", True, 0.0)
    s = Settings.from_env(
        {
            **env,
            "MEDAUDIT_PREDICT_DETAIL": "Scores",
            "MEDAUDIT_SCREEN_HEATMAPS": "off",
            "MEDAUDIT_SCREEN_SAMPLE_RATE": "0.01",
        }
    )
    assert (s.predict_detail, s.screen_heatmaps, s.screen_sample_rate) == ("scores", False, 0.01)
    for name, value in (
        ("MEDAUDIT_PREDICT_DETAIL", "heatmap"),
        ("MEDAUDIT_SCREEN_HEATMAPS", "always"),
        ("MEDAUDIT_SCREEN_SAMPLE_RATE", "1.5"),
        ("MEDAUDIT_SCREEN_SAMPLE_RATE", "often"),
    ):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({**env, name: value})


# ------------------------------------------------------------------------------ served


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tiny_store: Path, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory, new_medaudit_app):
    """Screening by default on /predict, everything present and relied on (FPR 0.99, share 0:
    every screen flags), flags to the real Redis, LRP in the auditor's own process."""
    from starlette.testclient import TestClient

    env = {
        "BENTOML_HOME": str(tiny_store),
        "MEDAUDIT_VERSIONS": "vanilla,pclarc-band_aid",
        "MEDAUDIT_AUTH": "off",
        "MEDAUDIT_AUDIT_WORKERS": "1",
        "MEDAUDIT_PREDICT_DETAIL": "scores",
        "MEDAUDIT_FLAGS": "on",
        "MEDAUDIT_FLAG_FPR": "0.99",
        "MEDAUDIT_FLAG_SHARE": "0",
        "MEDAUDIT_FLAG_PREFIX": redis_prefix,
        "MEDAUDIT_FLAG_SPOOL_DIR": str(tmp_path_factory.mktemp("spool")),
        "REDIS_URL": REDIS_URL,
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with TestClient(new_medaudit_app()) as c:
            yield c


@pytest.mark.redis
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")
def test_served_screens_flag_with_heatmaps_and_count(client, redis_prefix: str) -> None:
    """The deployment screens /predict by default; a flagged screen answers the full audit's
    heatmap and masks, and its review record carries them; ?detail= picks the other answers;
    a bad detail is a 422; the metrics count screens, their flags and heatmaps by reason."""
    from prometheus_client import REGISTRY

    from medaudit.service.flags.events import FlagEvent, FlagKeys
    from medaudit.service.flags.redis_conn import connect

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    screened0 = value("medaudit_screened_requests_total", version="vanilla")
    flagged0 = value("medaudit_heatmaps_total", version="vanilla", reason="flagged")
    rid = f"screen-{uuid.uuid4().hex[:8]}"
    headers = {"Content-Type": "image/png", "X-Model-Version": "vanilla"}
    r = client.post("/predict", content=_png(0), headers={**headers, "X-Request-ID": rid})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["detail"] == "scores" and body["version"] == "vanilla"
    assert body["flag"]["flagged"] and body["heatmap_reason"] == "flagged" and body["heatmap_png"]
    assert all((c["mask_png"] is not None) == c["present"] for c in body["concepts"])
    n_flags = len(body["flag"]["flags"])

    plain = client.post("/predict?detail=prediction", content=_png(0), headers=headers).json()
    assert plain["detail"] == "prediction" and "concepts" not in plain
    assert plain["prediction"]["label"] == body["prediction"]["label"]
    full = client.post("/predict?detail=full", content=_png(0), headers=headers).json()
    assert full["detail"] == "full" and full["heatmap_reason"] == "requested" and full["heatmap_png"]
    assert [c["score"] for c in full["concepts"]] == pytest.approx([c["score"] for c in body["concepts"]])
    via_audit = client.post("/audit?detail=scores", content=_png(0), headers=headers).json()
    assert via_audit["detail"] == "scores" and via_audit["flag"] == body["flag"]
    bad = client.post("/audit?detail=prediction", content=_png(0), headers=headers)
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_parameter"
    for path, answer in (("/predict", body), ("/predict", plain), ("/predict", full), ("/audit", via_audit)):
        _conforms(path, answer)
    parsed = parse_audit(body)  # the client's view of a flagged screen
    assert (parsed.detail, parsed.heatmap_reason) == ("scores", "flagged") and parsed.heatmap_png
    call = _Calls().audit(_png(0), detail="scores", raw_heatmap=True)
    assert (call.path, call.params) == ("/audit", {"raw_heatmap": "1", "detail": "scores"})

    assert value("medaudit_screened_requests_total", version="vanilla") - screened0 == 2
    assert value("medaudit_heatmaps_total", version="vanilla", reason="flagged") - flagged0 == 2
    assert value("medaudit_screen_flags_total", version="vanilla") >= n_flags

    keys = FlagKeys(redis_prefix)
    r_conn = connect(REDIS_URL)
    deadline, events = time.monotonic() + 10, []
    while time.monotonic() < deadline:
        events = [FlagEvent.from_fields(f) for _id, f in r_conn.xrange(keys.stream)]
        if any(e.request_id == rid for e in events):
            break
        time.sleep(0.1)
    mine = [e for e in events if e.request_id == rid]
    assert len(mine) == n_flags
    for e in mine:
        # the bare input and the heatmap layer (the blend is composed from them on reading)
        assert e.image_key and e.heat_layer_key and not e.heatmap_key
        assert r_conn.exists(e.image_key, e.heat_layer_key) == 2 and e.mask_key and e.features_key


class _Calls(Endpoints):
    """The client's endpoint methods, returning the request they would send."""

    def _call(self, build: Any) -> Any:
        return build()


def _conforms(path: str, body: dict[str, Any]) -> None:
    """``body`` is one of the answers the OpenAPI document gives ``POST path``."""
    import jsonschema

    doc = build(["vanilla", "pclarc-band_aid"], auth=False, reviews=False)
    schema = doc["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(body, {**schema, "components": doc["components"]})
