"""Fuzzing the websocket protocol with hypothesis against a real uvicorn server: well over 1,000 malformed control
messages and binary frames, each answered by a non-fatal ``error`` event (never a crash, a hang or a fatal error),
then the server must still be healthy and stream a fresh session.

Each example is one connection and a batch of messages (a new connection per message would spend the time on
handshakes). Half the batches run with a video-to-video session open, so that frames reach the frame parser and
``update``s reach the update parser. After each message the test sends a sentinel (an unknown ``type`` whose error
echoes it) and reads up to its answer: everything in between answers the message. The tiny random model at 32x32.
"""

import io
import json
import threading
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from websockets.sync.client import connect

from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.serving import Engine, EngineConfig
from stream_runtime.serving.limits import ClientLimits
from stream_runtime.serving.protocol import (
    CLIENT_TYPES,
    FIELDS,
    HEADER,
    KIND_INPUT,
    MAGIC,
    PROTOCOL,
    VERSION,
    FrameHeader,
    encode_frame,
    pack_frame,
    unpack_frame,
)
from stream_runtime.serving.server import build_app, create_server

SIZE = 32
WAIT_S = 30.0  # a guard against hangs, never a synchronisation
EXAMPLES = 80
BATCH = (20, 30)  # messages per example: at least 80 * 20 = 1,600 in all
MIN_MESSAGES = 1000
# Small size limits make oversized messages cheap to generate; no rate limit, so that every message is parsed.
LIMITS = ClientLimits(max_text_bytes=4096, max_frame_bytes=16384, messages_per_second=1e9, message_burst=10**9)


@pytest.fixture(scope="module")
def server():
    engine = Engine(StreamPipeline.tiny_random(height=SIZE, width=SIZE), EngineConfig(max_sessions=4))
    uvicorn_server, sock = create_server(build_app(engine, limits=LIMITS), "127.0.0.1", 0)
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"ws://127.0.0.1:{sock.getsockname()[1]}/ws", engine
    uvicorn_server.should_exit = True
    thread.join(timeout=WAIT_S)


def open_ws(url: str):
    return connect(url, max_size=None, compression=None, proxy=None, open_timeout=WAIT_S)


def receive(ws):
    """The next message: a JSON event (dict) or a binary frame (header, payload)."""
    message = ws.recv(timeout=WAIT_S)
    if isinstance(message, str):
        event = json.loads(message)
        assert isinstance(event, dict) and isinstance(event.get("type"), str), event
        return event
    return unpack_frame(message)


# -- strategies: (message, must it get an error?) pairs

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)
NOT_NULL = JSON.filter(lambda v: v is not None)
WRONG = {  # for each field, values of a wrong type (null is "not given", so never wrong)
    "string": NOT_NULL.filter(lambda v: not isinstance(v, str)),
    "int": st.one_of(
        st.text(max_size=5),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
        st.floats().filter(lambda f: not f.is_integer()),
    ),
    "number": st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2), st.just({})),
    "bool": NOT_NULL.filter(lambda v: not isinstance(v, bool)),
    "numbers": st.one_of(
        st.text(max_size=5), st.integers(), st.lists(st.one_of(st.text(), st.booleans(), st.none()), min_size=1)
    ),
}
FIELD_TYPES = {
    "prompt": "string",
    "mode": "string",
    "format": "string",
    "protocol": "string",
    "seed": "int",
    "height": "int",
    "width": "int",
    "steps": "int",
    "quality": "int",
    "blend_chunks": "int",
    "strength": "number",
    "guidance_scale": "number",
    "motion_aware": "bool",
    "early_first_frame": "bool",
    "record": "bool",
    "timesteps": "numbers",
    "source": "string",  # the understand-only fields: an error in any other open, and of a wrong type anyway
    "fps": "number",
    "stride_frames": "int",
    "slo_ttff_s": "number",
    "slo_fps": "number",
}
OPEN = {"type": "open", "protocol": PROTOCOL, "prompt": "a red fox", "mode": "v2v", "steps": 1}
UPDATE = {"type": "update", "prompt": "a blue cat"}


