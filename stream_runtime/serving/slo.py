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


def workload_of(mode: str, config: StreamConfig, height: int, width: int) -> Workload:
    """The cost class of a session: sessions with equal workloads cost the same per forward."""
    rows = 2 if config.guided else 1  # guidance runs every pass on two rows
    key = f"{mode} {height}x{width} chunk{config.chunk_frames} cache{config.cache_frames} {config.attention_backend}"
    if config.guided:
        key += " guided"
    return Workload(key, float(height * width * config.chunk_frames * rows))


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
        self._pending: tuple[tuple[int, ...], Decision] | None = None
        self.calibration: dict | None = None
        """What :meth:`calibrate` measured (seconds), for the metrics."""

    # -- admission (client threads)

    def spec(self, request: SessionRequest, config: StreamConfig, height: int, width: int) -> SessionSpec:
        batchable = (
            request.mode == "t2v"
            and not config.attention_reuse
            and config.prompt_switch != "reset"
            and not config.guided
        )
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

    def pick(self, sessions: dict, runnable: Callable) -> tuple[list, list[Violation]]:
        """(the sessions to step, sharing forwards when more than one; infeasible targets found while deciding).
        Sessions whose client has not taken their last chunk (slow clients) run only when no other one can, as in
        round-robin."""
        ready = [sid for sid, live in sessions.items() if runnable(live)]
        fresh = [sid for sid in ready if sessions[sid].outbox.unsent_chunks() == 0]
        decision = self.scheduler.decide(fresh or ready, self.clock())
        if decision is None:
            return [], []
        self._pending = (decision.sessions, decision)
        return [sessions[sid] for sid in decision.sessions], list(decision.violations)

    def before(self, sid: int, session) -> None:
        """Put the session on the decided schedule (raises ValueError if the session cannot, e.g. v2v)."""
        if self._pending is None or sid not in self._pending[0]:
            return
        decision = self._pending[1]
        if session.stream_batching != (decision.schedule == BATCH):
            session.set_stream_batch(decision.schedule == BATCH)
        session.profile = True
        session.timings.clear()

    def after(self, ran: list[tuple[int, object, bool]], wall_s: float) -> list[Violation]:
        """Feed the call's times to the cost model; return the targets its chunks missed. ``ran``: (sid, session,
        whether its chunk came out) of every session the call stepped (several when they shared forwards)."""
        pending, self._pending = self._pending, None
        if pending is None or not ran or any(sid not in pending[0] for sid, _, _ in ran):
            return []
        decision = pending[1]
        decodes = [session.timings.get("decode_s") for _, session, produced in ran if produced]
        decode = None if None in decodes else sum(decodes)
        denoise = max(wall_s - decode, 0.0) if decode is not None else None
        in_flight = {}
        for sid, session, _ in ran:
            schedule = BATCH if session.stream_batching else SEQUENTIAL
            self.scheduler.sync(sid, schedule, session.chunks_in_flight)
            in_flight[sid] = session.chunks_in_flight
        produced = {sid for sid, _, out in ran if out}
        if decode is not None and not produced:
            decode = None
        return self.scheduler.observe(decision, self.clock(), denoise, decode, in_flight, produced)

    # -- calibration

    def calibrate(self) -> dict:
        """Seed the cost model with the default workload's times: a sequential chunk, a steady stream-batch
        forward, and one pass of ``g`` sessions sharing a forward for every ``g`` up to
        ``max_sessions_per_forward``, all on scratch text-to-video sessions at the default resolution (a first chunk
        of each warms up and is not counted). Runs the model: a few chunks."""
        from stream_runtime.pipelines.wan import batching

        pipe = self.pipe
        config = pipe.stream_config("t2v").replace(stream_batch=False)
        height, width = pipe.default_resolution
        workload = workload_of("t2v", config, height, width)
        passes = passes_of(config)
        prompt = pipe.example_prompt  # the scratch sessions' prompt: one the model knows (a closed vocabulary too)
        out: dict = {"workload": workload.key}

        def open_session(seed: int):
            session = pipe.session(prompt, seed=seed, height=height, width=width, config=config)
            session.profile = True
            return session

        with open_session(0) as session:
            session.next_chunk()
            forward, decode = self._timed_chunk([session])
            out["pass_s"], out["decode_s"] = forward / passes, decode
            self.costs.seed(workload, (1, 1), out["pass_s"])
            self.costs.seed_decode(workload, decode)
            if passes > 1 and not config.attention_reuse and config.prompt_switch != "reset" and not config.guided:
                session.set_stream_batch(True)
                session.next_chunk()  # the warm-up
                forward, _ = self._timed_chunk([session])
                out["batch_forward_s"] = forward
                self.costs.seed(workload, (passes, 1), forward)
        for group in range(2, self.config.max_sessions_per_forward + 1):
            sessions = [open_session(seed) for seed in range(group)]
            try:
                batching.next_chunks(sessions)
                forward, _ = self._timed_chunk(sessions)
            finally:
                for session in sessions:
                    session.close()
            out[f"shared_pass_s_{group}"] = forward / passes
            self.costs.seed(workload, (1, group), forward / passes)
        self.calibration = out
        return out

    @staticmethod
    def _timed_chunk(sessions: list) -> tuple[float, float]:
        """(seconds of forwards, seconds of decode) of the next chunk of ``sessions`` (sharing forwards when there
        are several), by the wall clock."""
        from stream_runtime.pipelines.wan import batching

        start = time.perf_counter()
        batching.next_chunks(sessions)
        wall = time.perf_counter() - start
        decode = sum(session.timings.get("decode_s", 0.0) for session in sessions)
        return max(wall - decode, 0.0), decode

    def snapshot(self) -> dict:
        return {
            "policy": "slo",
            "calibration": self.calibration,
            "costs": self.costs.snapshot(),
            "sessions": self.scheduler.state(),
        }
