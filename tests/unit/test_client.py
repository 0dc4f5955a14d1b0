"""The HTTP client (medaudit.clients): parsing and error mapping against the in-process service
(starlette's TestClient injected), retries against a tiny real HTTP server that fails on purpose,
and the async client against the service over a real socket (uvicorn in a thread)."""

from __future__ import annotations

import asyncio
import email.utils
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medaudit.clients import (
    AsyncMedauditClient,
    AuditResponse,
    InvalidInput,
    MedauditClient,
    MedauditConnectionError,
    MedauditHTTPError,
    RateLimited,
    ResponseFormatError,
    RetryPolicy,
    ServerError,
    Unauthorized,
    UnknownVersion,
    encode_image,
    sniff_content_type,
)
from medaudit.clients.retry import parse_retry_after
from medaudit.service.process import free_port

# bentoml 1.4.40 builds its IO schemas through a pydantic hook deprecated in pydantic 2.11: theirs to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")

VERSIONS = ["pclarc-band_aid", "vanilla"]  # sorted, as the service lists valid versions
FAST = RetryPolicy(retries=3, base_delay=0.01, max_delay=0.05)


def _png(size: int = 40, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mc(live_service, new_medaudit_app) -> Iterator[MedauditClient]:
    """The sync client over starlette's TestClient on the in-process app (same env as live_service)."""
    from starlette.testclient import TestClient

    with TestClient(new_medaudit_app()) as tc, MedauditClient(http=tc, api_key=live_service.client_key) as c:
        yield c


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize(
    ("data", "suffix", "ctype"),
    [
        (b"\x89PNG\r\n\x1a\n....", "", "image/png"),
        (b"\xff\xd8\xff\xe0....", ".png", "image/jpeg"),  # the bytes win over the suffix
        (b"II*\x00....", "", "image/tiff"),
        (b"MM\x00*....", "", "image/tiff"),
        (b"GIF89a....", "", "image/gif"),
        (b"\0" * 128 + b"DICM....", "", "application/dicom"),
        (b"II*\x00" + b"\0" * 124 + b"DICM....", ".tif", "application/dicom"),  # TIFF in the preamble
        (b"\0" * 200, ".DCM", "application/dicom"),  # no preamble magic: the suffix decides
        (b"\0" * 200, ".jpeg", "image/jpeg"),
        (b"plain text", ".txt", "application/octet-stream"),
        (b"", "", "application/octet-stream"),
    ],
)
def test_sniff_content_type(data: bytes, suffix: str, ctype: str) -> None:
    assert sniff_content_type(data, suffix) == ctype


def test_encode_image_accepts_paths_bytes_pil_and_arrays(tmp_path: Path) -> None:
    png = _png()
    p = tmp_path / "x.png"
    p.write_bytes(png)
    assert encode_image(p) == (png, "image/png")
    assert encode_image(str(p)) == (png, "image/png")
    assert encode_image(bytearray(png)) == (png, "image/png")
    rgb = np.asarray(Image.open(io.BytesIO(png)))
    for img in (rgb, Image.fromarray(rgb), Image.fromarray(rgb).convert("CMYK")):
        data, ctype = encode_image(img)
        assert ctype == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), rgb)
    grey16 = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_image(grey16)[0]))), grey16)
    with pytest.raises(ValueError, match="float32"):
        encode_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(4, 4, 2\)"):
        encode_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match="got int"):
        encode_image(3)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        encode_image(tmp_path / "missing.png")


# ------------------------------------------------------------------------------ parsing


