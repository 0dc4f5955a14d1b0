"""The BentoML service: tier 1 (the class called directly), tier 2 (in-process ASGI), tier 3 (real
``bentoml serve`` + httpx + curl, marked e2e/slow). Every tier runs on the tiny two-version store."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medaudit.service.auth import hash_key
from medaudit.service.config import usable_cpus
from medaudit.service.errors import AuthError, ServiceOverloadedError, UnknownModelVersionError
from medaudit.service.inputs import decode_image
from medaudit.service.process import served

# bentoml 1.4.40 builds its IO schemas through a pydantic hook deprecated in pydantic 2.11: theirs to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")

SALT, CLIENT_KEY, REVIEWER_KEY = "test-salt", "client-key-0123456789abcdef", "reviewer-key-0123456789abcdef"


def _env(home: Path, auth: bool) -> dict[str, str]:
    env = {
        "BENTOML_HOME": str(home),
        "MEDAUDIT_VERSIONS": "vanilla,pclarc-band_aid",
        "MEDAUDIT_AB_WEIGHTS": "vanilla=1,pclarc-band_aid=1",
        "MEDAUDIT_SHADOW_VERSION": "pclarc-band_aid",
        "MEDAUDIT_AUTH": "on" if auth else "off",
        "MEDAUDIT_FLAGS": "off",  # the flag pipeline through the service: test_service_flags.py
    }
    if auth:
        env["MEDAUDIT_API_KEYS"] = (
            f"client:{hash_key(CLIENT_KEY, SALT)},reviewer:{hash_key(REVIEWER_KEY, SALT)}"
        )
        env["MEDAUDIT_API_KEY_SALT"] = SALT
    return env


def _metric_sum(families: dict[str, Any], family: str, suffix: str, **labels: str) -> float:
    """Sum of the ``family + suffix`` samples (``_total``, ``_count``, ``_sum``) whose labels
    include ``labels``, over every process /metrics aggregated."""
    return float(
        sum(
            s.value
            for s in families[family].samples
            if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items())
        )
    )


def _png(size: int = 40, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def service_env(tiny_store: Path) -> Iterator[dict[str, str]]:
    env = _env(tiny_store, auth=True)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env


# ------------------------------------------------------------------------------ tier 1


@pytest.fixture(scope="module")
def svc(service_env):
    from medaudit.service.api import MedAudit

    return MedAudit()


def test_tier1_service_class_called_directly(svc) -> None:
    img = decode_image(_png(), "image/png")
    assert svc.__is_ready__()
    out = svc.predict_json(img, {"x-model-version": "pclarc-band_aid"})
    assert out["version"] == "pclarc-band_aid" and out["via"] == "explicit" and out["shadow"] is None
    out = svc.audit_json(img, {"x-model-version": "vanilla"}, raw_heatmap=False)
    assert out["shadow"]["version"] == "pclarc-band_aid" and isinstance(out["shadow"]["agree"], bool)
    assert {c["concept"] for c in out["concepts"]} == {"band_aid", "ruler"}
    with pytest.raises(UnknownModelVersionError):
        svc.predict_json(img, {"x-model-version": "nope"})
    with pytest.raises(AuthError):
        svc.authenticate({})
    assert svc.card_json("resnet18-synthderm:vanilla")["version"] == "vanilla"


def test_tier1_batcher_groups_mixed_versions_and_keeps_order(svc) -> None:
    from medaudit.service.api import Predictor

    batcher = Predictor()
    images = [decode_image(_png(seed=s), "image/png") for s in range(4)]
    versions = ["vanilla", "pclarc-band_aid", "vanilla", "pclarc-band_aid"]
    jobs = [
        {"version": v, "pixels": svc.engines[v].predictor.pixels([im])[0]}
        for v, im in zip(versions, images, strict=True)
    ]
    out = batcher.predict_batch(jobs)
    for v, im, got in zip(versions, images, out, strict=True):
        want = svc.engines[v].predict([im])[0].to_json()
        assert got["version"] == v and got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)


# ------------------------------------------------------------------------------ tier 2


@pytest.fixture(scope="module")
def client(service_env, new_medaudit_app):
    from starlette.testclient import TestClient

    with TestClient(new_medaudit_app()) as c:
        c.headers["Authorization"] = f"Bearer {CLIENT_KEY}"
        yield c


def test_an_in_process_app_stops_its_lrp_processes_when_it_stops(
    service_env, new_medaudit_app, monkeypatch
) -> None:
    """MedAudit.to_asgi() creates the auditor in this process, with its LRP processes; stopping
    the app (BentoML's dependency cleanup) stops them. Before the auditor's close was async,
    BentoML never called it and every in-process start left two processes behind."""
    import os

    from starlette.testclient import TestClient

    from medaudit.service.process import spawned_pids

    def lrp() -> set[int]:
        return spawned_pids(os.getpid())

    monkeypatch.setenv("MEDAUDIT_AUDIT_WORKERS", "2")
    before = lrp()
    with TestClient(new_medaudit_app()) as c:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "image/png"}
        assert c.post("/audit", content=_png(), headers=headers).status_code == 200
        started = lrp() - before
        assert len(started) == 2
    assert not (lrp() & started)


def test_ready_and_models(client) -> None:
    assert client.get("/readyz").status_code == 200
    r = client.get("/models/")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [v["version"] for v in body["versions"]] == ["vanilla", "pclarc-band_aid"]
    assert body["shadow"] == "pclarc-band_aid" and body["request_id"]
    assert client.get("/models", follow_redirects=False).status_code in (200, 307)
    assert client.get("/models").json()["versions"] == body["versions"]
    r = client.get("/models/vanilla")
    assert r.status_code == 200 and r.json()["card"]["version"] == "vanilla"
    r = client.get("/models/nope")
    assert r.status_code == 404
    assert r.json()["error"] == "unknown_model_version"
    assert r.json()["valid_versions"] == ["pclarc-band_aid", "vanilla"]


def test_predict_explicit_version_wins_and_subject_key_is_stable(client) -> None:
    r = client.post(
        "/predict",
        content=_png(),
        headers={"Content-Type": "image/png", "X-Model-Version": "vanilla", "X-Request-ID": "rid-1"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "vanilla" and body["via"] == "explicit" and body["request_id"] == "rid-1"
    assert r.headers["x-model-version"] == "vanilla" and r.headers["x-request-id"] == "rid-1"
    assert body["shadow"]["version"] == "pclarc-band_aid"
    assert sum(body["prediction"]["probabilities"].values()) == pytest.approx(1.0)
    versions = {
        client.post(
            "/predict", content=_png(), headers={"Content-Type": "image/png", "X-Subject-Key": "patient-7"}
        ).json()["version"]
        for _ in range(3)
    }
    assert len(versions) == 1
    agreement = client.get("/models/").json()["shadow_agreement"]
    assert any(a["version"] == "vanilla" and a["agree"] + a["disagree"] >= 1 for a in agreement)


@pytest.mark.slow
def test_ab_split_over_http_is_within_three_points_and_stable(client) -> None:
    """10,000 subject keys through the HTTP routing path; /predict answers as /models/_route says."""
    n = 10_000
    got = [
        client.get("/models/_route", headers={"X-Subject-Key": f"patient-{i}"}).json()["version"]
        for i in range(n)
    ]
    share = got.count("vanilla") / n
    print(f"A/B over HTTP: vanilla {share:.2%} of {n} keys (weights 1:1)")
    assert abs(share - 0.5) <= 0.03
    again = [
        client.get("/models/_route", headers={"X-Subject-Key": f"patient-{i}"}).json()["version"]
        for i in range(500)
    ]
    assert again == got[:500]
    for i in range(0, 200, 10):
        r = client.post(
            "/predict",
            content=_png(seed=i),
            headers={"Content-Type": "image/png", "X-Subject-Key": f"patient-{i}"},
        )
        assert r.status_code == 200 and r.json()["version"] == got[i] and r.json()["via"] == "hash"
    r = client.get("/models/_route", headers={"X-Subject-Key": "patient-1", "X-Model-Version": "vanilla"})
    assert r.json() == {
        "request_id": r.json()["request_id"],
        "version": "vanilla",
        "shadow": "pclarc-band_aid",
        "via": "explicit",
    }
    r = client.get("/models/_route", headers={"X-Model-Version": "nope"})
    assert r.status_code == 404 and r.json()["valid_versions"] == ["pclarc-band_aid", "vanilla"]


def test_audit_returns_heatmap_concepts_and_flag(client) -> None:
    r = client.post(
        "/audit?raw_heatmap=1",
        content=_png(24),
        headers={"Content-Type": "application/octet-stream", "X-Model-Version": "pclarc-band_aid"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "pclarc-band_aid" and body["shadow"] is None
    hm = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert hm.size == (32, 32)
    assert body["heatmap"]["dtype"] == "float16" and body["heatmap"]["shape"] == [32, 32]
    assert set(body["flag"]) == {"flagged", "severity", "flags", "reasons", "concepts"}
    assert any("small image" in n for n in body["notes"])
    for c in body["concepts"]:
        assert (c["mask_png"] is not None) == c["present"]


def test_concurrent_audits_match_sequential_ones(client) -> None:
    """BentoML runs sync APIs in a thread pool: concurrent audits must not see each other's state."""
    from concurrent.futures import ThreadPoolExecutor

    headers = {"Content-Type": "image/png", "X-Model-Version": "vanilla"}

    def audit(seed: int) -> tuple[str, list[float]]:
        r = client.post("/audit", content=_png(seed=seed), headers=headers)
        assert r.status_code == 200, r.text
        b = r.json()
        return b["heatmap_png"], [c["score"] for c in b["concepts"]]

    sequential = [audit(s) for s in range(4)]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(audit, range(4)))
    for (hm_s, sc_s), (hm_c, sc_c) in zip(sequential, concurrent, strict=True):
        assert hm_s == hm_c and sc_s == pytest.approx(sc_c, rel=1e-5)


