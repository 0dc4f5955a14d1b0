"""The audit report opens in a real headless Chromium, offline, with every image rendered (issue 4).

Chromium is Debian's ``chromium`` package (``apt-get install -y chromium``); .ci/run installs it.
Without it the browser test fails and says so: it is never skipped.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medaudit.models.audit import AuditOptions, run_audit
from medaudit.models.audit.report import write_report
from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
from medaudit.models.registry import create_model

INSTALL_HINT = "install it with: apt-get update && apt-get install -y chromium"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # One torch thread: on a shared 2-core runner two threads contend and run ~4x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report of a randomly initialised resnet18 on tiny synthderm with a hidden timestamp."""
    torch.manual_seed(0)
    data = SynthDermConfig(size=32, n_train=48, n_val=20, n_test=32, seed=4).with_spec(
        band_aid=(0.5, 0.2), ruler=(0.2, 0.5), timestamp=(0.0, 0.3)
    )
    model, cfg = create_model("resnet18", img_size=32)
    rep = run_audit(
        model, cfg, "resnet18:random", SynthDerm(data), ["band_aid", "ruler"], options=AuditOptions(top_k=6)
    )
    out = tmp_path_factory.mktemp("report")
    write_report(rep, out)
    return out


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(f"headless Chromium is needed for the report test and is not on PATH; {INSTALL_HINT}")
    return exe


def _run_chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_report_is_self_contained(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert (report_dir / "metrics.json").is_file()
    parser = _Tags()
    parser.feed(page)
    imgs = [a for tag, a in parser.tags if tag == "img"]
    assert len(imgs) >= 10
    for attrs in imgs:
        src = attrs.get("src") or ""
        assert src.startswith("data:image/png;base64,"), src[:40]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG"
            im.verify()
    for tag, attrs in parser.tags:
        assert tag != "link", "external stylesheet"
        assert not (tag == "script" and attrs.get("src")), "external script"
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not re.match(r"(?i)\s*(https?:)?//", value), (
                f"<{tag} {name}={value[:60]!r}> reaches the network"
            )
    assert 'href="metrics.json"' in page


@pytest.mark.e2e
def test_report_renders_in_headless_chromium(report_dir: Path, tmp_path: Path) -> None:
    url = (report_dir / "report.html").resolve().as_uri()
    n_imgs = (report_dir / "report.html").read_text(encoding="utf-8").count("<img ")

    dom = _run_chromium(url, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    check = re.search(
        r'id="img-check"[^>]*data-loaded="(\d+)"[^>]*data-total="(\d+)"', dom.stdout
    ) or re.search(r'data-loaded="(\d+)"\s+data-total="(\d+)"[^>]*id="img-check"', dom.stdout)
    assert check, "the page's image check did not run"
    assert int(check.group(1)) == int(check.group(2)) == n_imgs
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, f"console messages: {console}"

    shot = tmp_path / "shot.png"
    res = _run_chromium(url, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,2000")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert px.shape[:2] == (2000, 1200)
    assert px.std() > 20, "the screenshot is nearly blank"
    # The galleries' skin-toned images and red/blue heatmaps must be on screen, not just text.
    colourful = (px.max(axis=2) - px.min(axis=2)) > 60
    assert colourful.mean() > 0.02