def test_predict_parses_routing_shadow_and_request_id(mc: MedauditClient) -> None:
    res = mc.predict(_png(), version="vanilla", request_id="rid-42")
    assert (res.request_id, res.version, res.via) == ("rid-42", "vanilla", "explicit")
    assert res.prediction.version == "vanilla" and res.prediction.label in res.prediction.probabilities
    assert sum(res.prediction.probabilities.values()) == pytest.approx(1.0)
    assert res.prediction.probability == max(res.prediction.probabilities.values())
    assert res.shadow is not None and res.shadow.version == "pclarc-band_aid"
    assert isinstance(res.shadow.agree, bool) and res.notes == ()
    keyed = {mc.predict(_png(), subject_key="patient-7").version for _ in range(3)}
    assert len(keyed) == 1 and mc.predict(_png(), subject_key="patient-7").via == "hash"


def test_predict_accepts_every_image_form(mc: MedauditClient, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    rgb = np.random.default_rng(1).integers(0, 256, size=(36, 36, 3), dtype=np.uint8)
    jpeg = tmp_path / "x.jpg"
    Image.fromarray(rgb).save(jpeg)
    dicom = get_testdata_file("MR_small.dcm", download=False)
    assert isinstance(dicom, str)
    for image in (rgb, Image.fromarray(rgb), jpeg, jpeg.read_bytes(), Path(dicom)):
        res = mc.predict(image, version="vanilla")
        assert res.version == "vanilla"
        assert not any("content type" in n.lower() for n in res.notes), res.notes  # declared = sniffed
    assert any("DICOM" in n for n in mc.predict(dicom, version="vanilla").notes)


def test_audit_parses_heatmaps_concepts_masks_and_flag(mc: MedauditClient) -> None:
    res = mc.audit(_png(24), version="pclarc-band_aid", raw_heatmap=True)
    assert isinstance(res, AuditResponse) and (res.version, res.via) == ("pclarc-band_aid", "explicit")
    assert res.shadow is None  # the shadow does not shadow itself
    assert Image.open(io.BytesIO(res.heatmap_png)).size == (32, 32)
    assert res.heatmap is not None and res.heatmap.dtype == np.float16 and res.heatmap.shape == (32, 32)
    assert not res.heatmap.flags.writeable and np.isfinite(res.heatmap).all()
    assert [c.concept for c in res.concepts] == ["band_aid", "ruler"] and res.layer
    for c in res.concepts:
        assert 0.0 <= c.percentile <= 100.0 and 0.0 <= c.relevance_share <= 1.0
        assert (c.mask_png is not None) == c.present
        if c.mask_png is not None:
            assert Image.open(io.BytesIO(c.mask_png)).size == (32, 32)
    assert res.flag.flagged == bool(res.flag.concepts) and len(res.flag.reasons) == len(res.flag.concepts)
    assert any("small image" in n for n in res.notes)
    assert res.concept("ruler").concept == "ruler"
    with pytest.raises(KeyError, match="band_aid, ruler"):
        res.concept("timestamp")
    plain = mc.audit(_png(24), version="vanilla")
    assert plain.heatmap is None and plain.shadow is not None and plain.shadow.version == "pclarc-band_aid"


def test_compare_keeps_the_order_asked_for(mc: MedauditClient) -> None:
    res = mc.compare(_png(), versions=["pclarc-band_aid", "vanilla"], request_id="cmp-1")
    assert res.versions == ("pclarc-band_aid", "vanilla") and list(res.results) == list(res.versions)
    assert res.request_id == "cmp-1"
    for v, r in res.results.items():
        assert r.version == v and r.via is None and r.shadow is None and r.request_id == "cmp-1"
        assert r.prediction.version == v and r.heatmap_png.startswith(b"\x89PNG")
    labels = {r.prediction.label for r in res.results.values()}
    assert res.labels_agree == (len(labels) == 1)
    assert mc.compare(_png(), versions="vanilla, pclarc-band_aid").versions == ("vanilla", "pclarc-band_aid")
    assert set(mc.compare(_png()).versions) == set(VERSIONS)


def test_models_route_card_and_ready(mc: MedauditClient) -> None:
    assert mc.ready()
    models = mc.models()
    assert [m.version for m in models.versions] == ["vanilla", "pclarc-band_aid"]
    assert models["vanilla"].concepts == ("band_aid", "ruler") and models["vanilla"].weight == 0.5
    assert models["vanilla"].input_size == (3, 32, 32) and models["vanilla"].labels == ("benign", "malignant")
    assert models.shadow == "pclarc-band_aid" and models.flag_thresholds.relevance_share == 0.2
    assert all(a.shadow == "pclarc-band_aid" for a in models.shadow_agreement)
    with pytest.raises(KeyError, match="served: vanilla, pclarc-band_aid"):
        models["nope"]
    route = mc.route(subject_key="patient-7")
    assert route.via == "hash" and route.version == mc.predict(_png(), subject_key="patient-7").version
    assert (mc.route(version="vanilla").version, mc.route(version="vanilla").via) == ("vanilla", "explicit")
    assert mc.route(version="vanilla").shadow == "pclarc-band_aid"
    with pytest.raises(UnknownVersion):
        mc.route(version="nope")
    card = mc.model_card("resnet18-synthderm:vanilla")
    assert (card.version, card.tag) == ("vanilla", "resnet18-synthderm:vanilla")
    assert card.card["version"] == "vanilla" and mc.model_card("vanilla").tag == card.tag


# ------------------------------------------------------------------------------ errors


def test_http_errors_map_to_classes_with_the_service_fields(mc: MedauditClient, live_service) -> None:
    with pytest.raises(UnknownVersion) as ei:
        mc.predict(_png(), version="nope", request_id="rid-404")
    e = ei.value
    assert (e.status, e.code, e.version, e.valid_versions) == (
        404,
        "unknown_model_version",
        "nope",
        tuple(VERSIONS),
    )
    assert e.request_id == "rid-404" and e.body["valid_versions"] == VERSIONS and "nope" in e.detail
    with pytest.raises(UnknownVersion):
        mc.model_card("nope")
    with pytest.raises(UnknownVersion):
        mc.compare(_png(), versions=["vanilla", "nope"])
    with pytest.raises(InvalidInput) as ei2:
        mc.audit(b"not an image at all")
    assert (ei2.value.status, ei2.value.code) == (415, "unsupported_media_type")
    with pytest.raises(InvalidInput) as ei3:
        mc.predict(b"")
    assert (ei3.value.status, ei3.value.code) == (400, "empty_body")
    with pytest.raises(InvalidInput, match="422 invalid_image"):
        mc.predict(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    http = mc._http  # the same in-process app, without a key / with a wrong one
    for key in (None, "wrong"):
        anon = MedauditClient(http=http, api_key=key)  # type: ignore[arg-type]
        for call in (lambda c: c.predict(_png()), lambda c: c.models(), lambda c: c.audit(_png())):
            with pytest.raises(Unauthorized) as eu:
                call(anon)
            assert eu.value.status == 401 and eu.value.code == "unauthorized" and eu.value.request_id
            assert key is None or "wrong" not in str(eu.value)  # never echoes the key
    assert "with key" in repr(mc) and live_service.client_key not in repr(mc)


def test_injected_http_client_is_left_open_and_own_one_is_closed(mc: MedauditClient) -> None:
    http = mc._http
    MedauditClient(http=http).close()  # type: ignore[arg-type]
    assert mc.ready()  # still usable
    with MedauditClient("http://127.0.0.1:9") as own:
        pass
    assert own._http.is_closed  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="http:// or https://"):
        MedauditClient("127.0.0.1:3000")


# ------------------------------------------------------------------------------ a real flaky server


class _Flaky:
    """A tiny real HTTP server that answers each request with the next scripted response."""

    def __init__(self, script: list[tuple[int, dict[str, str], bytes]], port: int = 0) -> None:
        self.script = list(script)
        self.seen: list[tuple[str, str, float]] = []  # method, path, time
        flaky = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                flaky.seen.append((self.command, self.path, time.monotonic()))
                status, headers, body = flaky.script.pop(0) if len(flaky.script) > 1 else flaky.script[0]
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> _Flaky:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


PREDICTION = {"version": "vanilla", "label": "benign", "class_index": 0, "probabilities": {"benign": 0.9}}
OK = (
    200,
    {},
    json.dumps(
        {"request_id": "r", "version": "vanilla", "via": "random", "prediction": PREDICTION, "shadow": None}
    ).encode(),
)


def _err(status: int, code: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return (
        status,
        headers or {},
        json.dumps({"error": code, "detail": f"{code}!", "request_id": "e"}).encode(),
    )


def test_503_twice_then_200_is_retried_to_success() -> None:
    with (
        _Flaky([_err(503, "busy"), _err(503, "busy"), OK]) as srv,
        MedauditClient(srv.url, retries=FAST) as c,
    ):
        res = c.predict(_png())
    assert res.prediction.label == "benign" and len(srv.seen) == 3
    assert {(m, p) for m, p, _ in srv.seen} == {("POST", "/predict")}


def test_retry_after_is_honoured() -> None:
    policy = RetryPolicy(retries=1, base_delay=0.0, max_delay=0.0)
    with (
        _Flaky([_err(429, "slow down", {"Retry-After": "1"}), OK]) as srv,
        MedauditClient(srv.url, retries=policy) as c,
    ):
        c.predict(_png())
    assert len(srv.seen) == 2 and srv.seen[1][2] - srv.seen[0][2] >= 0.95


@pytest.mark.parametrize(
    ("status", "cls"), [(502, ServerError), (503, ServerError), (504, ServerError), (429, RateLimited)]
)
def test_retries_run_out_into_the_status_error(status: int, cls: type[MedauditHTTPError]) -> None:
    with (
        _Flaky([_err(status, "nope")]) as srv,
        MedauditClient(srv.url, retries=FAST) as c,
        pytest.raises(cls) as ei,
    ):
        c.models()
    assert len(srv.seen) == 4 and ei.value.status == status and ei.value.detail == "nope!"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 415, 422, 500])
