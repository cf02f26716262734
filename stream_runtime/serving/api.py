"""The engine's public types: its configuration, the requests a client makes, the errors admission raises."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream_runtime.serving.scheduler import POLICIES, SLOConfig

MODES = ("t2v", "v2v")
MAX_SEED = 2**63 - 1
"""Largest seed (a signed 64-bit integer, what every torch generator accepts)."""


@dataclass(frozen=True)
class EngineConfig:
    """Admission limits and stream-wide settings of an :class:`Engine`."""

    max_sessions: int = 4
    """Sessions open at once; one more gets an ``EngineBusy``."""
    memory_budget_bytes: int | None = None
    """Bytes that the sessions' KV caches (plus ``session_overhead_bytes`` each) may hold together. None: on CUDA,
    ``memory_fraction`` of the device memory free when the engine is created; on CPU, no memory limit."""
    memory_fraction: float = 0.9
    """Share of the free CUDA memory used as the budget when ``memory_budget_bytes`` is None."""
    session_overhead_bytes: int = 0
    """Added to every session's cache bytes: its streaming VAE state and buffers, which the cache does not count.
    Measure it on the target GPU (it grows with resolution); 0 counts the cache alone."""
    max_pixels: int | None = None
    """Largest ``height * width`` a session may ask for. None: the model's default resolution."""
    max_steps: int = 8
    """Most denoising steps a session may ask for."""
    fps: float = 16.0
    """Frame rate the stream is meant to be played at (Wan2.1: 16). Reported to clients; output is not paced."""
    input_buffer_chunks: int = 4
    """Video-to-video: input frames buffered per session, in chunks' worth; beyond it the oldest are dropped (a
    live source that outruns the model keeps its newest frames)."""
    max_sessions_per_forward: int = 1
    """``round_robin``: up to this many runnable sessions that can share forwards
    (:func:`stream_runtime.pipelines.wan.batching.share_key`: same resolution, chunk size, steps, ...) get their
    next chunks from one shared forward per step instead of one after the other (1: never). The ``slo`` scheduler
    has its own limit (``SLOConfig.max_sessions_per_forward``) and groups only where measured costs say it pays."""
    scheduler: str = "round_robin"
    """``round_robin``: every runnable session gets one chunk per round. ``slo``: the SLO-aware scheduler
    (:mod:`stream_runtime.serving.scheduler`) orders sessions by their targets, chooses sequential or stream-batch
    denoising per chunk, refuses sessions whose targets are infeasible and reports violations."""
    slo: SLOConfig = SLOConfig()
    """Settings of the ``slo`` scheduler (ignored by ``round_robin``)."""

    def __post_init__(self) -> None:
        if self.scheduler not in POLICIES:
            raise ValueError(f"scheduler must be one of {POLICIES}, got {self.scheduler!r}")
        if not isinstance(self.max_sessions, int) or self.max_sessions < 1:
            raise ValueError(f"max_sessions must be an integer >= 1, got {self.max_sessions!r}")
        if not isinstance(self.max_sessions_per_forward, int) or self.max_sessions_per_forward < 1:
            raise ValueError(f"max_sessions_per_forward must be an integer >= 1, got {self.max_sessions_per_forward!r}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0 or None, got {self.memory_budget_bytes!r}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        if self.session_overhead_bytes < 0:
            raise ValueError(f"session_overhead_bytes must be >= 0, got {self.session_overhead_bytes!r}")
        if self.max_pixels is not None and self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0 or None, got {self.max_pixels!r}")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
        if not isinstance(self.input_buffer_chunks, int) or self.input_buffer_chunks < 1:
            raise ValueError(f"input_buffer_chunks must be an integer >= 1, got {self.input_buffer_chunks!r}")


@dataclass(frozen=True)
class SessionRequest:
    """What a client asks for when it opens a session. None means the model folder's default."""

    prompt: str
    seed: int = 0
    mode: str = "t2v"
    """``t2v`` (text-to-video) or ``v2v`` (video-to-video: the client pushes input frames)."""
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    """Number of denoising steps, spread evenly over the range of the mode's default step list (4 for t2v gives
    the default 1000, 750, 500, 250)."""
    timesteps: tuple[float, ...] | None = None
    """An explicit step list instead of ``steps``."""
    strength: float | None = None
    """Video-to-video noise strength in (0, 1]."""
    blend_chunks: int | None = None
    """Default prompt-blend length of later prompt switches."""
    motion_aware: bool | None = None
    """Video-to-video: follow the input's motion with the strength."""
    early_first_frame: bool | None = None
    """Send the stream's first latent frame on its own as soon as it is decoded (``StreamConfig.early_first_frame``;
    None: the model's default, off)."""
    guidance_scale: float | None = None
    """Classifier-free guidance (1: off; None: the model's default). A session keeps guidance on or off for its
    life; only the scale of a guided session changes in an update."""
    slo_ttff_s: float | None = None
    """SLO scheduler: target time to first frame in seconds (None: ``EngineConfig.slo.default_ttff_s``)."""
    slo_fps: float | None = None
    """SLO scheduler: frame rate the session must keep up with; each chunk of ``F`` frames is due ``F / slo_fps``
    seconds after the previous one (None: ``EngineConfig.slo.default_fps``)."""


@dataclass(frozen=True)
class SessionUpdate:
    """A live change to an open session; only the fields given change."""

    prompt: str | None = None
    blend_chunks: int | None = None
    """Chunks over which to blend into ``prompt`` (0: switch at once; None: the session's default)."""
    steps: int | None = None
    timesteps: tuple[float, ...] | None = None
    strength: float | None = None
    guidance_scale: float | None = None


class EngineBusy(RuntimeError):
    """The engine cannot admit another session now (session count or memory budget); try again later."""

    code = "busy"


class SLOInfeasible(EngineBusy):
    """The SLO scheduler cannot meet the session's targets under the current load; the message says why."""

    code = "slo_infeasible"


class EngineStopped(RuntimeError):
    """The engine is stopped (or its loop failed) and accepts no sessions."""

    code = "unavailable"


def timesteps_for_steps(default: tuple[float, ...], steps: int) -> tuple[float, ...]:
    """``steps`` timesteps spread evenly from the first to the last of ``default`` (the mode's step list)."""
    first, last = default[0], default[-1]
    if steps == 1:
        return (float(first),)
    if last >= first:  # a one-step default has no range to spread over: go down towards 0
        last = first / steps
    return tuple(float(t) for t in np.linspace(first, last, steps))
