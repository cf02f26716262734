"""The websocket server and protocol end to end (Starlette's TestClient), and the Python client against a real
uvicorn server. The tiny random model at 32x32 with one denoising step."""

import asyncio
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from helpers import free_port
from PIL import Image
from starlette.testclient import TestClient

from stream_runtime.apps import cli
from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.serving import Engine, EngineConfig
from stream_runtime.serving.client import parse_switch, record
from stream_runtime.serving.protocol import (
    FLAG_LAST_IN_CHUNK,
    HEADER_SIZE,
    KIND_INPUT,
    KIND_OUTPUT,
    PROTOCOL,
    FrameHeader,
    ProtocolError,
    decode_frame,
    encode_frame,
    pack_frame,
    unpack_frame,
)
from stream_runtime.serving.server import build_app, create_server, urls
from stream_runtime.video_io import read_video

SIZE = 32
SERVE_START_S = 120.0  # `stream-runtime serve` in a subprocess: imports, the tiny model, the socket
SERVE_STOP_S = 60.0  # from the signal to the exit


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(height=SIZE, width=SIZE)


@pytest.fixture
def client(pipe, request):
    config = getattr(request, "param", {})
    with TestClient(build_app(Engine(pipe, EngineConfig(**config)))) as c:
        yield c


def open_msg(**kw) -> dict:
    return {"type": "open", "protocol": PROTOCOL, "prompt": "a red fox", "steps": 1, **kw}


class Peer:
    """The browser's view of one websocket: JSON events and binary frames, in arrival order."""

    def __init__(self, ws) -> None:
        self.ws = ws

    def next(self):
        message = self.ws.receive()
        if message.get("text") is not None:
            return json.loads(message["text"])
        assert message.get("bytes") is not None, message
        return unpack_frame(message["bytes"])

    def event(self, kind: str) -> dict:
        """Skip to the next JSON event of ``kind`` (frames and other events in between are dropped)."""
        while True:
            item = self.next()
            if isinstance(item, dict) and item["type"] == kind:
                return item

    def chunk(self) -> tuple[dict, list[tuple[FrameHeader, bytes]]]:
        """The next chunk's metadata and its binary frames."""
        meta = self.event("chunk")
        return meta, [self.next() for _ in range(meta["frames"])]

    def send_frame(self, frame: np.ndarray, fmt: str = "jpeg") -> None:
        h, w = frame.shape[:2]
        header = FrameHeader(KIND_INPUT, fmt, 0, 0, 0, 0, 1, w, h)
        self.ws.send_bytes(pack_frame(header, encode_frame(frame, fmt, 90)))


def test_protocol_header_layout_and_errors():
    header = FrameHeader(KIND_OUTPUT, "raw", 7, 3, 45, 2, 12, 832, 480, FLAG_LAST_IN_CHUNK)
    data = pack_frame(header, b"xyz")
    assert len(data) == HEADER_SIZE + 3 == 31
    # The documented byte layout (docs/protocol.md), as a browser's DataView reads it: little-endian.
    assert data[:4] == b"SRTM" and data[4] == 1 and data[5] == KIND_OUTPUT and data[6] == 0 and data[7] == 1
    assert [int.from_bytes(data[o : o + 4], "little") for o in (8, 12, 16)] == [7, 3, 45]
    assert [int.from_bytes(data[o : o + 2], "little") for o in (20, 22, 24, 26)] == [2, 12, 832, 480]
    assert unpack_frame(data) == (header, b"xyz")
    for bad, message in ((b"SRTM", "28-byte header"), (b"XXXX" + data[4:], "must start with")):
        with pytest.raises(ProtocolError, match=message):
            unpack_frame(bad)
    with pytest.raises(ProtocolError, match="needs 12 payload bytes"):
        decode_frame(FrameHeader(KIND_INPUT, "raw", 0, 0, 0, 0, 1, 2, 2), b"123")


