"""The dashboards and rules against a real Prometheus scraping a real ``bentoml serve``.

Debian's ``/usr/bin/prometheus`` (package ``prometheus``, installed by .ci/run) scrapes the served
tiny store every second with the recording and alert rules loaded; after a short mixed load every
panel query of every dashboard must parse and return data, every rule must evaluate cleanly, and
the /metrics text must pass ``promtool check metrics``.

Panels marked as needing the flag worker (``deploytools.WORKER_MARK``) are queried against a
``medaudit worker`` scraped as job medaudit-worker when the worker can export metrics
(``--metrics-port``); otherwise they must still parse, and the test prints them as "no data
expected without worker".
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from deploytools import (
    PROM,
    ROOT,
    cli_options,
    dashboards,
    declared_series,
    metric_names,
    needs_worker,
    panel_targets,
    promtool,
    variable_metric_query,
)
from PIL import Image

from medaudit.service.process import free_port, served, stop

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCRAPE_S = 1
#: Grafana's variables as the test fills them in: windows long enough to hold the whole run.
SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "5s",
    "$__range": "1h",
    "$version": ".*",
    "$concept": ".*",
}
#: A series whose collector in service/metrics.py no code in service/ or clients/ records yet (see
#: _uninstrumented) cannot have data: its panels must parse, and the test names them in its output
#: as "not instrumented yet". Once some code records it, it must have data like every other.
#: `promtool check metrics` findings tolerated on the service's /metrics, each with its reason.
#: (None so far: prometheus_client writes HELP and TYPE for BentoML's series and ours alike.)
TOLERATED_LINT: tuple[tuple[str, str], ...] = ()


def _png(seed: int, size: int = 40) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _prometheus_bin() -> str:
    path = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if path is None:
        pytest.fail(
            "prometheus is not installed: apt-get install prometheus (Debian's package; .ci/run does)"
        )
    return path


def _wait(pred: Any, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            pytest.fail(f"{what} after {timeout:.0f} s\n{tail}")
        time.sleep(0.5)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def _process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            stop(proc)


def _prometheus_config(tmp: Path, service: str, worker: str | None) -> Path:
    jobs = [{"job_name": "medaudit", "static_configs": [{"targets": [service]}]}]
    if worker:
        jobs.append({"job_name": "medaudit-worker", "static_configs": [{"targets": [worker]}]})
    cfg = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(PROM / "recording.yml"), str(PROM / "alerts.yml")],
        "scrape_configs": jobs,
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _load(base: str) -> dict[str, int]:
    """A few dozen requests of every kind, a few at a time (so the batchers merge some)."""
    calls: list[tuple[str, dict[str, str], bytes]] = []
    png = {"Content-Type": "image/png"}
    for i in range(16):
        calls.append(("/predict", {**png, "X-Subject-Key": f"patient-{i}"}, _png(i)))
    calls.append(("/predict", {**png, "X-Model-Version": "pclarc-band_aid"}, _png(100)))
    for i in range(10):
        calls.append(("/audit", {**png, "X-Subject-Key": f"patient-{i}"}, _png(200 + i)))
    calls.append(("/audit", {**png, "X-Model-Version": "vanilla", "X-Subject-Key": "patient-x"}, _png(300)))
    for i in range(5):
        calls.append(("/compare?versions=vanilla,pclarc-band_aid", png, _png(400 + i)))
    for i in range(6):  # screens (service.screening): the screening panels' series
        calls.append((("/predict", "/audit")[i % 2] + "?detail=scores", png, _png(500 + i)))
    calls.append(("/predict", png, b"not an image"))  # a 4xx outcome

    def call(c: tuple[str, dict[str, str], bytes]) -> int:
        path, headers, body = c
        return httpx.post(base + path, content=body, headers=headers, timeout=120).status_code

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(call, calls))
    counts: dict[int, int] = {}
    for c in codes:
        counts[c] = counts.get(c, 0) + 1
    return counts


def _query(prom: str, expr: str) -> dict[str, Any]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body


def _fill(expr: str) -> str:
    for k in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(k, SUBSTITUTIONS[k])
    return expr


def _lint(text: str) -> list[str]:
    out = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    findings = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    kept = [f for f in findings if not any(f.startswith(p) and why in f for p, why in TOLERATED_LINT)]
    if not findings:
        assert out.returncode == 0, out
    return kept


@pytest.fixture
def flag_prefix() -> Iterator[str]:
    """A key prefix of the run's own; its keys are removed from the shared Redis afterwards."""
    prefix = f"medaudit-live-{uuid.uuid4().hex[:8]}"
    yield prefix
    if os.environ.get("REDIS_URL"):
        _forget_keys(os.environ["REDIS_URL"], prefix)


