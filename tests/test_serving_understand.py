"""The websocket "understand" session type: pushed frames and named files to timestamped caption events, its
errors, through Starlette's TestClient and a real uvicorn server."""

import json
import threading

import numpy as np
import pytest
from helpers import write_clip
from starlette.testclient import TestClient

from stream_runtime.pipelines.tinyworld.captions import parse_caption
from stream_runtime.pipelines.tinyworld.spec import WORLD_FPS, describe
from stream_runtime.pipelines.tinyworld.world import held_out_seeds, render, sample_spec
from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.serving import Engine, EngineConfig
from stream_runtime.serving.protocol import KIND_INPUT, PROTOCOL, FrameHeader, encode_frame, pack_frame
from stream_runtime.serving.server import build_app, create_server

SEED = held_out_seeds()[2]
FRAMES = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(height=32, width=32)


PUSHED_SIZE = 96
"""Pushed frames are 96x96 (the server resizes them to the captioner's 64x64): the server takes frames up to its
``max_pixels``."""


@pytest.fixture
def client(pipe):
    with TestClient(build_app(Engine(pipe, EngineConfig(max_pixels=PUSHED_SIZE**2)))) as c:
        yield c


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(
        tmp_path_factory.mktemp("serve_understand") / "world.mp4", render(sample_spec(SEED), FRAMES), WORLD_FPS
    )


def events_until_closed(ws) -> list[dict]:
    out = []
    while True:
        event = json.loads(ws.receive_text())
        out.append(event)
        if event["type"] == "closed":
            return out


def frame_message(frame: np.ndarray, number: int, fmt: str = "raw") -> bytes:
    height, width = frame.shape[:2]
    header = FrameHeader(KIND_INPUT, fmt, 0, 0, number, 0, 1, width, height)
    return pack_frame(header, encode_frame(frame, fmt, 95))


def test_pushed_frames_become_timestamped_captions(client):
    frames = render(sample_spec(SEED), FRAMES, PUSHED_SIZE, PUSHED_SIZE)
    with client.websocket_connect("/ws") as ws:
        hello = json.loads(ws.receive_text())
        assert "understand" in hello["modes"]
        ws.send_json({"type": "open", "protocol": PROTOCOL, "mode": "understand", "stride_frames": 8})
        opened = json.loads(ws.receive_text())
        assert opened["type"] == "opened" and opened["mode"] == "understand" and opened["source"] is None
        assert (opened["fps"], opened["window_frames"], opened["stride_frames"]) == (16.0, 24, 8)
        for number, frame in enumerate(frames):
            ws.send_bytes(frame_message(frame, number, "jpeg" if number % 2 else "raw"))
        ws.send_json({"type": "close"})
        events = events_until_closed(ws)
    assert [e for e in events if e["type"] == "error"] == []
    captions = [e for e in events if e["type"] == "caption"]
    assert [(c["index"], c["start_s"], c["end_s"]) for c in captions] == [(0, 0.0, 1.5), (1, 0.5, 2.0)]
    assert all(c["session"] == opened["session"] for c in captions)
    said, truth = parse_caption(captions[0]["text"]), describe(sample_spec(SEED))
    assert set(said.objects) == set(truth.objects) and said.background == truth.background
    closed = events[-1]
    assert closed["reason"] == "closed" and closed["captions"] == 2


def test_named_file_is_captioned_to_its_end_and_bad_requests_are_errors(client, clip, tmp_path):
    with client.websocket_connect("/ws") as ws:
        ws.receive_text()  # hello
        ws.send_json({"type": "open", "mode": "understand", "source": str(clip)})
        events = events_until_closed(ws)
        assert events[0]["type"] == "opened" and events[0]["source"] == str(clip)
        assert [e["start_s"] for e in events if e["type"] == "caption"] == [0.0, 0.5]
        assert events[-1]["reason"] == "end"
        # The connection goes on: errors for bad requests, none of them fatal.
        for message, code, text in (
            ({"source": str(tmp_path / "missing.mp4")}, "source_failed", "missing.mp4"),
            ({"stride_frames": 0}, "bad_params", "stride_frames must be an integer >= 1"),
            ({"prompt": "hi"}, "bad_params", "unknown field(s) ['prompt']"),
        ):
            ws.send_json({"type": "open", "mode": "understand", **message})
            error = json.loads(ws.receive_text())
            assert (error["type"], error["code"], error["fatal"]) == ("error", code, False) and text in error["message"]
        ws.send_json({"type": "open", "prompt": "a fox", "source": str(clip)})
        error = json.loads(ws.receive_text())
        assert error["code"] == "bad_params" and "for mode 'understand' only" in error["message"]
        ws.send_json({"type": "open", "mode": "understand"})
        assert json.loads(ws.receive_text())["type"] == "opened"
        ws.send_json({"type": "update", "prompt": "a cat"})
        assert json.loads(ws.receive_text())["code"] == "bad_message"
        ws.send_json({"type": "close"})  # no frame pushed: an empty stream is an error, then closed
        events = events_until_closed(ws)
        assert events[0]["code"] == "source_failed" and events[0]["fatal"] and "no frames" in events[0]["message"]
        assert events[-1]["reason"] == "error" and events[-1]["captions"] == 0


def test_a_server_beyond_loopback_refuses_named_sources(pipe, clip):
    with TestClient(build_app(Engine(pipe), named_sources=False)) as client, client.websocket_connect("/ws") as ws:
        ws.receive_text()
        ws.send_json({"type": "open", "mode": "understand", "source": str(clip)})
        error = json.loads(ws.receive_text())
        assert error["code"] == "bad_params" and "push frames instead" in error["message"]


def test_understand_sessions_are_limited_to_max_sessions(pipe):
    with TestClient(build_app(Engine(pipe, EngineConfig(max_sessions=1)))) as client:
        with client.websocket_connect("/ws") as first, client.websocket_connect("/ws") as second:
            first.receive_text(), second.receive_text()  # hello
            first.send_json({"type": "open", "mode": "understand"})
            assert json.loads(first.receive_text())["type"] == "opened"
            second.send_json({"type": "open", "mode": "understand"})
            busy = json.loads(second.receive_text())
            assert busy["code"] == "busy" and not busy["fatal"]
            first.send_bytes(frame_message(render(sample_spec(SEED), 1, 32, 32)[0], 0))  # within max_pixels
            first.send_json({"type": "close"})
            assert events_until_closed(first)[-1]["captions"] == 1  # the slot is free again once closed
            second.send_json({"type": "open", "mode": "understand"})
            assert json.loads(second.receive_text())["type"] == "opened"


def test_real_server_captions_a_file_for_a_websockets_client(pipe, clip):
    from websockets.sync.client import connect

    server, sock = create_server(build_app(Engine(pipe)), "127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            assert json.loads(ws.recv())["type"] == "hello"
            ws.send(json.dumps({"type": "open", "mode": "understand", "source": str(clip), "stride_frames": 16}))
            events = []
            while not events or events[-1]["type"] != "closed":
                events.append(json.loads(ws.recv()))
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    captions = [e for e in events if e["type"] == "caption"]
    assert [(c["start_s"], c["end_s"]) for c in captions] == [(0.0, 1.5), (0.5, 2.0)]  # stride 16, then the rest
    assert events[-1]["reason"] == "end" and not thread.is_alive()
