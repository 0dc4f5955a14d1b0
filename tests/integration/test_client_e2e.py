"""The client and the CLI against a real ``bentoml serve medaudit.service.api:MedAudit`` (every
dependency in its own process, auth on) on the tiny two-version store: what a user of the package
gets, and every Python example of clients/README.md run as written.

Flags go to the real Redis at ``REDIS_URL`` under a per-run key prefix, deleted afterwards; the
policy is opened wide (``MEDAUDIT_FLAG_FPR=0.99``, share 0) so that the random models flag every
audit and the README's review example finds a flag to resolve.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medaudit.clients import AsyncMedauditClient, MedauditClient, Unauthorized, UnknownVersion
from medaudit.service.auth import hash_key
from medaudit.service.process import free_port, served

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    # bentoml 1.4.40 builds its IO schemas through a pydantic hook deprecated in pydantic 2.11.
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]

SALT, CLIENT_KEY = "e2e-salt", "e2e-client-key-0123456789abcdef"
REVIEWER_KEY = "e2e-reviewer-key-0123456789abcdef"
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
README = ROOT / "clients" / "README.md"


def _png(size: int = 40, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def flag_prefix() -> Iterator[str]:
    """The Redis key prefix of this module's flags; every key under it is deleted afterwards."""
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import answers, connect

    prefix = f"test-e2e-{uuid.uuid4().hex[:10]}"
    yield prefix
    if answers(REDIS_URL, timeout=2.0):
        r = connect(REDIS_URL)
        try:
            for k in r.scan_iter(match=FlagKeys(prefix).scan_pattern()):
                r.delete(k)
        finally:
            r.close()


