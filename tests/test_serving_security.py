"""Access control (a token beyond loopback) and per-client limits (message sizes, frame dimensions, message rate,
unread events). The tiny random model at 32x32 with one denoising step; the page behind a token in headless
Chromium at the end (skipped without /usr/bin/chromium)."""

import asyncio
import io
import json
import pathlib
import socket
import threading

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient, WebSocketDenialResponse

from stream_runtime.apps import cli
from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.serving import Engine
from stream_runtime.serving.auth import TOKEN_COOKIE, TOKEN_ENV, is_loopback, resolve_token, tokens_equal
from stream_runtime.serving.limits import ClientLimits, TokenBucket
from stream_runtime.serving.protocol import KIND_INPUT, PROTOCOL, FrameHeader, encode_frame, pack_frame
from stream_runtime.serving.server import Connection, build_app, create_server

SIZE = 32
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(height=SIZE, width=SIZE)


def open_msg(**kw) -> dict:
    return {"type": "open", "protocol": PROTOCOL, "prompt": "a red fox", "steps": 1, **kw}


def next_event(ws, kind: str | None = None) -> dict:
    """The next JSON event (of ``kind``), skipping binary frames."""
    while True:
        message = ws.receive()
        if message.get("text") is not None:
            event = json.loads(message["text"])
            if kind is None or event["type"] == kind:
                return event


def frame_msg(payload: bytes, width: int = SIZE, height: int = SIZE, fmt: str = "jpeg") -> bytes:
    return pack_frame(FrameHeader(KIND_INPUT, fmt, 0, 0, 0, 0, 1, width, height), payload)


def jpeg(width: int = SIZE, height: int = SIZE) -> bytes:
    return encode_frame(np.full((height, width, 3), 128, np.uint8), "jpeg", 90)


# -- the token


def test_token_is_required_beyond_loopback_and_compared_safely():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "192.168.1.5", "example.com"]))
    assert resolve_token("127.0.0.1", None) == (None, False)
    with pytest.raises(ValueError, match="refusing to listen on '0.0.0.0' without a token.*--token auto"):
        resolve_token("0.0.0.0", None)
    token, generated = resolve_token("0.0.0.0", "auto")
    assert generated and len(token) >= 32 and token != resolve_token("0.0.0.0", "auto")[0]
    assert resolve_token("10.0.0.1", TOKEN) == (TOKEN, False)
    for bad in ("short", "has spaces in it, sixteen+", "semi;colon-0123456789"):
        with pytest.raises(ValueError, match="at least 16 characters of A-Z"):
            resolve_token("10.0.0.1", bad)
    assert tokens_equal(TOKEN, TOKEN) and not tokens_equal(TOKEN[:-1], TOKEN) and not tokens_equal(None, TOKEN)
    assert not tokens_equal("\udcff non-ascii é", TOKEN)  # never a TypeError, whatever a client sends


def test_serve_subcommand_refuses_a_public_host_without_a_token(monkeypatch, capsys):
    import stream_runtime.serving.server as server_module

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda pipe, **kw: seen.update(kw))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--no-app"]) == 2
    assert "refusing to listen on '0.0.0.0' without a token" in capsys.readouterr().err and seen == {}
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    argv = ["serve", "--host", "0.0.0.0", "--no-app", "--message-rate", "5", "--send-buffer-kb", "64"]
    assert cli.main([*argv, "--max-frame-mb", "1"]) == 0
    assert seen["token"] == TOKEN and seen["host"] == "0.0.0.0"
    limits = seen["limits"]
    assert (limits.messages_per_second, limits.send_buffer_bytes, limits.max_frame_bytes) == (5, 2**16, 2**20)
    assert limits.max_text_bytes == ClientLimits().max_text_bytes
    assert cli.main(["serve", "--host", "0.0.0.0", "--no-app", "--token", "auto"]) == 0
    assert seen["token"] == "auto"  # serve() makes it and prints it


def test_serve_prints_a_generated_token_in_the_urls(pipe, monkeypatch, capsys):
    import stream_runtime.serving.server as server_module

    class NoServer:
        def run(self, sockets):
            pass

    taken = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(server_module, "create_server", lambda app, *a: (NoServer(), taken))
    server_module.serve(pipe, host="0.0.0.0", port=0, token="auto")
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith("  ")}
    token = lines["websocket:"].split("?token=")[1]
    assert len(token) >= 32 and lines["metrics:"].endswith(f"?token={token}") and "token" not in lines["health:"]


