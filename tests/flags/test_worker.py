"""The worker against real Redis: crash recovery, dead letters, graceful stops, queue gauges."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from flagtools import result

from medaudit.service.flags.events import FlagEvent, FlagKeys
from medaudit.service.flags.producer import FlagPublisher
from medaudit.service.flags.redis_conn import connect
from medaudit.service.flags.worker import Worker, WorkerConfig, ensure_group, queue_stats
from medaudit.service.process import free_port

pytestmark = pytest.mark.redis
GROUP = "medaudit-review"


def _produce(redis_url: str, keys: FlagKeys, spool: Path, rids: list[str]) -> None:
    pub = FlagPublisher(redis_url, keys=keys, spool_dir=spool)
    for i, rid in enumerate(rids):
        pub.submit(result(seed=i), request_id=rid, version="vanilla")
    assert pub.close(10.0) and pub.published == len(rids)


def _review_records(client, keys: FlagKeys) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=keys.review("*"), count=1000))


def _run(worker: Worker, timeout: float = 60.0, **kw: bool) -> object:
    """Runs a worker in a thread with a stop deadline, so a bug cannot hang the suite."""
    stop = threading.Event()
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.setdefault("stats", worker.run(stop, **kw)))
    t.start()
    t.join(timeout)
    stop.set()
    t.join(10)
    assert "stats" in out, f"the worker did not finish within {timeout} s"
    return out["stats"]


class _Keys:
    """Just enough of a publisher for :meth:`FlagPublisher.record` (no thread, no spool)."""

    def __init__(self, keys: FlagKeys) -> None:
        self.keys = keys
        self._subject_secret = None  # plain sha256 subject hashes


def _pending(client, keys: FlagKeys, consumer: str | None = None) -> int:
    summary = client.xpending(keys.stream, GROUP)
    if consumer is None:
        return int(summary["pending"])
    return sum(int(c["pending"]) for c in summary["consumers"] if c["name"].decode() == consumer)


def test_a_killed_workers_entries_are_reclaimed_and_every_flag_gets_one_record(
    redis_url: str, keys: FlagKeys, client, tmp_path: Path
) -> None:
    n = 150
    rids = [f"req-{i:04d}" for i in range(n)]
    _produce(redis_url, keys, tmp_path, rids)
    doomed = textwrap.dedent(
        f"""
        import time
        from medaudit.service.flags.events import FlagKeys
        from medaudit.service.flags.redis_conn import connect
        from medaudit.service.flags.worker import Worker, WorkerConfig

        def slow(stage, event):
            if stage == "after_write":
                time.sleep(0.02)  # between the review write and the XACK: where a crash hurts most

        cfg = WorkerConfig(consumer="doomed", count=25, block_ms=200, min_idle_ms=600_000)
        Worker(connect({redis_url!r}, timeout=10), FlagKeys({keys.prefix!r}), cfg, hook=slow).run()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", doomed])
    try:
        deadline = time.monotonic() + 60
        while client.zcard(keys.open_index) < 40:  # mid-way through its second batch of 25
            assert proc.poll() is None and time.monotonic() < deadline, "worker A did not get going"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    written_by_a = client.zcard(keys.open_index)
    pending_at_kill = _pending(client, keys, "doomed")
    assert pending_at_kill > 0

    rescuer = Worker(
        connect(redis_url, timeout=10),
        keys,
        WorkerConfig(
            consumer="rescuer",
            count=25,
            block_ms=100,
            min_idle_ms=300,
            claim_interval_s=0.1,
            forget_after_ms=1,
        ),
    )
    stats = _run(rescuer, drain=True)
    records = _review_records(client, keys)
    q = queue_stats(client, keys, GROUP)
    print(
        f"\nflags produced {n}; worker A wrote {written_by_a} records, "
        f"{pending_at_kill} entries pending at SIGKILL; "
        f"rescuer {stats}; review records {len(records)}; queue {q}"
    )
    assert len(records) == n == q["open_reviews"]  # exactly one record per flag
    assert records == sorted(keys.review(f"{r}:band_aid") for r in rids)
    assert q["group_pending"] == 0 and q["group_lag"] == 0 and q["dlq_length"] == 0
    assert stats.claimed >= pending_at_kill  # type: ignore[attr-defined]
    assert stats.written == n - written_by_a  # type: ignore[attr-defined]  # the rest; A's are not rewritten
    consumers = [c["name"].decode() for c in client.xinfo_consumers(keys.stream, GROUP)]
    assert consumers == ["rescuer"]  # the dead one, with nothing pending, was forgotten


