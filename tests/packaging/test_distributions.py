"""The two distributions as a user installs them: wheels and sdists built from this tree, their
metadata checked, each wheel installed into a fresh virtual environment and used from there.

* **medaudit-client** (``clients/``): httpx, typer and rich only. Installed alone, without torch,
  numpy or BentoML, it talks to a real ``bentoml serve`` of the tiny store: predict, audit, compare,
  a DICOM audit and the review queue.
* **medaudit** (the rest): nothing importable as ``models``, ``service``, ``clients`` or ``cli``;
  ``medaudit demo --help`` and ``bentoml serve medaudit.service.api:MedAudit`` work from the wheel.

The full wheel's environment borrows this environment's third-party packages through a ``.pth``
path line (copying torch and the rest would take minutes and gigabytes); a path line adds a folder
to ``sys.path`` without running that folder's own ``.pth`` files, so the editable install of this
checkout stays out of it, which a test below asserts.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medaudit.service.auth import hash_key
from medaudit.service.process import served

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.1.0"
HEAVY = ("torch", "torchvision", "bentoml", "numpy", "PIL", "timm", "onnxruntime", "redis")
SALT = "pkg-salt"
CLIENT_KEY, REVIEWER_KEY = "pkg-client-key-0123456789abcdef", "pkg-reviewer-key-0123456789abcdef"
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out


def _neutral_env() -> dict[str, str]:
    """This process's environment without what would let a child see this checkout's code."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Wheels and sdists of both distributions, built from this tree and checked by twine."""
    out = tmp_path_factory.mktemp("dist")
    for src in (ROOT / "clients", ROOT):
        _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    files = sorted(out.iterdir())
    _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)])
    return {
        "client": out / f"medaudit_client-{VERSION}-py3-none-any.whl",
        "full": out / f"medaudit-{VERSION}-py3-none-any.whl",
        "client_sdist": out / f"medaudit_client-{VERSION}.tar.gz",
        "full_sdist": out / f"medaudit-{VERSION}.tar.gz",
    }


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def _requires(wheel: Path) -> list[str]:
    return [
        ln.split(":", 1)[1].strip() for ln in _metadata(wheel).splitlines() if ln.startswith("Requires-Dist:")
    ]


def test_the_client_wheel_is_small_light_and_typed(dist: dict[str, Path]) -> None:
    wheel = dist["client"]
    assert wheel.stat().st_size < 1_000_000, f"{wheel.name}: {wheel.stat().st_size} bytes"
    names = _wheel_names(wheel)
    code = [n for n in names if not n.startswith(f"medaudit_client-{VERSION}.dist-info/")]
    assert code and all(n.startswith("medaudit/clients/") for n in code), code
    assert "medaudit/clients/py.typed" in names and "medaudit/__init__.py" not in names
    base = {re.split(r"[<>=!~; \[]", r)[0] for r in _requires(wheel) if "extra ==" not in r}
    assert base == {"httpx", "typer", "rich"}, _requires(wheel)
    assert dist["client_sdist"].is_file()


def test_the_full_wheel_installs_only_under_medaudit_and_reuses_the_client(dist: dict[str, Path]) -> None:
    names = _wheel_names(dist["full"])
    tops = {n.split("/")[0] for n in names}
    assert tops == {"medaudit", f"medaudit-{VERSION}.dist-info"}, tops
    subpackages = {n.split("/")[1] for n in names if n.startswith("medaudit/")}
    # medaudit is a namespace package both wheels share; the client's code is not duplicated.
    assert subpackages == {"models", "service", "cli", "testing"}, subpackages
    assert {"medaudit/models/py.typed", "medaudit/service/py.typed", "medaudit/cli/py.typed"} <= set(names)
    assert f"medaudit-client=={VERSION}" in _requires(dist["full"])
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(dist["full"]) as z:
        assert "medaudit.cli.commands:app" in z.read(entry_points).decode()


def _venv(path: Path) -> Path:
    """A fresh virtual environment without pip (this environment's pip installs into it)."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    return path / "bin" / "python"


def _pip_into(python: Path, *args: str) -> None:
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", *args])


def _site_packages(python: Path) -> Path:
    out = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    return Path(out.stdout.strip())


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# Runs in the client-only environment: everything a hospital system would call.
CLIENT_SCRIPT = r"""
import json, os, sys
from pathlib import Path
from medaudit.clients import MedauditClient, Conflict