def test_compare(client) -> None:
    r = client.post(
        "/compare?versions=vanilla,pclarc-band_aid", content=_png(), headers={"Content-Type": "image/png"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["versions"] == ["vanilla", "pclarc-band_aid"] and set(body["agreement"]) == {"label", "flag"}
    r = client.post("/compare?versions=vanilla,nope", content=_png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 404 and r.json()["valid_versions"] == ["pclarc-band_aid", "vanilla"]


def _dcm(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom's bundled {name} is missing"
    return Path(str(path)).read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "SC_rgb_dcmtk_+eb+cr.dcm",
        "rtdose.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
@pytest.mark.parametrize("content_type", ["application/dicom", "application/octet-stream"])
def test_real_dicom_files_are_predicted_and_audited(client, name: str, content_type: str) -> None:
    """pydicom's bundled real files (CT with rescale, MR, RGB secondary capture, a 15-frame dose
    grid: its first frame, JPEG-LS) through the whole path."""
    body = _dcm(name)
    for endpoint in ("/predict", "/audit"):
        r = client.post(
            endpoint, content=body, headers={"Content-Type": content_type, "X-Model-Version": "vanilla"}
        )
        assert r.status_code == 200, (endpoint, r.text)
        assert r.json()["version"] == "vanilla"
    assert r.json()["heatmap_png"] and len(r.json()["concepts"]) == 2
    r = client.post("/predict", files={"image": (name, body, "application/dicom")})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("MR_truncated.dcm", 422, "invalid_image"),
        ("MR_small.dcm as MPEG-4", 415, "unsupported_media_type"),  # video: no pixel decoder
    ],
)
def test_unsupported_dicom_is_a_named_4xx(client, name: str, status: int, code: str) -> None:
    from pydicom.uid import MPEG4HP41

    from medaudit.testing.dicom import with_transfer_syntax

    body = with_transfer_syntax(_dcm("MR_small.dcm"), MPEG4HP41) if "MPEG" in name else _dcm(name)
    r = client.post("/audit", content=body, headers={"Content-Type": "application/dicom"})
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and r.json()["detail"]
    if status == 415:
        assert MPEG4HP41 in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"not an image at all", {"Content-Type": "image/png"}, 415, "unsupported_media_type"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, {"Content-Type": "image/png"}, 422, "invalid_image"),
        (b"", {"Content-Type": "image/png"}, 400, "empty_body"),
        (None, {"Content-Type": "image/png", "X-Model-Version": "nope"}, 404, "unknown_model_version"),
        (None, {"Content-Type": "image/png", "Authorization": "Bearer wrong"}, 401, "unauthorized"),
    ],
)
def test_bad_requests_are_4xx_json(client, body, headers, status, code) -> None:
    for endpoint in ("/predict", "/audit"):
        r = client.post(endpoint, content=_png() if body is None else body, headers=headers)
        assert r.status_code == status, r.text
        assert r.json()["error"] == code and r.json()["request_id"] == r.headers["x-request-id"]
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/models/", headers=headers).status_code == 401