def test_poison_entries_go_to_the_dead_letter_stream_and_nothing_else_is_lost(
    redis_url: str, keys: FlagKeys, client, tmp_path: Path
) -> None:
    from medaudit.service.flags.policy import evaluate

    # An entry whose consumers keep dying: delivered 5 times to "ghost", never acknowledged.
    ensure_group(client, keys, GROUP)
    r = result(seed=99)
    fields = FlagPublisher.record(_Keys(keys), r, evaluate(r), "crash", "vanilla")["events"][0]  # type: ignore[arg-type]
    crashloop = client.xadd(keys.stream, fields).decode()
    client.xreadgroup(GROUP, "ghost", {keys.stream: ">"}, count=1)
    for _ in range(4):
        client.xclaim(keys.stream, GROUP, "ghost", 0, [crashloop])  # each claim counts a delivery
    _produce(redis_url, keys, tmp_path / "a", [f"req-{i:02d}" for i in range(10)])
    malformed = client.xadd(keys.stream, {"schema": "1", "flag_id": "junk"}).decode()
    _produce(redis_url, keys, tmp_path / "b", [f"req-{i:02d}" for i in range(10, 20)])

    def buggy(stage: str, event: FlagEvent) -> None:
        if stage == "before_write" and event.request_id == "req-13":
            raise RuntimeError("handler bug on this one event")

    w = Worker(
        connect(redis_url, timeout=10),
        keys,
        WorkerConfig(consumer="w1", block_ms=100, min_idle_ms=100, claim_interval_s=0.05, max_deliveries=3),
        hook=buggy,
    )
    stats = _run(w, drain=True)
    dlq = {f[b"dlq.original_id"].decode(): f for _, f in client.xrange(keys.dlq)}
    records = _review_records(client, keys)
    q = queue_stats(client, keys, GROUP)
    print(
        f"\n21 entries + 1 crash-looping; worker {stats}; dead letters {sorted(dlq)}; "
        f"records {len(records)}; {q}"
    )
    req13 = next(i.decode() for i, f in client.xrange(keys.stream) if f.get(b"request_id") == b"req-13")
    assert set(dlq) == {malformed, req13, crashloop}
    assert dlq[malformed][b"dlq.deliveries"] == b"3" and b"EventFormatError" in dlq[malformed][b"dlq.reason"]
    assert dlq[req13][b"dlq.deliveries"] == b"3" and b"handler bug" in dlq[req13][b"dlq.reason"]
    assert dlq[req13][b"orig.request_id"] == b"req-13"  # the original fields travel with it
    assert b"without being acknowledged" in dlq[crashloop][b"dlq.reason"]
    assert len(records) == 19 and keys.review("req-13:band_aid") not in records
    assert q["group_pending"] == 0 and q["dlq_length"] == 3


def test_a_redelivered_entry_whose_record_exists_is_only_acknowledged(
    redis_url: str, keys: FlagKeys, client, tmp_path: Path
) -> None:
    """A crash after the review write and before XACK: the redelivery must not write again."""
    _produce(redis_url, keys, tmp_path, ["req-0"])
    crashed = {"n": 0}

    def crash_after_write(stage: str, _event: FlagEvent) -> None:
        if stage == "after_write" and not crashed["n"]:
            crashed["n"] += 1
            raise RuntimeError("simulated crash between the review write and the ack")

    w = Worker(
        connect(redis_url, timeout=10),
        keys,
        WorkerConfig(consumer="w1", block_ms=100, min_idle_ms=100, claim_interval_s=0.05),
        hook=crash_after_write,
    )
    stats = _run(w, drain=True)
    assert (stats.written, stats.redelivered, stats.failed) == (1, 1, 1)  # type: ignore[attr-defined]
    assert _review_records(client, keys) == [keys.review("req-0:band_aid")]
    assert client.hget(keys.review("req-0:band_aid"), "status") == b"open"


