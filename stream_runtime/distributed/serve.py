"""The websocket server with its engine over N pipeline stages of one host (one process per GPU, or gloo processes
on a CPU)::

    torchrun --nproc_per_node=4 -m stream_runtime.distributed.serve --model Wan2.1-T2V-1.3B-Diffusers \\
        --checkpoint self_forcing_dmd.pt --port 7860
    torchrun --nproc_per_node=2 -m stream_runtime.distributed.serve --no-app      # the tiny model on a CPU

Takes the arguments of ``stream-runtime serve`` plus the stage options below. Rank 0 runs the HTTP/websocket
server and the engine; its sessions run on the ring of stages (:mod:`.ring`), the other ranks run the stage loop.
What is supported: text-to-video sessions on the stream batch (stride N), one at a time (``--max-sessions 1``,
others get "busy"), prompt switches without blending; no step or strength updates, no video-to-video, no SLO
scheduler. Every wait on another rank is bounded by ``--timeout``; a dead or hung rank ends the server: clients get
an ``error`` event, every rank exits non-zero. Ctrl-C (or SIGTERM) on rank 0 closes the sessions and ends every
rank with exit status 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from stream_runtime.serving.api import SessionUpdate
from stream_runtime.serving.auth import resolve_token
from stream_runtime.serving.engine import Engine, EngineConfig
from stream_runtime.serving.outbox import Event, Outbox
from stream_runtime.serving.server import build_app, create_server, run_until_stopped, urls

from .comm import Channel
from .generate import init_process_group, load
from .ring import StageRing, run_stage_loop

log = logging.getLogger("stream_runtime.distributed")

FAILURE_FLUSH_S = 5.0
"""After the ring fails: how long the server waits for clients to be sent the error before it exits."""
FLUSH_POLL_S = 0.02
"""How often it looks whether those error events are out (an outbox has no waitable "sent" signal)."""


class _RingPipe:
    """The pipeline as the engine sees it: sessions open on the ring, configs are the ring's stream batch."""

    def __init__(self, pipe, ring: StageRing) -> None:
        self._pipe, self._ring = pipe, ring

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def stream_config(self, mode: str = "t2v", **overrides):
        return self._ring.stream_config(self._pipe.stream_config(mode, **overrides))

    def session(self, prompt: str, seed: int = 0, mode: str = "t2v", height=None, width=None, config=None):
        if mode != "t2v":
            raise ValueError(f"sessions over pipeline stages are text-to-video only (mode 't2v'), got {mode!r}")
        dh, dw = self._pipe.default_resolution
        config = self.stream_config(mode) if config is None else config
        return self._ring.open(prompt, seed, height or dh, width or dw, config)


