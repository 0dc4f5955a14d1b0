"""The reviewer workbench in a real browser (issue #27): Debian's headless Chromium driven by
Playwright (the Python package, pointed at /usr/bin/chromium: no browser download) against the
live ``bentoml serve`` of tests/live/conftest.py.

A flagged ``/audit`` reaches the queue (publisher -> stream -> worker); the reviewer signs in with
the reviewer key, opens the flag (the bare image under the heatmap and mask layers, and the
shadow version's answer), toggles the overlays, writes a note and gives the verdict by keyboard;
the Redis review record holds it. The refit action runs the real ``refine-cav`` and the page shows
its before/after table (on a small bank of its own: the live store's is shared and has no fit
data). A slow unfiltered queue answer, held back until the filtered one has painted, does not
paint over it. A client key cannot open the page; a forged cross-site POST (an
attacker's page in the same browser, and a same-origin request without the CSRF token) changes
nothing. Screenshots of the queue, a flag and a concept page are taken at
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
#: The reviewer key of the refit's own workbench (test_the_refit_action_shows_the_before_and_after_table).
REFIT_KEY = f"rk-refit-{uuid.uuid4().hex}"


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
            # pinned to vanilla: the shadow (pclarc-band_aid) answers too, and its answer is stored
            headers = {"Content-Type": "image/png", "X-Request-ID": rid, "X-Model-Version": "vanilla"}
            r = c.post("/audit", content=_png(seed), headers=headers)
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
    # The rows show a page once #queue-rows names its query (an answer superseded by a newer load,
    # e.g. the unfiltered queue of the sign-in landing after the filtered one, is dropped).
    shown = (
        "([c, o]) => { const q = new URLSearchParams(document.getElementById('queue-rows').dataset.query"
        " || ''); return q.get('concept') === c && q.get('offset') === o; }"
    )
    page.wait_for_function(shown, arg=[concept, "0"])
    # Open flags come oldest first, 25 a page: earlier live tests (the fuzzer's audits) may have
    # left older open flags of the concept, so page on until this run's flag shows.
    for k in range(1, 41):
        if row.count():
            break
        page.click("#next")
        page.wait_for_function(shown, arg=[concept, str(25 * k)])
    row.wait_for()
    assert "match these filters" in page.text_content("#queue-counts")
    # A new page reads from the top (the pager is below the table): the header bar is in view.
    page.wait_for_function("window.scrollY === 0")
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

    # The flag's page: the bare image under the heatmap layer and the mask, overlays toggled by
    # click and by key; the shadow version's label and probability among the facts.
    row.locator("a").click()
    page.wait_for_selector("#view-flag:not([hidden])")
    page.wait_for_function("() => ['#base', '#heat'].every(s => document.querySelector(s).naturalWidth > 0)")
    assert request_id in page.text_content("#flag-title")
    assert page.get_attribute("#base", "src").endswith("/image.png") and page.is_visible("#base")
    assert page.get_attribute("#heat", "src").endswith("/heat_layer.png")
    assert page.get_attribute("#heat", "alt").startswith("LRP heatmap")
    assert page.get_attribute("#base", "alt").startswith("The model-size input image")
    assert page.locator("#flag-reasons li").count() >= 1
    assert "flag/" + ref in page.url and target not in page.url and request_id not in page.url
    rec = _review(live, target)
    p_shadow = 100 * float(rec["corrected_probability"])
    shadow = f"{rec['corrected_version']}: {rec['corrected_label']} ({p_shadow:.1f} %)"
    assert rec["corrected_version"] == "pclarc-band_aid" and shadow in page.text_content("#flag-facts")
    _shot(page, "ui-flag.png", tmp_path)
    page.click("#show-heat")
    assert page.eval_on_selector("#heat", "e => e.style.opacity") == "0"
    page.keyboard.press("h")
    assert page.eval_on_selector("#heat", "e => e.style.opacity") == "0.6"  # the blend's weight
    if page.is_enabled("#show-mask"):
        page.keyboard.press("m")
        assert page.eval_on_selector("#mask-layer", "e => e.style.opacity") == "0"
    # Both overlays off: the image itself shows (the random pixels and the pad), not black.
    page.keyboard.press("h")
    if page.is_enabled("#show-mask") and page.is_checked("#show-mask"):
        page.keyboard.press("m")
    stage = np.asarray(Image.open(io.BytesIO(page.locator("#stage").screenshot())).convert("RGB"), float)
    assert stage.mean() > 60 and stage.std() > 30, (stage.mean(), stage.std())
    page.keyboard.press("h")
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


def test_a_slow_earlier_queue_answer_does_not_paint_over_a_newer_one(
    live: Live, browser: Any, flagged: list[str]
) -> None:
    """The sign-in's unfiltered queue load is held back until the reviewer's concept-filtered load
    has painted, then let through: the page keeps showing the filtered rows (the workbench drops
    the answer of a load a newer one superseded)."""
    concept = flagged[0].rsplit(":", 1)[1]
    ctx = browser.new_context(base_url=live.base, viewport=VIEWPORT)
    page = ctx.new_page()
    held: list[Any] = []

    def hold_the_first_unfiltered(route: Any) -> None:
        if "concept=" not in route.request.url and not held:
            held.append(route)
        else:
            route.continue_()

    page.route("**/ui/api/queue*", hold_the_first_unfiltered)
    _sign_in(page, live.reviewer_key)
    page.wait_for_selector("#view-queue:not([hidden])")
    page.wait_for_function("() => document.querySelector('#filters select[name=concept]').options.length > 1")
    assert len(held) == 1, "the sign-in's queue load never reached the route"
    page.select_option("#filters select[name=concept]", concept)
    page.click("#filters button[type=submit]")
    shown = (
        "c => new URLSearchParams(document.getElementById('queue-rows').dataset.query || '')"
        ".get('concept') === c"
    )
    page.wait_for_function(shown, arg=concept)
    filtered_counts = page.text_content("#queue-counts")
    with page.expect_response(lambda r: "api/queue" in r.url and "concept=" not in r.url) as late:
        held[0].continue_()
    late.value.finished()
    page.evaluate("() => new Promise(r => setTimeout(r, 300))")  # the page's await chain runs out
    assert page.evaluate(shown, concept), page.evaluate("document.getElementById('queue-rows').dataset.query")
    assert page.text_content("#queue-counts") == filtered_counts
    cells = page.locator("#queue-rows tr[data-ref] td:nth-child(3)").all_text_contents()
    assert cells and set(cells) == {concept}
    ctx.close()


@pytest.fixture(scope="module")
def refit_workbench(three_class_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The workbench alone (service/ui mounted at /ui, served by uvicorn in a thread) over a store
    of its own: a random 32 px three-class model whose card names the small three-class folder
    dataset, and 12 of its audits flagged and resolved by the dataset's annotations, so that
    ``refine-cav`` has reviewed samples and fit data (~10 s). Yields the base URL."""
    import threading

    import torch
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from medaudit.models.data.registry import open_dataset
    from medaudit.service.audit import AuditEngine
    from medaudit.service.auth import KeyStore, hash_key, parse_key_spec
    from medaudit.service.flags.events import FlagKeys
    from medaudit.service.flags.producer import FlagPublisher
    from medaudit.service.flags.redis_conn import connect
    from medaudit.service.flags.review import resolve_review
    from medaudit.service.flags.worker import Worker, WorkerConfig
    from medaudit.service.process import free_port
    from medaudit.service.ui import UI_MOUNT
    from medaudit.service.ui.app import Backend, ui_app
    from medaudit.testing.versions import register_version_files, write_version_files

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("refit_ui")
    home, spec = tmp / "bento", f"folder:{three_class_folder}"
    labels = ("bcc", "melanoma", "nevus")
    d = write_version_files(tmp / "v", "vanilla", 0, labels=labels, name="derm3", data={"dataset": spec})
    register_version_files(d, "vanilla", home, name="derm3")
    ds = open_dataset(spec)
    train = ds.indices("train")[:12]
    keys = FlagKeys(f"uirefit-{uuid.uuid4().hex[:10]}")
    engine = AuditEngine.from_store("derm3:vanilla", home=home, fpr=0.99)  # every concept "present"
    pub = FlagPublisher(REDIS_URL, keys=keys, spool_dir=tmp / "spool")
    for i, r in enumerate(engine.audit([ds.load_image(int(j), 32) for j in train])):
        pub.submit(r, request_id=f"img{i}", version="vanilla", corrected_disagrees=True)
    assert pub.close(10.0)
    r = connect(REDIS_URL, timeout=5.0)
    Worker(r, keys, WorkerConfig(consumer="w", block_ms=100)).run(drain=True)
    member = {a: set(v) for a, v in ds.artifact_ids("train").items()}
    for fid in r.zrange(keys.open_index, 0, -1):
        rid, concept = fid.decode().rsplit(":", 1)
        truth = int(train[int(rid[3:])]) in member.get(concept, set())
        verdict = "artifact_confirmed" if truth else "false_alarm"
        resolve_review(r, fid.decode(), verdict, reviewer="k_test", keys=keys)

    salt = "ui-refit-salt"
    store = KeyStore(parse_key_spec(f"reviewer:{hash_key(REFIT_KEY, salt)}"), salt)
    backend = Backend(
        client=r,
        keys=keys,
        authenticate=lambda key: store.authenticate(f"Bearer {key}"),
        versions=["vanilla"],
        concepts=list(engine.bank),
        model_name="derm3",
        env={
            **os.environ,
            "BENTOML_HOME": str(home),
            "MEDAUDIT_REDIS_URL": REDIS_URL,
            "MEDAUDIT_FLAG_PREFIX": keys.prefix,
            "OMP_NUM_THREADS": "1",
        },
        refit_dir=str(tmp / "refits"),
    )
    app = Starlette(routes=[Mount(UI_MOUNT, app=ui_app(lambda _r: backend))])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the workbench did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        doomed = list(r.scan_iter(match=keys.scan_pattern(), count=1000))
        if doomed:
            r.delete(*doomed)
        r.close()