def expects_error(obj) -> bool:
    """False only for what could be a valid message (a known type with known fields): those may or may not fail."""
    if not isinstance(obj, dict) or obj.get("type") not in CLIENT_TYPES:
        return True
    return not set(obj) <= FIELDS[obj["type"]]


def _as_text(obj) -> tuple[str, bool]:
    return json.dumps(obj), expects_error(obj)


def _not_json(text: str) -> tuple[str, bool]:
    try:
        return text, expects_error(json.loads(text))
    except ValueError:
        return text, True


@st.composite
def wrong_field(draw, base: dict):
    """``base`` with one field of the wrong type, or an unknown field."""
    msg = dict(base)
    fields = sorted(FIELDS[base["type"]] - {"type"})
    if fields and draw(st.booleans()):
        name = draw(st.sampled_from(fields))
        msg[name] = draw(WRONG[FIELD_TYPES[name]])
    else:
        name = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS[base["type"]]))
        msg[name] = draw(JSON)
    return json.dumps(msg), True


TEXT = st.one_of(
    st.text(max_size=40).map(_not_json),
    JSON.map(_as_text),
    st.dictionaries(st.sampled_from(["type", "prompt", "steps", "seed", "x"]), JSON, max_size=4).map(_as_text),
    st.sampled_from(CLIENT_TYPES).flatmap(lambda t: wrong_field({"type": t} if t != "open" else OPEN)),
    wrong_field(UPDATE),
    st.integers(LIMITS.max_text_bytes + 1, 2 * LIMITS.max_text_bytes).map(lambda n: ('"' + "x" * n + '"', True)),
)

GOOD_JPEG = encode_frame(np.full((SIZE, SIZE, 3), 100, np.uint8), "jpeg", 90)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(buf, format="PNG")
    return buf.getvalue()


def header_bytes(magic=MAGIC, version=VERSION, kind=KIND_INPUT, fmt=1, width=SIZE, height=SIZE) -> bytes:
    return HEADER.pack(magic, version, kind, fmt, 0, 0, 0, 0, 0, 1, width, height)


U8, U16 = st.integers(0, 255), st.integers(0, 65535)
FRAMES = st.one_of(
    st.binary(max_size=64).map(lambda b: (b, True)),  # no header, or not ours
    st.binary(min_size=4, max_size=4)
    .filter(lambda m: m != MAGIC)
    .map(lambda m: (header_bytes(magic=m) + GOOD_JPEG, True)),
    U8.filter(lambda v: v != VERSION).map(lambda v: (header_bytes(version=v) + GOOD_JPEG, True)),
    U8.filter(lambda k: k != KIND_INPUT).map(lambda k: (header_bytes(kind=k) + GOOD_JPEG, True)),
    st.integers(3, 255).map(lambda f: (header_bytes(fmt=f) + GOOD_JPEG, True)),
    st.tuples(U16, U16)
    .filter(lambda wh: wh != (SIZE, SIZE))
    .map(lambda wh: (header_bytes(width=wh[0], height=wh[1]) + GOOD_JPEG, True)),
    st.binary(max_size=256).map(lambda b: (header_bytes() + b, True)),  # a JPEG that is no JPEG
    st.integers(0, len(GOOD_JPEG) - 1).map(lambda n: (header_bytes() + GOOD_JPEG[:n], True)),  # truncated
    st.just((header_bytes() + _png(), True)),  # another image format under the JPEG code
    st.sampled_from([0, 2]).flatmap(lambda f: st.binary(max_size=64).map(lambda b: (header_bytes(fmt=f) + b, True))),
    # Over the frame limit but under the websocket layer's (2 x the largest limit): above that the connection is
    # closed with 1009 before the server can answer, which is the transport's job, not this test's.
    st.integers(LIMITS.max_frame_bytes + 1, LIMITS.transport_bytes(SIZE * SIZE) - HEADER.size).map(
        lambda n: (header_bytes() + bytes(n), True)
    ),
    # A flipped byte may still decode (JPEG is forgiving): no error required, only no failure.
    st.tuples(st.integers(0, len(GOOD_JPEG) - 1), st.integers(1, 255)).map(
        lambda iv: (
            header_bytes() + GOOD_JPEG[: iv[0]] + bytes([GOOD_JPEG[iv[0]] ^ iv[1]]) + GOOD_JPEG[iv[0] + 1 :],
            False,
        )
    ),
    st.just((pack_frame(FrameHeader(KIND_INPUT, "jpeg", 0, 0, 0, 0, 1, SIZE, SIZE), GOOD_JPEG), False)),  # valid
)


