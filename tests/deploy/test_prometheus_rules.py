"""Alert and recording rules: promtool's checks and unit tests, and what every alert must carry.

promtool is Debian's (package ``prometheus``); a missing promtool fails here rather than skipping,
and ``.ci/run`` installs it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from deploytools import PROM, load_yaml, metric_names, promtool, rules, unknown_names

RULE_FILES = [PROM / "recording.yml", PROM / "alerts.yml"]
TEST_FILES = sorted((PROM / "tests").glob("*_test.yml"))
SEVERITIES = {"critical", "warning", "info"}


def _run(*args: str | Path, cwd: Path = PROM) -> str:
    out = subprocess.run([promtool(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    return text


def test_promtool_check_rules() -> None:
    text = _run("check", "rules", *RULE_FILES)
    assert text.count("SUCCESS") == len(RULE_FILES), text


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_promtool_check_scrape_config(config: str) -> None:
    """The compose and Kubernetes scrape configs load, rule files included."""
    _run("check", "config", PROM / config)


def test_promtool_rule_unit_tests() -> None:
    assert TEST_FILES
    text = _run("test", "rules", *TEST_FILES, cwd=PROM / "tests")
    print(text)
    assert text.count("SUCCESS") == len(TEST_FILES), text


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in TEST_FILES:
        for case in load_yaml(path)["tests"]:
            for t in case.get("alert_rule_test", []):
                (firing if t.get("exp_alerts") else silent).add(t["alertname"])
    alerts = {r["alert"] for r in rules("alerts")}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested not firing"
    assert (firing | silent) - alerts == set(), "tests of alerts that do not exist"


@pytest.mark.parametrize("rule", rules("alerts"), ids=lambda r: r["alert"])
def test_alert_carries_severity_annotations_and_a_for(rule: dict) -> None:
    assert rule["labels"]["severity"] in SEVERITIES
    for key in ("summary", "description", "runbook"):
        assert rule["annotations"].get(key, "").strip(), f"{rule['alert']} has no {key}"
    assert rule.get("for"), f"{rule['alert']} would fire on one evaluation"


@pytest.mark.parametrize(
    "rule", rules("recording") + rules("alerts"), ids=lambda r: r.get("alert", r.get("record"))
)
def test_rule_reads_only_declared_series(rule: dict) -> None:
    assert metric_names(rule["expr"]), rule["expr"]
    assert unknown_names(rule["expr"]) == set()


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (endpoint, le) (rate(medaudit_stage_seconds_bucket{stage="total"}[5m]))',
            {"medaudit_stage_seconds_bucket"},
        ),
        ('absent(up{job="medaudit"})', {"up"}),
        (
            "a:b:c > 3 * x_total offset 1h and on (version) y_count bool > 1e3",
            {"a:b:c", "x_total", "y_count"},
        ),
        ('sum(rate(m_total{v=~"$version"}[$__rate_interval])) by (label) / ignoring(le) n', {"m_total", "n"}),
        ('label_replace(up, "dst", "$1", "instance", "(.*):.*")', {"up"}),
        ("histogram_quantile(0.99, sum without (pod) (rate(h_bucket[5m] offset -5m)))", {"h_bucket"}),
    ],
)
def test_metric_names_extractor(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_declared_series_use_exposed_names() -> None:
    """prometheus_client's exposed names: a Counter gains _total, a Histogram _bucket/_sum/_count."""
    from deploytools import declared_series

    names = declared_series()
    assert "medaudit_flags_total" in names and "medaudit_flags" not in names
    assert {"medaudit_stage_seconds_bucket", "medaudit_stage_seconds_count"} <= set(names)
    assert "medaudit_flag_queue_lag" in names
