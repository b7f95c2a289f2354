"""/dashboard in a real headless browser (Debian's chromium driven by Playwright): the page loads from the
server alone, its numbers change under load, the playground streams a chat reply, and a screenshot's
panels are not blank. A mock-engine server (the real app, scheduler and metrics, no model) keeps it quick;
the router serves the same page over its replicas."""

from __future__ import annotations

import io
import shutil
import threading
import time

import httpx
import pytest
from server_helpers import start_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server():
    s = start_server("--mock", "--mock-decode-ms-per-seq", "2")
    yield s
    assert s.stop() == 0, s.log_text()
    s.remove_log()


def _load(url: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            c.post(f"{url}/v1/completions", json={"prompt": "hello there", "max_tokens": 40, "priority": 1})


def test_dashboard_live_numbers_playground_and_screenshot(browser, server, tmp_path):
    # bypass_csp: Playwright evaluates its wait conditions as strings, which the page's CSP forbids.
    page = browser.new_page(viewport={"width": 1300, "height": 1100}, bypass_csp=True)
    offsite: list[str] = []
    page.on("request", lambda r: offsite.append(r.url) if not r.url.startswith(server.url) else None)
    page.goto(f"{server.url}/dashboard")
    page.wait_for_function("parseInt(document.getElementById('polls').textContent) >= 2", timeout=15000)
    before = page.text_content("#finished")

    stop = threading.Event()
    workers = [threading.Thread(target=_load, args=(server.url, stop)) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        page.wait_for_function("parseFloat(document.getElementById('throughput').textContent) > 0", timeout=20000)
        page.wait_for_function("document.getElementById('ttft-p50').textContent !== '–'", timeout=20000)
        time.sleep(1.5)
        shot = page.screenshot(full_page=True)
    finally:
        stop.set()
        for w in workers:
            w.join()
    page.wait_for_function(f"document.getElementById('finished').textContent !== '{before}'", timeout=10000)
    assert page.text_content("#error") == ""
    assert "1" in page.inner_text("#classes")  # the priority class the load used has a row

    # The playground streams a reply through the chat API.
    page.fill("#chat-input", "Say hello")
    page.click("#chat-send")
    page.wait_for_function("document.getElementById('chat-status').textContent.startsWith('done')", timeout=20000)
    assert page.text_content("#chat-output").strip()
    assert not offsite, offsite  # everything came from the server itself: no CDN

    from PIL import Image, ImageStat

    img = Image.open(io.BytesIO(shot)).convert("L")
    (tmp_path / "dashboard.png").write_bytes(shot)
    for sel in ("#chart", "#throughput"):
        box = page.locator(sel).bounding_box()
        crop = img.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"])))
        assert ImageStat.Stat(crop).stddev[0] > 5, f"{sel} looks blank"
    page.close()