def test_websocket_session_end_to_end(client):
    with client.websocket_connect("/ws") as ws:
        peer = Peer(ws)
        hello = peer.next()
        assert hello["type"] == "hello" and hello["protocol"] == PROTOCOL
        assert hello["default_height"] == SIZE and hello["resolution_multiple"] == 16 and "jpeg" in hello["formats"]
        ws.send_json(open_msg(quality=70, height=SIZE, width=SIZE))
        opened = peer.next()
        assert opened["type"] == "opened"
        assert (opened["height"], opened["width"], opened["fps"], opened["steps"]) == (SIZE, SIZE, 16.0, 1)
        assert (opened["format"], opened["quality"], opened["first_chunk_frames"]) == ("jpeg", 70, 9)
        sid = opened["session"]
        for expected_index in (0, 1):
            meta, frames = peer.chunk()
            assert meta["session"] == sid and meta["chunk"] == expected_index and meta["drops"] == 0
            assert meta["latency_s"] > 0 and meta["sent_at"] >= meta["generated_at"]
            assert meta["pts_s"] == meta["first_frame"] / 16.0
            for i, (header, payload) in enumerate(frames):
                assert (header.kind, header.format, header.session, header.chunk) == (
                    KIND_OUTPUT,
                    "jpeg",
                    sid,
                    meta["chunk"],
                )
                assert (header.frame, header.index, header.count) == (meta["first_frame"] + i, i, meta["frames"])
                assert (header.width, header.height) == (SIZE, SIZE)
                assert header.flags == (FLAG_LAST_IN_CHUNK if i == len(frames) - 1 else 0)
                assert payload[:2] == b"\xff\xd8"  # a JPEG
                assert np.asarray(Image.open(io.BytesIO(payload))).shape == (SIZE, SIZE, 3)
        ws.send_json({"type": "update", "prompt": "a blue cat", "blend_chunks": 1})
        updated = peer.event("updated")
        assert updated["prompt"] == "a blue cat" and updated["next_chunk"] >= 2
        meta, _ = peer.chunk()
        assert meta["chunk"] >= updated["next_chunk"]
        ws.send_json({"type": "pause"})
        assert peer.event("paused")["session"] == sid
        ws.send_json({"type": "resume"})
        peer.event("resumed")
        ws.send_json({"type": "close"})
        closed = peer.event("closed")
        assert closed["session"] == sid and closed["reason"] == "closed" and closed["chunks"] >= 3
        # One session at a time per connection, but the connection can open another.
        ws.send_json(open_msg(seed=1))
        assert peer.event("opened")["session"] != sid


@pytest.mark.parametrize("fmt,channels", [("raw", 3), ("rgba", 4)])
def test_raw_frame_formats(client, fmt, channels):
    with client.websocket_connect("/ws") as ws:
        peer = Peer(ws)
        peer.event("hello")
        ws.send_json(open_msg(format=fmt))
        meta, frames = peer.chunk()
        assert meta["format"] == fmt
        header, payload = frames[0]
        assert header.format == fmt and len(payload) == SIZE * SIZE * channels
        pixels = np.frombuffer(payload, np.uint8).reshape(SIZE, SIZE, channels)
        assert pixels.std() > 0
        if fmt == "rgba":
            assert (pixels[..., 3] == 255).all()


def test_video_to_video_over_the_websocket(client):
    rng = np.random.default_rng(0)
    with client.websocket_connect("/ws") as ws:
        peer = Peer(ws)
        peer.event("hello")
        ws.send_json(open_msg(mode="v2v", prompt="a watercolor painting", steps=1))
        opened = peer.event("opened")
        assert opened["mode"] == "v2v" and opened["input_frames_needed"] == 1
        peer.send_frame(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "jpeg")
        meta, frames = peer.chunk()
        assert meta["chunk"] == 0 and meta["frames"] == 1 and meta["input_latency_s"] >= 0
        for _ in range(4):  # the next chunk needs four frames; raw input works as well
            peer.send_frame(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "raw")
        meta, frames = peer.chunk()
        assert meta["chunk"] == 1 and meta["frames"] == 4 and len(frames) == 4
        peer.send_frame(np.zeros((16, 16, 3), np.uint8), "raw")  # wrong size
        error = peer.event("error")
        assert error["code"] == "bad_frame" and not error["fatal"]
        ws.send_json({"type": "close"})
        peer.event("closed")


def test_bad_messages_get_error_events_and_the_connection_stays_usable(client):
    with client.websocket_connect("/ws") as ws:
        peer = Peer(ws)
        peer.event("hello")
        cases = [
            ("{not json", "bad_json"),
            ("[1, 2]", "bad_json"),
            (json.dumps({"type": "dance"}), "bad_message"),
            (json.dumps({"type": "update", "prompt": "x"}), "not_open"),
            (json.dumps(open_msg(steps=0)), "bad_params"),
            (json.dumps(open_msg(height=30)), "bad_params"),
            (json.dumps(open_msg(format="png")), "bad_params"),
            (json.dumps(open_msg(seed="zero")), "bad_params"),
            (json.dumps(open_msg(prompt="")), "bad_params"),
            (json.dumps(open_msg(protocol="stream-runtime/9")), "protocol_version"),
        ]
        for text, code in cases:
            ws.send_text(text)
            error = peer.next()
            assert error["type"] == "error" and error["code"] == code and not error["fatal"], (text, error)
            assert error["message"]
        ws.send_bytes(b"garbage")
        assert peer.next()["code"] == "not_open"
        ws.send_json(open_msg())
        opened = peer.event("opened")
        ws.send_bytes(b"garbage")
        assert peer.event("error")["code"] == "bad_frame"
        peer.send_frame(np.zeros((SIZE, SIZE, 3), np.uint8))  # input frames on a t2v session
        assert "video-to-video" in peer.event("error")["message"]
        ws.send_json(open_msg())
        assert peer.event("error")["code"] == "already_open"
        ws.send_json({"type": "update", "steps": 99})
        assert peer.event("error")["code"] == "bad_params"
        meta, _ = peer.chunk()  # still streaming
        assert meta["session"] == opened["session"]


