"""``bentoml build`` packages the service (issue #6): what CI builds is what a deployment gets."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _requirements() -> list[str]:
    lines = (ROOT / "deploy" / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_bento_requirements_are_the_projects_dependencies() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(_requirements()) == sorted(deps), (
        "deploy/requirements.txt drifted from pyproject.toml [project.dependencies]; regenerate it"
    )


@pytest.mark.slow
@pytest.mark.e2e
def test_bentoml_build_packages_the_service(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    bentoml = str(Path(sys.executable).parent / "bentoml")
    out = subprocess.run(
        [bentoml, "build", "--output", "tag"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = tmp_path / "home" / "bentos" / name / version
    src = bento / "src"
    for f in ("service/api.py", "service/inputs.py", "models/registry.py", "clients/cli.py"):
        assert (src / f).is_file(), f"{f} missing from the Bento"
    assert not (src / "tests").exists() and not (src / "artifacts").exists()
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["service"] == "medaudit.service.api:MedAudit"
    assert {a["name"] for a in meta["schema"]["routes"]} >= {"predict", "audit", "compare"}
    reqs = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu==1.31.1" in reqs and "torch==2.14.1" in reqs