def test_the_token_guards_every_route_but_health_and_the_websocket_before_any_work(pipe):
    engine = Engine(pipe)
    with TestClient(build_app(engine, token=TOKEN)) as client:
        assert client.get("/health").json()["status"] == "ok"
        for url in ("/metrics", f"/metrics?token={TOKEN}x", "/recordings/x.mp4"):
            response = client.get(url)
            assert response.status_code == 401 and "needs its token" in response.text, url
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get(f"/recordings/x.mp4?token={TOKEN}").status_code == 404  # through the guard
        client.cookies.clear()  # the request above set the cookie already
        response = client.get(f"/metrics?token={TOKEN}")
        cookie = response.headers["set-cookie"]
        assert response.status_code == 200 and cookie.startswith(f"{TOKEN_COOKIE}={TOKEN}")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert client.get("/metrics").status_code == 200  # the cookie alone (the client keeps it)

        # The websocket needs the token itself: the cookie, which a page on another port could ride on, is not enough.
        for url, headers in (("/ws", {}), (f"/ws?token={TOKEN[:-1]}", {}), ("/ws", {"Authorization": "Bearer no"})):
            with pytest.raises(WebSocketDenialResponse) as refused:
                with client.websocket_connect(url, headers=headers):
                    pass
            assert refused.value.status_code == 401, url
        assert engine.metrics()["outboxes"]["count"] == 0  # refused before a connection existed
        for url, headers in ((f"/ws?token={TOKEN}", {}), ("/ws", {"Authorization": f"Bearer {TOKEN}"})):
            with client.websocket_connect(url, headers=headers) as ws:
                assert next_event(ws)["type"] == "hello"


def test_server_sockets_send_at_once_and_take_the_configured_buffer_and_size_limit(pipe):
    engine = Engine(pipe)
    limits = ClientLimits(send_buffer_bytes=2**16)
    server, sock = create_server(build_app(engine, limits=limits), "127.0.0.1", 0)
    try:
        # Inherited by accepted sockets: no Nagle delay between a chunk's messages; a bounded kernel backlog.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2**16
        assert server.config.ws_max_size == limits.transport_bytes(engine.max_pixels) == 2 * (28 + 4 * 1024 + 2**16)
    finally:
        sock.close()


# -- limits


def test_oversized_and_malformed_messages_get_errors_and_the_stream_goes_on(pipe):
    limits = ClientLimits(max_text_bytes=1024, max_frame_bytes=8192)
    with TestClient(build_app(Engine(pipe), limits=limits)) as client, client.websocket_connect("/ws") as ws:
        next_event(ws, "hello")
        cases = [
            (json.dumps(open_msg(prompt="x" * 1100)), "too_large", "<= 1024 bytes"),
            (json.dumps(open_msg(prompt="é" * 600), ensure_ascii=False), "too_large", "got 12"),  # < 1024 chars
            (json.dumps(open_msg(steps=1, stpes=2)), "bad_params", "unknown field(s) ['stpes']"),
            (json.dumps(open_msg(seed=2**64)), "bad_params", "seed must be an integer in 0.."),
            (json.dumps(open_msg(quality=float("nan"))), "bad_params", "quality must be"),
            (json.dumps({"type": "pause", "now": True}), "bad_params", "unknown field(s) ['now']"),
            (json.dumps({"type": ["open"]}), "bad_message", "type must be one of"),
        ]
        for text, code, message in cases:
            ws.send_text(text)
            error = next_event(ws)
            assert (error["type"], error["code"], error["fatal"]) == ("error", code, False) and message in error[
                "message"
            ]
        ws.send_json(open_msg(mode="v2v"))
        sid = next_event(ws, "opened")["session"]
        frames = [
            (frame_msg(b"\0" * 8192), "too_large", "<= 8192 bytes"),
            (frame_msg(jpeg(), width=4096, height=4096), "bad_frame", "1..1024 pixels"),  # checked before decoding
            (frame_msg(jpeg(16, 16), width=16, height=16), "bad_frame", "must be 32x32"),
            (frame_msg(jpeg(16, 16)), "bad_frame", "the JPEG is 16x16"),
            (frame_msg(jpeg()[:200]), "bad_frame", "does not decode"),
            (frame_msg(png_bytes()), "bad_frame", "does not decode"),  # JPEG only: no other Pillow decoder
        ]
        for data, code, message in frames:
            ws.send_bytes(data)
            error = next_event(ws)
            assert (error["code"], error["request"], error["session"]) == (code, "frame", sid), error
            assert message in error["message"], error
        ws.send_bytes(frame_msg(jpeg()))  # a good frame still works
        assert next_event(ws, "chunk")["session"] == sid


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(buf, format="PNG")
    return buf.getvalue()