url, phase = os.environ["MEDAUDIT_URL"], sys.argv[1]
out = {}
if phase == "requests":
    png, dcm = Path(sys.argv[2]), Path(sys.argv[3])
    with MedauditClient(url, api_key=os.environ["CLIENT_KEY"]) as mc:
        mc.wait_ready(timeout=60)
        p = mc.predict(png.read_bytes(), version="vanilla")
        a = mc.audit(png, version="vanilla")
        c = mc.compare(png, versions=["vanilla", "pclarc-band_aid"])
        d = mc.audit(dcm, version="vanilla")
        out = {
            "predict": {"label": p.prediction.label, "probabilities": p.prediction.probabilities},
            "audit": {"label": a.prediction.label, "flagged": a.flag.flagged, "png": a.heatmap_png[:8].hex()},
            "compare": {v: c.results[v].prediction.label for v in c.versions},
            "dicom": {"label": d.prediction.label, "png": d.heatmap_png[:8].hex(), "notes": list(d.notes)},
        }
else:
    with MedauditClient(url, api_key=os.environ["REVIEWER_KEY"]) as mc:
        page = mc.reviews()
        first = mc.review(page.items[0].flag_id)
        done = mc.resolve(first.flag_id, "false_alarm", "packaging test")
        try:
            mc.resolve(first.flag_id, "artifact_confirmed")
            again = "resolved twice"
        except Conflict as e:
            again = e.code
        out = {
            "total": page.total,
            "status": first.status,
            "heatmap": (first.heatmap_png or b"")[:8].hex(),
            "verdict": done.verdict,
            "reviewer": done.reviewer,
            "again": again,
            "resolved_total": mc.reviews("resolved").total,
        }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def client_python(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    python = _venv(tmp_path_factory.mktemp("client-venv") / "venv")
    _pip_into(python, str(dist["client"]))  # httpx, typer, rich from the package index
    return python


def test_the_client_environment_has_no_heavy_packages(client_python: Path) -> None:
    probe = f"import importlib.util as u, json; print(json.dumps([m for m in {HEAVY!r} if u.find_spec(m)]))"
    out = _run([str(client_python), "-c", probe], cwd=client_python.parents[1], env=_neutral_env())
    assert json.loads(out.stdout) == []
    client_size = _size(_site_packages(client_python))
    full_size = _size(Path(sysconfig.get_paths()["purelib"]))
    print(f"\nclient environment {client_size / 2**20:.1f} MiB, full environment {full_size / 2**30:.2f} GiB")
    assert client_size < full_size / 50
    # Its `medaudit` command is the service commands alone.
    out = _run([str(client_python.parent / "medaudit"), "--help"], env=_neutral_env())
    assert "predict" in out.stdout and "compare" in out.stdout and "demo" not in out.stdout


def test_the_client_wheel_alone_runs_every_call_against_a_served_store(
    client_python: Path,
    tiny_deployment: dict[str, str],
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    from pydicom.data import get_testdata_file

    from medaudit.clients import MedauditClient
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect
    from medaudit.service.flags.worker import Worker, WorkerConfig

    png = tmp_path / "lesion.png"
    png.write_bytes(_png(3))
    dcm = Path(str(get_testdata_file("SC_rgb_dcmtk_+eb+cr.dcm", download=False)))
    env = {
        **tiny_deployment,
        "MEDAUDIT_AUTH": "on",
        "MEDAUDIT_API_KEYS": f"client:{hash_key(CLIENT_KEY, SALT)},reviewer:{hash_key(REVIEWER_KEY, SALT)}",
        "MEDAUDIT_API_KEY_SALT": SALT,
        # Wide open, so the tiny store's random models flag every audit (as test_service_flags does).
        "MEDAUDIT_FLAGS": "on",
        "MEDAUDIT_FLAG_FPR": "0.99",
        "MEDAUDIT_FLAG_SHARE": "0",
        "MEDAUDIT_FLAG_PREFIX": redis_prefix,
        "MEDAUDIT_FLAG_SPOOL_DIR": str(tmp_path / "spool"),
        "REDIS_URL": REDIS_URL,
        "OMP_NUM_THREADS": "1",
    }
    with served(env, tmp_path / "serve.log") as url:
        run_env = {
            **_neutral_env(),
            "MEDAUDIT_URL": url,
            "CLIENT_KEY": CLIENT_KEY,
            "REVIEWER_KEY": REVIEWER_KEY,
        }
        script = tmp_path / "hospital.py"
        script.write_text(CLIENT_SCRIPT)
        py = [str(client_python), str(script)]
        got = json.loads(_run([*py, "requests", str(png), str(dcm)], cwd=tmp_path, env=run_env).stdout)

        # The answers equal what this environment's client gets for the same image and version.
        with MedauditClient(url, api_key=CLIENT_KEY) as mc:
            ref = mc.predict(png, version="vanilla").prediction
            labels = mc.models()["vanilla"].labels
        assert got["predict"]["label"] == ref.label and got["predict"]["label"] in labels
        for k, p in ref.probabilities.items():
            assert abs(got["predict"]["probabilities"][k] - p) <= 1e-6
        png_magic = b"\x89PNG\r\n\x1a\n".hex()
        assert got["audit"]["png"] == png_magic and got["audit"]["flagged"]
        assert got["audit"]["label"] == ref.label and got["compare"]["vanilla"] == ref.label
        assert set(got["compare"]) == {"vanilla", "pclarc-band_aid"}
        assert got["dicom"]["png"] == png_magic and got["dicom"]["label"] in labels

        # A worker turns the published flags into review records; the reviewer works them.
        keys = FlagKeys(redis_prefix)
        redis = connect(REDIS_URL, timeout=5.0)
        deadline = time.monotonic() + 20
        while redis.xlen(keys.stream) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = Worker(redis, keys, WorkerConfig(consumer="pkg", block_ms=200)).run(drain=True)
        assert stats.written >= 2 and stats.failed == 0
        rev = json.loads(_run([*py, "reviews"], cwd=tmp_path, env=run_env).stdout)
    assert rev["total"] == stats.written and rev["status"] == "open" and rev["heatmap"] == png_magic
    assert (rev["verdict"], rev["again"]) == ("false_alarm", "already_resolved"), rev
    assert rev["reviewer"], rev  # the reviewer key's id
    assert rev["resolved_total"] == 1


@pytest.fixture(scope="module")
def full_python(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with both wheels; third-party packages from this one (see the module doc)."""
    python = _venv(tmp_path_factory.mktemp("full-venv") / "venv")
    site = _site_packages(python)
    (site / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _pip_into(python, "--no-deps", str(dist["client"]), str(dist["full"]))
    return python


def test_the_full_wheel_has_no_top_level_models_service_or_clients(full_python: Path, tmp_path: Path) -> None:
    probe = r"""
import importlib, json
out = {}
for name in ("models", "service", "clients", "cli", "medaudit.models", "medaudit.service",
             "medaudit.clients", "medaudit.cli", "medaudit.service.api"):
    try:
        m = importlib.import_module(name)
        out[name] = m.__file__
    except ImportError:
        out[name] = None
print(json.dumps(out))
"""
    got = json.loads(
        _run([str(full_python), "-c", probe], cwd=tmp_path, env=_neutral_env(), timeout=300).stdout
    )
    for bare in ("models", "service", "clients", "cli"):
        assert got[bare] is None, f"`import {bare}` works from the install: {got[bare]}"
    venv = str(full_python.parents[1])
    for name in (
        "medaudit.models",
        "medaudit.service",
        "medaudit.clients",
        "medaudit.cli",
        "medaudit.service.api",
    ):
        assert got[name] is not None and got[name].startswith(venv), (name, got[name])
    assert not any(str(ROOT) in (f or "") for f in got.values())


def test_the_full_command_set_runs_from_the_wheel(full_python: Path, tmp_path: Path) -> None:
    medaudit = str(full_python.parent / "medaudit")
    out = _run([medaudit, "--help"], cwd=tmp_path, env=_neutral_env())
    for command in ("demo", "build", "worker", "review", "predict", "compare", "audit"):
        assert command in out.stdout, command
    out = _run([medaudit, "demo", "--help"], cwd=tmp_path, env=_neutral_env())
    assert "--no-serve" in out.stdout


def test_bentoml_serves_the_installed_service(
    full_python: Path, tiny_deployment: dict[str, str], tmp_path: Path
) -> None:
    from medaudit.clients import MedauditClient

    env = {**tiny_deployment, "MEDAUDIT_AUTH": "off", "OMP_NUM_THREADS": "1"}
    with served(env, tmp_path / "serve.log", python=full_python) as url, MedauditClient(url) as mc:
        res = mc.predict(_png(5), version="vanilla")
        assert res.version == "vanilla" and abs(sum(res.prediction.probabilities.values()) - 1) < 1e-5
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert str(ROOT / "service") not in log  # tracebacks, if any, would name the files that served