def test_other_errors_are_never_retried(status: int) -> None:
    with (
        _Flaky([_err(status, "no"), OK]) as srv,
        MedauditClient(srv.url, retries=FAST) as c,
        pytest.raises(MedauditHTTPError) as ei,
    ):
        c.predict(_png())
    assert len(srv.seen) == 1 and ei.value.status == status


def test_non_json_answers() -> None:
    html = (200, {"Content-Type": "text/html"}, b"<html>a proxy</html>")
    with (
        _Flaky([html]) as srv,
        MedauditClient(srv.url, retries=0) as c,
        pytest.raises(ResponseFormatError, match="does the URL point at the medaudit service"),
    ):
        c.predict(_png())
    with (
        _Flaky([(500, {"Content-Type": "text/plain"}, b"Internal Server Error")]) as srv,
        MedauditClient(srv.url) as c,
        pytest.raises(ServerError) as ei,
    ):
        c.models()
    assert (ei.value.code, ei.value.detail, ei.value.body) == ("http_500", "Internal Server Error", {})


def test_connection_refused_is_retried_then_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with MedauditClient(url, retries=RetryPolicy(retries=2, base_delay=0.01)) as c:
        with pytest.raises(MedauditConnectionError, match=f"at {url} after 3 attempts") as ei:
            c.predict(_png())
        assert ei.value.attempts == 3 and ei.value.url == url
        with pytest.raises(MedauditConnectionError, match=f"at {url}: "):  # ready() never retries
            c.ready()