class RingEngine(Engine):
    """The serving engine with its sessions on a :class:`StageRing`: refuses what the ring cannot do at the API
    (so a client gets a non-fatal ``bad_params``), tells clients the ring's layout, and reports a broken ring to
    every connected client."""

    def __init__(self, pipe, ring: StageRing, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig(max_sessions=1)
        if config.max_sessions != 1:
            raise ValueError(
                f"max_sessions must be 1 over pipeline stages (one session at a time), got {config.max_sessions}"
            )
        if config.scheduler != "round_robin":
            raise ValueError(f"scheduler must be 'round_robin' over pipeline stages, got {config.scheduler!r}")
        if config.max_sessions_per_forward != 1:
            raise ValueError(
                f"max_sessions_per_forward must be 1 over pipeline stages, got {config.max_sessions_per_forward}"
            )
        super().__init__(_RingPipe(pipe, ring), config)
        self.ring = ring

    def update(self, sid: int, update: SessionUpdate) -> None:
        fields = ("steps", "timesteps", "strength", "guidance_scale")
        fixed = [name for name in fields if getattr(update, name) is not None]
        if fixed:
            raise ValueError(f"{fixed} cannot change on a session over pipeline stages; open a new session")
        if update.blend_chunks:
            raise ValueError("prompt blending is not supported over pipeline stages: send blend_chunks 0 or none")
        super().update(sid, update)

    def _describe(self, live, memory_bytes: int) -> dict:
        described = super()._describe(live, memory_bytes)
        described["stages"] = self.ring.world
        described["switch_delay_chunks"] = live.session.switch_delay_chunks
        return described

    def report_failure(self, message: str) -> list[Outbox]:
        """A fatal ``stage_failed`` error to every client; returns their outboxes."""
        with self._lock:
            outboxes = list(self._outboxes)
        for outbox in outboxes:
            outbox.put_event(Event("error", None, {"code": "stage_failed", "message": message, "fatal": True}))
        return outboxes


def _end_after_failure(engine: RingEngine, server, exc: BaseException) -> None:
    """Stop the engine (the session in progress already got its error), tell every client, let the events go out
    (bounded), then stop the server."""
    engine.stop(FAILURE_FLUSH_S)
    outboxes = engine.report_failure(f"the pipeline stages failed, the server stops: {type(exc).__name__}: {exc}")
    deadline = time.monotonic() + FAILURE_FLUSH_S
    while any(o.pending_events() for o in outboxes) and time.monotonic() < deadline:
        time.sleep(FLUSH_POLL_S)
    server.should_exit = True


def serve_rank0(
    pipe,
    ring: StageRing,
    host: str = "127.0.0.1",
    port: int = 7860,
    config: EngineConfig | None = None,
    extra_mount=None,
    app_path: str | None = None,
    token: str | None = None,
    limits=None,
    log_level: str = "warning",
    on_listen=None,
) -> int:
    """Rank 0: serve until Ctrl-C / SIGTERM (then stop every stage: 0) or a failure of the ring (1).
    ``on_listen(port)`` is called once the socket listens (tests pass ``port=0``)."""
    token, generated = resolve_token(host, token)
    engine = RingEngine(pipe, ring, config)
    loopback = host in ("127.0.0.1", "::1", "localhost")
    app = build_app(engine, extra_mount=extra_mount, token=token, limits=limits, named_sources=loopback)
    server, sock = create_server(app, host, port, log_level)

    def failed(exc: BaseException) -> None:  # from the engine or heartbeat thread: stop from another one
        threading.Thread(target=_end_after_failure, args=(engine, server, exc), daemon=True).start()

    ring.on_failure(failed)
    ring.start()
    bound = sock.getsockname()[1]
    print(f"stream-runtime serving over {ring.world} pipeline stages (one session at a time)")
    for name, url in urls(host, bound, app_path, token if generated else None).items():
        print(f"  {name + ':':<10} {url}")
    print("Press Ctrl-C to stop.", flush=True)
    if on_listen is not None:
        on_listen(bound)
    try:
        run_until_stopped(server, sock, engine)
    finally:
        try:
            ring.stop()
        except Exception:  # recorded as ring.failure
            pass
    if ring.failure is not None:
        print(f"error: the pipeline stages failed: {ring.failure}", file=sys.stderr)
        return 1
    print("stopped: sessions closed, every stage ended")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from stream_runtime.apps.cli import add_serve_args

    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N -m stream_runtime.distributed.serve", description=__doc__.split("\n")[0]
    )
    add_serve_args(parser)
    parser.set_defaults(max_sessions=1)
    g = parser.add_argument_group("pipeline stages")
    g.add_argument("--bounds", help="inner block boundaries of the stages, e.g. 10,20 for 3 stages (default: even)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds any wait on another rank may take")
    g.add_argument(
        "--lookahead",
        type=int,
        help="forwards rank 0 sends ahead of the chunk it hands out (default N-1: every stage busy; 0: prompt "
        "switches act as on one process, but the stages take turns)",
    )
    g.add_argument("--tiny-layers", type=int, default=2, dest="tiny_layers", help="blocks of the built-in tiny model")
    return parser


def main(argv: list[str] | None = None) -> int:
    from stream_runtime.apps.cli import serve_settings

    args = build_parser().parse_args(argv)
    try:
        if args.max_sessions != 1:
            raise ValueError(f"--max-sessions must be 1 over pipeline stages, got {args.max_sessions}")
        if args.scheduler != "round_robin":
            raise ValueError(f"--scheduler must be round_robin over pipeline stages, got {args.scheduler}")
        if args.timeout <= 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
        settings = serve_settings(args)  # every rank checks, so that a bad argument ends them all at once
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank, world, device = init_process_group(args.timeout)
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    code = 1
    try:
        if world < 2:
            raise ValueError("run at least 2 processes (torchrun --nproc_per_node=N, N >= 2); for one, use serve")
        bounds = None if args.bounds is None else tuple(int(b) for b in args.bounds.split(","))
        pipe = load(args, device)
        channel = Channel(rank, device, args.timeout)
        channel.all_gather(torch.zeros(1), "the start (every rank has loaded the model)")
        if rank == 0:
            code = serve_rank0(pipe, StageRing(pipe, world, channel, args.lookahead, bounds), **settings)
        else:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches all: rank 0 ends the stages
            served = run_stage_loop(pipe, rank, world, channel, bounds)
            log.info("stopped by rank 0 after %d sessions", served)
            code = 0
    finally:
        if code == 0:
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
