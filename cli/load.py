"""Load and soak runs of a served medaudit: locust headless, batch sizes, server memory, a report.

:func:`run_load` drives a running server (its base URL) with the mix of ``cli/locustfile.py``
and returns a :class:`LoadReport`; :func:`render_markdown` and :func:`write_report` turn that
into ``benchmarks/results/<name>.md`` and ``.json``. ``benchmarks/load.py`` (``make load``,
``make soak``) and ``tests/integration/test_load_short.py`` are the callers.

Design:

* **Locust in a subprocess.** Locust monkey-patches the standard library with gevent at import;
  this module (and pytest, and ``bentoml serve``'s parent) must not be patched, so locust runs as
  ``locust -f cli/locustfile.py --headless`` and this module never imports it. At quit the
  locustfile writes its raw stats (per request name, with locust's response-time histogram) and
  errors to a JSON file named by ``MEDAUDIT_LOAD_SUMMARY``; the per-endpoint rows here merge those
  histograms, so an endpoint's p95 is over all its payload kinds, computed the way locust does.
  Locust's own CSV and HTML reports go to the work folder too, for a human to look at.
* **Batch sizes from the server.** ``/metrics`` is scraped before and after the run and the
  difference kept: BentoML's ``bentoml_service_adaptive_batch_size`` per batched method (how many
  requests the predictor's dispatcher merged) and medaudit's ``medaudit_batch_images`` per service
  and version (images per model call, after a mixed batch is split by version; the only batch
  figure of the auditor, whose own queue batches: :mod:`medaudit.service.audit_pool`). Both are
  histograms, so the report has counts, means and the bucket distribution; other traffic during
  the run is counted too.
* **Memory of the whole server.** ``bentoml serve`` runs every service in worker processes under
  one arbiter; :class:`RssSampler` sums the RSS of that process and all its descendants every few
  seconds from a thread. Summed RSS counts shared pages once per process, so the absolute figure
  overstates use; its *growth* is what a soak judges: the median of the samples in the last 30 s
  of the warm-up against the median of the last 30 s of the run (and the maximum, reported).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from medaudit.service.process import tree_rss

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
ADAPTIVE = "bentoml_service_adaptive_batch_size"
BATCH_IMAGES = "medaudit_batch_images"
#: Window (s) whose median RSS stands for "at the end of warm-up" and "at the end of the run".
RSS_WINDOW_S = 30.0


class LoadError(RuntimeError):
    """Locust did not produce a summary (crashed, timed out); the message ends with its log's tail."""


# ------------------------------------------------------------------------------------ report


@dataclass
class RequestRow:
    """Locust's figures for one request name, or for one endpoint (its names merged)."""

    name: str
    requests: int
    failures: int
    rps: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class BatchRow:
    """One batching histogram's change over the run: ``key`` is a method or ``service/version``."""

    key: str
    batches: int
    items: int
    mean: float | None
    #: Batches per histogram bucket (``"<=2"``: more than the previous bound, at most 2).
    buckets: dict[str, int] = field(default_factory=dict)


@dataclass
class RssSample:
    t_s: float
    rss_bytes: int
    processes: int


@dataclass
class RssSummary:
    """Server memory over the run; ``passed`` is judged only when a growth limit is given."""

    warmup_s: float
    start_bytes: int
    warmup_bytes: int
    end_bytes: int
    max_bytes: int
    growth_end_pct: float
    growth_max_pct: float
    limit_pct: float | None
    passed: bool | None