def test_the_refit_action_shows_the_before_and_after_table(refit_workbench: str, browser: Any) -> None:
    """The reviewer starts a refit from the page; the real ``refine-cav`` runs in a child process
    and the page, polling, renders the bank's held-out AUROC before and after, per concept. Then a
    flag stored as the blend only (an older record) shows that blend, as before."""
    ctx = browser.new_context(base_url=refit_workbench, viewport=VIEWPORT)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    _sign_in(page, REFIT_KEY)
    page.wait_for_selector("#view-queue:not([hidden])")
    page.click("#nav a[data-view=refit]")
    page.wait_for_selector("#view-refit:not([hidden])")
    assert page.text_content("#refit-state") == "No refit yet."
    page.select_option("#refit-version", "vanilla")
    page.click("#refit-form button[type=submit]")
    page.wait_for_function(
        "() => !/Refitting|No refit/.test(document.querySelector('#refit-state').textContent)",
        timeout=300_000,
    )
    state = page.text_content("#refit-state")
    assert "new version derm3:vanilla-refit1" in state, (state, page.text_content("#refit-output"))
    assert page.is_visible("#refit-table")
    rows = [
        [td.strip() for td in tr.locator("td").all_text_contents()]
        for tr in page.locator("#refit-rows tr").all()
    ]
    assert sorted(r[0] for r in rows) == ["band_aid", "ruler"], rows
    added = 0
    for row in rows:  # concept, added +/-, AUROC stored / refit w/o reviews / refined, AP refined
        pos, neg = (int(x) for x in row[1].split("/"))
        added += pos + neg
        assert len(row) == 6 and all(x == "–" or 0.0 <= float(x) <= 1.0 for x in row[2:]), row
        assert row[2] != "–" and row[4] != "–", row  # the stored and the refined bank were scored
    assert added > 0  # the reviewed flags went in

    # These flags were published from engine results without the raw heatmap, so they hold the
    # blend only, like every record stored before the bare image was kept: the page shows that.
    page.click("#nav a[data-view=queue]")
    page.select_option("#filters select[name=status]", "resolved")
    page.click("#filters button[type=submit]")
    page.locator("#queue-rows tr a").first.click()
    page.wait_for_function("() => document.querySelector('#heat').naturalWidth > 0")
    assert page.is_hidden("#base") and page.get_attribute("#heat", "src").endswith("/heatmap.png")
    assert "stored before the bare image was kept" in page.text_content("#image-note")
    assert page.eval_on_selector("#heat", "e => e.style.opacity") == "1"
    assert not errors, errors
    ctx.close()


def test_committed_screenshots_render() -> None:
    """The screenshots docs/review-ui.md shows exist and are pages, not blanks (see _check_rendered)."""
    for name in SHOTS:
        path = ROOT / "docs" / "img" / name
        assert path.exists(), f"{path} is missing: MEDAUDIT_UI_SCREENSHOTS=docs/img pytest {__file__}"
        _check_rendered(path)
