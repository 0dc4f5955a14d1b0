"""Reviewing flags: functions, the mountable HTTP app and the CLI, against real Redis."""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import pytest
from flagtools import result
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.testclient import TestClient
from typer.testing import CliRunner

from medaudit.service.errors import AlreadyResolvedError, AuthError, InvalidReviewError, UnknownFlagError
from medaudit.service.flags.events import FlagKeys
from medaudit.service.flags.producer import FlagPublisher
from medaudit.service.flags.redis_conn import connect
from medaudit.service.flags.review import get_review, list_reviews, resolve_review, review_app
from medaudit.service.flags.worker import Worker, WorkerConfig

pytestmark = pytest.mark.redis


@pytest.fixture
def queued(redis_url: str, keys: FlagKeys, tmp_path: Path) -> FlagKeys:
    """Three open flags (req-0, req-1, req-2), through the publisher and a worker."""
    pub = FlagPublisher(redis_url, keys=keys, spool_dir=tmp_path / "spool", ttl_s=3600)
    for i in range(3):
        pub.submit(result(seed=i), request_id=f"req-{i}", version="vanilla", corrected_disagrees=i == 2)
    assert pub.close(10.0)
    stop = threading.Event()
    stats = Worker(connect(redis_url, timeout=5), keys, WorkerConfig(consumer="w", block_ms=100)).run(
        stop, drain=True
    )
    assert stats.written == 3
    return keys


def test_list_show_resolve(client, queued: FlagKeys) -> None:
    keys = queued
    page = list_reviews(client, keys)
    assert page["total"] == 3 and [it["flag_id"] for it in page["items"]] == [
        f"req-{i}:band_aid" for i in range(3)
    ]
    assert page["items"][0]["severity"] == "low" and page["items"][2]["severity"] == "medium"

    rec = get_review(client, "req-1:band_aid", keys, images=True)
    assert rec["status"] == "open" and rec["concept"] == "band_aid" and rec["corrected_disagrees"] is False
    # no pixels beyond the blend in these results: the bare image and layer are absent
    assert rec["available"] == {
        "heatmap": True,
        "mask": True,
        "features": True,
        "image": False,
        "heat_layer": False,
    }
    assert Image.open(io.BytesIO(base64.b64decode(rec["heatmap_png"]))).format == "PNG"
    assert get_review(client, "req-2:band_aid", keys)["corrected_disagrees"] is True

    done = resolve_review(
        client, "req-1:band_aid", "artifact_confirmed", "plaster, clearly", reviewer="alice", keys=keys
    )
    assert (done["status"], done["verdict"], done["reviewer"], done["note"]) == (
        "resolved", "artifact_confirmed", "alice", "plaster, clearly"
    )  # fmt: skip
    assert done["resolved_at"] and done["features_kept"] == 1
    assert client.ttl(rec["features_key"]) == -1  # kept for refine-cav beyond the blob TTL
    assert 0 < client.ttl(rec["heatmap_key"]) <= 3600  # the image-like blobs still expire

    with pytest.raises(
        AlreadyResolvedError, match=r"already resolved as 'artifact_confirmed' by 'alice'"
    ) as e:
        resolve_review(client, "req-1:band_aid", "false_alarm", reviewer="bob", keys=keys)
    assert e.value.status == 409 and e.value.to_json()["reviewer"] == "alice"
    with pytest.raises(
        InvalidReviewError, match=r"unknown verdict 'yes'; valid: artifact_confirmed, false_alarm, other"
    ):
        resolve_review(client, "req-0:band_aid", "yes", reviewer="bob", keys=keys)
    with pytest.raises(UnknownFlagError, match=r"no flag 'req-9:band_aid'") as e404:
        resolve_review(client, "req-9:band_aid", "other", reviewer="bob", keys=keys)
    assert e404.value.status == 404
    with pytest.raises(InvalidReviewError, match="reviewer"):
        resolve_review(client, "req-0:band_aid", "other", reviewer=" ", keys=keys)
    with pytest.raises(InvalidReviewError, match="unknown status 'closed'"):
        list_reviews(client, keys, "closed")

    assert [it["flag_id"] for it in list_reviews(client, keys, "resolved")["items"]] == ["req-1:band_aid"]
    assert list_reviews(client, keys, "open", limit=1, offset=1)["items"][0]["flag_id"] == "req-2:band_aid"


