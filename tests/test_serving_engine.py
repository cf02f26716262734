"""The serving engine: round-robin scheduling, single-slot outboxes, admission, failure isolation, metrics.

The tiny random model at 32x32 with one denoising step. Nothing sleeps to synchronise: consumers are woken by the
outboxes' notify callbacks, and the engine's ``step`` counter records the order it generated chunks in.
"""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.pipelines.wan.session import StreamSession
from stream_runtime.serving import (
    ChunkOutput,
    Engine,
    EngineBusy,
    EngineStopped,
    Event,
    Outbox,
    SessionRequest,
    SessionUpdate,
)
from stream_runtime.serving.api import timesteps_for_steps
from stream_runtime.serving.engine import _Live
from stream_runtime.serving.metrics import Metrics, prometheus_text
from stream_runtime.serving.protocol import ProtocolError

SIZE = 32
WAIT_S = 60.0  # a guard against hangs, never a synchronisation


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(height=SIZE, width=SIZE)


def request(prompt="a red fox", **kw) -> SessionRequest:
    return SessionRequest(prompt=prompt, height=SIZE, width=SIZE, steps=1, **kw)


class Collector:
    """Takes everything from its outboxes as it arrives, woken by their notify callbacks (no polling)."""

    def __init__(self, engine: Engine, count: int = 1) -> None:
        self.ready = threading.Semaphore(0)
        self.outboxes = [engine.new_outbox(self.ready.release) for _ in range(count)]
        self.items: list[list] = [[] for _ in range(count)]

    def until(self, predicate) -> None:
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            assert self.ready.acquire(timeout=max(0.0, deadline - time.monotonic())), "timed out waiting"
            for outbox, items in zip(self.outboxes, self.items, strict=True):
                items.extend(outbox.take())

    def chunks(self, i: int = 0) -> list[ChunkOutput]:
        return [x for x in self.items[i] if isinstance(x, ChunkOutput)]

    def events(self, i: int = 0, kind: str | None = None) -> list[Event]:
        return [x for x in self.items[i] if isinstance(x, Event) and kind in (None, x.type)]


def fake_chunk(session=1, index=0, frames=3) -> ChunkOutput:
    return ChunkOutput(session, index, 0, np.zeros((frames, 2, 2, 3), np.uint8), 0.1, index, 0.0, 0.0, 0.0)


# -- outbox (no model)


def test_outbox_keeps_one_chunk_newest_wins_and_events_stay_in_order():
    outbox = Outbox()
    outbox.put_event(Event("opened", 1))
    assert outbox.put_chunk(fake_chunk(index=0, frames=9)) is None
    replaced = outbox.put_chunk(fake_chunk(index=1, frames=12))
    assert replaced.index == 0
    outbox.put_event(Event("updated", 1))
    assert outbox.unsent_chunks() == 1
    items = outbox.take()
    assert [type(x).__name__ for x in items] == ["Event", "ChunkOutput", "Event"]
    chunk = items[1]
    assert (chunk.index, chunk.drops, chunk.dropped_frames) == (1, 1, 9)
    assert chunk.queue_wait_s is not None and chunk.queue_wait_s >= 0
    assert outbox.take() == [] and outbox.get(timeout=0) == []
    # A chunk taken in time is no drop; the counter stays per session.
    outbox.put_chunk(fake_chunk(index=2))
    assert outbox.take()[0].drops == 1
    assert outbox.drops(1) == (1, 9) and outbox.drops(2) == (0, 0)


# -- scheduling


def test_round_robin_gives_sessions_chunks_alternately(make_engine):
    engine = make_engine()
    c = Collector(engine, 2)
    # Both opens are queued before the thread starts, so the first round already holds both sessions.
    a = engine.open(request("a red fox"), c.outboxes[0])
    b = engine.open(request("a blue cat", seed=1), c.outboxes[1])
    engine.start()
    c.until(lambda: all(ch and ch[-1].index >= 3 for ch in (c.chunks(0), c.chunks(1))))
    # step = the engine-wide generation order; drops (if the test thread was slow) skip indices but not the rule.
    assert all(ch.session == a and ch.step == 2 * ch.index for ch in c.chunks(0))
    assert all(ch.session == b and ch.step == 2 * ch.index + 1 for ch in c.chunks(1))
    assert [e.type for e in c.events(0)] == ["opened"]


