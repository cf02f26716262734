"""The Gradio app mounted on the server (Starlette's TestClient) and the server-side session recording. The tiny
random model at 32x32 with one denoising step. The page itself, in a real browser: tests/test_app_browser.py."""

import json
import time

import numpy as np
import pytest
from starlette.testclient import TestClient

pytest.importorskip("gradio", reason="the app needs gradio (pip install gradio==6.31.0)")

from stream_runtime.apps import cli  # noqa: E402
from stream_runtime.apps.gradio_app import mount  # noqa: E402
from stream_runtime.pipelines.wan.pipeline import StreamPipeline  # noqa: E402
from stream_runtime.serving import Engine  # noqa: E402
from stream_runtime.serving.protocol import PROTOCOL, unpack_frame  # noqa: E402
from stream_runtime.serving.server import build_app, urls  # noqa: E402
from stream_runtime.video_io import read_video  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(height=SIZE, width=SIZE)


@pytest.fixture
def client(pipe):
    with TestClient(build_app(Engine(pipe), extra_mount=mount)) as c:
        yield c


def open_msg(**kw) -> dict:
    return {"type": "open", "protocol": PROTOCOL, "prompt": "a red fox", "steps": 1, **kw}


def receive(ws):
    message = ws.receive()
    if message.get("text") is not None:
        return json.loads(message["text"])
    return unpack_frame(message["bytes"])


def until(ws, kind: str) -> dict:
    while True:
        item = receive(ws)
        if isinstance(item, dict) and item["type"] == kind:
            return item


def test_app_page_has_the_player_and_server_routes_keep_precedence(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "window.streamPlayer = new StreamPlayer()" in page.text  # the player script, inlined in <head>
    # Gradio renders in the browser from its config: the HTML block there holds the canvas and the player's parts.
    config = client.get("/config").json()
    html = "".join(str(c["props"].get("value")) for c in config["components"] if c.get("type") == "html")
    for part in ('<canvas id="sr-canvas"', 'data-ws-path="/ws"', 'id="sr-stats"', 'id="sr-download"'):
        assert part in html, part
    buttons = {c["props"].get("elem_id") for c in config["components"] if c.get("type") == "button"}
    assert {"sr-start", "sr-switch", "sr-stop"} <= buttons
    # Registered before the mount at "/": the server's own routes still answer.
    assert client.get("/health").json()["status"] == "ok"
    assert "stream_runtime_sessions_active" in client.get("/metrics").text
    with client.websocket_connect("/ws") as ws:
        assert receive(ws)["type"] == "hello"
        ws.send_json(open_msg())
        opened = until(ws, "opened")
        assert opened["record"] is False
        meta = until(ws, "chunk")
        header, _ = receive(ws)
        assert header.session == opened["session"] and header.frame == meta["first_frame"]
        ws.send_json({"type": "close"})
        closed = until(ws, "closed")
        assert "recording" not in closed


def test_recording_download_is_a_playable_mp4_of_the_sent_frames(client, tmp_path):
    sent: dict[int, np.ndarray] = {}
    with client.websocket_connect("/ws") as ws:
        receive(ws)  # hello
        ws.send_json(open_msg(record="yes"))
        error = until(ws, "error")
        assert error["code"] == "bad_params" and "record must be true or false" in error["message"]
        ws.send_json(open_msg(record=True, format="raw"))
        assert until(ws, "opened")["record"] is True
        closed = None
        while closed is None:
            item = receive(ws)
            if isinstance(item, tuple):  # a raw RGB frame: exactly what the server generated
                header, payload = item
                sent[header.frame] = np.frombuffer(payload, np.uint8).reshape(SIZE, SIZE, 3)
                if len(sent) == 21:  # the 9 + 12 frames of the first two chunks
                    ws.send_json({"type": "close"})
            elif item["type"] == "closed":
                closed = item
    assert closed["recording_frames"] == len(sent)  # what was sent; "frames" also counts a chunk cut by close
    url = closed["recording"]
    assert url.startswith("/recordings/") and url.endswith(".mp4")
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    path = tmp_path / "session.mp4"
    path.write_bytes(response.content)
    video = read_video(path)
    expected = np.stack([sent[i] for i in sorted(sent)])
    assert video.shape == expected.shape == (len(sent), SIZE, SIZE, 3)
    # H.264 (CRF 18, 4:2:0 chroma) is lossy on 32x32 noise, so each decoded frame must be nearest to its own sent
    # frame among all of them: these frames, in this order.
    dist = np.abs(video[:, None].astype(np.int16) - expected[None].astype(np.int16)).mean(axis=(2, 3, 4))
    assert (dist.argmin(axis=1) == np.arange(len(sent))).all(), dist.round(1)
    assert dist.diagonal().max() < 20, dist.diagonal()
    assert client.get("/recordings/never-made.mp4").status_code == 404


def test_a_recording_of_a_dropped_connection_is_discarded(client):
    recordings = client.app.state.recordings
    with client.websocket_connect("/ws") as ws:  # a full session: its file is published
        receive(ws)
        ws.send_json(open_msg(record=True))
        until(ws, "chunk")
        ws.send_json({"type": "close"})
        name = until(ws, "closed")["recording"].rsplit("/", 1)[1]
    with client.websocket_connect("/ws") as ws:  # a dropped one: nobody can download it, so it is deleted
        receive(ws)
        ws.send_json(open_msg(record=True))
        until(ws, "chunk")
    deadline = time.monotonic() + 10
    while sorted(p.name for p in recordings._dir.iterdir()) != [name]:  # the handler's cleanup runs after
        assert time.monotonic() < deadline, sorted(p.name for p in recordings._dir.iterdir())
        time.sleep(0.01)


def test_serve_subcommand_mounts_the_app(monkeypatch, capsys):
    import stream_runtime.serving.server as server_module

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda pipe, **kw: seen.update(kw))
    assert cli.main(["serve", "--port", "8123"]) == 0
    assert seen["extra_mount"] is not None and seen["app_path"] == "/"
    assert cli.main(["serve", "--no-app"]) == 0
    assert seen["extra_mount"] is None and seen["app_path"] is None
    assert urls("0.0.0.0", 7860, "/")["app"] == "http://127.0.0.1:7860/"
    assert "app" not in urls("127.0.0.1", 7860)