@dataclass
class LoadReport:
    meta: dict[str, Any]
    endpoints: list[RequestRow]
    requests: list[RequestRow]
    errors: list[dict[str, Any]]
    exceptions: list[dict[str, Any]]
    adaptive_batches: list[BatchRow]
    model_batches: list[BatchRow]
    rss: list[RssSample] = field(default_factory=list)
    rss_summary: RssSummary | None = None

    @property
    def total(self) -> RequestRow | None:
        """The ``all`` row: every request of the run."""
        return next((r for r in self.endpoints if r.name == "all"), None)

    @property
    def total_requests(self) -> int:
        return self.total.requests if self.total else 0

    @property
    def total_failures(self) -> int:
        return self.total.failures if self.total else 0

    def batch_mean(self, key: str) -> float | None:
        """Mean adaptive batch size of one method BentoML batches (``predict_batch``)."""
        return next((b.mean for b in self.adaptive_batches if b.key == key), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ locust stats


def percentile(hist: Mapping[int, int], q: float) -> float:
    """Locust's percentile of a response-time histogram (``{rounded ms: count}``)."""
    n = sum(hist.values())
    if n == 0:
        return 0.0
    target = int(n * q)
    seen = 0
    for rt in sorted(hist, reverse=True):
        seen += hist[rt]
        if n - seen <= target:
            return float(rt)
    return 0.0


def _row(name: str, entries: list[dict[str, Any]], seconds: float) -> RequestRow:
    hist: dict[int, int] = {}
    for e in entries:
        for k, v in e["response_times"].items():
            hist[int(float(k))] = hist.get(int(float(k)), 0) + int(v)
    n = sum(e["num_requests"] for e in entries)
    return RequestRow(
        name=name,
        requests=n,
        failures=sum(e["num_failures"] for e in entries),
        rps=n / seconds if seconds > 0 else 0.0,
        mean_ms=sum(e["total_response_time"] for e in entries) / n if n else 0.0,
        p50_ms=percentile(hist, 0.5),
        p95_ms=percentile(hist, 0.95),
        p99_ms=percentile(hist, 0.99),
        max_ms=float(max((e["max_response_time"] for e in entries), default=0)),
    )


def endpoint_of(name: str) -> str:
    """``"/predict [png-224]"`` -> ``"/predict"``."""
    return name.split(" [", 1)[0]


def request_rows(summary: Mapping[str, Any], seconds: float) -> tuple[list[RequestRow], list[RequestRow]]:
    """Per endpoint and per request name rows of a locustfile summary, over ``seconds`` of load."""
    entries = sorted(summary["entries"], key=lambda e: e["name"])
    by_endpoint: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_endpoint.setdefault(endpoint_of(e["name"]), []).append(e)
    endpoints = [_row(k, v, seconds) for k, v in by_endpoint.items()]
    endpoints.append(_row("all", entries, seconds))
    return endpoints, [_row(e["name"], [e], seconds) for e in entries]


# ------------------------------------------------------------------------------------ /metrics


def scrape_histograms(base: str, names: Iterable[str], timeout: float = 10.0) -> dict[str, dict[str, float]]:
    """Histogram samples of the metric families ``names`` on ``base``/metrics, flattened.

    Keys are ``family|group|field`` where ``group`` is the method (adaptive batching) or
    ``service/version`` (medaudit's), and ``field`` is ``sum``, ``count`` or ``le=BOUND``
    (cumulative); series that differ in other labels are summed.
    """
    text = httpx.get(f"{base}/metrics", timeout=timeout).text
    wanted = set(names)
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in wanted:
            continue
        for s in fam.samples:
            labels = s.labels
            group = labels.get("method_name") or f"{labels.get('service', '?')}/{labels.get('version', '?')}"
            if s.name.endswith("_bucket"):
                fld = f"le={labels['le']}"
            elif s.name.endswith("_sum"):
                fld = "sum"
            elif s.name.endswith("_count"):
                fld = "count"
            else:
                continue
            d = out.setdefault(f"{fam.name}|{group}", {})
            d[fld] = d.get(fld, 0.0) + float(s.value)
    return out


def batch_histogram(base: str, key: str) -> dict[str, float]:
    """Cumulative ``le`` buckets plus ``sum``/``count`` of one batch-size histogram, ``key`` named
    as :func:`scrape_histograms` names it: ``bentoml_service_adaptive_batch_size|predict_batch``
    (the predictor's dispatcher), ``medaudit_batch_images|auditor/vanilla`` (the auditor's queue)."""
    return scrape_histograms(base, [key.split("|", 1)[0]]).get(key, {})


def batch_rows(
    before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]], family: str
) -> list[BatchRow]:
    """What one histogram family gained between two :func:`scrape_histograms` (groups with batches)."""
    rows = []
    for key in sorted(k for k in after if k.startswith(family + "|")):
        a, b = after[key], before.get(key, {})
        d = {k: v - b.get(k, 0.0) for k, v in a.items()}
        count = int(round(d.get("count", 0.0)))
        if count <= 0:
            continue
        bounds = sorted((float(k[3:]), k) for k in d if k.startswith("le="))  # cumulative -> per bucket
        buckets, prev = {}, 0.0
        for bound, k in bounds:
            label = "+Inf" if bound == float("inf") else f"<={bound:g}"
            buckets[label] = int(round(d[k] - prev))
            prev = d[k]
        items = d.get("sum", 0.0)
        rows.append(
            BatchRow(
                key=key.split("|", 1)[1],
                batches=count,
                items=int(round(items)),
                mean=items / count,
                buckets={k: v for k, v in buckets.items() if v},
            )
        )
    return rows


