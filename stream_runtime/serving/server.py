"""The thin asyncio front end over an :class:`~stream_runtime.serving.engine.Engine`: a FastAPI app with the
websocket protocol (``/ws``, see docs/protocol.md), ``GET /metrics`` (Prometheus text), ``GET /health`` and
``GET /recordings/{name}`` (the MP4 of a session opened with ``record: true``). With a token, every route but
``/health`` needs it (:mod:`.auth`); every connection is held to :class:`~.limits.ClientLimits`.

The event loop never waits on the engine. Per connection there are two tasks: the receive loop turns client
messages into engine calls (which only enqueue), and one sender task owns every write to the socket, woken by the
engine thread through ``loop.call_soon_threadsafe`` and reading the connection's single-slot outbox. Frame
encoding (JPEG) and input decoding run in worker threads, and only for chunks that are actually sent.

Example::

    from stream_runtime.serving import serve
    serve(StreamPipeline.tiny_random(), port=7860)            # Ctrl-C stops it cleanly

    app = build_app(engine, extra_mount=lambda app: gradio.mount_gradio_app(app, blocks, path="/ui"))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from stream_runtime.serving.auth import TOKEN_QUERY, TokenAuth, check_token, resolve_token
from stream_runtime.serving.engine import Engine, EngineBusy, EngineConfig, EngineStopped
from stream_runtime.serving.limits import ClientLimits, TokenBucket
from stream_runtime.serving.outbox import ChunkOutput, Event
from stream_runtime.serving.protocol import (
    FORMATS,
    KIND_INPUT,
    PROTOCOL,
    OutputFormat,
    ProtocolError,
    decode_frame,
    encode_chunk,
    parse_message,
    parse_open,
    parse_update,
    unpack_frame,
)
from stream_runtime.serving.understand import UNDERSTAND_MODE, UnderstandSession, UnderstandSlots, open_understand
from stream_runtime.video_io import VideoWriter

logger = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

RECORDINGS_KEPT = 16
"""Finished recordings a server keeps for download; when one more finishes, the oldest is deleted."""
DEFAULT_TRANSPORT_BYTES = 64 * 2**20
"""Websocket message size limit of an app that :func:`build_app` did not make (its limits are unknown)."""
CLOSE_TIMEOUT_S = 5.0
"""How long closing a connection that broke a limit may wait for the client (one that does not read never acks)."""


def build_app(
    engine: Engine,
    extra_mount: Callable[[FastAPI], Any] | None = None,
    *,
    token: str | None = None,
    limits: ClientLimits | None = None,
    named_sources: bool = True,
) -> FastAPI:
    """The FastAPI app serving ``engine``. Its lifespan starts the engine and, at shutdown, stops it (sessions
    closed, thread joined, CUDA cache emptied).

    ``extra_mount(app)`` is called last, so a UI can be mounted on the same app and port, e.g. Gradio:
    ``lambda app: gradio.mount_gradio_app(app, blocks, path="/")``. Its return value, if not None, replaces the
    app. The routes ``/ws``, ``/metrics``, ``/health`` and ``/recordings/`` are registered first, so they win over a
    mount at ``/``. ``app.state.token`` tells a mounted UI the token its page must send.

    ``token``: every route but ``/health`` (the mounted UI included) needs it (see :mod:`.auth`); None: none does.
    ``limits``: what each websocket client may send (default :class:`ClientLimits`).
    ``named_sources``: whether understand sessions may name a file or URL for the server to read (else clients
    push frames); :func:`serve` allows it on loopback only.
    """
    if token is not None:
        check_token(token)
    limits = limits or ClientLimits()
    recordings = Recordings()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)  # joining the engine thread must not block the event loop
            recordings.cleanup()

    app = FastAPI(title="stream-runtime", lifespan=lifespan)
    app.state.engine = engine
    app.state.recordings = recordings
    app.state.token = token
    app.state.limits = limits
    app.state.named_sources = named_sources
    understand_slots = UnderstandSlots(engine.config.max_sessions)

    @app.get("/health")
    async def health():
        alive = engine.alive
        body = {"status": "ok" if alive else "unavailable", "protocol": PROTOCOL}
        body["sessions"] = engine.metrics()["sessions_active"]
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.prometheus(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/recordings/{name}")
    async def recording(name: str):
        path = recordings.get(name)
        if path is None:
            message = f"no recording named {name!r}: it never finished, or it was one of the oldest and was deleted"
            return JSONResponse({"error": message}, status_code=404)
        return FileResponse(path, media_type="video/mp4", filename=name)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await Connection(websocket, engine, recordings, limits, named_sources, understand_slots).run()

    if extra_mount is not None:
        mounted = extra_mount(app)
        app = app if mounted is None else mounted
    if token is not None:
        app.add_middleware(TokenAuth, token=token)  # outermost: wraps the mounted UI too
    return app


class Recordings:
    """Finished session recordings, by name (an unguessable token). The files live in a temporary folder made on
    the first recording and removed at shutdown; the ``keep`` newest are kept. Used from the event loop only."""

    def __init__(self, keep: int = RECORDINGS_KEPT) -> None:
        self.keep = keep
        self._dir: pathlib.Path | None = None
        self._done: OrderedDict[str, pathlib.Path] = OrderedDict()

    def new_file(self) -> tuple[str, pathlib.Path]:
        if self._dir is None:
            self._dir = pathlib.Path(tempfile.mkdtemp(prefix="stream-runtime-recordings-"))
        name = f"{secrets.token_urlsafe(12)}.mp4"
        return name, self._dir / name

    def publish(self, name: str, path: pathlib.Path) -> None:
        self._done[name] = path
        while len(self._done) > self.keep:
            self._done.popitem(last=False)[1].unlink(missing_ok=True)

    def get(self, name: str) -> pathlib.Path | None:
        return self._done.get(name)

    def cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self._done.clear()


class SessionRecorder:
    """Writes the frames a connection sent for one session to a fragmented MP4. One worker thread of its own keeps
    the writes in order and the H.264 encoder off the event loop."""

    def __init__(self, name: str, path: pathlib.Path, fps: float) -> None:
        self.name, self.path = name, path
        self._writer = VideoWriter(path, fps=fps)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stream-runtime-record")
        self._failure: BaseException | None = None

    def _write(self, frames) -> None:
        if self._failure is None:
            try:
                self._writer.write(frames)
            except Exception as exc:  # a broken recording must not end the stream; finish() reports it
                self._failure = exc

    def write(self, frames) -> None:
        self._pool.submit(self._write, frames)

    async def finish(self) -> int:
        """Wait for the queued writes, close the file; the frames written (0: no file, or the recording failed)."""
        try:
            await asyncio.wrap_future(self._pool.submit(self._writer.close))
        except Exception as exc:
            self._failure = self._failure or exc
        finally:
            self._pool.shutdown(wait=False)
        if self._failure is not None:
            logger.warning("recording %s failed: %s", self.name, self._failure)
            return 0
        return self._writer.frames_written

    async def discard(self) -> None:
        """Drop the recording (its connection is gone, so nobody can download it): writes not yet started are
        cancelled rather than encoded, the one in progress ends, the file is closed and deleted."""

        def stop() -> None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            with contextlib.suppress(Exception):
                self._writer.close()

        await asyncio.to_thread(stop)
        self.path.unlink(missing_ok=True)


class Connection:
    """One websocket: at most one session at a time (open, ..., closed, then open again if wanted)."""

    def __init__(
        self,
        websocket,
        engine: Engine,
        recordings: Recordings | None = None,
        limits: ClientLimits | None = None,
        named_sources: bool = True,
        understand_slots: UnderstandSlots | None = None,
    ) -> None:
        self.ws = websocket
        self.named_sources = named_sources
        self.understand_slots = understand_slots
        self.understanding: UnderstandSession | None = None
        """The open understand session (then ``sid`` is its id and ``mode`` is "understand")."""
        self.engine = engine
        self.recordings = recordings
        self.limits = limits or ClientLimits()
        self.server_limits = engine.limits()
        self.max_pixels = self.limits.frame_pixels(engine.max_pixels)
        self.max_frame_bytes = self.limits.frame_bytes(engine.max_pixels)
        self.bucket = TokenBucket(self.limits.messages_per_second, self.limits.message_burst)
        self._rate_limited = False  # in a run of dropped messages (one error per run)
        self.recorder: SessionRecorder | None = None
        self.sid: int | None = None
        self.mode: str | None = None
        self.size: tuple[int, int] | None = None
        """(height, width) of the open session: input frames must have it."""
        self.output = OutputFormat()
        wake = self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        # The callback holds the event, not self: the outbox (kept by the engine while a session is open) must not
        # keep the connection alive.
        self.outbox = engine.new_outbox(lambda: loop.call_soon_threadsafe(wake.set))

    async def run(self) -> None:
        await self.ws.accept()
        hello = {"protocol": PROTOCOL, "formats": list(FORMATS), **self.server_limits}
        hello["modes"] = [*hello.get("modes", []), UNDERSTAND_MODE]
        self.outbox.put_event(Event("hello", None, hello))
        sender = asyncio.create_task(self._send_loop())
        overflow = None
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await self._on_message(message)
                if self.outbox.pending_events() > self.limits.max_unsent_events:
                    overflow = f"more than {self.limits.max_unsent_events} events unread (max_unsent_events)"
                    break
        finally:
            if self.understanding is not None:
                self.understanding.abandon()
            elif self.sid is not None:
                self.engine.close(self.sid)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            if self.recorder is not None:  # nobody is left to download it
                await self.recorder.discard()
        if overflow is not None:
            logger.info("closing a websocket that reads nothing: %s", overflow)
            with contextlib.suppress(Exception):  # it may never ack the close; uvicorn drops the transport after us
                await asyncio.wait_for(self.ws.close(code=1008, reason=overflow), CLOSE_TIMEOUT_S)

    # -- client -> server

    def _error(self, code: str, message: str, request: str | None = None) -> None:
        data = {"code": code, "message": message, "fatal": False}
        if request is not None:
            data["request"] = request
        self.outbox.put_event(Event("error", self.sid, data))

    def _need_session(self) -> int:
        if self.sid is None:
            raise ProtocolError("not_open", "no session is open on this connection; send 'open' first")
        return self.sid

    async def _on_message(self, message: dict) -> None:
        """One client message, through the rate limit; nothing a client sends may end the connection."""
        text, data = message.get("text"), message.get("bytes")
        request = "frame" if text is None and data is not None else None
        if not self.bucket.take():
            if not self._rate_limited:  # one error per run of dropped messages: an error per message is a flood too
                self._rate_limited = True
                rate, burst = self.limits.messages_per_second, self.limits.message_burst
                self._error(
                    "rate_limited",
                    f"more than {rate:g} messages a second (bursts of {burst}): this message and the next ones are "
                    f"dropped unread until the rate allows again, in {self.bucket.wait_s():.3f} s",
                    request,
                )
            return
        self._rate_limited = False
        try:
            if text is not None:
                await self._on_text(text)
            elif data is not None:
                await self._on_binary(data)
        except Exception:  # a bug; the client gets an answer and the connection goes on
            logger.exception("handling a client message failed")
            self._error("internal_error", "the server failed on this message (logged there); nothing changed", request)

    async def _on_text(self, text: str) -> None:
        kind = None
        try:
            limit = self.limits.max_text_bytes
            # len() counts characters, each at least one byte: encode only when it could be under the limit.
            size = len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise ProtocolError("too_large", f"text messages must be <= {limit} bytes (UTF-8), got {size}")
            msg = parse_message(text)
            kind = msg["type"]
            if kind == "open":
                if self.sid is not None:
                    raise ProtocolError(
                        "already_open",
                        f"session {self.sid} is open on this connection; close it and wait for 'closed' first",
                    )
                if msg.get("mode") == UNDERSTAND_MODE:
                    self.understanding = await asyncio.to_thread(
                        open_understand, msg, self.outbox, self.named_sources, self.understand_slots
                    )  # a named source is opened (probed) here: off the event loop
                    self.sid, self.mode = self.understanding.id, UNDERSTAND_MODE
                    return
                request, output = parse_open(msg)
                record = msg.get("record", False)
                if not isinstance(record, bool):
                    raise ProtocolError("bad_params", f"record must be true or false, got {record!r}")
                if record and self.recordings is None:
                    raise ProtocolError("bad_params", "this server does not record sessions; open without record")
                self.sid = self.engine.open(request, self.outbox)
                self.mode, self.output = request.mode, output
                limits = self.server_limits
                self.size = (request.height or limits["default_height"], request.width or limits["default_width"])
                if record:
                    self.recorder = SessionRecorder(*self.recordings.new_file(), fps=self.engine.config.fps)
            elif kind in ("update", "pause", "resume") and self.mode == UNDERSTAND_MODE:
                raise ProtocolError(
                    "bad_message",
                    f"{kind!r} is for generation sessions; an understand session takes frames and 'close'",
                )
            elif kind == "close" and self.understanding is not None:
                self.understanding.close()
            elif kind == "update":
                self.engine.update(self._need_session(), parse_update(msg))
            elif kind == "pause":
                self.engine.pause(self._need_session())
            elif kind == "resume":
                self.engine.resume(self._need_session())
            elif kind == "close":
                self.engine.close(self._need_session())
        except ProtocolError as exc:
            self._error(exc.code, str(exc), kind)
        except (EngineBusy, EngineStopped) as exc:
            self._error(exc.code, str(exc), kind)
        except ValueError as exc:
            self._error("bad_params", str(exc), kind)

    async def _on_binary(self, data: bytes) -> None:
        try:
            if len(data) > self.max_frame_bytes:
                raise ProtocolError(
                    "too_large", f"binary messages must be <= {self.max_frame_bytes} bytes, got {len(data)}"
                )
            sid = self._need_session()
            header, payload = unpack_frame(data)
            if header.kind != KIND_INPUT:
                raise ProtocolError(
                    "bad_frame", f"client frames must have kind {KIND_INPUT} (input), got {header.kind}"
                )
            if self.mode not in ("v2v", UNDERSTAND_MODE):
                raise ProtocolError(
                    "bad_frame", "input frames are for video-to-video or understand sessions (open with mode 'v2v')"
                )
            self._check_frame_size(header.width, header.height)
            frame = await asyncio.to_thread(decode_frame, header, payload)
            if self.understanding is not None:
                self.understanding.push(frame, header.frame)
            else:
                self.engine.push_frames(sid, frame)
        except ProtocolError as exc:
            self._error(exc.code, str(exc), "frame")
        except ValueError as exc:
            self._error("bad_frame", str(exc), "frame")

    def _check_frame_size(self, width: int, height: int) -> None:
        """Before any decoding: the declared size must be within the pixel limit and the session's own."""
        if not 0 < width * height <= self.max_pixels:
            raise ProtocolError(
                "bad_frame", f"frames must have 1..{self.max_pixels} pixels (max_pixels), got {width}x{height}"
            )
        if self.size is not None and (height, width) != self.size:
            expected, got = f"{self.size[1]}x{self.size[0]}", f"{width}x{height}"
            raise ProtocolError(
                "bad_frame", f"input frames must be {expected} (width x height, the session's size), got {got}"
            )

    # -- server -> client (the only writer to the socket)

    async def _send_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()  # before take(): a put after this point sets it again
                for item in self.outbox.take():
                    if isinstance(item, ChunkOutput):
                        await self._send_chunk(item)
                    else:
                        await self._send_event(item)
        except asyncio.CancelledError:
            raise
        except Exception:  # the client went away mid-send; the receive loop sees the disconnect
            logger.debug("websocket send failed", exc_info=True)

    async def _send_event(self, event: Event) -> None:
        data = event.to_json()
        if event.type == "opened":
            data["format"], data["quality"] = self.output.format, self.output.quality
            data["record"] = self.recorder is not None
        if event.type == "closed" and event.session == self.sid:
            self.sid = self.mode = self.size = self.understanding = None
            if self.recorder is not None:
                data.update(await self._finish_recording())
        await self.ws.send_text(json.dumps(data))

    async def _send_chunk(self, chunk: ChunkOutput) -> None:
        output = self.output
        messages = await asyncio.to_thread(encode_chunk, chunk.session, chunk, output)
        count, height, width = chunk.frames.shape[:3]
        meta = {
            "type": "chunk",
            "session": chunk.session,
            "chunk": chunk.index,
            "first_frame": chunk.first_frame,
            "frames": count,
            "width": width,
            "height": height,
            "format": output.format,
            "pts_s": chunk.first_frame / self.engine.config.fps,
            "generated_at": chunk.wall_time,
            "sent_at": time.time(),
            "latency_s": chunk.latency_s,
            "queue_wait_s": chunk.queue_wait_s,
            "input_latency_s": chunk.input_latency_s,
            "drops": chunk.drops,
            "dropped_frames": chunk.dropped_frames,
        }
        await self.ws.send_text(json.dumps(meta))
        for message in messages:
            await self.ws.send_bytes(message)
        if self.recorder is not None and chunk.session == self.sid:
            self.recorder.write(chunk.frames)

    async def _finish_recording(self) -> dict:
        recorder, self.recorder = self.recorder, None
        frames = await recorder.finish()
        if frames == 0:
            recorder.path.unlink(missing_ok=True)
            return {"recording": None, "recording_frames": 0}
        self.recordings.publish(recorder.name, recorder.path)
        return {"recording": f"/recordings/{recorder.name}", "recording_frames": frames}