def test_stop_finishes_the_current_entry_and_leaves_the_rest_pending(
    redis_url: str, keys: FlagKeys, client, tmp_path: Path
) -> None:
    _produce(redis_url, keys, tmp_path, [f"req-{i}" for i in range(5)])
    stop, started = threading.Event(), threading.Event()

    def slow(stage: str, _event: FlagEvent) -> None:
        if stage == "before_write":
            started.set()
            time.sleep(0.3)

    w = Worker(
        connect(redis_url, timeout=10), keys, WorkerConfig(consumer="w1", count=5, block_ms=100), hook=slow
    )
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    assert started.wait(10)
    stop.set()  # what SIGTERM does
    t.join(10)
    assert not t.is_alive()
    assert w.stats.written == 1 and client.zcard(keys.open_index) == 1  # the entry in hand was finished
    assert _pending(client, keys, "w1") == 4  # read but not started: left for the next worker
    rest = Worker(connect(redis_url, timeout=10), keys, WorkerConfig(consumer="w1", block_ms=100))
    assert _run(rest, drain=True).written == 4  # type: ignore[attr-defined]  # same name: own pending first


def test_cli_worker_stops_cleanly_on_sigterm(redis_url: str, keys: FlagKeys, client, tmp_path: Path) -> None:
    _produce(redis_url, keys, tmp_path, [f"req-{i}" for i in range(8)])
    exe = Path(sys.executable).parent / "medaudit"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "medaudit.cli.commands"]
    env = {**os.environ, "MEDAUDIT_REDIS_URL": redis_url, "MEDAUDIT_FLAG_PREFIX": keys.prefix}
    port = free_port()
    proc = subprocess.Popen(
        [*cmd, "worker", "--block-ms", "200", "--consumer", "cli-worker", "--metrics-port", str(port),
         "--metrics-interval", "0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while client.zcard(keys.open_index) < 8:
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.communicate()[0] if proc.poll() else ""
            )
            time.sleep(0.05)
        metrics = ""
        while 'medaudit_flag_reviews_total{event="written"} 8.0' not in metrics:
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
            with contextlib.suppress(OSError):
                metrics = (
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                )
        assert "medaudit_flag_queue_length 8.0" in metrics and "medaudit_flag_queue_pending 0.0" in metrics
        assert "medaudit_flag_dead_letters 0.0" in metrics and "medaudit_flag_queue_lag 0.0" in metrics
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\nCLI worker stopped {stopped_in:.2f} s after SIGTERM (block 0.2 s)")
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and '"written": 8' in out
    assert _pending(client, keys) == 0


def test_parallel_workers_share_the_stream_and_write_each_record_once(
    redis_url: str, keys: FlagKeys, client, tmp_path: Path
) -> None:
    n = 120
    _produce(redis_url, keys, tmp_path, [f"req-{i:03d}" for i in range(n)])

    def pace(stage: str, _event: FlagEvent) -> None:
        if stage == "before_write":
            time.sleep(0.002)  # long enough for both workers to get a share

    workers = [
        Worker(
            connect(redis_url, timeout=10),
            keys,
            WorkerConfig(consumer=f"w{i}", count=5, block_ms=100),
            hook=pace,
        )
        for i in range(2)
    ]
    threads = [threading.Thread(target=w.run, kwargs={"drain": True}) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    written = [w.stats.written for w in workers]
    print(f"\n{n} flags, two workers in parallel wrote {written}")
    assert sum(written) == n and min(written) > 0
    assert len(_review_records(client, keys)) == n and _pending(client, keys) == 0