class FakeSocket:
    """A websocket whose client sends ``messages`` and never reads: every send blocks."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = list(messages)
        self.closed: tuple[int, str] | None = None

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        if not self.messages:
            await asyncio.Event().wait()
        return {"type": "websocket.receive", "text": self.messages.pop(0)}

    async def send_text(self, text: str) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = (code, reason)


def test_rate_limit_drops_messages_with_one_error_per_run(pipe):
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False] and bucket.wait_s() == 0.5
    now[0] += 0.5
    assert bucket.take() and not bucket.take()

    async def scenario() -> list[list[str]]:
        conn = Connection(FakeSocket([]), Engine(pipe), limits=ClientLimits(messages_per_second=1.0, message_burst=2))
        conn.bucket = TokenBucket(1.0, 2, clock=lambda: now[0])
        pause = {"type": "websocket.receive", "text": json.dumps({"type": "pause"})}
        runs = []
        for count in (5, 3):  # a run of 5 against a full bucket, then one of 3 after a token came back
            for _ in range(count):
                await conn._on_message(pause)
            runs.append([event.data["code"] for event in conn.outbox.take()])
            now[0] += 1.0
        return runs

    assert asyncio.run(scenario()) == [["not_open", "not_open", "rate_limited"], ["not_open", "rate_limited"]]
    limits = ClientLimits(messages_per_second=1e-3, message_burst=2)  # the same over a real connection
    with TestClient(build_app(Engine(pipe), limits=limits)) as client, client.websocket_connect("/ws") as ws:
        next_event(ws, "hello")
        for _ in range(3):
            ws.send_json({"type": "pause"})
        codes = [next_event(ws)["code"] for _ in range(3)]
        assert codes == ["not_open", "not_open", "rate_limited"]


def test_a_client_that_reads_nothing_is_disconnected_before_its_events_pile_up(pipe):
    limits = ClientLimits(max_unsent_events=8)
    fake = FakeSocket(["{bad json"] * 100)

    async def scenario() -> Connection:
        conn = Connection(fake, Engine(pipe), limits=limits)
        await asyncio.wait_for(conn.run(), timeout=30)
        return conn

    conn = asyncio.run(scenario())
    assert fake.closed[0] == 1008 and "max_unsent_events" in fake.closed[1]
    # It stopped reading at the first event over the limit (the hello may be among them, or stuck in the sender).
    assert conn.outbox.pending_events() == 9 and 100 - len(fake.messages) in (8, 9)


# -- the page behind a token, in a browser

CHROMIUM = pathlib.Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}")
def test_the_page_behind_a_token_streams_in_a_browser(pipe):
    pytest.importorskip("gradio", reason="the app needs gradio")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the test extra)")
    from stream_runtime.apps.gradio_app import mount

    engine = Engine(pipe)
    server, sock = create_server(build_app(engine, extra_mount=mount, token=TOKEN), "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
            page = browser.new_page()
            page.set_default_timeout(20_000)
            assert page.goto(base + "/").status == 401  # no token, no page
            page.goto(f"{base}/?token={TOKEN}")  # sets the cookie that Gradio's own requests then carry
            page.wait_for_function("window.streamPlayer !== undefined && document.querySelector('#sr-start')")
            page.click("#sr-start")
            page.wait_for_function("window.streamPlayer.framesDrawn >= 2")  # the JS passed the token to /ws
            assert page.evaluate("window.streamPlayer.errors") == []
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