@pytest.mark.parametrize("client", [{"max_sessions": 1}], indirect=True)
def test_busy_server_refuses_a_second_session(client):
    with client.websocket_connect("/ws") as first, client.websocket_connect("/ws") as second:
        a, b = Peer(first), Peer(second)
        a.event("hello")
        b.event("hello")
        first.send_json(open_msg())
        a.event("opened")
        second.send_json(open_msg())
        error = b.event("error")
        assert error["code"] == "busy" and "max_sessions" in error["message"]


def test_metrics_and_health_endpoints(client):
    assert client.get("/health").json() == {"status": "ok", "protocol": PROTOCOL, "sessions": 0}
    with client.websocket_connect("/ws") as ws:
        peer = Peer(ws)
        ws.send_json(open_msg())
        peer.chunk()
        peer.chunk()
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for name in (
        "stream_runtime_sessions_active",
        "stream_runtime_sessions_opened_total 1",
        "stream_runtime_chunks_total",
        "stream_runtime_chunks_dropped_total",
        "stream_runtime_frames_dropped_total",
        "stream_runtime_chunk_latency_seconds_count",
        "stream_runtime_queue_wait_seconds",
        "stream_runtime_end_to_end_latency_seconds",
        "stream_runtime_time_to_first_frame_seconds_count 1",
        "stream_runtime_session_fps",
        "stream_runtime_session_frame_interval_jitter_seconds",
        "stream_runtime_memory_reserved_bytes",
    ):
        assert name in text, name
    for line in text.splitlines():  # every sample line is `name{labels} value`
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2


def test_python_client_records_a_playable_mp4_from_a_real_server(pipe, tmp_path):
    engine = Engine(pipe, EngineConfig(max_sessions=2))
    server, sock = create_server(build_app(engine), "127.0.0.1", 0)
    port = sock.getsockname()[1]
    # The socket already listens: the client's connection waits in the backlog until uvicorn accepts it.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    out = tmp_path / "client.mp4"
    try:
        stats = asyncio.run(
            record(f"ws://127.0.0.1:{port}/ws", "a red fox", 1.5, str(out), [parse_switch("0.5:a blue cat")], steps=1)
        )
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive() and not engine.alive  # the lifespan stopped the engine
    assert stats.frames_written == 24 and stats.switches_sent == 1 and stats.ttff_s > 0
    assert stats.opened["height"] == SIZE
    video = read_video(out)
    assert video.shape == (24, SIZE, SIZE, 3)


def test_serve_subcommand_wires_the_engine_config(monkeypatch, capsys):
    import stream_runtime.serving.server as server_module

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda pipe, **kw: seen.update(pipe=pipe, **kw))
    code = cli.main(["serve", "--port", "8123", "--max-sessions", "3", "--memory-budget-gb", "0.5"])
    assert code == 0
    assert seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    assert seen["config"].max_sessions == 3 and seen["config"].memory_budget_bytes == 2**29
    assert seen["config"].scheduler == "round_robin"
    assert cli.main(["serve", "--port", "8123", "--scheduler", "slo"]) == 0
    assert seen["config"].scheduler == "slo"
    assert urls("0.0.0.0", 7860)["websocket"] == "ws://127.0.0.1:7860/ws"
    with pytest.raises(ValueError, match="cannot listen"):
        taken = create_server(None, "127.0.0.1", 0)[1]
        try:
            create_server(None, "127.0.0.1", taken.getsockname()[1])
        finally:
            taken.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_ctrl_c_and_sigterm(sig):
    """uvicorn raises the signal it caught again after its graceful shutdown; for SIGTERM that is the default
    handler, which would kill the process before the engine is stopped. Both must end in the clean stop, status 0."""
    port = free_port()
    cmd = [sys.executable, "-m", "stream_runtime.apps.cli", "serve", "--tiny-random", "--port", str(port), "--no-app"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SERVE_START_S
        while True:
            assert proc.poll() is None, f"serve exited early: {proc.communicate()}"
            assert time.monotonic() < deadline, f"no /health answer within {SERVE_START_S} s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=SERVE_STOP_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert "stopped: sessions closed, engine thread joined" in out, (out, err)


def test_a_discarded_recording_skips_its_queued_writes(tmp_path):
    """A dropped connection's recording: the write in progress ends, the queued ones are cancelled (not encoded
    for nobody), and the file is deleted."""
    from stream_runtime.serving.server import SessionRecorder

    recorder = SessionRecorder("x", tmp_path / "x.mp4", fps=16)
    started, release, written = threading.Event(), threading.Event(), []

    def write(frames):
        started.set()
        release.wait(timeout=10)
        written.append(len(frames))

    recorder._writer.write = write
    for _ in range(5):
        recorder.write(np.zeros((4, 16, 16, 3), np.uint8))
    assert started.wait(timeout=10)

    async def main():
        task = asyncio.create_task(recorder.discard())
        # ThreadPoolExecutor.shutdown cancels the queued writes under the lock that sets _shutdown, then waits
        while not recorder._pool._shutdown:
            await asyncio.sleep(0.001)
        release.set()
        await task

    asyncio.run(main())
    assert written == [4] and not recorder.path.exists()
