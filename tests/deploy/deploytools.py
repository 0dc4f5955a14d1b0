"""What the deploy tests share: paths, promtool, and the metric-name check for PromQL.

The name check is what keeps dashboards and alerts honest about ``service/metrics.py``: every
series a rule or panel reads must be declared there (under the names prometheus_client exposes),
be one of BentoML's own ``bentoml_service_*`` series, a Prometheus built-in, or a recording rule of
``deploy/prometheus/recording.yml``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"

#: What BentoML 1.4 exports itself (bentoml/_internal/server/http/instruments.py and
#: _bentoml_impl/server/app.py, namespace "bentoml_service").
BENTOML_SERIES = frozenset(
    {
        "bentoml_service_request_total",
        "bentoml_service_request_in_progress",
        "bentoml_service_last_request_timestamp_seconds",
        *(f"bentoml_service_request_duration_seconds{s}" for s in ("_bucket", "_sum", "_count")),
        *(f"bentoml_service_adaptive_batch_size{s}" for s in ("_bucket", "_sum", "_count")),
    }
)
#: Series Prometheus makes itself for every target.
PROMETHEUS_BUILTINS = frozenset({"up"})

_EXPOSED_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
    | {"inf", "nan", "offset"}
)


def promtool() -> str:
    """promtool's path; a missing promtool fails the test (CI installs it, see .ci/run)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (Debian's package; .ci/run does)")
    return path


def declared_series() -> dict[str, str]:
    """Every series name ``service/metrics.py`` exposes -> the collector's declared name."""
    from prometheus_client.metrics import MetricWrapperBase

    from medaudit.service import metrics

    out: dict[str, str] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            for suffix in _EXPOSED_SUFFIXES[family.type]:
                out[family.name + suffix] = family.name
    return out


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules(kind: str) -> list[dict[str, Any]]:
    """The rules of ``deploy/prometheus/{recording,alerts}.yml``."""
    return [r for g in load_yaml(PROM / f"{kind}.yml")["groups"] for r in g["rules"]]


def recorded_series() -> frozenset[str]:
    return frozenset(r["record"] for r in rules("recording"))


def known_series() -> frozenset[str]:
    return frozenset(declared_series()) | BENTOML_SERIES | PROMETHEUS_BUILTINS | recorded_series()


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed).

    A tokenizer, not a parser: strings, label matchers, ranges, ``by (...)``-style label lists and
    ``offset`` durations are removed first; what is left that looks like an identifier and is not
    called like a function or spelled like a keyword is a metric name.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[\w.]+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", s):
        if m.group(2) or m.group(1).lower() in _KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def unknown_names(expr: str) -> set[str]:
    return metric_names(expr) - known_series()


# ---------------------------------------------------------------------------------------- Grafana

#: Panels whose series only `medaudit worker` exports carry this in their description: without a
#: worker they have no data, and the live check says so instead of failing.
WORKER_MARK = "Needs the flag worker"
#: Series only the worker exports (the service process declares them too, but never sets them).
WORKER_SERIES = frozenset(
    {
        "medaudit_flag_queue_length",
        "medaudit_flag_queue_lag",
        "medaudit_flag_queue_pending",
        "medaudit_flag_dead_letters",
        "medaudit_flag_reviews_total",
    }
)
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
#: Grafana's own variables a Prometheus query may use.
GRAFANA_VARIABLES = frozenset({"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"})


def dashboards() -> dict[str, dict[str, Any]]:
    """File name -> parsed dashboard JSON, for every file in ``deploy/grafana/dashboards``."""
    import json

    return {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    out: list[dict[str, Any]] = []
    for p in board.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def panel_targets(board: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel."""
    return [(p, t) for p in all_panels(board) for t in p.get("targets", [])]


def variable_metric_query(query: str) -> str:
    """A template variable's query as PromQL: ``label_values(m{...}, l)`` -> ``group by (l) (m{...})``."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.S)
    if m:
        return f"group by ({m.group(2)}) ({m.group(1)})"
    return query


def needs_worker(panel: dict[str, Any]) -> bool:
    return WORKER_MARK in panel.get("description", "")


# ------------------------------------------------------------------------------ processes, settings


def cli_options(command: str) -> set[str]:
    """The options a ``medaudit <command>`` accepts (from the typer app itself)."""
    import typer.main

    from medaudit.cli.commands import app

    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


def check_medaudit_args(args: list[str]) -> None:
    """``["medaudit", "<command>", "--opt", ...]`` names a real command and only its options."""
    assert args[0] == "medaudit", args
    options = cli_options(args[1])
    used = {a.split("=", 1)[0] for a in args[2:] if a.startswith("--")}
    assert used <= options, f"medaudit {args[1]} has no {sorted(used - options)}"


def check_settings(env: dict[str, str]) -> None:
    """Every MEDAUDIT_* variable is one the service reads, and together they parse (auth aside)."""
    from medaudit.service.config import Settings, unknown_variables

    assert unknown_variables(env) == []
    Settings.from_env({**env, "MEDAUDIT_AUTH": "off", "MEDAUDIT_API_KEYS": "", "MEDAUDIT_API_KEY_SALT": ""})