def test_slow_consumer_gets_the_newest_chunk_and_drops_are_counted(make_engine):
    engine = make_engine()
    puts = threading.Semaphore(0)
    outbox = engine.new_outbox(puts.release)
    sid = engine.open(request(), outbox)
    engine.start()
    delivered = []
    for _ in range(3):
        # Do not consume while the engine puts five things (opened + chunks): the slot must not grow.
        for _ in range(5):
            assert puts.acquire(timeout=WAIT_S)
            assert outbox.unsent_chunks() <= 1
        chunks = [x for x in outbox.take() if isinstance(x, ChunkOutput)]
        assert len(chunks) == 1
        delivered.append(chunks[0])
    seen = {chunk.index for chunk in delivered}
    for i, chunk in enumerate(delivered):
        # Every index this consumer never saw was dropped and counted, with its frames (9 in the first chunk, then 12).
        skipped = [j for j in range(chunk.index) if j not in seen]
        assert chunk.drops == chunk.index - i == len(skipped)
        assert chunk.dropped_frames == sum(9 if j == 0 else 12 for j in skipped)
    assert delivered[0].drops >= 3
    snap = engine.metrics()
    assert snap["chunks_dropped"] >= delivered[-1].drops
    assert snap["sessions"][sid]["dropped_chunks"] >= delivered[-1].drops


def test_sessions_whose_client_is_behind_go_last(make_engine):
    engine = make_engine()  # not started: the test plays the engine thread
    outboxes = [Outbox() for _ in range(3)]
    for sid, outbox in enumerate(outboxes, 1):
        engine._sessions[sid] = _Live(sid, request(), SimpleNamespace(mode="t2v"), outbox)
        engine._order.append(sid)
    outboxes[0].put_chunk(fake_chunk(session=1))  # session 1's client has not taken its last chunk yet
    picks = lambda: [[live.sid for live in engine._pick()] for _ in range(4)]
    assert picks() == [[2], [3], [2], [3]]
    for sid in (2, 3):
        outboxes[sid - 1].put_chunk(fake_chunk(session=sid))
    assert picks() == [[1], [2], [3], [1]]  # all behind: plain round-robin again
    engine._sessions.clear()
    # A chunk finished after its session was closed is counted as dropped: delivered + dropped = generated.
    outboxes[0].discard(fake_chunk(session=1, frames=12))
    assert outboxes[0].drops(1) == (1, 12) and outboxes[0].unsent_chunks() == 1


def test_paused_sessions_and_v2v_without_input_are_not_scheduled(make_engine):
    engine = make_engine()
    c = Collector(engine, 3)
    engine.open(request("a fox"), c.outboxes[0])
    paused = engine.open(request("a cat"), c.outboxes[1])
    v2v = engine.open(request("a dog", mode="v2v"), c.outboxes[2])
    engine.pause(paused)
    engine.start()
    c.until(lambda: c.events(1, "paused") and len(c.chunks(0)) >= 3)
    assert c.chunks(1) == [] and c.chunks(2) == []
    assert c.events(2, "opened")[0].data["input_frames_needed"] == 1
    # One input frame is what the first v2v chunk needs; then four per chunk.
    engine.push_frames(v2v, np.zeros((1, SIZE, SIZE, 3), np.uint8))
    engine.resume(paused)
    c.until(lambda: c.chunks(2) and c.chunks(1))
    assert c.chunks(2)[0].frames.shape == (1, SIZE, SIZE, 3)
    assert c.events(1, "resumed")
    engine.push_frames(v2v, np.zeros((3, SIZE, SIZE, 3), np.uint8))
    engine.push_frames(v2v, np.zeros((1, SIZE, SIZE, 3), np.uint8))
    c.until(lambda: c.chunks(2)[-1].index == 1)
    assert c.chunks(2)[-1].frames.shape == (4, SIZE, SIZE, 3)
    assert c.chunks(2)[-1].input_latency_s >= 0
    engine.push_frames(v2v, np.zeros((1, 16, 16, 3), np.uint8))  # wrong size: an error, the session goes on
    c.until(lambda: c.events(2, "error"))
    error = c.events(2, "error")[0].data
    assert error["code"] == "bad_frame" and not error["fatal"]


