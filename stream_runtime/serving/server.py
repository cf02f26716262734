"""The thin asyncio front end over an :class:`~stream_runtime.serving.engine.Engine`: a FastAPI app with the
websocket protocol (``/ws``, see docs/protocol.md), ``GET /metrics`` (Prometheus text), ``GET /health`` and
``GET /recordings/{name}`` (the MP4 of a session opened with ``record: true``).

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
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from stream_runtime.serving.engine import Engine, EngineBusy, EngineConfig, EngineStopped
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
from stream_runtime.video_io import VideoWriter

logger = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

RECORDINGS_KEPT = 16
"""Finished recordings a server keeps for download; when one more finishes, the oldest is deleted."""


def build_app(engine: Engine, extra_mount: Callable[[FastAPI], Any] | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``. Its lifespan starts the engine and, at shutdown, stops it (sessions
    closed, thread joined, CUDA cache emptied).

    ``extra_mount(app)`` is called last, so a UI can be mounted on the same app and port, e.g. Gradio:
    ``lambda app: gradio.mount_gradio_app(app, blocks, path="/")``. Its return value, if not None, replaces the
    app. The routes ``/ws``, ``/metrics``, ``/health`` and ``/recordings/`` are registered first, so they win over a
    mount at ``/``.
    """

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
        await Connection(websocket, engine, recordings).run()

    if extra_mount is not None:
        mounted = extra_mount(app)
        app = app if mounted is None else mounted
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


class Connection:
    """One websocket: at most one session at a time (open, ..., closed, then open again if wanted)."""

    def __init__(self, websocket, engine: Engine, recordings: Recordings | None = None) -> None:
        self.ws = websocket
        self.engine = engine
        self.recordings = recordings
        self.recorder: SessionRecorder | None = None
        self.sid: int | None = None
        self.mode: str | None = None
        self.output = OutputFormat()
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.outbox = engine.new_outbox(lambda: loop.call_soon_threadsafe(self._wake.set))

    async def run(self) -> None:
        await self.ws.accept()
        hello = {"protocol": PROTOCOL, "formats": list(FORMATS), **self.engine.limits()}
        self.outbox.put_event(Event("hello", None, hello))
        sender = asyncio.create_task(self._send_loop())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is not None:
                    await self._on_text(message["text"])
                elif message.get("bytes") is not None:
                    await self._on_binary(message["bytes"])
        finally:
            if self.sid is not None:
                self.engine.close(self.sid)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            if self.recorder is not None:  # nobody is left to download it
                await self.recorder.finish()
                self.recorder.path.unlink(missing_ok=True)

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

    async def _on_text(self, text: str) -> None:
        kind = None
        try:
            msg = parse_message(text)
            kind = msg["type"]
            if kind == "open":
                if self.sid is not None:
                    raise ProtocolError(
                        "already_open",
                        f"session {self.sid} is open on this connection; close it and wait for 'closed' first",
                    )
                request, output = parse_open(msg)
                record = msg.get("record", False)
                if not isinstance(record, bool):
                    raise ProtocolError("bad_params", f"record must be true or false, got {record!r}")
                if record and self.recordings is None:
                    raise ProtocolError("bad_params", "this server does not record sessions; open without record")
                self.sid = self.engine.open(request, self.outbox)
                self.mode, self.output = request.mode, output
                if record:
                    self.recorder = SessionRecorder(*self.recordings.new_file(), fps=self.engine.config.fps)
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
            sid = self._need_session()
            header, payload = unpack_frame(data)
            if header.kind != KIND_INPUT:
                raise ProtocolError(
                    "bad_frame", f"client frames must have kind {KIND_INPUT} (input), got {header.kind}"
                )
            if self.mode != "v2v":
                raise ProtocolError("bad_frame", "input frames are for video-to-video sessions (open with mode 'v2v')")
            frame = await asyncio.to_thread(decode_frame, header, payload)
            self.engine.push_frames(sid, frame)
        except ProtocolError as exc:
            self._error(exc.code, str(exc), "frame")
        except ValueError as exc:
            self._error("bad_frame", str(exc), "frame")

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
            self.sid = self.mode = None
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
    (``sock.getsockname()[1]``); connections made before the server runs wait in the listen backlog.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from exc
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, ws_max_size=64 * 2**20)
    return uvicorn.Server(config), sock


def urls(host: str, port: int, app_path: str | None = None) -> dict[str, str]:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    app = {} if app_path is None else {"app": f"http://{shown}:{port}{app_path}"}
    return {
        **app,
        "websocket": f"ws://{shown}:{port}/ws",
        "metrics": f"http://{shown}:{port}/metrics",
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
) -> None:
    """Serve ``pipe`` until Ctrl-C: prints the URLs (``app_path``: where ``extra_mount`` put a UI, e.g. "/"),
    then on Ctrl-C closes the sessions, joins the engine thread and empties the CUDA cache."""
    engine = Engine(pipe, config)
    app = build_app(engine, extra_mount=extra_mount)
    server, sock = create_server(app, host, port, log_level)
    bound = sock.getsockname()[1]
    print(f"stream-runtime serving {PROTOCOL} (max {engine.config.max_sessions} sessions)")
    for name, url in urls(host, bound, app_path).items():
        print(f"  {name + ':':<10} {url}")
    if host in ("0.0.0.0", "::"):
        print("  (listening on all interfaces: use this machine's address from elsewhere)")
    print("Press Ctrl-C to stop.", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it caught once its graceful shutdown is done
    finally:
        engine.stop()
        sock.close()
    print("stopped: sessions closed, engine thread joined")
