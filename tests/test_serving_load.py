"""Load on a real uvicorn server: 6 fast and 2 slow websocket clients at once for a few seconds (the short CI form of
bench/bench_serving_load.py). Asserted on counts, never on wall-clock rates, so that a loaded 2-core machine passes:

- memory stays bounded: no outbox ever holds more than one chunk, events do not pile up, RSS does not run away;
- every chunk is accounted for: for each session, the chunks its client received plus those the server dropped for it
  equal the chunks generated (``closed``), and the slow clients get fewer than the fast ones;
- slow clients cost the fast ones little: once their socket buffers are full (the second half of the run), the fast
  sessions get at least ``FAST_SHARE`` of the chunks the engine makes (plain round-robin would give them 6/8).

Frames are raw RGBA (4 KiB at 32x32, a chunk ~50 KiB) and the server's send buffer is small, so that a slow reader's
socket fills within a chunk or two, as a full-size stream's would.
"""

import asyncio
import resource
import threading
import time

import pytest

from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.serving import Engine, EngineConfig
from stream_runtime.serving.limits import ClientLimits
from stream_runtime.serving.load import run_clients
from stream_runtime.serving.server import build_app, create_server

SIZE = 32
FAST, SLOW = 6, 2
CHUNKS = 10
"""The run ends when every fast client has received this many chunks (or after MAX_SECONDS)."""
MAX_SECONDS = 90.0
SLOW_INTERVAL_S = 1.0
SAMPLE_S = 0.2
FAST_SHARE = 0.85
RSS_GROWTH_LIMIT = 256 * 2**20


@pytest.fixture(scope="module")
def server():
    engine = Engine(StreamPipeline.tiny_random(height=SIZE, width=SIZE), EngineConfig(max_sessions=FAST + SLOW))
    limits = ClientLimits(send_buffer_bytes=16 * 2**10)
    uvicorn_server, sock = create_server(build_app(engine, limits=limits), "127.0.0.1", 0)
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"ws://127.0.0.1:{sock.getsockname()[1]}/ws", engine
    uvicorn_server.should_exit = True
    thread.join(timeout=30)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def test_slow_readers_cost_the_fast_ones_little_and_every_chunk_is_accounted_for(server):
    url, engine = server
    samples = []  # (time, {session: chunks generated}, outbox stats)
    done = threading.Event()

    def monitor() -> None:
        while not done.wait(SAMPLE_S):
            snap = engine.metrics()
            chunks = {sid: s["chunks"] for sid, s in snap["sessions"].items()}
            samples.append((time.monotonic(), chunks, snap["outboxes"]))

    rss_before = max_rss_bytes()
    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    try:
        until = lambda rs: all(r.chunks_received >= CHUNKS for r in rs if not r.slow)
        results = asyncio.run(run_clients(url, FAST, SLOW, MAX_SECONDS, SLOW_INTERVAL_S, until, fmt="rgba"))
    finally:
        done.set()
        watcher.join()

    # Bounded memory: the single slot held, nobody's events piled up, and no large growth of the process.
    assert max(s[2]["max_unsent_chunks"] for s in samples) <= 1
    assert max(s[2]["max_pending_events"] for s in samples) <= 4
    assert max_rss_bytes() - rss_before < RSS_GROWTH_LIMIT

    fast = [r for r in results if not r.slow]
    slow = [r for r in results if r.slow]
    summary = [(r.name, r.chunks_received, r.dropped_chunks, r.chunks_generated) for r in results]
    for r in results:
        assert r.errors == [] and r.accounted, summary
    assert min(r.chunks_received for r in fast) > max(r.chunks_received for r in slow), summary

    # The fast sessions' share of what the engine generated in the second half of the time all sessions were open
    # (by then the slow clients' sockets are full).
    sessions = {r.session for r in results}
    together = [s for s in samples if sessions <= set(s[1])]
    half = next(s for s in together if s[0] >= (together[0][0] + together[-1][0]) / 2)
    last = together[-1]
    fast_ids = {r.session for r in fast}
    delta = {sid: last[1][sid] - half[1][sid] for sid in sessions}
    generated = sum(delta.values())
    share = sum(v for sid, v in delta.items() if sid in fast_ids) / generated
    assert generated > 0 and share >= FAST_SHARE, (share, delta, summary)
