"""Benchmark: the reviewer workbench's queue with 10,000 open flags (issue #27: p95 < 300 ms on 2 cores).

Seeds ``--flags`` open review records (three concepts, two versions, three severities, 30 days)
into the real Redis at ``REDIS_URL`` under a fresh key prefix, through the worker's own write
(``medaudit.testing.review_queue``), and serves the workbench and the JSON review API from one
uvicorn process (a child of this one, so client and server do not share a GIL), signed in like a
browser (session cookie). Then, interleaved round-robin for ``--rounds`` rounds, it times each
request as a browser would send it:

* ``page``: ``GET /ui/`` (the static page);
* ``queue``: the first page of 25, no filter (what the page asks for first);
* ``queue, concept``: one concept's flags; ``queue, 3 filters``: concept + severity + version;
* ``queue, 7 days``: a date range (the index range shrinks: Redis walks only those days);
* ``queue, deep page``: offset 5,000;
* ``flag``: one flag's page data (record, other flags of its request, earlier verdicts);
* baseline ``/reviews``: the existing JSON list of the same 25 flags (``list_reviews``: ZRANGE of
  one page and its records), in the same run.

Every filtered queue request walks its date range of the open index inside Redis (one Lua
script, service/ui/queries.py), so its cost grows with the number of open flags in range; the
``redis only`` row is that script alone, timed from Python. Reports p50/p95/max per row and the
median's ratio to the baseline's; the load average is recorded before and after.

    python benchmarks/review_ui.py                      # 10,000 flags, 40 rounds
    python benchmarks/review_ui.py --flags 50000 --rounds 20 --out benchmarks/results/review_ui_50k_cpu

Writes ``benchmarks/results/review_ui_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name, write_results  # noqa: E402

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
SALT = "bench-salt"
REVIEWER_KEY = "bench-reviewer-key"


def serve(port: int, prefix: str) -> None:
    """The child: the workbench at /ui and the review API at /reviews, on one uvicorn worker."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from medaudit.service.auth import KeyStore, hash_key, parse_key_spec
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect
    from medaudit.service.flags.review import review_app
    from medaudit.service.ui.app import Backend, ui_app

    client, keys = connect(REDIS_URL, timeout=10.0), FlagKeys(prefix)
    store = KeyStore(parse_key_spec(f"reviewer:{hash_key(REVIEWER_KEY, SALT)}"), SALT)
    backend = Backend(
        client=client,
        keys=keys,
        authenticate=lambda key: store.authenticate(f"Bearer {key}"),
        versions=["vanilla", "pclarc-band_aid"],
        concepts=["band_aid", "ruler", "skin_marker"],
    )
    app = Starlette(
        routes=[
            Mount("/ui", app=ui_app(lambda _r: backend)),
            Mount("/reviews", app=review_app(client, keys)),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--flags", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/review_ui_cpu")
    ap.add_argument("--serve", nargs=2, metavar=("PORT", "PREFIX"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return

    import httpx

    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect
    from medaudit.service.process import free_port
    from medaudit.service.ui import queries
    from medaudit.testing.review_queue import DAY_MS, seed_flags, synthetic_events

    prefix = f"bench-ui-{uuid.uuid4().hex[:8]}"
    keys, r = FlagKeys(prefix), connect(REDIS_URL, timeout=30.0)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    events = synthetic_events(args.flags, subjects=2000, seed=0)
    seed_flags(r, keys, events)
    seeded_s = time.perf_counter() - t0
    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), prefix])
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30.0) as http:
            for _ in range(200):
                try:
                    if http.get("/ui/").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            origin = {"Origin": base}
            assert http.post("/ui/session", json={"key": REVIEWER_KEY}, headers=origin).status_code == 200
            first = http.get("/ui/api/queue?limit=25").json()
            assert first["total"] == args.flags, first["total"]
            ref = first["items"][0]["ref"]
            last_day = events[-1].created_ms
            since = time.strftime("%Y-%m-%d", time.gmtime((last_day - 7 * DAY_MS) / 1000))
            cases = {
                "page": "/ui/",
                "queue": "/ui/api/queue?limit=25",
                "queue, concept": "/ui/api/queue?limit=25&concept=ruler",
                "queue, 3 filters": "/ui/api/queue?limit=25&concept=ruler&severity=high&version=vanilla",
                "queue, 7 days": f"/ui/api/queue?limit=25&since={since}",
                "queue, deep page": "/ui/api/queue?limit=25&offset=5000",
                "flag": f"/ui/api/flags/{ref}",
                "baseline /reviews": "/reviews/?limit=25",
            }
            times: dict[str, list[float]] = {k: [] for k in cases}
            sizes: dict[str, int] = {}
            for _ in range(3):  # warm-up: connections, script cache
                for path in cases.values():
                    http.get(path)
            for _ in range(args.rounds):
                for name, path in cases.items():
                    t = time.perf_counter()
                    resp = http.get(path, headers={"Authorization": f"Bearer {REVIEWER_KEY}"})
                    times[name].append(1000 * (time.perf_counter() - t))
                    assert resp.status_code == 200, (name, resp.status_code, resp.text[:200])
                    sizes[name] = len(resp.content)
            matching = {
                n: http.get(p).json().get("matching") for n, p in cases.items() if n.startswith("queue")
            }
        # The Lua pass alone (Redis time plus one round trip), unfiltered and with three filters.
        redis_only: dict[str, list[float]] = {"any": [], "3 filters": []}
        refs = queries.Refs(r, keys)
        for _ in range(args.rounds):
            for name, f in (
                ("any", queries.QueueFilter()),
                ("3 filters", queries.QueueFilter(concept="ruler", severity="high", version="vanilla")),
            ):
                t = time.perf_counter()
                queries.queue_page(r, keys, f, refs)
                redis_only[name].append(1000 * (time.perf_counter() - t))
    finally:
        child.terminate()
        child.wait(10)
        doomed = list(r.scan_iter(match=keys.scan_pattern(), count=5000))
        for i in range(0, len(doomed), 1000):
            r.delete(*doomed[i : i + 1000])
    base_p50 = statistics.median(times["baseline /reviews"])
    rows = {
        name: {
            "p50_ms": statistics.median(ts),
            "p95_ms": percentile(ts, 0.95),
            "max_ms": max(ts),
            "ratio_p50_to_baseline": statistics.median(ts) / base_p50,
            "bytes": sizes[name],
            "matching": matching.get(name),
        }
        for name, ts in times.items()
    }
    res: dict[str, Any] = {
        "flags": args.flags,
        "rounds": args.rounds,
        "seeded_s": seeded_s,
        "rows": rows,
        "redis_only": {
            n: {"p50_ms": statistics.median(v), "p95_ms": percentile(v, 0.95)} for n, v in redis_only.items()
        },
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "redis": REDIS_URL.rsplit("@", 1)[-1],
    }
    write_results(args.out, res, report)


