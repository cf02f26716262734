"""The engine's side of SLO-aware scheduling: sessions to :class:`SessionSpec`\\ s, decisions applied to
``StreamSession``\\ s, their measured times back into the cost model, the calibration.

:class:`SLOController` is what :class:`~stream_runtime.serving.engine.Engine` holds when
``EngineConfig.scheduler == "slo"``; the policy itself is :class:`~stream_runtime.serving.scheduler.SLOScheduler`.

Measurements: a session's ``profile`` flag makes it time its decode (``timings["decode_s"]``, with a device sync
around it); the rest of the call's wall time is its forwards, whose shapes the decision named. The sync costs a
little on CUDA; it is what makes the two times separable.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from stream_runtime.config import StreamConfig
from stream_runtime.serving.api import SessionRequest
from stream_runtime.serving.cost_model import CostModel, Workload
from stream_runtime.serving.scheduler import (
    BATCH,
    SEQUENTIAL,
    Decision,
    SessionSpec,
    SLOConfig,
    SLOScheduler,
    Violation,
)

CALIBRATION_PROMPT = "calibration"
"""Prompt of the scratch session the calibration runs (its frames are thrown away)."""


def workload_of(mode: str, config: StreamConfig, height: int, width: int) -> Workload:
    """The cost class of a session: sessions with equal workloads cost the same per forward."""
    key = f"{mode} {height}x{width} chunk{config.chunk_frames} cache{config.cache_frames} {config.attention_backend}"
    return Workload(key, float(height * width * config.chunk_frames))


def passes_of(config: StreamConfig) -> int:
    return len(config.timesteps) + int(config.context_pass)


class SLOController:
    """Adapts the SLO scheduler to the engine's sessions. Engine-thread methods but :meth:`admit`, :meth:`add`."""

    def __init__(self, pipe, config: SLOConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.pipe = pipe
        self.clock = clock
        self.config = config
        self.costs = CostModel(config.ewma_alpha, config.window)
        self.scheduler = SLOScheduler(self.costs, config)
        self._pending: tuple[int, Decision] | None = None
        self.calibration: dict | None = None
        """What :meth:`calibrate` measured (seconds), for the metrics."""

    # -- admission (client threads)

    def spec(self, request: SessionRequest, config: StreamConfig, height: int, width: int) -> SessionSpec:
        batchable = request.mode == "t2v" and not config.attention_reuse and config.prompt_switch != "reset"
        return SessionSpec(
            workload_of(request.mode, config, height, width),
            passes_of(config),
            self.pipe.temporal_factor * config.chunk_frames,
            self.config.targets(request.slo_ttff_s, request.slo_fps),
            batchable,
        )

    def admit(self, spec: SessionSpec, now: float) -> str | None:
        return self.scheduler.admit(spec, now)

    def add(self, sid: int, spec: SessionSpec, now: float) -> None:
        self.scheduler.add(sid, spec, now)

    def remove(self, sid: int) -> None:
        self.scheduler.remove(sid)

    def describe(self, sid: int) -> dict:
        """The session's targets for its ``opened`` event."""
        state = self.scheduler.state().get(sid)
        return {} if state is None else {"slo": state["targets"]}

    # -- the tick (engine thread)

    def pick(self, sessions: dict, runnable: Callable) -> tuple[object | None, list[Violation]]:
        """(the session to step, infeasible targets found while deciding). Sessions whose client has not taken
        their last chunk (slow clients) run only when no other one can, as in round-robin."""
        ready = [sid for sid, live in sessions.items() if runnable(live)]
        fresh = [sid for sid in ready if sessions[sid].outbox.unsent_chunks() == 0]
        decision = self.scheduler.decide(fresh or ready, self.clock())
        if decision is None:
            return None, []
        sid = decision.sessions[0]  # the engine's pipeline runs one session per forward (max_sessions_per_forward)
        self._pending = (sid, decision)
        return sessions[sid], list(decision.violations)

    def before(self, sid: int, session) -> None:
        """Put the session on the decided schedule (raises ValueError if the session cannot, e.g. v2v)."""
        if self._pending is None or self._pending[0] != sid:
            return
        decision = self._pending[1]
        if session.stream_batching != (decision.schedule == BATCH):
            session.set_stream_batch(decision.schedule == BATCH)
        session.profile = True
        session.timings.clear()

    def after(self, sid: int, session, wall_s: float, produced: bool) -> list[Violation]:
        """Feed the call's times to the cost model; return the targets its chunk missed."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != sid:
            return []
        decision = pending[1]
        decode = session.timings.get("decode_s")
        denoise = max(wall_s - decode, 0.0) if decode is not None else None
        schedule = BATCH if session.stream_batching else SEQUENTIAL
        self.scheduler.sync(sid, schedule, session.chunks_in_flight)
        in_flight = {sid: session.chunks_in_flight}
        return self.scheduler.observe(decision, self.clock(), denoise, decode, in_flight, {sid} if produced else set())

    # -- calibration

    def calibrate(self) -> dict:
        """Seed the cost model with the default workload's times: a sequential chunk and a steady stream-batch
        forward of a scratch text-to-video session at the default resolution (a first chunk of each warms up and
        is not counted). Runs the model: a few forwards."""
        pipe = self.pipe
        config = pipe.stream_config("t2v").replace(stream_batch=False)
        height, width = pipe.default_resolution
        workload = workload_of("t2v", config, height, width)
        passes = passes_of(config)
        out: dict = {"workload": workload.key}
        with pipe.session(CALIBRATION_PROMPT, seed=0, height=height, width=width, config=config) as session:
            session.profile = True
            session.next_chunk()
            forward, decode = self._timed_chunk(session)
            out["pass_s"], out["decode_s"] = forward / passes, decode
            self.costs.seed(workload, (1, 1), out["pass_s"])
            self.costs.seed_decode(workload, decode)
            if passes > 1 and not config.attention_reuse and config.prompt_switch != "reset":
                session.set_stream_batch(True)
                session.next_chunk()  # the warm-up
                forward, _ = self._timed_chunk(session)
                out["batch_forward_s"] = forward
                self.costs.seed(workload, (passes, 1), forward)
        self.calibration = out
        return out

    @staticmethod
    def _timed_chunk(session) -> tuple[float, float]:
        """(seconds of forwards, seconds of decode) of one ``next_chunk``, by the wall clock."""
        start = time.perf_counter()
        session.next_chunk()
        wall = time.perf_counter() - start
        decode = session.timings.get("decode_s", 0.0)
        return max(wall - decode, 0.0), decode

    def snapshot(self) -> dict:
        return {
            "policy": "slo",
            "calibration": self.calibration,
            "costs": self.costs.snapshot(),
            "sessions": self.scheduler.state(),
        }
