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
    """The index-installed dependencies; medaudit-client travels as a wheel beside medaudit's."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    third_party = [d for d in deps if not d.startswith("medaudit-client")]
    assert sorted(_requirements()) == sorted(third_party), (
        "deploy/requirements.txt drifted from pyproject.toml [project.dependencies]; regenerate it"
    )


@pytest.mark.slow
@pytest.mark.e2e
def test_bentoml_build_packages_the_service(tmp_path: Path) -> None:
    """`make bento`: the two wheels (built into dist/ as `make wheels` does), then `bentoml build`."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    dist = ROOT / "dist"
    for src in (ROOT / "clients", ROOT):
        built = subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(dist), str(src)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    bentoml = str(Path(sys.executable).parent / "bentoml")
    out = subprocess.run(
        [bentoml, "build", "--output", "tag"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = tmp_path / "home" / "bentos" / name / version
    wheels = {p.name for p in (bento / "env" / "python" / "wheels").iterdir()}
    assert wheels == {"medaudit_client-0.1.0-py3-none-any.whl", "medaudit-0.1.0-py3-none-any.whl"}
    src = bento / "src"
    # The code travels as the wheels only: no source folder that could shadow the installed package.
    for folder in ("service", "models", "clients", "cli", "tests", "artifacts"):
        assert not (src / folder).exists(), f"{folder}/ copied into the Bento"
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["service"] == "medaudit.service.api:MedAudit"
    assert {a["name"] for a in meta["schema"]["routes"]} >= {"predict", "audit", "compare"}
    reqs = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu==1.31.1" in reqs and "torch==2.14.1" in reqs
