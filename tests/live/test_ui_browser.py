"""The reviewer workbench in a real browser (issue #27): Debian's headless Chromium driven by
Playwright (the Python package, pointed at /usr/bin/chromium: no browser download) against the
live ``bentoml serve`` of tests/live/conftest.py.

A flagged ``/audit`` reaches the queue (publisher -> stream -> worker); the reviewer signs in with
the reviewer key, opens the flag, toggles the overlays, writes a note and gives the verdict by
keyboard; the Redis review record holds it. A client key cannot open the page; a forged
cross-site POST (an attacker's page in the same browser, and a same-origin request without the
CSRF token) changes nothing. Screenshots of the queue, a flag and a concept page are taken at
1366x768 and checked to render; ``MEDAUDIT_UI_SCREENSHOTS=docs/img`` also writes them there (the
ones docs/review-ui.md shows), and :func:`test_committed_screenshots_render` checks those.
"""

from __future__ import annotations

import io
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from live_support import Live
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"  # the live service's (conftest.py)
SHOTS = ("ui-queue.png", "ui-flag.png", "ui-concept.png")
VIEWPORT = {"width": 1366, "height": 768}
#: The header bar's colour (ui.css ``.bar``): a screenshot of the page has it across its top.
BAR = (0x15, 0x30, 0x4F)