def test_update_switches_prompt_and_steps(make_engine):
    engine = make_engine().start()
    c = Collector(engine)
    sid = engine.open(request(), c.outboxes[0])
    c.until(lambda: c.chunks())
    engine.update(sid, SessionUpdate(prompt="a blue cat", blend_chunks=2, steps=2))
    c.until(lambda: c.events(0, "updated"))
    data = c.events(0, "updated")[0].data
    assert data["prompt"] == "a blue cat" and data["timesteps"] == [1000.0, 250.0]
    engine.update(sid, SessionUpdate(strength=0.5))  # fine for the config, used by v2v only
    engine.update(sid, SessionUpdate(timesteps=(500.0, 900.0)))  # not decreasing: the config refuses
    c.until(lambda: c.events(0, "error") and len(c.events(0, "updated")) == 2)
    error = c.events(0, "error")[0].data
    assert error["code"] == "bad_params" and not error["fatal"] and "timesteps" in error["message"]
    first = c.chunks()[-1].index
    c.until(lambda: c.chunks()[-1].index >= first + 2)  # the session keeps streaming
    with pytest.raises(ValueError, match="at least one"):
        engine.update(sid, SessionUpdate())
    with pytest.raises(ValueError, match="blend_chunks needs a prompt"):
        engine.update(sid, SessionUpdate(blend_chunks=2))


# -- admission and failures


def test_admission_by_session_count_and_memory_budget(make_engine, pipe):
    engine = make_engine(max_sessions=1)
    c = Collector(engine)
    first = engine.open(request(), c.outboxes[0])
    with pytest.raises(EngineBusy, match="max_sessions"):
        engine.open(request(), engine.new_outbox())
    assert engine.metrics()["sessions_rejected"] == 1
    engine.start()
    engine.close(first)
    c.until(lambda: c.events(0, "closed"))
    engine.open(request(), engine.new_outbox())  # the slot is free again

    need = make_engine().estimate_bytes(pipe.stream_config("t2v", timesteps=(1000.0,)), SIZE, SIZE)
    assert need > 0
    tight = make_engine(max_sessions=8, memory_budget_bytes=need * 3 // 2)
    tight.open(request(), tight.new_outbox())
    with pytest.raises(EngineBusy, match="memory budget"):
        tight.open(request(), tight.new_outbox())
    assert tight.metrics()["memory"] == {"budget_bytes": need * 3 // 2, "reserved_bytes": need}


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(steps=0), "steps must be an integer in 1..8"),
        (dict(steps=2, timesteps=(1000.0,)), "not both"),
        (dict(height=30), "height must be a positive multiple of 16"),
        (dict(height=64, width=64), "height \\* width must be <= 1024"),
        (dict(mode="i2v"), "mode must be one of"),
        (dict(seed=-1), "seed must be an integer in 0.."),
        (dict(strength=1.5), "strength must be in"),
    ],
)
def test_bad_parameters_are_value_errors(make_engine, kw, message):
    base = dict(prompt="a fox", height=SIZE, width=SIZE, steps=1) | kw
    with pytest.raises(ValueError, match=message):
        make_engine().open(SessionRequest(**base), Outbox())


@pytest.mark.parametrize(
    "exc,code",
    [
        (RuntimeError("the model broke"), "session_failed"),
        (torch.OutOfMemoryError("CUDA out of memory (simulated)"), "out_of_memory"),
    ],
)
def test_a_failing_session_ends_alone(make_engine, monkeypatch, exc, code):
    real = StreamSession.next_chunk

    def flaky(self):
        if self.prompt == "boom" and self.chunk_index == 1:
            raise exc
        return real(self)

    monkeypatch.setattr(StreamSession, "next_chunk", flaky)
    engine = make_engine()
    c = Collector(engine, 2)
    engine.open(request("a fox"), c.outboxes[0])
    engine.open(request("boom"), c.outboxes[1])
    engine.start()
    c.until(lambda: c.events(1, "closed") and c.chunks(0) and c.chunks(0)[-1].index >= 3)
    error, closed = c.events(1, "error")[0].data, c.events(1, "closed")[0].data
    assert error["code"] == code and error["fatal"] and str(exc) in error["message"]
    assert closed["reason"] == "error" and closed["chunks"] == 1
    assert engine.alive
    snap = engine.metrics()
    assert snap["session_errors"] == 1 and snap["sessions_active"] == 1