@pytest.fixture(scope="module")
def url(
    tiny_deployment: dict[str, str], flag_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``bentoml serve`` (service.process.served) on a free port, ready before the first test."""
    env = {
        **tiny_deployment,
        "MEDAUDIT_AUTH": "on",
        "MEDAUDIT_API_KEYS": f"client:{hash_key(CLIENT_KEY, SALT)},reviewer:{hash_key(REVIEWER_KEY, SALT)}",
        "MEDAUDIT_API_KEY_SALT": SALT,
        "MEDAUDIT_FLAGS": "on",
        "MEDAUDIT_FLAG_FPR": "0.99",
        "MEDAUDIT_FLAG_SHARE": "0",
        "MEDAUDIT_FLAG_PREFIX": flag_prefix,
        "MEDAUDIT_FLAG_SPOOL_DIR": str(tmp_path_factory.mktemp("spool")),
        "REDIS_URL": REDIS_URL,
        "OMP_NUM_THREADS": "1",
    }
    with served(env, tmp_path_factory.mktemp("e2e") / "serve.log") as base:
        yield base


def test_sync_client(url: str) -> None:
    with MedauditClient(url, api_key=CLIENT_KEY) as mc:
        mc.wait_ready(timeout=5)
        pred = mc.predict(_png(), version="vanilla", request_id="e2e-1")
        assert (pred.request_id, pred.version, pred.via) == ("e2e-1", "vanilla", "explicit")
        assert pred.shadow is not None and pred.shadow.version == "pclarc-band_aid"
        audit = mc.audit(_png(), version="vanilla", raw_heatmap=True)
        # the audit's torch forward and /predict's ONNX Runtime agree on the label
        assert audit.prediction.label == pred.prediction.label
        assert audit.heatmap is not None and audit.heatmap.shape == (32, 32)
        assert Image.open(io.BytesIO(audit.heatmap_png)).size == (32, 32)
        cmp = mc.compare(_png(), versions=["vanilla", "pclarc-band_aid"])
        assert cmp.results["vanilla"].heatmap_png == audit.heatmap_png
        models = mc.models()
        assert [m.version for m in models.versions] == ["vanilla", "pclarc-band_aid"]
        assert any(a.version == "vanilla" and a.agree + a.disagree >= 2 for a in models.shadow_agreement)
        assert mc.route(subject_key="p-1").version == mc.predict(_png(), subject_key="p-1").version
        assert mc.model_card("vanilla").card["version"] == "vanilla"
        with pytest.raises(UnknownVersion) as ei:
            mc.audit(_png(), version="nope")
        assert ei.value.valid_versions == ("pclarc-band_aid", "vanilla")
    with MedauditClient(url) as anon, pytest.raises(Unauthorized):
        anon.predict(_png())


def test_async_client_concurrent_requests(url: str) -> None:
    async def main() -> None:
        async with AsyncMedauditClient(url, api_key=CLIENT_KEY) as c:
            await c.wait_ready(timeout=5)
            images = [_png(seed=s) for s in range(6)]
            preds = await asyncio.gather(*(c.predict(im, version="vanilla") for im in images))
            audits = await asyncio.gather(*(c.audit(im, version="vanilla") for im in images[:3]))
            for p, a in zip(preds, audits, strict=False):
                assert p.prediction.label == a.prediction.label
            assert len({p.request_id for p in preds}) == len(images)
            with pytest.raises(UnknownVersion):
                await c.predict(images[0], version="nope")

    asyncio.run(main())


def _cli(*args: str, key: str | None = CLIENT_KEY, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MEDAUDIT_API_KEY", "MEDAUDIT_URL")}
    env["COLUMNS"] = "120"
    if key is not None:
        env["MEDAUDIT_API_KEY"] = key
    return subprocess.run(
        [str(BIN / "medaudit"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_against_the_served_app(url: str, tmp_path: Path) -> None:
    img = tmp_path / "case.png"
    img.write_bytes(_png())
    out = _cli("predict", str(img), "--url", url, "--version", "vanilla")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "answered by vanilla (via explicit)" in out.stdout and "shadow pclarc-band_aid" in out.stdout, (
        out.stdout
    )

    out = _cli("audit", str(img), "--url", url, "--version", "pclarc-band_aid", "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "concepts at" in out.stdout and ("FLAGGED" in out.stdout or "not flagged" in out.stdout), (
        out.stdout
    )
    (heatmap,) = (tmp_path / "o").glob("case_*_heatmap.png")
    with Image.open(heatmap) as im:
        assert im.size == (32, 32)

    out = _cli("compare", str(img), "--url", url, "--heatmaps", "--out", str(tmp_path / "c"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"labels (agree|DISAGREE), flags (agree|DISAGREE)", out.stdout), out.stdout
    assert len(list((tmp_path / "c").glob("case_*_heatmap.png"))) == 2

    out = _cli("predict", str(img), "--url", url, key=None)
    assert out.returncode == 1 and "MEDAUDIT_API_KEY" in out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    out = _cli("predict", str(img), "--url", url, "--version", "nope")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "this service serves: pclarc-band_aid, vanilla" in out.stderr, out.stderr
    down = f"http://127.0.0.1:{free_port()}"
    out = _cli("predict", str(img), "--url", down)
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"cannot reach the medaudit service at {down}" in out.stderr and "make demo" in out.stderr, (
        out.stderr
    )
    assert "Traceback" not in out.stderr


def _python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a Markdown text, each with the line its code starts on."""
    return [
        (text.count("\n", 0, m.start(1)) + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.M | re.S)
    ]


@pytest.mark.redis
def test_readme_examples_run(
    url: str, flag_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Python example of clients/README.md, as written, against the served store: they read
    the URL and key from the environment and the images ``lesion.png`` and ``scan.dcm`` from the
    working directory. The key is a reviewer's, which may call every endpoint."""
    from pydicom.data import get_testdata_file

    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import answers, connect
    from medaudit.service.flags.worker import Worker, WorkerConfig

    if not answers(REDIS_URL, timeout=2.0):
        pytest.skip(f"no Redis answers at {REDIS_URL}; the review examples need a flag in the queue")
    # One flag in the review queue for the review example: every audit flags under this module's
    # policy, and the worker turns the published events into review records.
    keys, rid = FlagKeys(flag_prefix), f"readme-{uuid.uuid4().hex[:8]}"
    with MedauditClient(url, api_key=CLIENT_KEY) as mc:
        assert mc.audit(_png(seed=7), version="vanilla", request_id=rid).flag.flagged
    r = connect(REDIS_URL, timeout=5.0)
    try:
        deadline = time.monotonic() + 10
        while rid.encode() not in {f[b"request_id"] for _, f in r.xrange(keys.stream)}:
            assert time.monotonic() < deadline, f"the flag of {rid} never reached the stream"
            time.sleep(0.1)
        Worker(r, keys, WorkerConfig(consumer="readme", block_ms=200)).run(drain=True)
    finally:
        r.close()

    dicom = get_testdata_file("MR_small.dcm", download=False)
    assert isinstance(dicom, str)
    (tmp_path / "lesion.png").write_bytes(_png(size=48))
    shutil.copy(dicom, tmp_path / "scan.dcm")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDAUDIT_URL", url)
    monkeypatch.setenv("MEDAUDIT_API_KEY", REVIEWER_KEY)
    blocks = _python_blocks(README.read_text())
    assert len(blocks) == 10, [line for line, _ in blocks]
    for line, code in blocks:
        # Padded so that a traceback names the README's own line.
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "__main__"})

    with Image.open(tmp_path / "lesion_heatmap.png") as im:
        assert im.size == (32, 32)
    assert {p.name for p in tmp_path.glob("lesion_*_heatmap.png")} >= {
        "lesion_vanilla_heatmap.png",
        "lesion_pclarc-band_aid_heatmap.png",
    }
    with MedauditClient(url, api_key=REVIEWER_KEY) as mc:
        resolved = mc.reviews("resolved")
    assert resolved.total == 1 and resolved.items[0].verdict == "artifact_confirmed", resolved
