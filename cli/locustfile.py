"""Locust load mix for medaudit: what a hospital integration's traffic looks like, for ``make load``.

Run it through :mod:`medaudit.cli.load` (``benchmarks/load.py``, ``make load``, the short test in
``tests/integration/test_load_short.py``), or by hand against any server::

    locust -f cli/locustfile.py --headless -u 24 -r 8 -t 60s --host http://127.0.0.1:3000

The mix (task weights of :class:`ClinicUser`): ~70% ``POST /predict``, ~20% ``POST /audit``, ~7%
``POST /compare``, ~3% ``GET /models/``. Every POST body is one image drawn from a weighted pool
of synthderm lesions (half with a band-aid) encoded as PNG and JPEG at 64 to 1024 px, plus DICOM
Part-10 files: 8-bit RGB VL Photographic and 16-bit MONOCHROME2 Secondary Capture with a window.
Most requests carry ``X-Subject-Key`` from a pool of patient ids, so A/B routing hashes them; a
tenth of the predictions name ``X-Model-Version`` explicitly. The screened variant sends a share
of the predictions as ``POST /predict?detail=scores`` (``MEDAUDIT_LOAD_SCREEN``; 1: every one):
screens, named apart in the stats, whose answers must carry concept scores and a flag decision,
and a heatmap only where ``heatmap_reason`` says why.

Requests are named ``ENDPOINT [PAYLOAD]`` (``/predict [jpeg-1024]``): locust's stats are then per
endpoint and format, and :mod:`medaudit.cli.load` merges them per endpoint. A response counts as a
failure when it is not 2xx (locust's default) or when its body or headers are wrong: missing
fields, an ``X-Request-ID`` that is not the one sent, an ``X-Model-Version`` that is not the body's
version or not the one asked for, or a subject key answered by two versions (hash routing is
sticky while the weights stay the same).

Environment: ``MEDAUDIT_API_KEY`` (sent as ``Authorization: Bearer``, when auth is on),
``MEDAUDIT_LOAD_WAIT`` (most think time between a user's requests, s; default 0.5),
``MEDAUDIT_LOAD_SUBJECTS`` (patient-id pool size, default 500), ``MEDAUDIT_LOAD_IMAGES``
(distinct lesions per payload kind, default 4), ``MEDAUDIT_LOAD_SCREEN`` (share of the
predictions screened, 0 to 1, default 0), ``MEDAUDIT_LOAD_SUMMARY`` (a path: at quit, the
raw stats, errors and payload list are written there as JSON for :mod:`medaudit.cli.load`).

No torch here: locust runs on gevent and monkey-patches the standard library at import, so the
file only needs numpy, Pillow, pydicom and synthderm (which is numpy + Pillow).
"""

from __future__ import annotations

import io
import json
import os
import random
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from locust import HttpUser, between, events, task
from PIL import Image

#: ``(payload name, weight)``: mostly camera-sized PNG/JPEG, some large photos and DICOM files.
PAYLOAD_WEIGHTS: dict[str, int] = {
    "png-64": 2,
    "png-224": 5,
    "png-512": 2,
    "jpeg-224": 5,
    "jpeg-512": 3,
    "jpeg-1024": 1,
    "dicom-rgb-224": 2,
    "dicom-mono16-512": 1,
}
SUMMARY_VAR = "MEDAUDIT_LOAD_SUMMARY"


@dataclass(frozen=True)
class Payload:
    """One request body: ``kind`` names it in the stats, several lesions share a kind."""

    kind: str
    body: bytes
    content_type: str


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _lesions(n: int, size: int = 256) -> list[np.ndarray]:
    """``n`` synthderm test lesions (RGB uint8), every other one with a band-aid."""
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig

    ds = SynthDerm(SynthDermConfig(size=size))
    out = []
    for k, i in enumerate(ds.indices("test")[:n]):
        s = ds.sample(int(i), "attacked", attack="band_aid") if k % 2 else ds.sample(int(i), "clean")
        out.append(s.image)
    return out