def test_a_service_that_comes_up_late_is_reached_by_retrying() -> None:
    port = free_port()
    started: list[_Flaky] = []

    def start_late() -> None:
        time.sleep(0.3)
        started.append(_Flaky([OK], port=port).__enter__())

    t = threading.Thread(target=start_late)
    t.start()
    try:
        policy = RetryPolicy(retries=8, base_delay=0.1, max_delay=0.2)
        with MedauditClient(f"http://127.0.0.1:{port}", retries=policy) as c:
            assert c.predict(_png()).prediction.label == "benign"
    finally:
        t.join()
        for srv in started:
            srv.__exit__()


def test_retry_policy_delays() -> None:
    import random

    p = RetryPolicy(base_delay=0.5, max_delay=4.0, max_retry_after=30.0)
    rng = random.Random(0)
    for attempt, (lo, hi) in enumerate([(0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.0, 4.0)]):
        delays = [p.delay(attempt, rng=rng) for _ in range(200)]
        assert lo <= min(delays) and max(delays) <= hi and max(delays) - min(delays) > (hi - lo) / 2
    assert p.delay(0, "7") == 7.0 and p.delay(0, "3600") == 30.0 and p.delay(5, "0") == 0.0
    assert p.delay(0, "soon") <= 0.5  # unparseable: the backoff
    now = time.time()
    assert parse_retry_after(email.utils.formatdate(now + 20, usegmt=True), now=now) == pytest.approx(
        20, abs=1
    )
    assert parse_retry_after(email.utils.formatdate(now - 20, usegmt=True), now=now) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after(" ") is None
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)