# -- running it


def create_server(app, host: str = "127.0.0.1", port: int = 7860, log_level: str = "warning"):
    """(uvicorn.Server, bound listening socket) for ``app``; run with ``server.run(sockets=[sock])``.

    Binding here (not in uvicorn) makes a taken port a clear ValueError and lets ``port=0`` pick a free one
    (``sock.getsockname()[1]``); connections made before the server runs wait in the listen backlog. The websocket
    message size limit and the sockets' send buffer come from the :class:`ClientLimits` of a :func:`build_app` app.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from exc
    state = getattr(app, "state", None)
    limits = getattr(state, "limits", None) or ClientLimits()
    engine = getattr(state, "engine", None)
    max_size = limits.transport_bytes(engine.max_pixels) if engine is not None else DEFAULT_TRANSPORT_BYTES
    # Accepted sockets inherit these from the listening one. asyncio sets TCP_NODELAY only on sockets whose proto is
    # IPPROTO_TCP, and socket.create_server's is 0: without it, Nagle's algorithm holds a small message (an event,
    # a chunk's frames) until the previous one is acked, 40 ms with a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if limits.send_buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.send_buffer_bytes)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, ws_max_size=max_size)
    return uvicorn.Server(config), sock


def run_until_stopped(server, sock: socket.socket, engine: Engine) -> None:
    """Run ``server`` (from :func:`create_server`) on ``sock`` until it stops (Ctrl-C, SIGTERM, or
    ``server.should_exit`` set from another thread), then stop ``engine`` (sessions closed, thread joined) and close
    ``sock``, also when the server fails.

    uvicorn catches SIGINT and SIGTERM, shuts down gracefully, restores the handlers it found, then raises the signal
    it caught again: a Ctrl-C arrives here as a KeyboardInterrupt and is a normal stop. SIGTERM's default handler
    would end the process right there, before the engine is stopped (and, on rank 0 of the distributed server,
    before the other ranks are told), with a non-zero status; so while the server runs, a SIGTERM handler of ours
    (in the main thread, the only one that can have one) takes it as a normal stop too, then the previous one is
    put back. Any other exception propagates once the engine is stopped.
    """

    def on_sigterm(signum, frame) -> None:
        server.should_exit = True  # also when it comes before uvicorn's handlers are in place

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it caught once its graceful shutdown is done
    finally:
        if main_thread:  # None: a handler set from C, which Python cannot put back; the default one then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        engine.stop()
        sock.close()


def urls(host: str, port: int, app_path: str | None = None, token: str | None = None) -> dict[str, str]:
    """The URLs to print; with ``token`` those that need it carry it as ``?token=``."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    query = "" if token is None else f"?{TOKEN_QUERY}={token}"
    app = {} if app_path is None else {"app": f"http://{shown}:{port}{app_path}{query}"}
    return {
        **app,
        "websocket": f"ws://{shown}:{port}/ws{query}",
        "metrics": f"http://{shown}:{port}/metrics{query}",
        "health": f"http://{shown}:{port}/health",
    }


