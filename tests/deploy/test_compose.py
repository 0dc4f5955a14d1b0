"""deploy/compose.yaml and deploy/Dockerfile, checked without Docker: the file parses, every path it
mounts or builds from exists, every reference (volumes, ports, scrape targets, datasource URL,
dashboards path) meets its other end, and the service's environment is settings it reads."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from deploytools import DEPLOY, GRAFANA, PROM, ROOT, check_medaudit_args, check_settings, load_yaml

COMPOSE = load_yaml(DEPLOY / "compose.yaml")
SERVICES: dict[str, Any] = COMPOSE["services"]


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR}, with nothing set in the environment."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def _mounts(service: str) -> list[tuple[str, str]]:
    out = []
    for v in SERVICES[service].get("volumes", []):
        parts = v.split(":")
        out.append((parts[0], parts[1]))
    return out


def _container_port(service: str) -> set[int]:
    return {int(p.split(":")[-1]) for p in SERVICES[service].get("ports", [])}


def test_services_and_named_volumes() -> None:
    assert set(SERVICES) == {"medaudit", "worker", "redis", "prometheus", "grafana"}
    declared = set(COMPOSE.get("volumes", {}))
    used = set()
    for name in SERVICES:
        for src, _ in _mounts(name):
            if not src.startswith((".", "/", "~", "$")):
                used.add(src)
    assert used == declared


def test_bind_mounts_and_build_context_exist() -> None:
    build = SERVICES["medaudit"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).is_file()
    for name in SERVICES:
        for src, _ in _mounts(name):
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name} mounts missing {src}"


def test_host_ports_are_unique() -> None:
    hosts = [p.split(":")[0] for s in SERVICES.values() for p in s.get("ports", [])]
    assert len(hosts) == len(set(hosts)), hosts


def test_service_and_worker_environment_is_read_by_the_service() -> None:
    for name in ("medaudit", "worker"):
        env = {k: _interpolate(str(v)) for k, v in SERVICES[name]["environment"].items()}
        check_settings({k: v for k, v in env.items() if k.startswith("MEDAUDIT_")})
        assert env["MEDAUDIT_REDIS_URL"] == "redis://redis:6379/0"
        assert urlparse(env["MEDAUDIT_REDIS_URL"]).hostname in SERVICES
    assert _interpolate(SERVICES["medaudit"]["environment"]["MEDAUDIT_AUTH"]) == "on"


def test_worker_runs_a_real_medaudit_command_on_the_service_image() -> None:
    check_medaudit_args(SERVICES["worker"]["command"])
    assert SERVICES["worker"]["image"] == SERVICES["medaudit"]["image"]


def test_prometheus_gets_its_config_and_rules_and_scrapes_compose_services() -> None:
    mounts = {dst: (DEPLOY / src).resolve() for src, dst in _mounts("prometheus") if src.startswith(".")}
    flag = next(a for a in SERVICES["prometheus"]["command"] if a.startswith("--config.file="))
    config_path = flag.split("=", 1)[1]
    assert mounts[config_path] == PROM / "prometheus.yml"
    config = load_yaml(PROM / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert mounts[str(Path(config_path).parent / rule_file)] == PROM / rule_file
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"medaudit", "medaudit-worker"}  # the job names the alert rules match
    for job in jobs.values():
        for target in (t for sc in job["static_configs"] for t in sc["targets"]):
            host, port = target.split(":")
            assert host in SERVICES, target
            if host == "medaudit":
                assert int(port) in _container_port("medaudit")
            if host == "worker":
                command = SERVICES["worker"]["command"]
                assert command[command.index("--metrics-port") + 1] == port


def test_grafana_provisioning_matches_its_mounts() -> None:
    mounts = {(DEPLOY / src).resolve(): dst for src, dst in _mounts("grafana") if src.startswith(".")}
    assert mounts[GRAFANA / "provisioning"] == "/etc/grafana/provisioning"
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "medaudit.yml")["providers"][0]
    assert mounts[GRAFANA / "dashboards"] == provider["options"]["path"]
    url = urlparse(
        load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]["url"]
    )
    assert url.hostname == "prometheus" and url.port == 9090
    assert _container_port("prometheus") == {9090}


def _dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def test_dockerfile_copies_existing_paths_and_serves_the_bento_service() -> None:
    import json

    steps = _dockerfile()
    for instr, rest in steps:
        if instr == "COPY":
            *sources, _ = shlex.split(rest)
            for src in sources:
                assert (ROOT / src).exists(), src
    (cmd,) = [json.loads(rest) for instr, rest in steps if instr == "CMD"]
    assert cmd[:3] == ["bentoml", "serve", load_yaml(ROOT / "bentofile.yaml")["service"]]
    exposed = {int(rest) for instr, rest in steps if instr == "EXPOSE"}
    assert exposed == _container_port("medaudit") == {3000}
    requirements = (DEPLOY / "requirements.txt").read_text()
    assert any(rest.startswith("deploy/requirements.txt") for instr, rest in steps if instr == "COPY")
    assert "onnxruntime-gpu" in requirements and "\nonnxruntime==" not in requirements


@pytest.mark.parametrize("service", ["medaudit", "redis"])
def test_healthchecks_probe_the_right_thing(service: str) -> None:
    test = " ".join(SERVICES[service]["healthcheck"]["test"])
    assert {"medaudit": "/readyz", "redis": "ping"}[service] in test