# ------------------------------------------------------------------------------ async, over a socket


def test_async_client_against_the_served_app(live_service) -> None:
    async def main() -> None:
        async with AsyncMedauditClient(live_service.url, api_key=live_service.client_key) as c:
            assert await c.ready()
            await c.wait_ready(timeout=5)
            png = _png()
            preds = await asyncio.gather(*(c.predict(png, version="vanilla") for _ in range(4)))
            assert len({p.request_id for p in preds}) == 4
            assert len({json.dumps(dict(p.prediction.probabilities)) for p in preds}) == 1
            audit, cmp = await asyncio.gather(
                c.audit(png, version="vanilla", raw_heatmap=True, request_id="a-1"),
                c.compare(png, versions=["vanilla", "pclarc-band_aid"]),
            )
            assert audit.request_id == "a-1" and audit.heatmap is not None
            # the same image, the same version: the audit in the comparison is the same audit
            assert cmp.results["vanilla"].heatmap_png == audit.heatmap_png
            assert [c.score for c in cmp.results["vanilla"].concepts] == pytest.approx(
                [c.score for c in audit.concepts]
            )
            assert audit.prediction.label == preds[0].prediction.label
            models = await c.models()
            assert [m.version for m in models.versions] == ["vanilla", "pclarc-band_aid"]
            assert (await c.model_card("vanilla")).version == "vanilla"
            with pytest.raises(UnknownVersion) as ei:
                await c.audit(png, version="nope")
            assert ei.value.valid_versions == tuple(VERSIONS)
        async with AsyncMedauditClient(live_service.url) as anon:
            with pytest.raises(Unauthorized):
                await anon.predict(png)

    asyncio.run(main())


def test_async_client_retries_and_maps_errors() -> None:
    async def main(url: str, policy: RetryPolicy) -> None:
        async with AsyncMedauditClient(url, retries=policy) as c:
            assert (await c.predict(_png())).prediction.label == "benign"

    with _Flaky([_err(503, "busy"), _err(502, "gw"), OK]) as srv:
        asyncio.run(main(srv.url, FAST))
    assert len(srv.seen) == 3

    async def refused(url: str) -> None:
        async with AsyncMedauditClient(url, retries=RetryPolicy(retries=1, base_delay=0.01)) as c:
            await c.models()

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MedauditConnectionError, match="after 2 attempts"):
        asyncio.run(refused(url))


def test_async_client_with_an_injected_http_client() -> None:
    import httpx

    async def main(url: str) -> httpx.AsyncClient:
        async with httpx.AsyncClient() as http:
            async with AsyncMedauditClient(url, http=http, retries=0) as c:
                await c.predict(_png())
            assert not http.is_closed  # ours to close, not the client's
            return http

    with _Flaky([OK]) as srv:
        assert asyncio.run(main(srv.url)).is_closed