def serve(
    pipe,
    host: str = "127.0.0.1",
    port: int = 7860,
    config: EngineConfig | None = None,
    extra_mount: Callable[[FastAPI], Any] | None = None,
    log_level: str = "warning",
    app_path: str | None = None,
    token: str | None = None,
    limits: ClientLimits | None = None,
) -> None:
    """Serve ``pipe`` until Ctrl-C or SIGTERM: prints the URLs (``app_path``: where ``extra_mount`` put a UI, e.g.
    "/"), then on either closes the sessions, joins the engine thread, empties the CUDA cache and prints "stopped".

    ``token``: required from clients (see :mod:`.auth`); "auto" makes a random one and prints it in the URLs. A
    ``host`` other than loopback needs one: without it this raises a ValueError before loading anything else.
    """
    token, generated = resolve_token(host, token)
    engine = Engine(pipe, config)
    loopback = host in ("127.0.0.1", "::1", "localhost")
    app = build_app(engine, extra_mount=extra_mount, token=token, limits=limits, named_sources=loopback)
    server, sock = create_server(app, host, port, log_level)
    bound = sock.getsockname()[1]
    print(f"stream-runtime serving {PROTOCOL} (max {engine.config.max_sessions} sessions)")
    for name, url in urls(host, bound, app_path, token if generated else None).items():
        print(f"  {name + ':':<10} {url}")
    if token is not None and not generated:
        print(f"  (every route but /health needs the token: add ?{TOKEN_QUERY}=YOUR_TOKEN, see docs/protocol.md)")
    if host in ("0.0.0.0", "::"):
        print("  (listening on all interfaces: use this machine's address from elsewhere)")
    print("Press Ctrl-C to stop.", flush=True)
    run_until_stopped(server, sock, engine)
    print("stopped: sessions closed, engine thread joined")
