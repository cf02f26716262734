"""Serving metrics: time to first frame, per-session FPS and jitter, latency percentiles, drops.

Written from two threads (the engine thread when a chunk is generated, the consumer when it takes a chunk from
its outbox), so every method takes one lock. Timing is measured where the consumer takes a chunk, which is what a
viewer sees (minus the network), not where the engine finishes it.

Quantiles are over the most recent ``window`` samples; sums and counts are over the life of the process
(Prometheus summary semantics).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

QUANTILES = (0.5, 0.9, 0.99)
PREFIX = "stream_runtime"


class _Summary:
    """Recent samples for quantiles, plus an all-time sum and count."""

    def __init__(self, window: int) -> None:
        self.samples: deque[float] = deque(maxlen=window)
        self.sum = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.samples.append(value)
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {"count": self.count, "sum": self.sum}
        values = np.asarray(self.samples, dtype=np.float64)
        for q in QUANTILES:
            out[f"p{round(q * 100)}"] = float(np.quantile(values, q)) if len(values) else None
        out["mean"] = float(values.mean()) if len(values) else None
        return out


@dataclass
class _SessionStats:
    mode: str
    opened_at: float
    first_frame_at: float | None = None
    chunks: int = 0
    frames: int = 0
    dropped_chunks: int = 0
    dropped_frames: int = 0
    dropped_input_frames: int = 0
    slo_violations: int = 0
    paused: bool = False
    deliveries: deque = field(default_factory=lambda: deque(maxlen=32))
    """(time taken, frames) of the most recent delivered chunks."""

    def rates(self) -> tuple[float | None, float | None]:
        """(frames per second, frame-interval jitter in seconds) over the recent deliveries.

        A chunk's frames arrive together, so the interval of a frame is amortised over its chunk:
        ``(t_i - t_{i-1}) / frames_i``; jitter is the standard deviation of that interval.
        """
        d = list(self.deliveries)
        if len(d) < 2:
            return None, None
        span = d[-1][0] - d[0][0]
        fps = sum(n for _, n in d[1:]) / span if span > 0 else None
        intervals = [(t1 - t0) / n for (t0, _), (t1, n) in zip(d, d[1:], strict=False) if n > 0]
        return fps, float(np.std(intervals)) if intervals else None


class Metrics:
    """Counters and latency summaries of one engine; :meth:`snapshot` for JSON, :func:`prometheus_text` to export.

    Example::

        metrics = Metrics()
        metrics.session_opened(1, "t2v")
        metrics.chunk_generated(1, latency_s=0.2, frames=9)
        metrics.chunk_delivered(1, frames=9, queue_wait_s=0.001, end_to_end_s=0.21)
        metrics.snapshot()["sessions"][1]["ttff_s"]
    """

    def __init__(self, window: int = 1024, clock=time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._sessions: dict[int, _SessionStats] = {}
        self.counters = {
            "sessions_opened": 0,
            "sessions_rejected": 0,
            "session_errors": 0,
            "chunks": 0,
            "frames": 0,
            "chunks_dropped": 0,
            "frames_dropped": 0,
            "input_frames_dropped": 0,
            "sessions_rejected_slo": 0,
        }
        self.slo_violations: dict[tuple[str, str], int] = {}
        """(target, reason) -> count of SLO violations reported (see :mod:`stream_runtime.serving.scheduler`)."""
        self.summaries = {
            name: _Summary(window) for name in ("chunk_latency_s", "queue_wait_s", "end_to_end_s", "ttff_s")
        }

    def session_opened(self, sid: int, mode: str, at: float | None = None) -> None:
        with self._lock:
            self._sessions[sid] = _SessionStats(mode, self._clock() if at is None else at)
            self.counters["sessions_opened"] += 1

    def session_rejected(self) -> None:
        with self._lock:
            self.counters["sessions_rejected"] += 1

    def slo_rejected(self) -> None:
        """A session refused because its SLO targets were infeasible (also counted in ``sessions_rejected``)."""
        with self._lock:
            self.counters["sessions_rejected_slo"] += 1

    def slo_violation(self, sid: int, target: str, reason: str) -> None:
        with self._lock:
            key = (target, reason)
            self.slo_violations[key] = self.slo_violations.get(key, 0) + 1
            if sid in self._sessions:
                self._sessions[sid].slo_violations += 1

    def session_closed(self, sid: int, failed: bool = False) -> None:
        with self._lock:
            self._sessions.pop(sid, None)
            if failed:
                self.counters["session_errors"] += 1

    def session_paused(self, sid: int, paused: bool) -> None:
        with self._lock:
            if sid in self._sessions:
                self._sessions[sid].paused = paused

    def chunk_generated(self, sid: int, latency_s: float, frames: int) -> None:
        with self._lock:
            self.counters["chunks"] += 1
            self.counters["frames"] += frames
            self.summaries["chunk_latency_s"].add(latency_s)
            if sid in self._sessions:
                self._sessions[sid].chunks += 1

    def chunk_dropped(self, sid: int, frames: int) -> None:
        with self._lock:
            self.counters["chunks_dropped"] += 1
            self.counters["frames_dropped"] += frames
            if sid in self._sessions:
                self._sessions[sid].dropped_chunks += 1
                self._sessions[sid].dropped_frames += frames

    def input_dropped(self, sid: int, frames: int) -> None:
        with self._lock:
            self.counters["input_frames_dropped"] += frames
            if sid in self._sessions:
                self._sessions[sid].dropped_input_frames += frames

    def chunk_delivered(self, sid: int, frames: int, queue_wait_s: float, end_to_end_s: float) -> None:
        """A consumer took a chunk from its outbox (the moment the frames leave the engine's hands)."""
        now = self._clock()
        with self._lock:
            self.summaries["queue_wait_s"].add(queue_wait_s)
            self.summaries["end_to_end_s"].add(end_to_end_s)
            stats = self._sessions.get(sid)
            if stats is None:
                return
            if stats.first_frame_at is None:
                stats.first_frame_at = now
                self.summaries["ttff_s"].add(now - stats.opened_at)
            stats.frames += frames
            stats.deliveries.append((now, frames))

    def snapshot(self) -> dict:
        """Everything as plain JSON-friendly values; ``sessions`` lists the open sessions by id."""
        now = self._clock()
        with self._lock:
            sessions = {}
            for sid, s in self._sessions.items():
                fps, jitter = s.rates()
                sessions[sid] = {
                    "mode": s.mode,
                    "age_s": now - s.opened_at,
                    "ttff_s": None if s.first_frame_at is None else s.first_frame_at - s.opened_at,
                    "fps": fps,
                    "jitter_s": jitter,
                    "chunks": s.chunks,
                    "frames_delivered": s.frames,
                    "dropped_chunks": s.dropped_chunks,
                    "dropped_frames": s.dropped_frames,
                    "dropped_input_frames": s.dropped_input_frames,
                    "slo_violations": s.slo_violations,
                    "paused": s.paused,
                }
            return {
                "sessions_active": len(self._sessions),
                **self.counters,
                "latency": {name: summary.snapshot() for name, summary in self.summaries.items()},
                "slo_violations": [
                    {"target": target, "reason": reason, "count": n}
                    for (target, reason), n in sorted(self.slo_violations.items())
                ],
                "sessions": sessions,
            }


_COUNTER_HELP = {
    "sessions_opened": "Sessions admitted since start.",
    "sessions_rejected": "Sessions refused because the engine was busy (session or memory budget).",
    "session_errors": "Sessions ended by an error (bad parameters, model exception, out of memory).",
    "chunks": "Chunks generated.",
    "frames": "Frames generated.",
    "chunks_dropped": "Chunks never sent: replaced in a slow client's outbox, or finished after their session closed.",
    "frames_dropped": "Frames of dropped chunks.",
    "input_frames_dropped": "Video-to-video input frames discarded because the input buffer was full.",
    "sessions_rejected_slo": "Sessions refused because their SLO targets were infeasible under the load.",
}
_SUMMARY_HELP = {
    "chunk_latency_s": ("chunk_latency_seconds", "Generation time of a chunk (denoise + decode + copy to host)."),
    "queue_wait_s": ("queue_wait_seconds", "Time a finished chunk waited in its outbox before the sender took it."),
    "end_to_end_s": ("end_to_end_latency_seconds", "From the start of a chunk's generation to the sender taking it."),
    "ttff_s": ("time_to_first_frame_seconds", "From a session's open request to its first chunk being taken."),
}
_SESSION_GAUGES = (
    ("fps", "session_fps", "Frames per second delivered to the client, over its recent chunks."),
    ("jitter_s", "session_frame_interval_jitter_seconds", "Std. deviation of the per-frame interval, recent chunks."),
    ("ttff_s", "session_time_to_first_frame_seconds", "Time to first frame of the session."),
    ("dropped_chunks", "session_dropped_chunks", "Chunks dropped for this session's client."),
    ("frames_delivered", "session_frames_delivered", "Frames handed to this session's client."),
    ("slo_violations", "session_slo_violations", "SLO targets of this session reported infeasible or missed."),
)

_OUTBOX_GAUGES = (
    ("count", "outboxes", "Live client outboxes (one per connection)."),
    ("unsent_chunks", "outbox_unsent_chunks", "Chunks waiting in all outboxes for their sender (<= 1 each)."),
    ("max_unsent_chunks", "outbox_unsent_chunks_max", "Most chunks waiting in one outbox (the single slot: <= 1)."),
    ("pending_events", "outbox_pending_events", "Events waiting in all outboxes for their sender."),
    ("max_pending_events", "outbox_pending_events_max", "Most events waiting in one outbox."),
)


def _value(v: float | int | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    return repr(float(v)) if isinstance(v, float) else str(v)


def prometheus_text(snapshot: dict, memory: dict | None = None, outboxes: dict | None = None) -> str:
    """The Prometheus text exposition format (version 0.0.4) of a :meth:`Metrics.snapshot`.

    ``memory``: optional ``{"budget_bytes": int | None, "reserved_bytes": int}`` from the engine's admission.
    ``outboxes``: optional ``{"count", "unsent_chunks", "max_unsent_chunks", "pending_events", "max_pending_events"}``
    from the engine's live outboxes.
    """
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float | int | None]]) -> None:
        full = f"{PREFIX}_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        for suffix_labels, value in samples:
            lines.append(f"{full}{suffix_labels} {_value(value)}")

    metric("sessions_active", "gauge", "Sessions open in the engine.", [("", snapshot["sessions_active"])])
    for key, help_text in _COUNTER_HELP.items():
        metric(f"{key}_total", "counter", help_text, [("", snapshot[key])])
    for key, (name, help_text) in _SUMMARY_HELP.items():
        s = snapshot["latency"][key]
        samples = [(f'{{quantile="{q}"}}', s[f"p{round(q * 100)}"]) for q in QUANTILES]
        samples += [("_sum", s["sum"]), ("_count", s["count"])]
        metric(name, "summary", help_text, samples)
    violations = [
        (f'{{target="{v["target"]}",reason="{v["reason"]}"}}', v["count"]) for v in snapshot["slo_violations"]
    ]
    metric(
        "slo_violations_total",
        "counter",
        "SLO targets reported: infeasible (predicted before the chunk ran) or missed (measured).",
        violations,
    )
    if memory is not None:
        budget = memory.get("budget_bytes")
        metric("memory_budget_bytes", "gauge", "Admission memory budget (NaN: unlimited).", [("", budget)])
        metric(
            "memory_reserved_bytes", "gauge", "Memory reserved by admitted sessions.", [("", memory["reserved_bytes"])]
        )
    if outboxes is not None:
        for key, name, help_text in _OUTBOX_GAUGES:
            metric(name, "gauge", help_text, [("", outboxes[key])])
    for key, name, help_text in _SESSION_GAUGES:
        samples = [
            (f'{{session="{sid}",mode="{s["mode"]}"}}', s[key]) for sid, s in sorted(snapshot["sessions"].items())
        ]
        metric(name, "gauge", help_text, samples)
    return "\n".join(lines) + "\n"