def test_every_panel_and_rule_against_live_prometheus(
    tiny_deployment: dict[str, str], tmp_path: Path, flag_prefix: str
) -> None:
    prometheus = _prometheus_bin()
    promtool()
    with_worker = "--metrics-port" in cli_options("worker") and bool(os.environ.get("REDIS_URL"))
    if not with_worker:
        print("\nno worker: REDIS_URL is unset or `medaudit worker` has no --metrics-port")
    env = {
        **tiny_deployment,
        "MEDAUDIT_AUTH": "off",
        # Lenient thresholds so that random tiny models still find concepts present and raise flags.
        "MEDAUDIT_FLAG_FPR": "0.5",
        "MEDAUDIT_FLAG_POLICY": "share=0",
        "MEDAUDIT_FLAG_PREFIX": flag_prefix,
        "MEDAUDIT_FLAG_SPOOL_DIR": str(tmp_path / "spool"),
        "OMP_NUM_THREADS": "1",
    }
    if os.environ.get("REDIS_URL"):
        env["MEDAUDIT_REDIS_URL"] = os.environ["REDIS_URL"]
    t0 = time.monotonic()
    with served(env, tmp_path / "serve.log") as base:
        t_ready = time.monotonic() - t0
        service_target = base.removeprefix("http://")
        worker_target = None
        with ExitStack() as stack:
            if with_worker:
                wport = free_port()
                worker_target = f"127.0.0.1:{wport}"
                cmd = [str(Path(sys.executable).parent / "medaudit"), "worker", "--metrics-port", str(wport)]
                stack.enter_context(_process(cmd, tmp_path / "worker.log", env={**os.environ, **env}))
                _wait(
                    lambda: _answers(f"http://{worker_target}/metrics"),
                    60,
                    "worker /metrics",
                    tmp_path / "worker.log",
                )
            pport = free_port()
            prom = f"http://127.0.0.1:{pport}"
            config = _prometheus_config(tmp_path, service_target, worker_target)
            cmd = [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{pport}",
                "--log.level=warn",
            ]
            stack.enter_context(_process(cmd, tmp_path / "prometheus.log"))
            _wait(
                lambda: _answers(f"{prom}/-/ready"), 60, "prometheus not ready", tmp_path / "prometheus.log"
            )

            codes = _load(base)
            t_load = time.monotonic() - t0
            assert codes.get(200, 0) == sum(codes.values()) - 1 and codes.get(415, 0) == 1, codes
            # Every sample of the load scraped (and the rules evaluated on it) at least twice more.
            loaded_at = time.time()
            _wait(
                lambda: _last_scrape(prom) > loaded_at + 3 * SCRAPE_S,
                60,
                "no scrape after the load",
                tmp_path / "prometheus.log",
            )
            time.sleep(3 * SCRAPE_S)

            report, failures = _check_dashboards(prom, with_worker)
            failures += _check_rules(prom)
            metrics_text = httpx.get(f"{base}/metrics", timeout=30).text
            lint = _lint(metrics_text)
            if worker_target:
                lint += _lint(httpx.get(f"http://{worker_target}/metrics", timeout=30).text)

    print(f"\nserver ready in {t_ready:.0f} s; load done at {t_load:.0f} s; responses {codes}")
    print("\n".join(report))
    assert lint == [], "promtool check metrics:\n" + "\n".join(lint)
    assert failures == [], "\n".join(failures)