def _png(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    rgb[10:22, 8:40] = (230, 200, 170)  # a band-aid-like pad
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("no chromium on PATH: scripts/setup-system.sh installs Debian's chromium")
    return exe


def _review(live: Live, flag_id: str) -> dict[str, str]:
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect

    r = connect(REDIS_URL)
    try:
        return {k.decode(): v.decode() for k, v in r.hgetall(FlagKeys(live.prefix).review(flag_id)).items()}
    finally:
        r.close()


@pytest.fixture(scope="module")
def flagged(live: Live) -> list[str]:
    """Flag ids of audits the live service flagged, turned into open review records by a worker."""
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.redis_conn import connect
    from medaudit.service.flags.worker import Worker, WorkerConfig

    ids: list[str] = []
    run = uuid.uuid4().hex[:8]
    with live.client("client") as c:
        for seed in range(40):
            rid = f"ui-{run}-{seed}"
            r = c.post(
                "/audit", content=_png(seed), headers={"Content-Type": "image/png", "X-Request-ID": rid}
            )
            assert r.status_code == 200, r.text
            ids += [f"{rid}:{f['concept']}" for f in r.json()["flag"]["flags"]]
            if len(ids) >= 3:
                break
    assert len(ids) >= 2, "the live service flagged fewer than two of 40 audits"
    keys = FlagKeys(live.prefix)
    r = connect(REDIS_URL, timeout=5.0)
    try:
        for _ in range(100):  # the publisher writes in the background
            if all(r.exists(keys.published(i.rsplit(":", 1)[0])) for i in ids):
                break
            time.sleep(0.1)
        Worker(r, keys, WorkerConfig(consumer="ui-browser", block_ms=200)).run(drain=True)
    finally:
        r.close()
    assert all(_review(live, i).get("status") == "open" for i in ids)
    return ids


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _shot(page: Any, name: str, tmp: Path) -> Path:
    out = tmp / name
    page.screenshot(path=str(out))
    target = os.environ.get("MEDAUDIT_UI_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(target) / name)
    _check_rendered(out)
    return out


def _check_rendered(path: Path) -> None:
    """A page screenshot, not a blank or an error page: 1366x768, many colours, the header bar."""
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (768, 1366, 3), img.shape
    assert img.std() > 20, f"{path.name} is (nearly) blank"
    packed = (img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2]
    assert len(np.unique(packed)) > 200, f"{path.name} has too few colours"
    bar = img[5:30, 300:1000].reshape(-1, 3)
    assert (np.abs(bar.astype(int) - BAR).sum(axis=1) < 12).mean() > 0.6, f"{path.name} lacks the header bar"


def _sign_in(page: Any, key: str) -> None:
    page.goto("/ui/")
    page.fill("#login-key", key)
    page.click("#login-form button[type=submit]")


def test_a_client_key_cannot_open_the_workbench(live: Live, browser: Any) -> None:
    ctx = browser.new_context(base_url=live.base, viewport=VIEWPORT)
    page = ctx.new_page()
    _sign_in(page, live.client_key)
    page.wait_for_function("() => document.querySelector('#login-error').textContent.length > 0")
    assert "not a reviewer key" in page.text_content("#login-error")
    assert page.is_hidden("#view-queue") and not ctx.cookies()
    assert page.evaluate("fetch('api/queue').then(r => r.status)") == 401
    ctx.close()


def test_reviewer_resolves_a_flag_in_the_browser(
    live: Live, browser: Any, flagged: list[str], tmp_path: Path
) -> None:
    target, other = flagged[0], flagged[1]
    request_id, concept = target.rsplit(":", 1)
    ctx = browser.new_context(base_url=live.base, viewport=VIEWPORT)
    page = ctx.new_page()
    errors: list[str] = []
    # Script errors only: the refused requests below (401 before sign-in, the forged 403) are
    # logged by Chromium as failed loads, which they are meant to be.
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on("pageerror", lambda e: errors.append(str(e)))
    _sign_in(page, live.reviewer_key)
    page.wait_for_selector("#view-queue:not([hidden])")
    cookie = next(c for c in ctx.cookies() if c["name"] == "medaudit_ui")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"

    # The queue lists the flagged audit; the concept filter narrows it and says how many.
    page.select_option("#filters select[name=concept]", concept)
    page.click("#filters button[type=submit]")
    row = page.locator("#queue-rows tr", has_text=request_id)
    row.wait_for()
    assert "match these filters" in page.text_content("#queue-counts")
    _shot(page, "ui-queue.png", tmp_path)

    # Forged cross-site POSTs while signed in: a form on another site's page, and a same-origin
    # request that lacks the CSRF token. Neither resolves the flag.
    ref = row.get_attribute("data-ref")
    evil = ctx.new_page()
    evil.route(
        "http://attacker.test/",
        lambda route: route.fulfill(
            content_type="text/html",
            body=(
                f'<form id="f" method="POST" action="{live.base}/ui/api/flags/{ref}/resolve" '
                'enctype="text/plain"><input name=\'{"verdict":"false_alarm","x":"\' value=\'"}\'></form>'
                "<script>document.getElementById('f').submit()</script>"
            ),
        ),
    )
    with evil.expect_navigation(url=f"{live.base}/ui/api/flags/{ref}/resolve"):
        evil.goto("http://attacker.test/")
    assert '"error"' in evil.content() and "false_alarm" not in evil.content()
    evil.close()
    status = page.evaluate(
        f"""fetch('api/flags/{ref}/resolve', {{method: 'POST',
            headers: {{'Content-Type': 'application/json'}},
            body: JSON.stringify({{verdict: 'false_alarm'}})}}).then(r => r.status)"""
    )
    assert status == 403
    assert _review(live, target)["status"] == "open"

    # The flag's page: heatmap and mask, overlays toggled by click and by key.
    row.locator("a").click()
    page.wait_for_selector("#view-flag:not([hidden])")
    page.wait_for_function("() => document.querySelector('#heat').naturalWidth > 0")
    assert request_id in page.text_content("#flag-title")
    assert page.get_attribute("#heat", "alt").startswith("LRP heatmap")
    assert page.locator("#flag-reasons li").count() >= 1
    assert "flag/" + ref in page.url and target not in page.url and request_id not in page.url
    _shot(page, "ui-flag.png", tmp_path)
    page.click("#show-heat")
    assert page.eval_on_selector("#heat", "e => e.style.opacity") == "0"
    page.keyboard.press("h")
    assert page.eval_on_selector("#heat", "e => e.style.opacity") == "1"
    if page.is_enabled("#show-mask"):
        page.keyboard.press("m")
        assert page.eval_on_selector("#mask-layer", "e => e.style.opacity") == "0"
    page.eval_on_selector("#heat-opacity", "e => { e.value = '40'; e.dispatchEvent(new Event('input')); }")
    assert page.eval_on_selector("#heat", "e => e.style.opacity") == "0.4"

    # The verdict by keyboard, with a note; the next flag loads without reloading the page.
    page.evaluate("window.__same_page = true")
    page.keyboard.press("n")
    page.keyboard.type("pad over the lesion, upper left")
    page.keyboard.press("Escape")
    page.keyboard.press("a")
    page.wait_for_function(f"() => !location.hash.includes('{ref}')")
    assert page.evaluate("window.__same_page") is True
    rec = _review(live, target)
    assert (rec["status"], rec["verdict"], rec["note"]) == (
        "resolved",
        "artifact_confirmed",
        "pad over the lesion, upper left",
    )
    assert rec["reviewer"].startswith("k_") and live.reviewer_key not in str(rec)
    assert _review(live, other)["status"] == "open"

    # The concept page: the concept's flagged images by CAV score, confirmable in place.
    page.goto(f"/ui/#/concept/{concept}")
    page.wait_for_selector("#concept-items li")
    assert "flagged images of recent traffic" in page.text_content("#concept-summary")
    _shot(page, "ui-concept.png", tmp_path)
    assert not errors, errors
    ctx.close()


def test_committed_screenshots_render() -> None:
    """The screenshots docs/review-ui.md shows exist and are pages, not blanks (see _check_rendered)."""
    for name in SHOTS:
        path = ROOT / "docs" / "img" / name
        assert path.exists(), f"{path} is missing: MEDAUDIT_UI_SCREENSHOTS=docs/img pytest {__file__}"
        _check_rendered(path)
