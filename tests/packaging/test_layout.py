"""pyproject.toml's package list and folder mapping match the source tree (fast; no build)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FULL = {
    "models": "medaudit.models",
    "service": "medaudit.service",
    "cli": "medaudit.cli",
    "testing": "medaudit.testing",
}


def _packages_on_disk(folder: Path, name: str) -> set[str]:
    return {
        ".".join([name, *p.parent.relative_to(folder).parts])
        for p in folder.rglob("__init__.py")
        # build/ is setuptools' scratch folder when a distribution is built in place.
        if not {"__pycache__", "build"} & set(p.relative_to(folder).parts)
    }


def test_the_full_distribution_lists_every_package_of_its_folders() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {name: folder for folder, name in FULL.items()}
    on_disk = set().union(*(_packages_on_disk(ROOT / f, n) for f, n in FULL.items()))
    assert set(cfg["packages"]) == on_disk, (
        f"missing from pyproject.toml: {sorted(on_disk - set(cfg['packages']))}; "
        f"listed but absent: {sorted(set(cfg['packages']) - on_disk)}"
    )


def test_the_client_distribution_is_the_clients_folder() -> None:
    cfg = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())
    assert cfg["tool"]["setuptools"]["package-dir"] == {"medaudit.clients": "."}
    assert _packages_on_disk(ROOT / "clients", "medaudit.clients") == set(
        cfg["tool"]["setuptools"]["packages"]
    )
    full = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"medaudit-client=={cfg['project']['version']}" in full["dependencies"]
    assert full["version"] == cfg["project"]["version"]


def test_no_folder_is_a_medaudit_package_itself() -> None:
    """`medaudit` is a namespace package shared by both distributions: neither may own it."""
    assert not (ROOT / "medaudit").exists() and not (ROOT / "__init__.py").exists()
