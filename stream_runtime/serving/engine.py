"""``Engine``: owns the pipeline (and the GPU) and generates the chunks of every open session in one thread.

::

    client threads / asyncio                     engine thread (synchronous loop)
    ─────────────────────────                    ────────────────────────────────
    open()  ── admission (lock) ──> inbox ──┐    drain inbox: open/update/pause/resume/push
    update/pause/resume/push  ────> inbox ──┤    apply aborts (side channel)
    close() ──> aborts (side channel) + wake┘    pick the next runnable session (round-robin)
                                                 next_chunk() -> outbox.put_chunk()  ──> consumer

Scheduling is round-robin at chunk granularity: every runnable session gets one chunk per round. A session is
runnable when it is not paused and, for video-to-video, when enough input frames are buffered. A session whose last
chunk still waits in its outbox (its client is slow) goes after all the others: it gets only the time they leave.
A failure inside one session (bad parameters, a model exception, ``torch.OutOfMemoryError``) ends that session
with an ``error`` event; the engine and the other sessions go on.

Admission is decided synchronously in :meth:`Engine.open` (an :class:`EngineBusy` at once, never a queue): a
maximum number of sessions and a memory budget against each session's KV-cache bytes (estimated from its config
before it exists, then the cache's ``memory_bytes()``).

With ``EngineConfig.scheduler = "slo"`` an :class:`~stream_runtime.serving.slo.SLOController` replaces the
round-robin pick: sessions go by their targets (time to first frame, frame rate), each chunk runs sequential or
stream-batch denoising as the scheduler decides, admission also refuses infeasible targets
(:class:`SLOInfeasible`), and violations go to the client as ``slo_violation`` events and to the metrics.

Example::

    engine = Engine(StreamPipeline.tiny_random(), EngineConfig(max_sessions=2)).start()
    outbox = engine.new_outbox()
    sid = engine.open(SessionRequest(prompt="a fox in snow", height=32, width=32), outbox)
    for item in outbox.get(timeout=30):   # Event("opened", ...), then ChunkOutput(...)s
        ...
    engine.close(sid)
    engine.stop()
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from stream_runtime.cache import CacheLayout, RollingKVCache
from stream_runtime.config import StreamConfig
from stream_runtime.pipelines.wan.batching import groups, next_chunks, share_key
from stream_runtime.serving.api import (
    MAX_SEED,
    MODES,
    EngineBusy,
    EngineConfig,
    EngineStopped,
    SessionRequest,
    SessionUpdate,
    SLOInfeasible,
    timesteps_for_steps,
)
from stream_runtime.serving.metrics import Metrics, prometheus_text
from stream_runtime.serving.outbox import ChunkOutput, Event, Outbox, outbox_stats
from stream_runtime.serving.scheduler import SLOTargets
from stream_runtime.serving.slo import SLOController

logger = logging.getLogger(__name__)

__all__ = [
    "Engine",
    "EngineBusy",
    "EngineConfig",
    "EngineStopped",
    "SessionRequest",
    "SessionUpdate",
    "SLOInfeasible",
]


# -- commands on the inbox (client threads -> engine thread)


@dataclass
class _Open:
    sid: int
    request: SessionRequest
    config: StreamConfig
    height: int
    width: int
    outbox: Outbox


@dataclass
class _Update:
    sid: int
    update: SessionUpdate


@dataclass
class _Pause:
    sid: int
    paused: bool


@dataclass
class _Push:
    sid: int
    frames: np.ndarray
    arrived_at: float


_WAKE = object()
_STOP = object()


@dataclass
class _Live:
    """An open session as the engine thread sees it."""

    sid: int
    request: SessionRequest
    session: object  # StreamSession
    outbox: Outbox
    paused: bool = False
    inputs: deque = field(default_factory=deque)
    """(frame [H, W, 3], arrival time) of buffered video-to-video input."""


class Engine:
    """Runs every session's chunks in one thread; all public methods are thread-safe and never block on it."""

    def __init__(self, pipe, config: EngineConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.pipe = pipe
        self.config = config or EngineConfig()
        self._clock = clock
        self._metrics = Metrics(clock=clock)
        dh, dw = pipe.default_resolution
        self.max_pixels = self.config.max_pixels or dh * dw
        self.memory_budget = self._memory_budget()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _reserved and _aborts, the state shared with client threads
        self._reserved: dict[int, int] = {}  # admitted session (open or being opened) -> bytes reserved
        self._aborts: set[int] = set()
        self._outboxes: weakref.WeakSet[Outbox] = weakref.WeakSet()  # for metrics; guarded by _lock
        self._ids = itertools.count(1)
        # Engine-thread state.
        self._sessions: dict[int, _Live] = {}
        self._order: deque[int] = deque()
        self._steps = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._shut_down = False
        self._slo = SLOController(pipe, self.config.slo, clock) if self.config.scheduler == "slo" else None
        self.failure: BaseException | None = None
        """The exception that ended the engine loop, if one did (a bug, not a session failure)."""

    def _memory_budget(self) -> int | None:
        if self.config.memory_budget_bytes is not None:
            return self.config.memory_budget_bytes
        device = self.pipe.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * self.config.memory_fraction)
        return None

    # -- lifecycle

    def start(self) -> Engine:
        """Start the engine thread (idempotent). Commands sent before start wait in the inbox."""
        if self._stopping:
            raise EngineStopped("this engine was stopped; create a new one")
        if self._thread is None:
            if self._slo is not None and self.config.slo.calibrate and self._slo.calibration is None:
                self._slo.calibrate()  # before the thread: the first admissions have measured costs to go by
            self._thread = threading.Thread(target=self._run, name="stream-runtime-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Close every session, finish the chunk in progress, join the thread, release cached GPU memory."""
        with self._lock:
            self._stopping = True
        if self._thread is None:
            self._shutdown()
            return
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- client API (any thread)

    def new_outbox(self, notify: Callable[[], None] | None = None) -> Outbox:
        """An outbox wired to this engine's metrics; one per client (it may hold several sessions in turn)."""
        outbox = Outbox(notify, self._metrics, self._clock)
        with self._lock:
            self._outboxes.add(outbox)
        return outbox

    def resolve(self, request: SessionRequest) -> tuple[StreamConfig, int, int]:
        """(config, height, width) of a request with defaults filled in; a ValueError naming a bad field."""
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {request.prompt!r}")
        if request.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {request.mode!r}")
        if not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {request.seed!r}")
        dh, dw = self.pipe.default_resolution
        height = dh if request.height is None else request.height
        width = dw if request.width is None else request.width
        self.pipe.check_resolution(height, width)
        if height * width > self.max_pixels:
            raise ValueError(
                f"height * width must be <= {self.max_pixels} pixels on this server (the model's default is "
                f"{dh}x{dw}), got {height}x{width}"
            )
        overrides = self._step_overrides(request.mode, request.steps, request.timesteps)
        if request.strength is not None:
            overrides["strength"] = float(request.strength)
        if request.blend_chunks is not None:
            overrides["blend_chunks"] = request.blend_chunks
        if request.motion_aware is not None:
            overrides["motion_aware"] = bool(request.motion_aware)
        if request.early_first_frame is not None:
            overrides["early_first_frame"] = bool(request.early_first_frame)
        if request.guidance_scale is not None:
            overrides["guidance_scale"] = float(request.guidance_scale)
        for name in ("slo_ttff_s", "slo_fps"):
            try:
                SLOTargets(**{name[4:]: getattr(request, name)})
            except ValueError:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(request, name)!r}") from None
        return self.pipe.stream_config(request.mode, **overrides), height, width

    def _step_overrides(self, mode: str, steps: int | None, timesteps: tuple[float, ...] | None) -> dict:
        if steps is not None and timesteps is not None:
            raise ValueError("give steps or timesteps, not both")
        limit = self.config.max_steps
        if steps is not None:
            if not isinstance(steps, int) or not 1 <= steps <= limit:
                raise ValueError(f"steps must be an integer in 1..{limit}, got {steps!r}")
            return {"timesteps": timesteps_for_steps(self.pipe.stream_config(mode).timesteps, steps)}
        if timesteps is not None:
            if not 1 <= len(timesteps) <= limit:
                raise ValueError(f"timesteps must hold 1..{limit} values, got {len(timesteps)}")
            return {"timesteps": tuple(float(t) for t in timesteps)}
        return {}

    def estimate_bytes(self, config: StreamConfig, height: int, width: int) -> int:
        """Memory a session will hold: its KV cache (sized on the meta device, nothing allocated) plus the
        configured per-session overhead."""
        pipe, net = self.pipe, self.pipe.net
        factor = pipe.vae.config.scale_factor_spatial
        latent_shape = (pipe.vae.config.z_dim, height // factor, width // factor)
        grid = net.grid(*latent_shape[1:])
        layout = CacheLayout(grid[0] * grid[1], config.sink_frames, config.window_frames, config.chunk_frames)
        rows = 2 if config.guided else 1  # guidance keeps a cache row per branch
        cache = RollingKVCache(
            layout, net.num_layers, rows, net.heads, net.head_dim, latent_shape, dtype=pipe.dtype, device="meta"
        )
        return cache.memory_bytes() + self.config.session_overhead_bytes

    def open(self, request: SessionRequest, outbox: Outbox) -> int:
        """Admit a session and return its id; ``opened`` (or ``error`` + ``closed``) follows in ``outbox``.

        Raises ValueError for bad parameters, :class:`EngineBusy` when the session or memory budget is used up,
        :class:`EngineStopped` after :meth:`stop`.
        """
        config, height, width = self.resolve(request)
        need = self.estimate_bytes(config, height, width)
        spec = None if self._slo is None else self._slo.spec(request, config, height, width)
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is stopped and accepts no sessions")
            reserved = sum(self._reserved.values())
            busy = None
            if len(self._reserved) >= self.config.max_sessions:
                busy = f"all {self.config.max_sessions} session slots are in use (max_sessions)"
            elif self.memory_budget is not None and reserved + need > self.memory_budget:
                busy = (
                    f"the session needs {need / 2**20:.1f} MiB and {reserved / 2**20:.1f} of the "
                    f"{self.memory_budget / 2**20:.1f} MiB memory budget are reserved by open sessions"
                )
            infeasible = None if busy is not None or spec is None else self._slo.admit(spec, self._clock())
            if busy is None and infeasible is None:
                sid = next(self._ids)
                self._reserved[sid] = need
                if spec is not None:
                    self._slo.add(sid, spec, self._clock())
                self._metrics.session_opened(sid, request.mode, self._clock())
                # Enqueued under the lock: either before a stop is requested, or not at all (EngineStopped
                # above), so every admitted open is answered, by the loop or by the shutdown's drain.
                self._inbox.put(_Open(sid, request, config, height, width, outbox))
        if busy is not None:
            self._metrics.session_rejected()
            raise EngineBusy(f"busy: {busy}; try again later or ask for a smaller resolution")
        if infeasible is not None:
            self._metrics.session_rejected()
            self._metrics.slo_rejected()
            raise SLOInfeasible(infeasible)
        return sid

    def update(self, sid: int, update: SessionUpdate) -> None:
        """Change the prompt (at once or blended) or the step list / strength from the next chunk on."""
        if update.prompt is not None and (not isinstance(update.prompt, str) or not update.prompt.strip()):
            raise ValueError(f"prompt must be a non-empty string, got {update.prompt!r}")
        if update.blend_chunks is not None:
            if update.prompt is None:
                raise ValueError("blend_chunks needs a prompt to blend into")
            if not isinstance(update.blend_chunks, int) or update.blend_chunks < 0:
                raise ValueError(f"blend_chunks must be an integer >= 0, got {update.blend_chunks!r}")
        if update.strength is not None and not 0.0 < update.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {update.strength!r}")
        self._step_overrides("t2v", update.steps, update.timesteps)  # validates the ranges only
        if update.guidance_scale is not None and not update.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be a number >= 1, got {update.guidance_scale!r}")
        given = (update.prompt, update.steps, update.timesteps, update.strength, update.guidance_scale)
        if all(v is None for v in given):
            raise ValueError("update needs at least one of prompt, steps, timesteps, strength, guidance_scale")
        self._inbox.put(_Update(sid, update))

    def pause(self, sid: int) -> None:
        """Stop scheduling the session (its state is kept) until :meth:`resume`."""
        self._inbox.put(_Pause(sid, True))

    def resume(self, sid: int) -> None:
        self._inbox.put(_Pause(sid, False))

    def push_frames(self, sid: int, frames: np.ndarray) -> None:
        """Buffer video-to-video input: uint8 ``[T, H, W, 3]`` or ``[H, W, 3]`` RGB at the session's resolution."""
        arr = np.array(frames)  # a copy: the caller may reuse its buffer while the frames wait here
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [T, H, W, 3] RGB, got {arr.dtype} {list(arr.shape)}")
        self._inbox.put(_Push(sid, arr, self._clock()))

    def close(self, sid: int) -> None:
        """End a session (an abort on the side channel: it takes effect before any queued command of it)."""
        with self._lock:
            self._aborts.add(sid)
        self._inbox.put(_WAKE)

    def limits(self) -> dict:
        """What a client may ask for (sent in the protocol's ``hello``)."""
        dh, dw = self.pipe.default_resolution
        return {
            "modes": list(MODES),
            "default_height": dh,
            "default_width": dw,
            "example_prompt": self.pipe.example_prompt,
            "resolution_multiple": self.pipe.spatial_factor,
            "max_pixels": self.max_pixels,
            "max_steps": self.config.max_steps,
            "default_steps": {mode: len(self.pipe.stream_config(mode).timesteps) for mode in MODES},
            "fps": self.config.fps,
            "max_sessions": self.config.max_sessions,
        }

    def metrics(self) -> dict:
        """A snapshot of the serving metrics (see :mod:`stream_runtime.serving.metrics`) plus admission state."""
        snap = self._metrics.snapshot()
        with self._lock:
            snap["memory"] = {"budget_bytes": self.memory_budget, "reserved_bytes": sum(self._reserved.values())}
            outboxes = list(self._outboxes)
        snap["outboxes"] = outbox_stats(outboxes)  # outside the engine lock: each outbox takes its own
        snap["engine_alive"] = self.alive
        snap["scheduler"] = {"policy": "round_robin"} if self._slo is None else self._slo.snapshot()
        return snap

    def prometheus(self) -> str:
        """The metrics in the Prometheus text format."""
        snap = self.metrics()
        return prometheus_text(snap, snap["memory"], snap["outboxes"])

    # -- the engine thread

    def _run(self) -> None:
        try:
            while True:
                if not self._drain(block=not self._has_work()):
                    break
                self._apply_aborts()
                lives = self._pick()
                if lives:
                    self._step(lives)
        except BaseException as exc:  # a bug in the loop itself; sessions' own failures never get here
            logger.exception("the engine loop failed")
            self.failure = exc
        finally:
            self._shutdown()

    def _has_work(self) -> bool:
        with self._lock:
            if self._aborts:
                return True
        return any(self._runnable(live) for live in self._sessions.values())

    def _drain(self, block: bool) -> bool:
        """Handle every queued command (waiting for one if ``block``); False once asked to stop."""
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            if item is not _WAKE:
                self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _handle(self, cmd) -> None:
        if isinstance(cmd, _Open):
            self._create(cmd)
            return
        live = self._sessions.get(cmd.sid)
        with self._lock:
            aborted = cmd.sid in self._aborts
        if live is None or aborted:
            return  # the session ended (its closed event is out) or is being closed: its commands are moot
        if isinstance(cmd, _Update):
            self._apply_update(live, cmd.update)
        elif isinstance(cmd, _Pause):
            live.paused = cmd.paused
            self._metrics.session_paused(live.sid, cmd.paused)
            kind = "paused" if cmd.paused else "resumed"
            live.outbox.put_event(Event(kind, live.sid, {"next_chunk": live.session.chunk_index}))
        elif isinstance(cmd, _Push):
            self._buffer_input(live, cmd)

    def _create(self, cmd: _Open) -> None:
        with self._lock:
            aborted = cmd.sid in self._aborts
            self._aborts.discard(cmd.sid)
        if aborted:
            self._end(cmd.sid, cmd.outbox, "closed")
            return
        req = cmd.request
        try:
            session = self.pipe.session(
                req.prompt, seed=req.seed, mode=req.mode, height=cmd.height, width=cmd.width, config=cmd.config
            )
        except Exception as exc:
            self._fail(cmd.sid, cmd.outbox, exc)
            return
        actual = session.cache.memory_bytes() + self.config.session_overhead_bytes
        with self._lock:
            self._reserved[cmd.sid] = actual
        live = _Live(cmd.sid, req, session, cmd.outbox)
        self._sessions[cmd.sid] = live
        self._order.append(cmd.sid)
        described = self._describe(live, actual)
        if self._slo is not None:
            described.update(self._slo.describe(cmd.sid))
            self._slo.scheduler.sync(cmd.sid, "batch" if session.stream_batching else "sequential", 0)
        cmd.outbox.put_event(Event("opened", cmd.sid, described))

    def _describe(self, live: _Live, memory_bytes: int) -> dict:
        from stream_runtime.pipelines.wan.pipeline import config_to_json

        s, config, t = live.session, live.session.config, self.pipe.temporal_factor
        return {
            "mode": s.mode,
            "prompt": s.prompt,
            "seed": s.seed,
            "height": s.height,
            "width": s.width,
            "fps": self.config.fps,
            "steps": len(config.timesteps),
            "timesteps": list(config.timesteps),
            "strength": config.strength,
            "guidance_scale": config.guidance_scale,
            "chunk_frames": config.chunk_frames,
            "first_chunk_frames": 1 + t * (config.chunk_frames - 1),
            "frames_per_chunk": t * config.chunk_frames,
            "input_frames_needed": s.frames_needed() if s.mode == "v2v" else 0,
            "memory_bytes": memory_bytes,
            "config": config_to_json(config),
        }

    def _apply_update(self, live: _Live, update: SessionUpdate) -> None:
        session = live.session
        try:
            changes = self._step_overrides(session.mode, update.steps, update.timesteps)
            if update.strength is not None:
                changes["strength"] = float(update.strength)
            if update.guidance_scale is not None:
                changes["guidance_scale"] = float(update.guidance_scale)
            config = session.config.replace(**changes) if changes else None
            if config is not None and config.guided != session.config.guided:
                raise ValueError(
                    f"guidance_scale {config.guidance_scale:g}: this session was opened with guidance "
                    f"{'on' if session.config.guided else 'off'}, which it keeps; open a new session to change it"
                )
        except ValueError as exc:
            live.outbox.put_event(Event("error", live.sid, {"code": "bad_params", "message": str(exc), "fatal": False}))
            return

        def apply() -> None:
            if config is not None:
                session.set_config(config)
            if update.prompt is not None:
                session.set_prompt(update.prompt, update.blend_chunks)  # a recache runs the model

        if self._guarded(live, apply):
            data = {
                "next_chunk": session.chunk_index,
                "prompt": session.prompt,
                "steps": len(session.config.timesteps),
                "timesteps": list(session.config.timesteps),
                "strength": session.config.strength,
                "guidance_scale": session.config.guidance_scale,
            }
            live.outbox.put_event(Event("updated", live.sid, data))

    def _buffer_input(self, live: _Live, cmd: _Push) -> None:
        s = live.session
        problem = None
        if s.mode != "v2v":
            problem = "input frames are for video-to-video sessions (open with mode 'v2v')"
        elif cmd.frames.shape[1:3] != (s.height, s.width):
            got = f"{cmd.frames.shape[2]}x{cmd.frames.shape[1]}"
            problem = f"input frames must be {s.width}x{s.height} (width x height, the session's size), got {got}"
        if problem is not None:
            live.outbox.put_event(Event("error", live.sid, {"code": "bad_frame", "message": problem, "fatal": False}))
            return
        live.inputs.extend((frame, cmd.arrived_at) for frame in cmd.frames)
        cap = self.config.input_buffer_chunks * self.pipe.temporal_factor * s.config.chunk_frames
        excess = len(live.inputs) - cap
        if excess > 0:
            for _ in range(excess):
                live.inputs.popleft()
            self._metrics.input_dropped(live.sid, excess)

    def _apply_aborts(self) -> None:
        with self._lock:
            ready = [sid for sid in self._aborts if sid in self._sessions]
            # Keep aborts of sessions whose open is still queued; forget those of sessions already gone.
            self._aborts = {sid for sid in self._aborts if sid not in self._sessions and sid in self._reserved}
        for sid in ready:
            self._end(sid, self._sessions[sid].outbox, "closed")

    def _runnable(self, live: _Live) -> bool:
        if live.paused:
            return False
        return live.session.mode == "t2v" or len(live.inputs) >= live.session.frames_needed()

    def _pick(self) -> list[_Live]:
        """The sessions to step next (several when they share forwards), or none.

        Round-robin: the next runnable session in line, preferring sessions whose client has taken their last
        chunk. A session whose chunk still waits in its outbox (a slow client) runs only when no other one can: its
        next chunk would replace the unsent one, so it gets the time nobody else needs, and slow clients cost fast
        ones almost nothing. The picked session and those before it move to the back of the line; so do the
        sessions that share its forwards (:meth:`_companions`)."""
        if self._slo is not None:
            lives, violations = self._slo.pick(self._sessions, self._runnable)
            self._report(violations)
            return lives
        backlogged = None
        for i, sid in enumerate(self._order):
            live = self._sessions[sid]
            if not self._runnable(live):
                continue
            if live.outbox.unsent_chunks() == 0:
                self._order.rotate(-(i + 1))
                return self._companions(live)
            if backlogged is None:
                backlogged = i, live
        if backlogged is None:
            return []
        self._order.rotate(-(backlogged[0] + 1))
        return [backlogged[1]]

    def _companions(self, live: _Live) -> list[_Live]:
        """``live`` and, up to ``max_sessions_per_forward``, the next runnable sessions in line (fast clients only)
        that can share its forwards; they go to the back of the line with it."""
        limit = self.config.max_sessions_per_forward
        key = share_key(live.session) if limit > 1 else None
        if key is None:
            return [live]
        group = [live]
        for sid in list(self._order)[:-1]:  # the picked session is last now
            other = self._sessions[sid]
            if len(group) == limit:
                break
            if self._runnable(other) and other.outbox.unsent_chunks() == 0 and share_key(other.session) == key:
                group.append(other)
                self._order.remove(sid)
                self._order.append(sid)
        return group

    def _step(self, lives: list[_Live]) -> None:
        """One chunk of each session in ``lives`` (shared forwards when there are several). A failure inside the
        shared work cannot be laid at one session's door: it ends every session of the group."""
        inputs: dict[int, tuple[np.ndarray, float]] = {}
        for live in lives:
            need = live.session.frames_needed() if live.session.mode == "v2v" else 0
            if need:  # 0: a draining stream batch, whose next forward takes no new input
                batch = [live.inputs.popleft() for _ in range(need)]
                inputs[live.sid] = np.stack([frame for frame, _ in batch]), batch[0][1]
        started = self._clock()
        ready = []
        for live in lives:

            def prepare(live=live) -> None:
                if self._slo is not None:
                    self._slo.before(live.sid, live.session)
                if live.sid in inputs:
                    live.session.push_frames(inputs[live.sid][0])

            if self._guarded(live, prepare):
                ready.append(live)
        if not ready:
            return
        by_session = {id(live.session): live for live in ready}
        outputs: dict[int, np.ndarray | None] = {}
        sessions = [live.session for live in ready]
        # What the scheduler grouped, as the model can run it (one session needs no check: any session object runs)
        for group in groups(sessions) if len(sessions) > 1 else [sessions]:
            try:
                for session, frames in zip(group, next_chunks(group), strict=True):
                    outputs[by_session[id(session)].sid] = frames
            except Exception as exc:
                for session in group:
                    live = by_session[id(session)]
                    self._fail(live.sid, live.outbox, exc)
        finished = self._clock()
        ran = [live for live in ready if live.sid in outputs]
        if self._slo is not None and ran:
            self._report(
                self._slo.after([(lv.sid, lv.session, outputs[lv.sid] is not None) for lv in ran], finished - started)
            )
        for live in ran:
            oldest = inputs[live.sid][1] if live.sid in inputs else None
            self._deliver(live, outputs[live.sid], started, finished, oldest)

    def _deliver(self, live: _Live, frames: np.ndarray | None, started: float, finished: float, oldest_input) -> None:
        """Hand a generated chunk to the session's outbox (with its timings) and count it."""
        if frames is None:
            return
        session = live.session
        step, self._steps = self._steps, self._steps + 1
        info = session.last_chunk
        chunk = ChunkOutput(
            session=live.sid,
            index=info.index,
            first_frame=info.first_frame,
            frames=frames,
            latency_s=info.latency_s,
            step=step,
            started_at=started,
            finished_at=finished,
            wall_time=time.time(),
            input_latency_s=None if oldest_input is None else finished - oldest_input,
        )
        self._metrics.chunk_generated(live.sid, info.latency_s, info.num_frames)
        with self._lock:
            aborted = live.sid in self._aborts
        if aborted:  # closed while generating: nobody wants it; counted as dropped, so chunks = delivered + dropped
            live.outbox.discard(chunk)
            return
        live.outbox.put_chunk(chunk)

    def _report(self, violations: list) -> None:
        """SLO violations to their sessions' clients (``slo_violation`` events) and to the metrics."""
        for v in violations:
            live = self._sessions.get(v.session)
            self._metrics.slo_violation(v.session, v.target, v.reason)
            if live is not None:
                live.outbox.put_event(Event("slo_violation", v.session, v.to_json()))

    def _guarded(self, live: _Live, fn: Callable[[], None]) -> bool:
        """Run model work of one session; a failure ends that session only. True if it succeeded."""
        try:
            fn()
            return True
        except Exception as exc:
            self._fail(live.sid, live.outbox, exc)
            return False

    def _fail(self, sid: int, outbox: Outbox, exc: Exception) -> None:
        if isinstance(exc, torch.OutOfMemoryError):
            code = "out_of_memory"
            logger.warning("session %d ran out of memory and was ended: %s", sid, exc)
            self._empty_cache()
        elif isinstance(exc, ValueError):
            code = "bad_params"
        else:
            code = "session_failed"
            logger.error("session %d failed", sid, exc_info=exc)
        message = f"{type(exc).__name__}: {exc}"
        outbox.put_event(Event("error", sid, {"code": code, "message": message, "fatal": True}))
        self._end(sid, outbox, "error", failed=True)

    def _end(self, sid: int, outbox: Outbox, reason: str, failed: bool = False) -> None:
        live = self._sessions.pop(sid, None)
        data = {"reason": reason, "chunks": 0, "frames": 0}
        if live is not None:
            self._order.remove(sid)
            data.update(chunks=live.session.chunk_index, frames=live.session.output_frames)
            live.session.close()
            live.inputs.clear()
        data["dropped_chunks"], data["dropped_frames"] = outbox.drops(sid)
        with self._lock:
            self._reserved.pop(sid, None)
            self._aborts.discard(sid)
        if self._slo is not None:
            self._slo.remove(sid)
        self._metrics.session_closed(sid, failed)
        outbox.put_event(Event("closed", sid, data))

    def _shutdown(self) -> None:
        with self._lock:
            if self._shut_down:
                return
            self._stopping = self._shut_down = True
        for sid in list(self._sessions):
            self._end(sid, self._sessions[sid].outbox, "shutdown")
        while True:  # opens that were queued behind the stop
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Open):
                message = {"code": "unavailable", "message": "the server is shutting down", "fatal": True}
                cmd.outbox.put_event(Event("error", cmd.sid, message))
                self._end(cmd.sid, cmd.outbox, "shutdown")
        self._empty_cache()

    def _empty_cache(self) -> None:
        if self.pipe.device.type == "cuda":
            torch.cuda.empty_cache()