def test_fuzzed_messages_and_frames_get_errors_and_the_server_survives(server):
    url, engine = server
    sent = []
    problems = []

    def exchange(ws, message, must_fail: bool, counter: list[int]) -> None:
        counter[0] += 1
        sentinel = f"sentinel-{counter[0]}"
        ws.send(message)
        ws.send(json.dumps({"type": sentinel}))
        answers = []
        while True:
            item = receive(ws)
            if isinstance(item, dict) and item["type"] == "error" and sentinel in item["message"]:
                break
            answers.append(item)
        errors = [a for a in answers if isinstance(a, dict) and a["type"] == "error"]
        bad = [e for e in errors if e["fatal"] or e["code"] == "internal_error"]
        bad += [a for a in answers if isinstance(a, dict) and a["type"] == "closed" and a["reason"] == "error"]
        if bad or (must_fail and not errors):
            problems.append((message if isinstance(message, str) else message[:64], answers))
        sent.append(message)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same cases on every run: a CI failure reproduces
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(
        with_session=st.booleans(),
        batch=st.data(),
    )
    def run(with_session: bool, batch) -> None:
        items = batch.draw(
            st.lists(st.one_of(TEXT, FRAMES) if with_session else TEXT, min_size=BATCH[0], max_size=BATCH[1])
        )
        counter = [0]
        with open_ws(url) as ws:
            assert receive(ws)["type"] == "hello"
            if with_session:
                ws.send(json.dumps(dict(OPEN, height=SIZE, width=SIZE)))
                while not (isinstance(event := receive(ws), dict) and event["type"] == "opened"):
                    pass
            for message, must_fail in items:
                exchange(ws, message, must_fail, counter)
        assert problems == [], problems[:3]

    run()
    assert len(sent) >= MIN_MESSAGES, len(sent)
    assert sum(isinstance(m, bytes) for m in sent) >= 200  # frames as well as control messages

    # Still alive: health is OK, the engine loop runs, and a fresh connection streams.
    health_url = url.replace("ws://", "http://").replace("/ws", "/health")
    with urllib.request.urlopen(health_url, timeout=WAIT_S) as response:
        assert json.loads(response.read())["status"] == "ok"
    assert engine.alive and engine.failure is None
    with open_ws(url) as ws:
        receive(ws)
        ws.send(json.dumps({"type": "open", "prompt": "a red fox", "steps": 1}))
        while not (isinstance(item := receive(ws), dict) and item["type"] == "chunk"):
            assert not (isinstance(item, dict) and item["type"] == "error"), item
    # A text message that is not UTF-8 breaks the websocket protocol itself: that connection is closed (1007),
    # the server goes on.
    with open_ws(url) as ws:
        receive(ws)
        ws.send(b"\xff\xfe{", text=True)
        with pytest.raises(Exception, match="1007"):
            receive(ws)
    assert engine.alive and engine.metrics()["outboxes"]["max_unsent_chunks"] <= 1