def report(res: dict[str, Any]) -> str:
    lines = [
        f"# Reviewer workbench: the queue with {res['flags']:,} open flags",
        "",
        f"{res['cpu']}, {res['cores']} cores (shared), Redis at {res['redis']}; load average "
        f"{res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} after. One uvicorn worker serving "
        f"/ui and /reviews; {res['rounds']} rounds, requests interleaved, one at a time, as a signed-in "
        f"browser sends them. Seeding {res['flags']:,} records through the worker's write took "
        f"{res['seeded_s']:.1f} s. `python benchmarks/review_ui.py`",
        "",
        "| request | matching flags | p50 ms | p95 ms | max ms | p50 / baseline | bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["rows"].items():
        m = "" if r["matching"] is None else f"{r['matching']:,}"
        lines.append(
            f"| {name} | {m} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['max_ms']:.1f} | "
            f"{r['ratio_p50_to_baseline']:.2f} | {r['bytes']:,} |"
        )
    ro = res["redis_only"]
    a, f3 = ro["any"], ro["3 filters"]
    lines += [
        "",
        f"The queue's Lua pass over all {res['flags']:,} open flags, called from Python (Redis time, "
        f"one round trip and the page's records): p50 {a['p50_ms']:.1f} ms, p95 {a['p95_ms']:.1f} ms "
        f"unfiltered; p50 {f3['p50_ms']:.1f} ms, p95 {f3['p95_ms']:.1f} ms with three filters.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
