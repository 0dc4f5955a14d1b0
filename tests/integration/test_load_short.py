"""Short load test (issue #9, "Load"): the locust mix of ``cli/locustfile.py`` against a real
``bentoml serve`` of the tiny two-version store, A/B split with a shadow, for ~30 s.

Asserts zero failed requests (non-2xx or a wrong body), that every endpoint and payload kind of the
mix was exercised, and that adaptive batching engaged (mean predictor batch > 1). ``make load``
runs the same mix, longer, on the demo store (``benchmarks/load.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medaudit.cli.load import render_markdown, run_load
from medaudit.service.process import serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USERS, SECONDS = 16, 30


def test_load_mix_has_no_errors_and_batches(tiny_deployment: dict[str, str], tmp_path: Path) -> None:
    env = {
        **tiny_deployment,
        "MEDAUDIT_AUTH": "off",
        "MEDAUDIT_FLAGS": "off",
    }
    with serving(env, tmp_path / "serve.log") as server:
        report = run_load(
            server.base,
            users=USERS,
            spawn_rate=USERS,
            seconds=SECONDS,
            workdir=tmp_path / "locust",
            server_pid=server.proc.pid,
            # Think time up to 1 s: enough concurrency to batch, below the predictor's 1 s
            # max_latency_ms on a busy 2-core runner (past it BentoML answers 503 "overloaded").
            env={"MEDAUDIT_LOAD_WAIT": "1.0"},
            meta={
                "served": "tiny store, vanilla + pclarc-band_aid A/B 1:1, shadow pclarc-band_aid",
                "command": "python benchmarks/load.py --users 16",
            },
        )
    md = render_markdown(report, "Short load test")
    print("\n" + md)
    assert "Command: `python benchmarks/load.py --users 16`." in md  # a report says how to rerun it
    # Internal hops retried because BentoML's client dropped a connection under a request in
    # flight (service.api._keep_sessions stops its session recycling; ~1 a second before).
    dropped = (tmp_path / "serve.log").read_text(errors="replace").count("dependency call connection dropped")
    print(f"internal connections dropped and retried: {dropped}")

    assert report.total_failures == 0, report.errors
    assert not report.exceptions, report.exceptions
    endpoints = {r.name: r.requests for r in report.endpoints}
    for e in ("/predict", "/audit", "/compare", "/models/"):
        assert endpoints.get(e, 0) > 0, f"{e} got no requests: {endpoints}"
    kinds = {r.name.split(" [", 1)[1].rstrip("]") for r in report.requests if " [" in r.name}
    assert kinds == {p["kind"] for p in report.meta["payloads"]}, kinds
    mean = report.batch_mean("predict_batch")
    assert mean is not None and mean > 1.0, report.adaptive_batches
    assert report.rss and report.rss[-1].processes >= 3  # arbiter + MedAudit, Predictor, Auditor
    assert dropped <= 5, f"{dropped} internal calls lost their connection: is the session recycled again?"
