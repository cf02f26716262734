"""The app's page in headless Chromium against a real uvicorn server: start a stream, see the canvas draw frames,
switch the prompt, stop, download the recording; video-to-video from Chromium's fake webcam. No JS errors.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (no downloaded browsers); skipped without.
Every wait polls a condition in the page with a timeout (playwright's wait_for_function), never a fixed sleep.
"""

import pathlib
import threading

import pytest

CHROMIUM = pathlib.Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("gradio", reason="the app needs gradio (pip install gradio==6.31.0)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the test extra)")

from stream_runtime.apps.gradio_app import mount  # noqa: E402
from stream_runtime.pipelines.wan.pipeline import StreamPipeline  # noqa: E402
from stream_runtime.serving import Engine  # noqa: E402
from stream_runtime.serving.server import build_app, create_server  # noqa: E402

SIZE = 32
TIMEOUT_MS = 20_000
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Video-to-video: grant the camera without a prompt and feed Chromium's synthetic test pattern.
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]


@pytest.fixture(scope="module")
def base_url():
    engine = Engine(StreamPipeline.tiny_random(height=SIZE, width=SIZE))
    server, sock = create_server(build_app(engine, extra_mount=mount), "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    assert not engine.alive


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, base_url):
    """A fresh page on the app; after the test, asserts that nothing went wrong in the page's JS."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems = []
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.goto(base_url + "/")
    page.wait_for_selector("#sr-canvas")
    page.wait_for_function("window.streamPlayer !== undefined")
    yield page
    player_errors = page.evaluate("window.streamPlayer.errors")
    context.close()
    assert problems == [], problems
    assert player_errors == [], player_errors


def wait(page, condition: str) -> None:
    page.wait_for_function(condition, timeout=TIMEOUT_MS)


def test_start_switch_prompt_stop_and_download(page):
    page.fill("#sr-prompt textarea", "a red fox in the snow")
    page.click("#sr-start")
    wait(page, "window.streamPlayer.framesDrawn >= 4")
    stats = page.evaluate("window.streamPlayer.stats()")
    assert stats["state"] == "live" and stats["ttffMs"] > 0 and stats["chunkLatencyMs"] > 0
    canvas = page.locator("#sr-canvas")
    assert canvas.evaluate("c => [c.width, c.height]") == [SIZE, SIZE]  # the session's resolution
    assert "fps" in page.inner_text("#sr-stats")

    page.fill("#sr-prompt textarea", "a blue cat on a sofa")
    page.click("#sr-switch")
    wait(page, "window.streamPlayer.updatesAcked >= 1")
    drawn = page.evaluate("window.streamPlayer.framesDrawn")
    wait(page, f"window.streamPlayer.framesDrawn > {drawn}")  # still playing after the switch

    page.click("#sr-stop")
    wait(page, "window.streamPlayer.state === 'closed'")
    link = page.locator("#sr-download")
    assert link.is_visible()
    href = link.get_attribute("href")
    assert href.startswith("/recordings/")
    fetch = (
        "async (url) => { const r = await fetch(url); return [r.status, r.headers.get('content-type'), "
        "(await r.arrayBuffer()).byteLength]; }"
    )
    status, content_type, size = page.evaluate(fetch, href)  # what the link downloads
    assert status == 200 and content_type == "video/mp4" and size > 0


def test_video_to_video_from_the_webcam(page):
    page.check("#sr-mode input[value='v2v']")
    wait(page, "document.querySelector('#sr-steps input[type=number]').value === '2'")  # v2v's default steps
    page.click("#sr-start")
    wait(page, "window.streamPlayer.framesDrawn >= 4 && window.streamPlayer.inputSent >= 4")
    assert page.evaluate("window.streamPlayer.opened.mode") == "v2v"
    assert page.evaluate("window.streamPlayer.stats().inputLatencyMs") > 0
    page.click("#sr-stop")
    wait(page, "window.streamPlayer.state === 'closed'")
    assert page.evaluate("document.getElementById('sr-webcam').hidden")  # the camera was released
