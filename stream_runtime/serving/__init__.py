"""Serving: the engine that owns the GPU and schedules every session's chunks, the websocket server speaking
``stream-runtime/1`` (docs/protocol.md), and a Python client.

- :mod:`.engine`: ``Engine`` (synchronous loop in one thread, round-robin at chunk granularity, admission).
- :mod:`.scheduler`, :mod:`.cost_model`, :mod:`.slo`: the SLO-aware scheduler (``EngineConfig(scheduler="slo")``):
  per-session targets, measured costs, sequential or stream-batch denoising per chunk, violation reports.
- :mod:`.api`: its public types: ``EngineConfig``, ``SessionRequest``, ``SessionUpdate``, ``EngineBusy``.
- :mod:`.outbox`: the per-client single-slot handoff (a slow client gets the newest chunk; drops are counted).
- :mod:`.metrics`: TTFF, FPS, jitter, latency percentiles, drops; Prometheus text.
- :mod:`.protocol`: the wire format (JSON control messages, 28-byte binary frame header).
- :mod:`.server`: ``build_app`` (FastAPI: ``/ws``, ``/metrics``, ``/health``) and ``serve``.
- :mod:`.auth`: the token a server beyond loopback requires (``TokenAuth`` middleware).
- :mod:`.limits`: ``ClientLimits`` (message sizes, frame dimensions, message rate) and the ``TokenBucket``.
- :mod:`.client`: ``python -m stream_runtime.serving.client --url ws://127.0.0.1:7860/ws --prompt ... --out x.mp4``.
- :mod:`.load`: a load generator (concurrent clients, some slow readers), for bench/bench_serving_load.py.

The server needs fastapi and uvicorn, the client websockets; they are imported only when used.
"""

from stream_runtime.serving.engine import (
    Engine,
    EngineBusy,
    EngineConfig,
    EngineStopped,
    SessionRequest,
    SessionUpdate,
    SLOInfeasible,
)
from stream_runtime.serving.limits import ClientLimits
from stream_runtime.serving.outbox import ChunkOutput, Event, Outbox
from stream_runtime.serving.protocol import PROTOCOL

__all__ = [
    "PROTOCOL",
    "ChunkOutput",
    "ClientLimits",
    "Engine",
    "EngineBusy",
    "EngineConfig",
    "EngineStopped",
    "Event",
    "Outbox",
    "SessionRequest",
    "SessionUpdate",
    "SLOInfeasible",
    "build_app",
    "serve",
]


def __getattr__(name: str):
    # The server pulls in fastapi/uvicorn; import it only when asked for.
    if name in ("build_app", "serve"):
        from stream_runtime.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'stream_runtime.serving' has no attribute {name!r}")