# ------------------------------------------------------------------------------------ memory


class RssSampler:
    """Samples :func:`~service.process.tree_rss` of ``pid`` every ``interval`` s on a daemon thread
    (a context manager)."""

    def __init__(self, pid: int, interval: float = 2.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[RssSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while True:
            rss, n = tree_rss(self.pid)
            if n:
                self.samples.append(RssSample(round(time.monotonic() - self._t0, 2), rss, n))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 10)


def summarize_rss(
    samples: list[RssSample], warmup_s: float, limit_pct: float | None = None
) -> RssSummary | None:
    """Growth of summed RSS after ``warmup_s``: end-of-run vs end-of-warm-up medians (and the max)."""
    if not samples:
        return None
    end_t = samples[-1].t_s

    def median_in(lo: float, hi: float) -> int:
        xs = [s.rss_bytes for s in samples if lo <= s.t_s <= hi]
        if not xs:  # no sample in the window: the nearest one before its end
            xs = [next((s.rss_bytes for s in reversed(samples) if s.t_s <= hi), samples[0].rss_bytes)]
        return int(statistics.median(xs))

    warm = median_in(warmup_s - RSS_WINDOW_S, warmup_s)
    end = median_in(end_t - RSS_WINDOW_S, end_t)
    after = [s.rss_bytes for s in samples if s.t_s >= warmup_s] or [end]
    peak = max(after)
    g_end = 100.0 * (end - warm) / warm if warm else 0.0
    g_max = 100.0 * (peak - warm) / warm if warm else 0.0
    return RssSummary(
        warmup_s=warmup_s,
        start_bytes=samples[0].rss_bytes,
        warmup_bytes=warm,
        end_bytes=end,
        max_bytes=peak,
        growth_end_pct=g_end,
        growth_max_pct=g_max,
        limit_pct=limit_pct,
        passed=None if limit_pct is None else g_end <= limit_pct,
    )


# ------------------------------------------------------------------------------------ the run


def run_load(
    base: str,
    *,
    users: int,
    spawn_rate: float,
    seconds: float,
    workdir: Path,
    server_pid: int | None = None,
    rss_interval: float = 2.0,
    warmup_s: float = 0.0,
    rss_limit_pct: float | None = None,
    env: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
    locustfile: Path = LOCUSTFILE,
) -> LoadReport:
    """Run the locust mix against ``base`` for ``seconds`` with ``users`` users; the report.

    ``server_pid`` (the ``bentoml serve`` process, e.g. ``Server.proc.pid``) enables RSS sampling;
    ``env`` is added to locust's
    environment (``MEDAUDIT_API_KEY``, ``MEDAUDIT_LOAD_WAIT``, …); ``meta`` is copied into the
    report. Locust's log, CSV and HTML files go to ``workdir``.

    Raises:
        LoadError: Locust exited without writing its summary, or ran far past ``seconds``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    summary_path = workdir / "locust_summary.json"
    summary_path.unlink(missing_ok=True)
    log_path = workdir / "locust.log"
    locust = str(Path(sys.executable).parent / "locust")
    cmd = [
        locust,
        "-f",
        str(locustfile),
        "--headless",
        "--only-summary",
        "--host",
        base,
        "-u",
        str(users),
        "-r",
        f"{spawn_rate:g}",
        "-t",
        f"{int(round(seconds))}s",
        # Users finish a request in flight at -t for up to 5 s; then locust kills them (uncounted).
        "--stop-timeout",
        "5",
        "--csv",
        str(workdir / "locust"),
        "--html",
        str(workdir / "locust.html"),
    ]
    full_env = {**os.environ, **(env or {}), "MEDAUDIT_LOAD_SUMMARY": str(summary_path)}
    adaptive_before = scrape_histograms(base, [ADAPTIVE, BATCH_IMAGES])
    sampler = RssSampler(server_pid, rss_interval) if server_pid is not None else None
    t0 = time.time()
    with log_path.open("wb") as log:
        if sampler is not None:
            sampler.__enter__()
        try:
            proc = subprocess.run(
                cmd,
                cwd=workdir,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=seconds + 90,
                check=False,
            )
            returncode = proc.returncode
        except subprocess.TimeoutExpired as e:
            raise LoadError(f"locust ran past {seconds + 90:.0f} s:\n{_tail(log_path)}") from e
        finally:
            if sampler is not None:
                sampler.__exit__(None, None, None)
    wall = time.time() - t0
    adaptive_after = scrape_histograms(base, [ADAPTIVE, BATCH_IMAGES])
    if not summary_path.exists():
        raise LoadError(f"locust exited with {returncode} and no summary:\n{_tail(log_path)}")
    summary = json.loads(summary_path.read_text())
    start, last = summary.get("start_time"), summary.get("last_request_timestamp")
    # Requests still in flight at -t finish (--stop-timeout) but do not lengthen the run for req/s.
    measured = min(last - start, seconds) if start and last and last > start else seconds
    endpoints, requests = request_rows(summary, measured)
    # Memory while the load ran: not locust's start-up before, nor its shutdown after.
    samples = [x for x in sampler.samples if x.t_s <= seconds + 3.0] if sampler is not None else []
    report_meta = {
        "host": base,
        "users": users,
        "spawn_rate": spawn_rate,
        "seconds": seconds,
        "measured_s": round(measured, 1),
        "wall_s": round(wall, 1),
        "locust_exit_code": returncode,
        "locust": _version("locust"),
        "payloads": summary.get("payloads", []),
        "subjects": summary.get("subjects"),
        "wait_max_s": summary.get("wait_max_s"),
        "screen_share": summary.get("screen_share") or 0.0,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
        "workdir": str(workdir),
        **(meta or {}),
    }
    return LoadReport(
        meta=report_meta,
        endpoints=endpoints,
        requests=requests,
        errors=sorted(summary.get("errors", []), key=lambda e: -e["occurrences"]),
        exceptions=summary.get("exceptions", []),
        adaptive_batches=batch_rows(adaptive_before, adaptive_after, ADAPTIVE),
        model_batches=batch_rows(adaptive_before, adaptive_after, BATCH_IMAGES),
        rss=samples,
        rss_summary=summarize_rss(samples, warmup_s, rss_limit_pct),
    )


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------ rendering


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _table(rows: list[RequestRow], first: str) -> list[str]:
    out = [
        f"| {first} | requests | failures | req/s | mean ms | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"**{r.name}**" if r.name == "all" else f"`{r.name}`"
        out.append(
            f"| {name} | {r.requests} | {r.failures} | {r.rps:.1f} | {r.mean_ms:.0f} | {r.p50_ms:.0f} "
            f"| {r.p95_ms:.0f} | {r.p99_ms:.0f} | {r.max_ms:.0f} |"
        )
    return out


def _batch_table(rows: list[BatchRow], first: str) -> list[str]:
    out = [f"| {first} | batches | items | mean size | batches by size |", "|---|---:|---:|---:|---|"]
    for b in rows:
        hist = ", ".join(f"{k}: {v}" for k, v in b.buckets.items())
        mean = f"{b.mean:.2f}" if b.mean is not None else "-"
        out.append(f"| `{b.key}` | {b.batches} | {b.items} | {mean} | {hist} |")
    if not rows:
        out.append("| (none observed) | | | | |")
    return out


def render_markdown(report: LoadReport, title: str) -> str:
    """The report as Markdown: totals, per-endpoint and per-payload tables, errors, batches, memory."""
    m = report.meta
    n, f = report.total_requests, report.total_failures
    total = report.total
    lines = [
        f"# {title} ({m['date']}, {m['cpu_count']} CPUs, {m['users']} users, {m['seconds']:.0f} s)",
        "",
    ]
    if m.get("command"):
        lines += [f"Command: `{m['command']}`.", ""]
    if m.get("served"):
        lines.append(f"Served: {m['served']}.")
    lines += [
        f"Mix: `cli/locustfile.py` (locust {m['locust']}): ~70% /predict, ~20% /audit, ~7% /compare, "
        f"~3% GET /models/; PNG/JPEG 64–1024 px and DICOM (RGB 8-bit, MONOCHROME2 16-bit); "
        f"{m.get('subjects')} subject keys for A/B routing; think time 0–{m.get('wait_max_s')} s"
        + (
            f"; {100 * m['screen_share']:.0f}% of the predictions screened (`/predict?detail=scores`)."
            if m.get("screen_share")
            else "."
        ),
        "",
        f"**{n} requests, {f} failures ({100.0 * f / n if n else 0.0:.2f}%), "
        f"{total.rps if total else 0.0:.1f} req/s** over {m['measured_s']:.0f} s.",
        "",
        "## Per endpoint",
        "",
        *_table(report.endpoints, "endpoint"),
        "",
        "## Per endpoint and payload",
        "",
        *_table(report.requests, "request"),
        "",
        "## Errors",
        "",
    ]
    if report.errors or report.exceptions:
        lines += ["| request | error | count |", "|---|---|---:|"]
        for e in report.errors:
            err = str(e["error"]).replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| `{e['method']} {e['name']}` | {err} | {e['occurrences']} |")
        for x in report.exceptions:
            msg = str(x["msg"]).replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| (locustfile exception) | {msg} | {x['count']} |")
    else:
        lines.append("None.")
    lines += [
        "",
        "## Batching",
        "",
        "Adaptive batches BentoML's dispatcher formed (`bentoml_service_adaptive_batch_size`; the "
        "auditor batches in its own queue and shows only below):",
        "",
        *_batch_table(report.adaptive_batches, "batched method"),
        "",
        "Images per model call after a batch is split by version (`medaudit_batch_images`):",
        "",
        *_batch_table(report.model_batches, "service/version"),
        "",
    ]
    s = report.rss_summary
    if s is not None:
        lines += [
            "## Server memory",
            "",
            f"Summed RSS of the `bentoml serve` process tree ({report.rss[-1].processes} processes), "
            f"{len(report.rss)} samples:",
            "",
            (
                f"- start {_mib(s.start_bytes)}; end of warm-up ({s.warmup_s:.0f} s) {_mib(s.warmup_bytes)}; "
                if s.warmup_s > 0
                else f"- start {_mib(s.start_bytes)}; "
            )
            + f"end {_mib(s.end_bytes)}; max {_mib(s.max_bytes)}",
            f"- growth {'after warm-up' if s.warmup_s > 0 else 'since the start'}: "
            f"**{s.growth_end_pct:+.1f}%** at the end, {s.growth_max_pct:+.1f}% at the max",
        ]
        if s.passed is not None:
            verdict = "PASS" if s.passed else "FAIL"
            lines.append(f"- **{verdict}** (limit: end-of-run growth ≤ {s.limit_pct:g}%)")
        lines.append("")
    lines += [
        "The load generator shares the machine with the server: on a small machine the figures are",
        "lower bounds for a dedicated host. Locust's own CSV/HTML reports: "
        f"`{m.get('workdir', 'the work folder')}`.",
    ]
    return "\n".join(lines) + "\n"


def write_report(report: LoadReport, out: Path, title: str) -> str:
    """Writes ``out.md`` and ``out.json``; returns the Markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    md = render_markdown(report, title)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return md
