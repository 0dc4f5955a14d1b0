"""The reviewer workbench's HTTP side (service/ui/), in-process against the real Redis: sessions,
roles, CSRF, the security headers, the filtered queue and its counts, opaque flag references,
verdicts, the concept ranking and the refit job. The browser drives the served page in
tests/live/test_ui_browser.py."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.testclient import TestClient

from medaudit.service.auth import KeyStore, hash_key, parse_key_spec
from medaudit.service.flags.events import FlagKeys
from medaudit.service.flags.review import list_reviews, resolve_review
from medaudit.service.ui import UI_MOUNT, sessions
from medaudit.service.ui.app import Backend, ui_app
from medaudit.testing.review_queue import seed_flags, synthetic_events

pytestmark = pytest.mark.redis

SALT = "ui-salt"
CLIENT_KEY, REVIEWER_KEY = "client-key-ui", "reviewer-key-ui"
HOST = "testserver"
N = 60


@pytest.fixture
def seeded(client, keys: FlagKeys) -> list:
    events = synthetic_events(N, subjects=5, seed=3)
    assert seed_flags(client, keys, events, images=True) == N
    return events


@pytest.fixture
def http(client, keys: FlagKeys, tmp_path) -> Iterator[TestClient]:
    store = KeyStore(
        parse_key_spec(f"client:{hash_key(CLIENT_KEY, SALT)},reviewer:{hash_key(REVIEWER_KEY, SALT)}"), SALT
    )

    def backend(_request: Request) -> Backend:
        return Backend(
            client=client,
            keys=keys,
            authenticate=lambda key: store.authenticate(f"Bearer {key}"),
            versions=["vanilla", "pclarc-band_aid"],
            concepts=["band_aid", "ruler", "skin_marker"],
            env={"MEDAUDIT_FLAG_PREFIX": keys.prefix, "PATH": "/usr/bin:/bin", "BENTOML_HOME": str(tmp_path)},
        )

    app = Starlette(routes=[Mount(UI_MOUNT, app=ui_app(backend))])
    with TestClient(app, base_url=f"http://{HOST}") as c:
        yield c


def _sign_in(http: TestClient, key: str = REVIEWER_KEY) -> str:
    r = http.post("/ui/session", json={"key": key}, headers={"Origin": f"http://{HOST}"})
    assert r.status_code == 200, r.text
    return str(r.json()["csrf"])


def _post(http: TestClient, path: str, body: dict, csrf: str | None, **headers: str):
    h = {"Origin": f"http://{HOST}", "Sec-Fetch-Site": "same-origin", **headers}
    if csrf is not None:
        h["X-CSRF-Token"] = csrf
    return http.post(path, json=body, headers=h)


def test_page_headers_roles_and_session_cookie(http: TestClient) -> None:
    page = http.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert "<script" in page.text and not re.search(r"<script(?![^>]*\bsrc=)", page.text), "an inline script"
    assert not re.search(r"\son[a-z]+=", page.text), "an inline event handler"
    js = http.get("/ui/static/ui.js")
    assert (
        js.status_code == 200
        and "innerHTML" not in js.text
        and js.headers["x-content-type-options"] == "nosniff"
    )
    assert http.get("/ui/static/secret.py").status_code == 404

    assert http.get("/ui/api/queue").status_code == 401  # no session
    r = http.post("/ui/session", json={"key": CLIENT_KEY}, headers={"Origin": f"http://{HOST}"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden" and "set-cookie" not in r.headers
    r = http.post("/ui/session", json={"key": "nope"}, headers={"Origin": f"http://{HOST}"})
    assert r.status_code == 401 and "nope" not in r.text
    r = http.post("/ui/session", json={"key": REVIEWER_KEY}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"] == "cross_site_request"

    r = http.post("/ui/session", json={"key": REVIEWER_KEY}, headers={"Origin": f"http://{HOST}"})
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie and REVIEWER_KEY not in cookie
    me = http.get("/ui/api/me").json()
    assert me["key_id"].startswith("k_") and me["verdicts"] == ["artifact_confirmed", "false_alarm", "other"]

    assert _post(http, "/ui/logout", {}, None).status_code == 403  # logout is a state change too
    assert _post(http, "/ui/logout", {}, me["csrf"]).status_code == 200
    assert http.get("/ui/api/me").status_code == 401
    behind_tls = http.post("/ui/session", json={"key": REVIEWER_KEY}, headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in behind_tls.headers["set-cookie"]


def test_queue_filters_counts_and_pages_match_the_records(http: TestClient, seeded: list) -> None:
    _sign_in(http)
    page = http.get("/ui/api/queue?limit=10").json()
    assert page["total"] == page["matching"] == N and len(page["items"]) == 10
    assert [it["request_id"] for it in page["items"]] == [e.request_id for e in seeded[:10]]  # oldest first
    assert page["facets"]["concept"] == dict(sorted(Counter(e.concept for e in seeded).items()))

    want = [e for e in seeded if e.concept == "ruler" and e.severity == "high"]
    page = http.get("/ui/api/queue?concept=ruler&severity=high&limit=100").json()
    assert page["matching"] == len(want) and [it["request_id"] for it in page["items"]] == [
        e.request_id for e in want
    ]
    # A facet counts the flags that match the other filters: the severities of rulers.
    assert page["facets"]["severity"] == dict(
        sorted(Counter(e.severity for e in seeded if e.concept == "ruler").items())
    )
    day = seeded[N // 2].created_at[:10]
    on_day = [e for e in seeded if e.created_at[:10] == day]
    page = http.get(f"/ui/api/queue?since={day}&until={day}&limit=100").json()
    assert [it["request_id"] for it in page["items"]] == [e.request_id for e in on_day]
    page2 = http.get("/ui/api/queue?limit=7&offset=7").json()
    assert [it["request_id"] for it in page2["items"]] == [e.request_id for e in seeded[7:14]]

    for bad in ("limit=0", "limit=101", "offset=-1", "status=all", "since=yesterday", "limit=x"):
        r = http.get(f"/ui/api/queue?{bad}")
        assert r.status_code == 422 and r.json()["error"] == "invalid_parameter", bad


def test_flag_references_verdicts_and_csrf(http: TestClient, seeded: list, client, keys: FlagKeys) -> None:
    csrf = _sign_in(http)
    items = http.get("/ui/api/queue?limit=3").json()["items"]
    first = items[0]
    assert re.fullmatch(r"[0-9a-f]{32}", first["ref"]) and "flag_id" not in first
    flag = http.get(f"/ui/api/flags/{first['ref']}").json()
    assert flag["request_id"] == seeded[0].request_id and "flag_id" not in flag and "subject_hash" not in flag
    assert not any(k.endswith("_key") for k in flag), "Redis key names (with the request id) reach the page"
    assert flag["available"]["heatmap"] and flag["available"]["mask"]
    png = http.get(f"/ui/api/flags/{first['ref']}/heatmap.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # These records hold the blend only, like those stored before the bare image was kept: the
    # page falls back to the blend (tests/live/test_ui_browser.py sees the layered view).
    assert not flag["available"]["image"] and not flag["available"]["heat_layer"]
    missing = http.get(f"/ui/api/flags/{first['ref']}/image.png")
    assert missing.status_code == 404 and "never stored" in missing.json()["detail"]
    assert http.get(f"/ui/api/flags/{first['ref']}/raw.png").status_code == 404
    assert http.get(f"/ui/api/flags/{'0' * 32}").status_code == 404
    assert http.get(f"/ui/api/flags/{seeded[0].flag_id}").status_code == 404  # ids are not references

    path = f"/ui/api/flags/{first['ref']}/resolve"
    body = {"verdict": "artifact_confirmed", "note": "plaster at 3 o'clock"}
    refused = [
        _post(http, path, body, None),  # no token
        _post(http, path, body, "forged-token"),
        _post(http, path, body, csrf, Origin="http://evil.example"),
        _post(http, path, body, csrf, **{"Sec-Fetch-Site": "cross-site"}),
    ]
    assert [r.status_code for r in refused] == [403] * 4
    assert {r.json()["error"] for r in refused} == {"cross_site_request"}
    assert list_reviews(client, keys)["total"] == N  # nothing was resolved

    r = _post(http, path, body, csrf)
    assert r.status_code == 200 and r.json()["verdict"] == "artifact_confirmed"
    rec = {k.decode(): v.decode() for k, v in client.hgetall(keys.review(seeded[0].flag_id)).items()}
    assert (rec["status"], rec["verdict"], rec["note"]) == ("resolved", "artifact_confirmed", body["note"])
    assert rec["reviewer"].startswith("k_")  # the key's fingerprint, never the key
    again = _post(http, path, {"verdict": "other"}, csrf)
    assert again.status_code == 409 and again.json()["error"] == "already_resolved"
    bad = _post(http, f"/ui/api/flags/{items[1]['ref']}/resolve", {"verdict": "maybe"}, csrf)
    assert bad.status_code == 422 and "artifact_confirmed" in bad.text
    assert http.get("/ui/api/queue").json()["total"] == N - 1

    # Earlier verdicts: another open flag of the same subject lists the resolved one.
    same = next(e for e in seeded[1:] if e.subject_hash == seeded[0].subject_hash)
    ref = next(
        it["ref"]
        for it in http.get("/ui/api/queue?limit=100").json()["items"]
        if it["request_id"] == same.request_id
    )
    history = http.get(f"/ui/api/flags/{ref}").json()["history"]
    assert [h["request_id"] for h in history] == [seeded[0].request_id] and history[0]["verdict"] == body[
        "verdict"
    ]


def test_concept_ranking_is_by_score(http: TestClient, seeded: list, client, keys: FlagKeys) -> None:
    _sign_in(http)
    resolve_review(client, seeded[0].flag_id, "false_alarm", reviewer="bob", keys=keys)
    c = http.get("/ui/api/concepts/band_aid?top=5").json()
    want = sorted((e for e in seeded if e.concept == "band_aid"), key=lambda e: -e.score)
    assert c["flagged"] == len(want) and [it["request_id"] for it in c["items"]] == [
        e.request_id for e in want[:5]
    ]
    assert http.get("/ui/api/concepts/pacemaker").status_code == 422


def test_sessions_end(client, keys: FlagKeys) -> None:
    token, s = sessions.start(client, keys, "k_abc", now=1000.0)
    assert sessions.current(client, keys, token, now=1000.0 + 60).csrf == s.csrf
    assert (
        0
        < client.ttl(f"{keys.prefix}:ui:session:{hashlib.sha256(token.encode()).hexdigest()}")
        <= sessions.IDLE_S
    )
    with pytest.raises(Exception, match="maximum age"):
        sessions.current(client, keys, token, now=1000.0 + sessions.MAX_AGE_S + 1)
    with pytest.raises(Exception, match="ended"):  # and it is gone
        sessions.current(client, keys, token)
    with pytest.raises(Exception, match="no reviewer session"):
        sessions.current(client, keys, None)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")
def test_refit_runs_refine_cav_and_reports_before_and_after(
    client, keys: FlagKeys, three_class_folder: Path, tmp_path: Path, redis_url: str
) -> None:
    """The refit action runs the real ``medaudit refine-cav`` in a child process: a random 32 px
    three-class model stored as ``derm3:vanilla`` with its card naming a folder dataset, its flags
    resolved through the workbench, then refitted; one refit at a time; the report holds the
    held-out AUROC before and after and the new version registered beside the old one."""
    import torch

    from medaudit.models.data.registry import open_dataset
    from medaudit.service.audit import AuditEngine
    from medaudit.service.flags.producer import FlagPublisher
    from medaudit.service.flags.redis_conn import connect
    from medaudit.service.flags.worker import Worker, WorkerConfig
    from medaudit.service.store import list_versions
    from medaudit.testing.versions import register_version_files, write_version_files

    torch.set_num_threads(1)
    home, spec = tmp_path / "bento", f"folder:{three_class_folder}"
    d = write_version_files(
        tmp_path / "v",
        "vanilla",
        0,
        labels=("bcc", "melanoma", "nevus"),
        name="derm3",
        data={"dataset": spec},
    )
    register_version_files(d, "vanilla", home, name="derm3")
    ds = open_dataset(spec)
    train = ds.indices("train")[:16]
    engine = AuditEngine.from_store("derm3:vanilla", home=home, fpr=0.99)  # every concept "present"
    pub = FlagPublisher(redis_url, keys=keys, spool_dir=tmp_path / "spool")
    for i, r in enumerate(engine.audit([ds.load_image(int(j), 32) for j in train])):
        pub.submit(
            r, request_id=f"img{i}", version="vanilla", corrected_disagrees=True
        )  # flags every present one
    assert pub.close(10.0)
    Worker(connect(redis_url, timeout=5), keys, WorkerConfig(consumer="w", block_ms=100)).run(drain=True)

    store = KeyStore(parse_key_spec(f"reviewer:{hash_key(REVIEWER_KEY, SALT)}"), SALT)
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "MEDAUDIT_REDIS_URL": redis_url,
        "MEDAUDIT_FLAG_PREFIX": keys.prefix,
        "OMP_NUM_THREADS": "1",
    }
    backend = Backend(
        client=client,
        keys=keys,
        authenticate=lambda key: store.authenticate(f"Bearer {key}"),
        versions=["vanilla"],
        concepts=["band_aid", "ruler"],
        model_name="derm3",
        env=env,
        refit_dir=str(tmp_path / "refits"),
    )
    app = Starlette(routes=[Mount(UI_MOUNT, app=ui_app(lambda _r: backend))])
    with TestClient(app, base_url=f"http://{HOST}") as http:
        csrf = _sign_in(http)
        # Verdicts through the workbench, by the dataset's annotations.
        member = {a: set(v) for a, v in ds.artifact_ids("train").items()}
        items = http.get("/ui/api/queue?limit=100").json()["items"]
        assert items, "no flags reached the queue"
        for it in items:
            i = int(it["request_id"][3:])
            truth = int(train[i]) in member.get(it["concept"], set())
            verdict = "artifact_confirmed" if truth else "false_alarm"
            assert (
                _post(http, f"/ui/api/flags/{it['ref']}/resolve", {"verdict": verdict}, csrf).status_code
                == 200
            )

        assert http.get("/ui/api/refit").json() == {"state": "none"}
        assert _post(http, "/ui/api/refit", {"version": "nope"}, csrf).status_code == 422
        started = _post(http, "/ui/api/refit", {"version": "vanilla"}, csrf)
        assert started.status_code == 200 and started.json()["state"] == "running", started.text
        second = _post(http, "/ui/api/refit", {"version": "vanilla"}, csrf)
        assert second.status_code == 409 and second.json()["error"] == "refit_running"
        deadline = time.monotonic() + 300
        while (s := http.get("/ui/api/refit").json())["state"] == "running":
            assert time.monotonic() < deadline, s
            time.sleep(0.5)
    assert s["state"] == "done", s.get("output")
    report = s["report"]
    assert report["new_version"] == "derm3:vanilla-refit1"
    added = sum(a["positive"] + a["negative"] for a in report["added"].values())
    assert added == len(items) and len(report["flag_ids"]) == len(items)
    for c, m in report["held_out"].items():
        assert {"stored", "baseline", "refined"} <= set(m), c
        assert m["refined"] is None or 0.0 <= m["refined"]["auroc"] <= 1.0
    assert [v.tag for v in list_versions(home=home)] == ["derm3:vanilla", "derm3:vanilla-refit1"]
    assert client.get(f"{keys.prefix}:ui:refit:lock") is None  # the next refit may start
    assert len(list((tmp_path / "refits").glob("*/bank"))) == 1  # written where the settings say
