"""Flags through the HTTP service (issue #7 wired into #6): /audit publishes what the policy flags to
the real Redis, a worker turns it into a review record, and a reviewer resolves it over HTTP.

The policy is opened wide (``MEDAUDIT_FLAG_FPR=0.99``, share 0) so that the tiny store's random
models flag every audit; the stream lives under a per-run key prefix that is deleted afterwards.

The same served app (one start, shared) then takes DICOM in and out (service/dicomweb.py): /audit
answered in DICOM, STOW-RS with mixed instances and per-instance failures, WADO-RS retrieval, the
client's DICOM calls and ``medaudit audit FILE.dcm --dicom-out``, and no patient identifier in logs,
metrics or the flag stream. Those tests come last: the first one counts the stream's entries.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medaudit.service.auth import hash_key
from medaudit.service.dicom_out import Geometry, mask_of, read_report, to_source_grid
from medaudit.service.dicom_store import parse_multipart_related
from medaudit.testing import dicom as tdicom

pytestmark = [
    pytest.mark.redis,
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]

SALT, CLIENT_KEY, REVIEWER_KEY = "flag-salt", "client-key-flags-0123456789", "reviewer-key-flags-0123456789"
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tiny_store: Path, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory, new_medaudit_app):
    from starlette.testclient import TestClient

    env = {
        "BENTOML_HOME": str(tiny_store),
        "MEDAUDIT_VERSIONS": "vanilla,pclarc-band_aid",
        "MEDAUDIT_SHADOW_VERSION": "pclarc-band_aid",
        "MEDAUDIT_AUTH": "on",
        "MEDAUDIT_API_KEYS": f"client:{hash_key(CLIENT_KEY, SALT)},reviewer:{hash_key(REVIEWER_KEY, SALT)}",
        "MEDAUDIT_API_KEY_SALT": SALT,
        "MEDAUDIT_FLAGS": "on",
        "MEDAUDIT_FLAG_FPR": "0.99",
        "MEDAUDIT_FLAG_SHARE": "0",
        "MEDAUDIT_FLAG_PREFIX": redis_prefix,
        "MEDAUDIT_FLAG_SPOOL_DIR": str(tmp_path_factory.mktemp("spool")),
        "MEDAUDIT_DICOM_DIR": str(tmp_path_factory.mktemp("dicomweb")),
        "MEDAUDIT_SUBJECT_SECRET": "routing-secret",
        "REDIS_URL": REDIS_URL,
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with TestClient(new_medaudit_app()) as c:
            c.headers["Authorization"] = f"Bearer {CLIENT_KEY}"
            yield c


def _stream_request_ids(redis_prefix: str) -> list[str]:
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect

    r = connect(REDIS_URL)
    out = []
    for _id, fields in r.xrange(FlagKeys(redis_prefix).stream):
        out.append(fields[b"request_id"].decode())
    return out


def test_audit_flags_are_published_once_reviewed_and_resolved(client, redis_prefix: str) -> None:
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect
    from medaudit.service.flags.worker import Worker, WorkerConfig

    rids = [f"req-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for i, rid in enumerate(rids):
        headers = {"Content-Type": "image/png", "X-Request-ID": rid, "X-Subject-Key": f"patient-{i}"}
        r = client.post("/audit", content=_png(i), headers=headers)
        assert r.status_code == 200, r.text
        flag = r.json()["flag"]
        assert flag["flagged"] and flag["severity"] in ("low", "medium", "high"), flag
        assert flag["concepts"] == [f["concept"] for f in flag["flags"]] and flag["reasons"]
    # The same request id again (a client retry) must not publish twice.
    client.post("/audit", content=_png(0), headers={"Content-Type": "image/png", "X-Request-ID": rids[0]})
    deadline = time.monotonic() + 10
    while set(_stream_request_ids(redis_prefix)) != set(rids) and time.monotonic() < deadline:
        time.sleep(0.1)
    published = _stream_request_ids(redis_prefix)
    print(f"flags: {len(rids)} flagged requests, {len(published)} stream entries")
    assert set(published) == set(rids)
    stream = connect(REDIS_URL).xrange(FlagKeys(redis_prefix).stream)
    for _id, fields in stream:
        assert b"image" not in fields and b"patient-0" not in b"".join(fields.values())

    worker = Worker(
        connect(REDIS_URL, timeout=5.0), FlagKeys(redis_prefix), WorkerConfig(consumer="t", block_ms=200)
    )
    stats = worker.run(drain=True)
    assert stats.written == len(stream) and stats.failed == 0

    reviewer = {"Authorization": f"Bearer {REVIEWER_KEY}"}
    assert client.get("/reviews/").status_code == 403  # a client key is not a reviewer
    assert client.get("/reviews/", headers={"Authorization": "Bearer nope"}).status_code == 401
    listing = client.get("/reviews/?status=open", headers=reviewer)
    assert listing.status_code == 200, listing.text
    items = listing.json()["items"]
    assert {i["request_id"] for i in items} == set(rids)
    fid = items[0]["flag_id"]
    shown = client.get(f"/reviews/{fid}", headers=reviewer).json()
    assert shown["flag_id"] == fid and shown["heatmap_png"]
    r = client.post(f"/reviews/{fid}/resolve", json={"verdict": "artifact_confirmed"}, headers=reviewer)
    assert r.status_code == 200 and r.json()["status"] == "resolved", r.text
    r = client.post(f"/reviews/{fid}/resolve", json={"verdict": "false_alarm"}, headers=reviewer)
    assert r.status_code == 409
    r = client.post(f"/reviews/{items[1]['flag_id']}/resolve", json={"verdict": "maybe"}, headers=reviewer)
    assert r.status_code == 422
    assert client.get("/reviews/nope", headers=reviewer).status_code == 404


def test_flag_metrics_are_exported(client) -> None:
    # In-process the registry is read directly: BentoML's /metrics route does not answer under
    # starlette's TestClient (it does under `bentoml serve`: test_service.py's 2-worker test).
    from prometheus_client import generate_latest

    text = generate_latest().decode()
    assert 'medaudit_flags_total{concept="' in text
    assert 'medaudit_flag_publish_total{outcome="published"}' in text
    assert 'stage="flag_publish"' in text


# ------------------------------------------------------------------------------ DICOM in and out

DICOM_PARTS = 'multipart/related; type="application/dicom"'
KIND = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.30": "PM",
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",
}


def _parts(r) -> list[bytes]:
    assert r.status_code == 200, r.text
    return [data for _, data in parse_multipart_related(r.content, r.headers["content-type"])]


def _read(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))


def test_audit_answers_dicom_objects_equal_to_its_json(client) -> None:
    src = tdicom.source("ct", 48, 40, seed=1)
    headers = {"Content-Type": "application/dicom", "X-Model-Version": "vanilla"}
    js = client.post("/audit", content=src, headers=headers).json()
    r = client.post("/audit", content=src, headers={**headers, "Accept": DICOM_PARTS})
    objs = {KIND[_read(p).SOPClassUID]: _read(p) for p in _parts(r)}
    assert set(objs) == {"SEG", "PM", "SR"} and r.headers["x-model-version"] == "vanilla"
    source = _read(src)
    for ds in objs.values():
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    seg = objs["SEG"]
    present = [c for c in js["concepts"] if c["present"]]
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == [c["concept"] for c in present]
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(seg)
    geometry = Geometry((32, 32))
    for k, c in enumerate(present, start=1):
        want = to_source_grid(mask_of(c["mask_png"]), (48, 40), geometry)
        got = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[k])[0, :, :, 0]
        np.testing.assert_array_equal(got.astype(bool), want)
    (group,) = read_report(objs["SR"])
    assert group["codes"]["prediction"] == f"class/{js['prediction']['label']}"
    for label, p in js["prediction"]["probabilities"].items():
        assert group["values"][f"probability/{label}"] == p
    for c in js["concepts"]:
        assert group["values"][f"score/{c['concept']}"] == c["score"]
        assert group["values"][f"share/{c['concept']}"] == c["relevance_share"]


def _dciodvfy_errors(data: bytes, tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(data)
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


def _mixed_instances() -> tuple[list[bytes], list[str]]:
    """8 instances: 4 modalities, 5 transfer syntaxes, a multi-frame one, and two that must fail."""
    import pydicom

    ct = tdicom.source("ct", 40, 36, seed=2)
    files = [
        ct,
        tdicom.encode(tdicom.source("ct", 32, 32, seed=3), "rle"),
        tdicom.encode(tdicom.source("cr", 36, 40, seed=4), "jpegls"),
        tdicom.source("rgb", 32, 48, seed=5),
        tdicom.encode(tdicom.source("rgb", 40, 40, seed=6), "jpeg2000"),
        tdicom.source("multiframe", 32, 32, frames=3, seed=7),
        ct[: len(ct) // 2],  # truncated
        tdicom.with_transfer_syntax(tdicom.source("ct", 32, 32, seed=8), pydicom.uid.MPEG4HP41),
    ]
    return files, ["ok"] * 6 + ["invalid_image", "unsupported_media_type"]


def test_stow_audits_eight_mixed_instances_with_per_instance_failures(client, tmp_path: Path) -> None:
    from medaudit.clients import MedauditClient

    files, expected = _mixed_instances()
    mc = MedauditClient(http=client, retries=0)
    res = mc.stow(files, frames="all")
    assert [i.status if i.ok else i.error for i in res.instances] == expected
    assert (res.audited, res.failed) == (6, 2) and res.retrievable_for_s == 3600
    failed = res.instances[7]
    assert failed.http_status == 415 and "1.2.840.10008.1.2.4.102" in (failed.detail or "")
    multi = res.instances[5]
    assert [f["frame"] for f in multi.frames] == [1, 2, 3]
    import pydicom

    for inst, src in zip(res.instances[:6], files[:6], strict=True):
        source = pydicom.dcmread(io.BytesIO(src))
        assert inst.sop_instance_uid == source.SOPInstanceUID
        assert {o.kind for o in inst.objects} >= {"PM", "SR"}
        for o in inst.objects:
            (data,) = mc.retrieve(o.study_instance_uid, o.series_instance_uid, o.sop_instance_uid)
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.SOPInstanceUID == o.sop_instance_uid and ds.StudyInstanceUID == source.StudyInstanceUID
            assert not _dciodvfy_errors(data, tmp_path, f"{inst.index}-{o.kind}"), (inst.index, o.kind)
        (sr,) = [
            pydicom.dcmread(io.BytesIO(d))
            for o in inst.objects
            if o.kind == "SR"
            for d in mc.retrieve(o.study_instance_uid, o.series_instance_uid, o.sop_instance_uid)
        ]
        groups = read_report(sr)
        assert [g["frame"] for g in groups] == [f["frame"] for f in inst.frames]
        for g, f in zip(groups, inst.frames, strict=True):
            for c in f["concepts"]:
                assert g["values"][f"percentile/{c['concept']}"] == c["percentile"]
            assert g["texts"] == f["flag"]["reasons"]
    # the study folder holds every created object of the study
    study = res.instances[0].study_instance_uid
    assert study is not None and len(mc.retrieve(study)) == len(res.instances[0].objects)


def test_wado_refuses_what_was_never_created(client) -> None:
    r = client.get("/dicomweb/studies/1.2.3/series/4.5/instances/6.7")
    assert r.status_code == 404 and r.json()["error"] == "unknown_instance"
    r = client.get("/dicomweb/studies/..%2F..%2Fetc")
    assert r.status_code == 404


def test_dicom_answers_refuse_what_they_cannot_give(client) -> None:
    src = tdicom.source("ct", 32, 32)
    r = client.post("/audit", content=src, headers={"Accept": "application/dicom"})
    assert r.status_code == 406 and "multipart/related" in r.json()["detail"]
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(png, format="PNG")
    r = client.post("/audit", content=png.getvalue(), headers={"Accept": DICOM_PARTS})
    assert r.status_code == 406 and "DICOM input" in r.json()["detail"]
    r = client.post("/dicomweb/studies", content=b"x", headers={"Content-Type": "application/dicom"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_upload"
    r = client.post("/audit?frames=0", content=tdicom.source("multiframe"), headers={"Accept": DICOM_PARTS})
    assert r.status_code == 422 and r.json()["error"] == "invalid_parameter"
    r = client.post("/audit?detail=scores", content=src, headers={"Accept": DICOM_PARTS})
    assert r.status_code == 406 and "detail='scores'" in r.json()["detail"]
    r = client.post("/audit?detail=scores", content=src)  # the same screen in JSON is answered
    assert r.status_code == 200 and r.json()["detail"] == "scores"


def test_cli_dicom_out_writes_the_objects(client, tmp_path: Path, monkeypatch) -> None:
    from medaudit.clients import MedauditClient, service_cmd

    monkeypatch.setattr(
        service_cmd, "open_client", lambda url, key, timeout: MedauditClient(http=client, retries=0)
    )
    f = tmp_path / "study.dcm"
    f.write_bytes(tdicom.source("ct", 32, 32, seed=11))
    paths = service_cmd.audit_to_dicom(
        f,
        url="http://test",
        api_key=None,
        version="vanilla",
        subject_key=None,
        out=tmp_path / "out",
        timeout=30,
    )
    assert sorted(p.name for p in paths) == ["study_PM.dcm", "study_SEG.dcm", "study_SR.dcm"]
    import pydicom

    for p in paths:
        assert pydicom.dcmread(p).StudyInstanceUID == pydicom.dcmread(f).StudyInstanceUID
    parts = MedauditClient(http=client, retries=0).audit_dicom(f, version="vanilla")
    assert len(parts) == 3


def test_no_patient_identifier_in_logs_metrics_or_the_flag_stream(client, redis_prefix: str, caplog) -> None:
    """Instances carrying identifiers through /audit (JSON and DICOM), STOW-RS and the flag path."""
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect

    caplog.set_level(logging.DEBUG)
    src = tdicom.source("ct", 32, 32, seed=12)
    broken = src[: len(src) // 3]
    for body, accept in ((src, "application/json"), (src, DICOM_PARTS), (broken, "application/json")):
        r = client.post(
            "/audit", content=body, headers={"Content-Type": "application/dicom", "Accept": accept}
        )
        assert r.status_code in (200, 422), r.text
        for ident in tdicom.IDENTIFIERS:
            if accept == "application/json":
                assert ident not in r.text
    from medaudit.clients import MedauditClient

    res = MedauditClient(http=client, retries=0).stow([src, broken])
    assert res.audited == 1 and res.instances[1].status == "failed"
    r = connect(REDIS_URL)
    try:
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not r.xlen(FlagKeys(redis_prefix).stream):
            time.sleep(0.1)
        stream = r.xrange(FlagKeys(redis_prefix).stream)
        assert stream, "the flag path was not exercised"
        dumped = json.dumps([{k.decode(): v.decode("latin-1") for k, v in f.items()} for _, f in stream])
        keys = " ".join(k.decode() for k in r.scan_iter(match=f"{redis_prefix}:*"))
    finally:
        r.close()
    # what /metrics exposes of this process (served in-process, BentoML's route needs its
    # multiprocess folder; tests/integration/test_service.py reads it from a real `bentoml serve`)
    from prometheus_client import REGISTRY, generate_latest

    metrics_text = generate_latest(REGISTRY).decode()
    assert "medaudit_requests_total" in metrics_text and "/dicomweb/studies" in metrics_text
    logs = "\n".join(rec.getMessage() for rec in caplog.records)
    for ident in tdicom.IDENTIFIERS:
        assert ident not in dumped and ident not in keys
        assert ident not in metrics_text
        assert ident not in logs
    # routed by the keyed hash of the Patient ID: never the ID, never its plain sha256
    import hashlib

    assert hashlib.sha256(tdicom.PATIENT_ID.encode()).hexdigest() not in dumped