def test_multipart_and_form_labelled_uploads_reach_the_decoder(client) -> None:
    png = _png()
    r = client.post(
        "/predict", files={"image": ("x.png", png, "image/png")}, headers={"X-Model-Version": "vanilla"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "vanilla" and r.json()["notes"] == []
    r = client.post("/audit", files={"other": ("x.bin", png, "application/octet-stream")})
    assert r.status_code == 200, r.text
    r = client.post("/predict", content=png, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    r = client.post("/predict", data={"field": "no file"}, files={})
    assert r.status_code in (400, 415) and r.json()["error"] in ("empty_body", "unsupported_media_type")
    r = client.post(
        "/predict", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert 400 <= r.status_code < 500 and "error" in r.json()


# ------------------------------------------------------------------------------ tier 3


@pytest.mark.e2e
@pytest.mark.slow
def test_tier3_real_bentoml_serve_with_httpx_and_curl(tiny_store: Path, tmp_path: Path) -> None:
    import httpx

    env = {**_env(tiny_store, auth=False), "OMP_NUM_THREADS": "1"}
    with served(env, tmp_path / "serve.log") as base:
        r = httpx.post(f"{base}/audit", content=_png(), headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["version"] in ("vanilla", "pclarc-band_aid")
        assert httpx.get(f"{base}/models/nope").status_code == 404
        from concurrent.futures import ThreadPoolExecutor

        def predict(_: int) -> int:
            return httpx.post(
                f"{base}/predict", content=_png(), headers={"Content-Type": "image/png"}, timeout=60
            ).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(predict, range(16))) == {200}
        metrics = httpx.get(f"{base}/metrics").text  # the batcher's histogram: every job went through it
        sums = [ln for ln in metrics.splitlines() if ln.startswith("bentoml_service_adaptive_batch_size_sum")]
        assert any('method_name="predict_batch"' in ln and float(ln.split()[-1]) >= 16 for ln in sums), sums
        assert shutil.which("curl"), "curl is part of this tier (apt-get install curl)"
        img = tmp_path / "x.png"
        img.write_bytes(_png())
        curl = ["curl", "-s", "-w", "\n%{http_code}", "--data-binary", f"@{img}"]
        curl += ["-H", "Content-Type: image/png", "-H", "X-Model-Version: vanilla", f"{base}/predict"]
        out = subprocess.run(curl, capture_output=True, text=True, timeout=60, check=True)
        body, code = out.stdout.rsplit("\n", 1)
        assert code == "200" and '"version":"vanilla"' in body.replace(" ", "")
        form = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-F",
            f"image=@{img};type=image/png",
        ]
        out = subprocess.run([*form, f"{base}/audit"], capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout == "200"
        dcm = tmp_path / "ct.dcm"
        dcm.write_bytes(_dcm("CT_small.dcm"))
        curl = ["curl", "-s", "-w", "\n%{http_code}", "--data-binary", f"@{dcm}"]
        curl += ["-H", "Content-Type: application/dicom", f"{base}/audit"]
        out = subprocess.run(curl, capture_output=True, text=True, timeout=60, check=True)
        body, code = out.stdout.rsplit("\n", 1)
        assert code == "200" and '"heatmap_png"' in body, body[:500]
        # The curl examples `make demo` prints, run through a shell exactly as printed.
        from medaudit.cli.commands import try_commands

        example = tmp_path / "demo example.png"
        example.write_bytes(_png())
        port = int(base.rsplit(":", 1)[1])
        demo_curls = [c for c in try_commands(example, port, "pclarc-band_aid") if c.startswith("curl")]
        assert len(demo_curls) == 4
        for cmd in demo_curls:
            out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60, check=True)
            answer = json.loads(out.stdout)
            assert "error" not in answer and "request_id" in answer, (cmd, out.stdout[:300])


@pytest.mark.e2e
@pytest.mark.slow
def test_two_lrp_processes_both_take_audits(tiny_store: Path, tmp_path: Path) -> None:
    """MEDAUDIT_AUDIT_WORKERS=2 starts one auditor worker and two LRP processes under it, and
    concurrent audits reach both processes (each burns CPU on them; BentoML #5426 is why they are
    not two BentoML workers), every one a 200; the queue's own metrics count them all."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import psutil
    from prometheus_client.parser import text_string_to_metric_families

    from medaudit.service.process import serving

    env = {**_env(tiny_store, auth=False), "MEDAUDIT_AUDIT_WORKERS": "2"}
    n = 32
    with serving(env, tmp_path / "serve.log") as server:
        workers = server.worker_cpu_seconds("medaudit-auditor")
        before = server.spawned_cpu_seconds("medaudit-auditor")
        # the BentoML worker, its two LRP processes and multiprocessing's resource tracker
        assert len(before) == 2 and len(workers) == 4, workers
        assert all(psutil.Process(pid).ppid() in workers for pid in before)

        def audit(i: int) -> int:
            headers = {"Content-Type": "image/png", "X-Model-Version": "vanilla"}
            r = httpx.post(f"{server.base}/audit", content=_png(seed=i), headers=headers, timeout=120)
            return r.status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(audit, range(n))) == {200}
        after = server.spawned_cpu_seconds("medaudit-auditor")
        text = httpx.get(f"{server.base}/metrics").text
    spent = {pid: after[pid] - before[pid] for pid in before}
    print(f"CPU seconds by LRP process over {n} audits: {spent}")
    assert all(s > 0.05 for s in spent.values()), spent
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert _metric_sum(families, "medaudit_audit_queue_seconds", "_count") == n
    assert _metric_sum(families, "medaudit_batch_images", "_sum", service="auditor") == n


@pytest.mark.e2e
@pytest.mark.slow
def test_custom_metrics_add_up_across_two_workers(tiny_store: Path, tmp_path: Path) -> None:
    """BentoML #5056: with 2 API workers, /metrics must aggregate every custom series of both."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    env = {
        **_env(tiny_store, auth=False),
        "OMP_NUM_THREADS": "1",
        "BENTOML_CONFIG_OPTIONS": "services.medaudit.workers=2",
    }
    n = 24
    with served(env, tmp_path / "serve.log") as base:
        from concurrent.futures import ThreadPoolExecutor

        def call(i: int) -> int:
            endpoint = "/audit" if i % 4 == 0 else "/predict"
            headers = {"Content-Type": "image/png", "X-Subject-Key": f"s{i}"}
            return httpx.post(
                f"{base}{endpoint}", content=_png(seed=i), headers=headers, timeout=120
            ).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(call, range(n))) == {200}
        text = httpx.get(f"{base}/metrics").text
    log = (tmp_path / "serve.log").read_text()
    assert "[entry_service:medaudit:2]" in log, "the second API worker never started"
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def total(name: str, **labels: str) -> float:
        return _metric_sum(families, name, "_total", **labels)

    print(f"2 workers: {total('medaudit_requests', outcome='ok'):.0f} requests counted of {n}")
    assert total("medaudit_requests", outcome="ok") == n
    assert total("medaudit_ab_assignments") == n
    assert total("medaudit_predictions") == n
    # pclarc-band_aid shadows every request it does not answer itself
    assert total("medaudit_shadow_comparisons") == total("medaudit_ab_assignments", version="vanilla") > 0
    assert _metric_sum(families, "medaudit_stage_seconds", "_count", stage="total") == n
    assert _metric_sum(families, "medaudit_batch_images", "_sum") >= n
    info = [s for s in families["medaudit_model_info"].samples]
    assert {s.labels["version"] for s in info} == {"vanilla", "pclarc-band_aid"}
    assert all(len(s.labels["weights_sha256"]) == 64 for s in info)
    for f in families.values():  # no request-level identifiers as labels, ever
        for s in f.samples:
            assert not {"request_id", "subject_key", "patient_id"} & set(s.labels), s


def test_tier1_thread_settings_reach_the_model_runtimes(svc, monkeypatch) -> None:
    """MEDAUDIT_PREDICT_THREADS sets ONNX Runtime's intra-op threads of every /predict session;
    MEDAUDIT_AUDIT_THREADS sets the torch threads of the auditor's one LRP process (its own), and
    without it several LRP processes (MEDAUDIT_AUDIT_WORKERS) share the usable cores out."""
    import torch

    from medaudit.service.api import Auditor, Predictor
    from medaudit.service.audit_pool import LocalLane, ProcessLane

    monkeypatch.setenv("MEDAUDIT_PREDICT_THREADS", "1")
    batcher = Predictor()
    for p in batcher.predictors.values():
        assert p.session.get_session_options().intra_op_num_threads == 1
    before = torch.get_num_threads()
    monkeypatch.setenv("MEDAUDIT_AUDIT_THREADS", "1")
    monkeypatch.setenv("MEDAUDIT_AUDIT_WORKERS", "1")
    try:
        auditor = Auditor()
        asyncio.run(auditor.close())
        assert [type(lane) for lane in auditor.pool.lanes] == [LocalLane]
        assert torch.get_num_threads() == 1
        # Several LRP processes and no thread count: the usable cores shared out among them.
        monkeypatch.delenv("MEDAUDIT_AUDIT_THREADS")
        monkeypatch.setenv("MEDAUDIT_AUDIT_WORKERS", "2")
        torch.set_num_threads(7)
        auditor = Auditor()
        asyncio.run(auditor.close())
        lanes = auditor.pool.lanes
        assert [type(lane) for lane in lanes] == [ProcessLane, ProcessLane]
        assert [lane.torch_threads for lane in lanes] == [max(1, usable_cpus() // 2)] * 2  # type: ignore[attr-defined]
        assert torch.get_num_threads() == 7  # this process runs no LRP: left alone
    finally:
        torch.set_num_threads(before)


def test_tier1_auditor_sheds_a_full_queue_as_a_503(svc, monkeypatch) -> None:
    """An audit whose wait in the auditor's queue would pass the limit is refused as BentoML's
    ServiceUnavailable (a 503 on the internal hop), which the entry turns into its own 503 with
    Retry-After at once; an admitted audit answers as the engines do."""
    from bentoml.exceptions import ServiceUnavailable

    from medaudit.service.api import Auditor
    from medaudit.service.dependencies import call_dependency

    monkeypatch.setenv("MEDAUDIT_AUDIT_WORKERS", "1")
    auditor = Auditor()
    try:
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        job = {"version": "vanilla", "pixels": pixels, "raw_heatmap": False}
        answer = asyncio.run(auditor.audit(job))
        assert answer["result"]["prediction"]["version"] == "vanilla" and answer["result"]["heatmap"] is None
        auditor.pool.max_wait_s = -1.0  # any wait is too long
        with pytest.raises(ServiceUnavailable, match="audits queued"):
            asyncio.run(auditor.audit(job))
        with pytest.raises(ServiceOverloadedError) as ei:
            asyncio.run(call_dependency(auditor.audit, job, 5.0))
        assert ei.value.status == 503 and ei.value.headers() == {"Retry-After": "1"}
    finally:
        asyncio.run(auditor.close())


def test_tier1_services_freeze_their_startup_heap(svc, monkeypatch) -> None:
    """A service, once loaded and warmed, takes its startup objects out of the garbage collector's
    full passes (gc.freeze): one full pass over them stalled every request in flight for ~285 ms
    in the entry service, the /predict p99."""
    import gc

    from medaudit.service.api import Auditor, Predictor

    monkeypatch.setenv("MEDAUDIT_AUDIT_WORKERS", "1")  # the auditor's models load in this process
    for service in (Predictor, Auditor):
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        instance = service()
        assert gc.get_freeze_count() > 10_000, service
        if hasattr(instance, "pool"):  # the auditor's lane thread
            asyncio.run(instance.close())
    assert len(gc.get_objects()) < gc.get_freeze_count()


def test_chunked_uploads_over_the_byte_limit_are_413_and_small_ones_pass(client) -> None:
    """A body without Content-Length (chunked transfer) gets the same limit as a declared one.
    (The test client assembles the whole body before the app runs; that the service stops reading
    at the limit is tested on the middleware in tests/unit/test_uploads.py.)"""
    from medaudit.service.inputs import Limits

    limit = Limits().max_bytes
    chunk = b"\x89PNG\r\n\x1a\n" + b"\x00" * (2**20 - 8)
    for ctype in ("image/png", "multipart/form-data; boundary=x"):
        r = client.post(
            "/predict",
            content=(chunk for _ in range(limit // len(chunk) + 2)),
            headers={"Content-Type": ctype, "X-Request-Id": "big-1"},
        )
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "payload_too_large" and r.json()["request_id"] == "big-1"
    png = _png()
    r = client.post(
        "/predict",
        content=(png[i : i + 100] for i in range(0, len(png), 100)),
        headers={"Content-Type": "image/png", "X-Model-Version": "vanilla"},
    )
    assert r.status_code == 200, r.text
    r = client.post(  # a declared length over the limit is refused before reading
        "/audit", content=b"\x00" * (limit + 1), headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