def test_http_endpoints(client, queued: FlagKeys) -> None:
    def authorize(request: Request) -> str:
        key = request.headers.get("authorization")
        if key != "Bearer reviewer-key":
            raise AuthError("invalid API key")
        return "k_reviewer"

    # Built before the client exists (as at import in service/api.py): both are looked up per request.
    late: dict[str, object] = {}
    app = Starlette(
        routes=[
            Mount("/reviews", review_app(lambda _req: late["r"], lambda _req: late["k"], authorize=authorize))
        ]
    )
    late.update(r=client, k=queued)
    h = {"Authorization": "Bearer reviewer-key"}
    with TestClient(app) as http:
        assert http.get("/reviews").status_code == 401
        assert http.get("/reviews").headers["www-authenticate"].startswith("Bearer")
        r = http.get("/reviews?status=open", headers=h)
        assert r.status_code == 200 and r.json()["total"] == 3
        r = http.get("/reviews/req-0:band_aid", headers=h)
        assert r.status_code == 200 and r.json()["heatmap_png"] and r.json()["reasons"]
        assert http.get("/reviews/req-0:band_aid?images=0", headers=h).json().get("heatmap_png") is None
        r = http.get("/reviews/nope:band_aid", headers={**h, "X-Request-ID": "rv-1"})
        assert r.status_code == 404 and r.json()["error"] == "unknown_flag"
        assert r.json()["request_id"] == "rv-1" and r.headers["x-request-id"] == "rv-1"
        r = http.get("/reviews?status=open", headers=h)  # a success: the id in the header only
        assert len(r.headers["x-request-id"]) == 32 and "request_id" not in r.json()
        r = http.post("/reviews/req-0:band_aid/resolve", headers=h, json={"verdict": "maybe"})
        assert r.status_code == 422 and r.json()["valid"] == ["artifact_confirmed", "false_alarm", "other"]
        assert http.post("/reviews/req-0:band_aid/resolve", headers=h, content=b"{").status_code == 422
        r = http.post(
            "/reviews/req-0:band_aid/resolve", headers=h, json={"verdict": "false_alarm", "note": "ink"}
        )
        assert (
            r.status_code == 200
            and r.json()["reviewer"] == "k_reviewer"
            and r.json()["verdict"] == "false_alarm"
        )
        r = http.post("/reviews/req-0:band_aid/resolve", headers=h, json={"verdict": "other"})
        assert r.status_code == 409 and r.json()["error"] == "already_resolved"
        assert http.get("/reviews?limit=0", headers=h).status_code == 422
        # An offset past Redis's 64-bit ranks (found by the fuzzer as a 500) is a 422 that says the range.
        r = http.get(f"/reviews?status=resolved&offset={2**112}", headers=h)
        assert r.status_code == 422 and "offset in [0, 1000000000]" in r.json()["detail"]


def test_http_503_when_redis_is_down() -> None:
    from medaudit.service.process import free_port

    dead = connect(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, connect_timeout=0.2, retries=0)
    with TestClient(Starlette(routes=[Mount("/reviews", review_app(dead))])) as http:
        r = http.get("/reviews")
    assert r.status_code == 503 and r.json()["error"] == "review_store_unavailable"


def test_cli_review_commands(
    redis_url: str, queued: FlagKeys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medaudit.cli.commands import app

    monkeypatch.setenv("MEDAUDIT_REDIS_URL", redis_url)
    monkeypatch.setenv("MEDAUDIT_FLAG_PREFIX", queued.prefix)
    runner = CliRunner()
    out = runner.invoke(app, ["review", "list"])
    assert out.exit_code == 0, out.output
    assert "3 open flags" in out.output and "req-2:band_aid" in out.output
    listed = json.loads(runner.invoke(app, ["review", "list", "--json"]).output)
    assert [it["flag_id"] for it in listed["items"]] == ["req-0:band_aid", "req-1:band_aid", "req-2:band_aid"]

    shown = runner.invoke(app, ["review", "show", "req-1:band_aid", "--out", str(tmp_path / "png")])
    assert shown.exit_code == 0, shown.output
    assert "predicted benign" in shown.output and "relies on it" in shown.output
    heat, mask = tmp_path / "png" / "req-1_band_aid-heatmap.png", tmp_path / "png" / "req-1_band_aid-mask.png"
    for png in (heat, mask):
        with Image.open(png) as im:
            assert im.format == "PNG"

    ok = runner.invoke(
        app, ["review", "resolve", "req-1:band_aid", "other", "--note", "hair", "--reviewer", "carol"]
    )
    assert ok.exit_code == 0 and "resolved req-1:band_aid as other by carol" in ok.output
    twice = runner.invoke(app, ["review", "resolve", "req-1:band_aid", "false_alarm", "--reviewer", "dave"])
    assert twice.exit_code == 1 and "already resolved as 'other' by 'carol'" in " ".join(twice.output.split())
    bad = runner.invoke(app, ["review", "resolve", "req-2:band_aid", "nah", "--reviewer", "dave"])
    assert bad.exit_code == 2 and "unknown verdict 'nah'" in bad.output
    missing = runner.invoke(app, ["review", "show", "req-7:band_aid"])
    assert missing.exit_code == 1 and "no flag 'req-7:band_aid'" in missing.output

    stats = runner.invoke(app, ["review", "stats"])
    assert (
        stats.exit_code == 0
        and '"open_reviews": 2' in stats.output
        and '"resolved_reviews": 1' in stats.output
    )
