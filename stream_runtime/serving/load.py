"""A load generator for the websocket server: concurrent text-to-video clients, some of them slow readers.

A fast client reads every message as it arrives. A slow one reads one message per ``slow_interval_s`` through a
small socket receive buffer (``slow_rcvbuf``), like a client on a slow link: the server's sender blocks on it and
its single-slot outbox drops stale chunks. After ``seconds`` every client sends ``close`` and reads everything left
(at full speed) up to the ``closed`` event, so each session's chunks can be accounted for: the chunk events a client
received plus the chunks the server dropped for it equal the chunks generated for it (``closed.chunks``).

Used by ``bench/bench_serving_load.py`` (a 30 s run against a server process) and ``tests/test_serving_load.py``.

Example::

    results = asyncio.run(run_clients("ws://127.0.0.1:7860/ws", fast=6, slow=2, seconds=30))
    [(r.name, r.fps, r.dropped_chunks, r.accounted) for r in results]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from stream_runtime.serving.protocol import PROTOCOL

DEFAULT_TIMEOUT_S = 60.0
"""Longest wait for any one message before a client gives up (a guard against hangs)."""
POLL_S = 0.05
"""How often clients and the controller look at the stop condition."""


@dataclass
class ClientResult:
    """What one client saw of its session."""

    name: str
    slow: bool
    session: int | None = None
    window_s: float = 0.0
    """Seconds between ``opened`` and the ``close`` the client sent."""
    window_frames: int = 0
    """Frames received in the window."""
    chunks_received: int = 0
    """Chunk events received over the whole session (the drain after ``close`` included)."""
    frames_received: int = 0
    bytes_received: int = 0
    ttff_s: float | None = None
    """From sending ``open`` to the first frame."""
    chunks_generated: int | None = None
    """``closed.chunks``: chunks the engine made for this session."""
    dropped_chunks: int | None = None
    """``closed.dropped_chunks``: chunks the server never sent to this client."""
    errors: list[dict] = field(default_factory=list)

    @property
    def fps(self) -> float:
        """Frames received per second in the window."""
        return self.window_frames / self.window_s if self.window_s > 0 else 0.0

    @property
    def accounted(self) -> bool:
        """Every chunk generated for the session was either received or counted as dropped."""
        return self.chunks_generated is not None and self.chunks_received + self.dropped_chunks == self.chunks_generated

    def to_json(self) -> dict:
        return {**asdict(self), "fps": self.fps, "accounted": self.accounted}


async def _connect(url: str, rcvbuf: int | None, max_queue: int | None):
    from websockets.asyncio.client import connect

    sock = None
    if rcvbuf is not None:  # must be set before connecting: it sets the TCP window the client offers
        parts = urllib.parse.urlsplit(url)
        family = socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    return connect(url, sock=sock, max_size=None, max_queue=max_queue, compression=None, proxy=None)


async def run_client(
    url: str,
    result: ClientResult,
    stop: asyncio.Event,
    slow_interval_s: float | None = None,
    slow_rcvbuf: int | None = 4096,
    prompt: str = "a red fox in the snow",
    steps: int = 1,
    height: int | None = None,
    width: int | None = None,
    fmt: str = "jpeg",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ClientResult:
    """One text-to-video client, filling in ``result`` as it goes, until ``stop`` is set; slow if
    ``slow_interval_s`` is given. ``fmt``: the frames' format (``rgba`` makes a chunk's bytes closer to those of a
    full-size JPEG stream)."""
    slow = slow_interval_s is not None
    connection = await _connect(url, slow_rcvbuf if slow else None, 1 if slow else None)
    async with connection as ws:

        async def receive(timeout: float = timeout_s):
            message = await asyncio.wait_for(ws.recv(), timeout)  # websockets' recv() is safe to cancel
            if isinstance(message, str):
                return json.loads(message)
            result.frames_received += 1
            result.bytes_received += len(message)
            return None

        await receive()  # hello
        request = {"type": "open", "protocol": PROTOCOL, "prompt": prompt, "steps": steps, "seed": 0, "format": fmt}
        request.update({k: v for k, v in dict(height=height, width=width).items() if v is not None})
        sent_at = time.perf_counter()
        await ws.send(json.dumps(request))
        while True:
            event = await receive()
            if event is not None and event["type"] == "error":
                raise RuntimeError(f"{result.name}: the server refused the session: {event}")
            if event is not None and event["type"] == "opened":
                break
        result.session = event["session"]
        opened_at = time.perf_counter()
        deadline = opened_at + timeout_s
        while not stop.is_set():
            try:
                event = await receive(POLL_S)
            except asyncio.TimeoutError:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{result.name}: nothing arrived for {timeout_s} s") from None
                continue
            deadline = time.perf_counter() + timeout_s
            if event is None:
                result.window_frames += 1
                if result.ttff_s is None:
                    result.ttff_s = time.perf_counter() - sent_at
            elif event["type"] == "chunk":
                result.chunks_received += 1
            elif event["type"] == "error":
                result.errors.append(event)
            if slow:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), slow_interval_s)
        result.window_s = time.perf_counter() - opened_at
        await ws.send(json.dumps({"type": "close"}))
        while True:  # the drain, at full speed
            event = await receive()
            if event is None:
                continue
            if event["type"] == "chunk":
                result.chunks_received += 1
            elif event["type"] == "error":
                result.errors.append(event)
            elif event["type"] == "closed":
                result.chunks_generated = event["chunks"]
                result.dropped_chunks = event["dropped_chunks"]
                return result


async def run_clients(
    url: str,
    fast: int,
    slow: int,
    seconds: float,
    slow_interval_s: float = 1.0,
    until: Callable[[list[ClientResult]], bool] | None = None,
    **kw,
) -> list[ClientResult]:
    """``fast`` + ``slow`` clients at once (see :func:`run_client` for ``kw``) for ``seconds``, or until
    ``until(results)`` (a condition on counts, e.g. every fast client received 10 chunks) holds if that is sooner.
    Their results, fast clients first."""
    stop = asyncio.Event()
    results = [ClientResult(f"fast-{i}", False) for i in range(fast)]
    results += [ClientResult(f"slow-{i}", True) for i in range(slow)]
    tasks = [asyncio.create_task(run_client(url, r, stop, slow_interval_s if r.slow else None, **kw)) for r in results]
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and not (until is not None and until(results)):
        done = [t for t in tasks if t.done()]
        if done:  # a client failed: stop the others and raise its exception
            stop.set()
            await asyncio.gather(*tasks)
        await asyncio.sleep(POLL_S)
    stop.set()
    await asyncio.gather(*tasks)
    return results