def test_stop_closes_sessions_and_refuses_new_ones(make_engine):
    engine = make_engine().start()
    c = Collector(engine)
    engine.open(request(), c.outboxes[0])
    c.until(lambda: c.chunks())
    engine.stop(timeout=WAIT_S)
    assert not engine.alive
    c.until(lambda: c.events(0, "closed"))
    assert c.events(0, "closed")[0].data["reason"] == "shutdown"
    assert engine.metrics()["memory"]["reserved_bytes"] == 0
    with pytest.raises(EngineStopped):
        engine.open(request(), Outbox())


# -- metrics


def test_metrics_snapshot_and_prometheus_text(make_engine):
    engine = make_engine().start()
    c = Collector(engine)
    sid = engine.open(request(), c.outboxes[0])
    c.until(lambda: len(c.chunks()) >= 3)
    snap = engine.metrics()
    session = snap["sessions"][sid]
    assert session["ttff_s"] > 0 and session["fps"] > 0 and session["jitter_s"] >= 0
    assert snap["latency"]["chunk_latency_s"]["count"] >= 3 and snap["latency"]["ttff_s"]["count"] == 1
    assert snap["latency"]["chunk_latency_s"]["p50"] > 0
    text = engine.prometheus()
    for name in (
        "stream_runtime_sessions_active 1",
        "# TYPE stream_runtime_chunk_latency_seconds summary",
        'stream_runtime_chunk_latency_seconds{quantile="0.99"}',
        "stream_runtime_queue_wait_seconds_count",
        "stream_runtime_time_to_first_frame_seconds_sum",
        "stream_runtime_chunks_dropped_total",
        f'stream_runtime_session_fps{{session="{sid}",mode="t2v"}}',
        "stream_runtime_memory_budget_bytes NaN",
    ):
        assert name in text


def test_metrics_rates_from_a_fake_clock():
    now = [0.0]
    metrics = Metrics(clock=lambda: now[0])
    metrics.session_opened(7, "t2v")
    for t, frames in ((1.0, 9), (1.75, 12), (2.5, 12), (3.5, 12)):
        now[0] = t
        metrics.chunk_generated(7, 0.5, frames)
        metrics.chunk_delivered(7, frames, queue_wait_s=0.01, end_to_end_s=0.5)
    s = metrics.snapshot()["sessions"][7]
    assert s["ttff_s"] == 1.0
    assert s["fps"] == pytest.approx(36 / 2.5)
    assert s["jitter_s"] == pytest.approx(np.std([0.75 / 12, 0.75 / 12, 1.0 / 12]))
    assert "stream_runtime_frames_total 45" in prometheus_text(metrics.snapshot())


def test_steps_spread_over_the_default_range():
    assert timesteps_for_steps((1000.0, 750.0, 500.0, 250.0), 4) == (1000.0, 750.0, 500.0, 250.0)
    assert timesteps_for_steps((1000.0, 750.0, 500.0, 250.0), 2) == (1000.0, 250.0)
    assert timesteps_for_steps((700.0, 500.0), 3) == (700.0, 600.0, 500.0)
    assert timesteps_for_steps((1000.0,), 1) == (1000.0,)
    assert timesteps_for_steps((1000.0,), 2) == (1000.0, 500.0)


def test_open_asks_for_an_early_first_frame(make_engine):
    """The protocol's early_first_frame reaches the session's config (the split itself: test_early_first_frame.py)."""
    from stream_runtime.serving.protocol import parse_open

    engine = make_engine()
    req, _ = parse_open(
        {"type": "open", "prompt": "a red fox", "height": SIZE, "width": SIZE, "early_first_frame": True}
    )
    assert engine.resolve(req)[0].early_first_frame
    assert not engine.resolve(request())[0].early_first_frame
    with pytest.raises(ProtocolError, match="early_first_frame"):
        parse_open({"type": "open", "prompt": "a red fox", "early_first_frame": "yes"})