def _forget_keys(url: str, prefix: str) -> None:
    """The run's flag stream, reviews and heatmaps: its own key prefix, removed from the shared Redis."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _last_scrape(prom: str) -> float:
    try:
        result = _query(prom, 'timestamp(up{job="medaudit"})')["data"]["result"]
    except (httpx.HTTPError, AssertionError):
        return 0.0
    return float(result[0]["value"][1]) if result else 0.0


def _check_dashboards(prom: str, with_worker: bool) -> tuple[list[str], list[str]]:
    report: list[str] = []
    failures: list[str] = []
    uninstrumented = _uninstrumented()
    flags_raised = bool(_query(prom, "medaudit_flags_total")["data"]["result"])
    if uninstrumented:
        report.append(f"not instrumented yet (nothing records them): {', '.join(sorted(uninstrumented))}")
    for name, board in dashboards().items():
        for v in board["templating"]["list"]:
            if v["type"] != "query":
                continue
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            expr = _fill(variable_metric_query(q))
            n = len(_query(prom, expr)["data"]["result"])
            report.append(f"{'ok' if n else 'NO DATA':<8} {n:>3} series  {name} variable ${v['name']}")
            if not n:
                failures.append(f"{name}: variable ${v['name']} has no values: {expr}")
        for panel, target in panel_targets(board):
            expr = _fill(target["expr"])
            where = f"{name} / {panel['title']} / {target['refId']}"
            try:
                n = len(_query(prom, expr)["data"]["result"])
            except AssertionError as e:
                failures.append(f"{where}: does not parse or evaluate: {e}")
                continue
            if n:
                report.append(f"ok       {n:>3} series  {where}")
            elif needs_worker(panel) and not with_worker:
                report.append(f"parsed     0 series  {where}  (no data expected without worker)")
            elif pending := metric_names(expr) & uninstrumented:
                report.append(
                    f"parsed     0 series  {where}  (not instrumented yet: {', '.join(sorted(pending))})"
                )
            elif metric_names(expr) & {"medaudit_flag_reviews_total"} and not flags_raised:
                report.append(f"parsed     0 series  {where}  (no flags were raised, so none reviewed)")
            else:
                report.append(f"NO DATA    0 series  {where}")
                failures.append(f"{where}: no data: {expr}")
    return report, failures


def _uninstrumented() -> set[str]:
    """Exposed names of the collectors of service/metrics.py that no other module records."""
    from prometheus_client.metrics import MetricWrapperBase

    from medaudit.service import metrics

    code = "\n".join(
        p.read_text()
        for d in ("service", "clients")
        for p in sorted((ROOT / d).rglob("*.py"))
        if p.name != "metrics.py"
    )
    declared = declared_series()
    out: set[str] = set()
    for var, collector in vars(metrics).items():
        if isinstance(collector, MetricWrapperBase) and not re.search(rf"\.{var}\b", code):
            families = {f.name for f in collector.describe()}
            out |= {name for name, family in declared.items() if family in families}
    return out


def _check_rules(prom: str) -> list[str]:
    groups = httpx.get(f"{prom}/api/v1/rules", timeout=30).json()["data"]["groups"]
    loaded = {g["name"] for g in groups}
    want = {
        g["name"]
        for f in ("recording", "alerts")
        for g in yaml.safe_load((PROM / f"{f}.yml").read_text())["groups"]
    }
    failures = [f"rule group {g} not loaded" for g in sorted(want - loaded)]
    for g in groups:
        for r in g["rules"]:
            if r.get("health") != "ok" or r.get("lastError"):
                failures.append(f"rule {r['name']}: health {r.get('health')} {r.get('lastError', '')}")
            if r["type"] == "alerting" and r["state"] == "firing":
                failures.append(f"alert {r['name']} fires on a healthy service: {r.get('alerts')}")
    return failures
