"""Grafana dashboards and provisioning: JSON structure, datasource references, and every metric a
panel reads declared in service/metrics.py (or BentoML's/Prometheus' own)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from deploytools import (
    DATASOURCE_REF,
    GRAFANA,
    GRAFANA_VARIABLES,
    WORKER_SERIES,
    all_panels,
    dashboards,
    declared_series,
    load_yaml,
    metric_names,
    needs_worker,
    panel_targets,
    rules,
    unknown_names,
    variable_metric_query,
)

BOARDS = dashboards()
EXPECTED = {"service-overview.json", "ab-comparison.json", "concepts-flags.json", "queue-health.json"}


def test_the_four_dashboards_exist_with_unique_uids_and_titles() -> None:
    assert set(BOARDS) == EXPECTED
    uids = [b["uid"] for b in BOARDS.values()]
    titles = [b["title"] for b in BOARDS.values()]
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles)
    for b in BOARDS.values():
        assert re.fullmatch(r"[a-z0-9-]{1,40}", b["uid"]), b["uid"]
        assert "medaudit" in b["tags"] and b["schemaVersion"] >= 36


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_datasource_variable_is_used_everywhere(name: str) -> None:
    board = BOARDS[name]
    variables = board["templating"]["list"]
    ds = [v for v in variables if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in ds] == [("datasource", "prometheus")]
    for v in variables:
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE_REF, v["name"]
    for p in all_panels(board):
        if p["type"] == "row":
            continue
        assert p.get("datasource") == DATASOURCE_REF, p["title"]
        for t in p.get("targets", []):
            assert t.get("datasource") == DATASOURCE_REF, (p["title"], t.get("refId"))


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panels_have_unique_ids_targets_with_exprs_and_a_non_overlapping_layout(name: str) -> None:
    board = BOARDS[name]
    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids), f"duplicate panel ids in {name}"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        assert p.get("title"), p["id"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p.get("description"), f"{p['title']!r} has no description"
        targets = p.get("targets", [])
        assert targets, f"{p['title']!r} has no query"
        ref_ids = [t["refId"] for t in targets]
        assert len(set(ref_ids)) == len(ref_ids), p["title"]
        for t in targets:
            assert t.get("expr", "").strip(), (p["title"], t["refId"])


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_expr_reads_declared_series_and_defined_variables(name: str) -> None:
    board = BOARDS[name]
    defined = {v["name"] for v in board["templating"]["list"]} | GRAFANA_VARIABLES
    queries = [(p["title"], t["expr"]) for p, t in panel_targets(board)]
    queries += [
        (f"variable {v['name']}", variable_metric_query(_var_query(v)))
        for v in board["templating"]["list"]
        if v["type"] == "query"
    ]
    for title, expr in queries:
        assert metric_names(expr), (title, expr)
        assert unknown_names(expr) == set(), (title, expr)
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= defined, (title, used - defined)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_worker_panels_are_marked(name: str) -> None:
    """A panel is marked 'needs the worker' exactly when it reads what only the worker exports."""
    for p in all_panels(BOARDS[name]):
        exprs = [t["expr"] for t in p.get("targets", [])]
        reads_worker = any(metric_names(e) & WORKER_SERIES or 'job="medaudit-worker"' in e for e in exprs)
        assert reads_worker == needs_worker(p), p["title"]


def test_every_declared_series_is_on_a_dashboard_or_in_a_rule() -> None:
    used: set[str] = set()
    for board in BOARDS.values():
        for _, t in panel_targets(board):
            used |= metric_names(t["expr"])
    for r in rules("recording") + rules("alerts"):
        used |= metric_names(r["expr"])
    families = declared_series()
    unused = {family for name, family in families.items()} - {families[n] for n in used if n in families}
    assert unused == set(), "declared in service/metrics.py but neither charted nor alerted on"


def test_provisioning_points_at_the_dashboards_and_a_prometheus_datasource() -> None:
    ds = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] and source["url"].startswith("http")
    prov = load_yaml(GRAFANA / "provisioning" / "dashboards" / "medaudit.yml")
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/var/lib/grafana/")


def _var_query(v: dict[str, Any]) -> str:
    q = v["query"]
    return q["query"] if isinstance(q, dict) else q