def _encoded(rgb: np.ndarray, fmt: str, side: int) -> bytes:
    im = Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def dicom_bytes(rgb: np.ndarray, *, mono16: bool = False) -> bytes:
    """A DICOM Part-10 file of ``rgb``: 8-bit RGB VL Photographic Image, or (``mono16``) a 12-bit in
    16 MONOCHROME2 Secondary Capture of its luminance with a window, as a modality would send."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    sop_class = UID("1.2.840.10008.5.1.4.1.1.7" if mono16 else "1.2.840.10008.5.1.4.1.1.77.1.4")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "LOAD-TEST"
    ds.Modality = "OT" if mono16 else "XC"
    if mono16:
        lum = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        ds.set_pixel_data((lum * 16).astype(np.uint16), "MONOCHROME2", 12)
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
    else:
        ds.set_pixel_data(np.ascontiguousarray(rgb), "RGB", 8)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def build_payloads(n_lesions: int) -> list[Payload]:
    """Every payload kind of :data:`PAYLOAD_WEIGHTS` for each of ``n_lesions`` lesions."""
    out = []
    for rgb in _lesions(n_lesions):
        for kind in PAYLOAD_WEIGHTS:
            fmt, _, side_s = kind.rpartition("-")
            side = int(side_s)
            if fmt == "png":
                out.append(Payload(kind, _encoded(rgb, "PNG", side), "image/png"))
            elif fmt == "jpeg":
                out.append(Payload(kind, _encoded(rgb, "JPEG", side), "image/jpeg"))
            else:
                small = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR))
                body = dicom_bytes(small, mono16=fmt == "dicom-mono16")
                out.append(Payload(kind, body, "application/dicom"))
    return out


PAYLOADS = build_payloads(_env_int("MEDAUDIT_LOAD_IMAGES", 4))
_WEIGHTS = [PAYLOAD_WEIGHTS[p.kind] for p in PAYLOADS]
SUBJECTS = [f"patient-{i:05d}" for i in range(_env_int("MEDAUDIT_LOAD_SUBJECTS", 500))]
WAIT_MAX = float(os.environ.get("MEDAUDIT_LOAD_WAIT", "") or 0.5)
#: Share of the /predict requests sent as screens (``?detail=scores``).
SCREEN_SHARE = float(os.environ.get("MEDAUDIT_LOAD_SCREEN", "") or 0.0)

# subject key -> the version hash routing gave it; shared by every user of this process.
_ROUTED: dict[str, str] = {}
_ROUTED_LOCK = threading.Lock()


class BadResponse(Exception):
    """A 2xx answer whose body or headers are not what the request should have got."""


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise BadResponse(what)


class ClinicUser(HttpUser):
    """A client system: mostly predictions, some audits and comparisons, now and then the model list."""

    wait_time = between(0.0, WAIT_MAX)

    def on_start(self) -> None:
        self.api_key = os.environ.get("MEDAUDIT_API_KEY", "").strip()
        self.versions: list[str] = []
        self.models()

    # ----------------------------------------------------------------------------- helpers

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"X-Request-ID": uuid.uuid4().hex}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return {**h, **(extra or {})}

    def _post(self, endpoint: str, check: Any, *, explicit: bool = False, query: str = "") -> None:
        """POST a random payload to ``endpoint``; ``check(body)`` raises :class:`BadResponse`."""
        payload = random.choices(PAYLOADS, weights=_WEIGHTS)[0]
        extra = {"Content-Type": payload.content_type}
        version = None
        if explicit and self.versions:
            version = random.choice(self.versions)
            extra["X-Model-Version"] = version
        subject = random.choice(SUBJECTS)
        extra["X-Subject-Key"] = subject
        headers = self._headers(extra)
        name = f"{endpoint} [{payload.kind}]"
        with self.client.post(
            endpoint + query, data=payload.body, headers=headers, name=name, catch_response=True
        ) as r:
            if not r.ok:
                return  # locust already counts it, with the status in the error
            try:
                _require(r.headers.get("X-Request-ID") == headers["X-Request-ID"], "X-Request-ID not echoed")
                body = r.json()
                check(body)
                if "version" in body:
                    _require(r.headers.get("X-Model-Version") == body["version"], "X-Model-Version != body")
                    if version is not None:
                        _require(body["version"] == version, f"asked {version}, got {body['version']}")
                    elif body.get("via") == "hash":
                        with _ROUTED_LOCK:
                            first = _ROUTED.setdefault(subject, body["version"])
                        _require(
                            first == body["version"], f"subject routed to {first} then {body['version']}"
                        )
                r.success()
            except (BadResponse, ValueError, KeyError, TypeError) as e:
                r.failure(f"{type(e).__name__}: {e}")

    # ----------------------------------------------------------------------------- tasks

    @task(70)
    def predict(self) -> None:
        def check(b: dict[str, Any]) -> None:
            _require(b["prediction"]["label"] in b["prediction"]["probabilities"], "label not a class")

        if random.random() < SCREEN_SHARE:
            self._post("/predict?detail=scores", _check_screen, explicit=random.random() < 0.1)
        else:
            self._post("/predict", check, explicit=random.random() < 0.1)

    @task(20)
    def audit(self) -> None:
        def check(b: dict[str, Any]) -> None:
            _require(isinstance(b["prediction"]["label"], str), "no prediction.label")
            _require(isinstance(b["flag"]["flagged"], bool), "no flag.flagged")
            _require(len(b["concepts"]) > 0, "no concepts")

        self._post("/audit", check)

    @task(7)
    def compare(self) -> None:
        def check(b: dict[str, Any]) -> None:
            _require(len(b["results"]) >= 1 and set(b["results"]) == set(b["versions"]), "bad results")
            _require(isinstance(b["agreement"]["label"], bool), "no agreement.label")

        self._post("/compare", check)

    @task(3)
    def models(self) -> None:
        with self.client.get("/models/", headers=self._headers(), name="/models/", catch_response=True) as r:
            if not r.ok:
                return
            try:
                versions = [v["version"] for v in r.json()["versions"]]
                _require(bool(versions), "no versions served")
                self.versions = versions
                r.success()
            except (BadResponse, ValueError, KeyError, TypeError) as e:
                r.failure(f"{type(e).__name__}: {e}")


def _check_screen(b: dict[str, Any]) -> None:
    """A screen: the prediction, every concept scored, a flag decision, and a heatmap only where
    the answer says why it was computed (the screen flagged, or was sampled)."""
    _require(b["detail"] == "scores", f"detail {b.get('detail')!r}, asked for scores")
    _require(b["prediction"]["label"] in b["prediction"]["probabilities"], "label not a class")
    _require(len(b["concepts"]) > 0 and isinstance(b["flag"]["flagged"], bool), "no concepts or flag")
    _require(b["heatmap_png"] is None or b["heatmap_reason"] is not None, "a heatmap without its reason")


@events.quitting.add_listener
def write_summary(environment: Any, **_kwargs: Any) -> None:
    """At quit, the raw stats (with response-time histograms) and errors as JSON, for clients.load.

    Locust's own ``--csv`` files are rewritten once a second and its ``--json-file`` has no
    errors; this is the complete picture, taken after the last request.
    """
    path = os.environ.get(SUMMARY_VAR)
    runner = environment.runner
    if not path or runner is None:
        return
    stats = runner.stats
    summary = {
        "entries": [e.serialize() for e in stats.entries.values()],
        "errors": [
            {
                "method": e.method,
                "name": e.name,
                "error": e.to_name().removeprefix(f"{e.method} {e.name}: "),
                "occurrences": e.occurrences,
            }
            for e in stats.errors.values()
        ],
        "exceptions": [
            {"count": x["count"], "msg": x["msg"], "nodes": sorted(x["nodes"])}
            for x in runner.exceptions.values()
        ],
        "start_time": stats.total.start_time,
        "last_request_timestamp": stats.total.last_request_timestamp,
        "payloads": [
            {"kind": k, "weight": w, "bytes": [len(p.body) for p in PAYLOADS if p.kind == k]}
            for k, w in PAYLOAD_WEIGHTS.items()
        ],
        "subjects": len(SUBJECTS),
        "wait_max_s": WAIT_MAX,
        "screen_share": SCREEN_SHARE,
    }
    Path(path).write_text(json.dumps(summary))
