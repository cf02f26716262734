"""SLO-aware scheduling: per-session targets, a choice per engine tick, admission against the targets.

Targets (:class:`SLOTargets`, optional per session): a *time to first frame* (open request to the first chunk out
of the engine) and a *frame rate*, which gives each later chunk of ``F`` frames a deadline of ``d = F / fps``
seconds. Deadlines run on the session's playback clock: chunk ``i`` is due ``i * d`` after the first chunk came out.
For a stream that never runs ahead that is "at most ``d`` between two chunks"; a session that got ahead (a player
buffers what arrives early) keeps its lead instead of having its next deadline pulled in, so running a session
early never makes the others' deadlines harder. When a session becomes runnable again (resumed, or video input
arrived), its next chunk is due no earlier than ``d`` later: it owes nothing for the time it could not run.

Every tick the engine asks :meth:`SLOScheduler.decide` what to run, given the runnable sessions. The choice:

- **Denoising schedule per session.** ``sequential`` runs all ``P`` passes of one chunk (``P`` = steps, plus the
  context pass): the shortest time to the next chunk from a cold start, ``P * pass``. ``batch`` is the stream batch
  (:mod:`stream_runtime.stream_batch`): from cold, ``P`` forwards of 1, 2, ..., P chunks before the first chunk
  leaves, then one forward of ``P`` chunks per chunk, cheaper per chunk when the device has room to spare. A
  session takes the option with the lower steady per-chunk cost among those that meet its next due time, else the
  fastest one. Hence a tight time to first frame gets a sequential first chunk, and a throughput-bound stream
  switches to the batch once a warm-up fits in its frame deadline. Leaving the batch drains the chunks in flight
  first (one forward each).
- **Order.** Earliest due first (EDF) among sessions with a due time; a session without one (no targets: best
  effort) runs when every targeted session can still wait for it (its predicted time fits in the smallest slack).
- **Sessions per forward.** Up to ``max_sessions_per_forward`` sessions of one workload on the sequential
  schedule share their forwards (:mod:`stream_runtime.pipelines.wan.batching`) when that costs less than running
  them one after the other and every one of them still meets its due time.
- **Reports.** When no choice meets a due time (even the fastest schedules, in EDF order), a :class:`Violation`
  with ``reason="infeasible"`` names the session, the target and the predicted against the target time, before the
  chunk runs; a chunk that comes out late without having been predicted late is reported as ``missed``. Each
  (session, target, chunk) is reported once.

Predictions come from a :class:`~stream_runtime.serving.cost_model.CostModel` of measured forward and decode
times, multiplied by ``headroom``. :meth:`SLOScheduler.admit` refuses a session whose targets cannot be met under
the current load, with the reason.

The scheduler holds no clock: every call takes ``now``, so a simulation drives it with recorded times.

Example::

    sched = SLOScheduler(CostModel(), SLOConfig())
    spec = SessionSpec(Workload("t2v 32x32", 3072), passes=5, frames_per_chunk=12, targets=SLOTargets(fps=16))
    reason = sched.admit(spec, now=0.0)          # None: admitted
    sched.add(1, spec, opened_at=0.0)
    decision = sched.decide([1], now=0.0)         # Decision(sessions=(1,), mode="sequential", ...)
    ... run it ...
    sched.observe(decision, now=0.4, denoise_s=0.3, decode_s=0.1, in_flight={1: 0}, produced={1})
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from stream_runtime.serving.cost_model import CostModel, Shape, Workload

SEQUENTIAL = "sequential"
BATCH = "batch"
SCHEDULES = (SEQUENTIAL, BATCH)
POLICIES = ("round_robin", "slo")
"""``EngineConfig.scheduler``: fair round-robin (the default) or this module's SLO-aware scheduler."""
TTFF = "ttff"
CHUNK_INTERVAL = "chunk_interval"


def _positive_or_none(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")


@dataclass(frozen=True)
class SLOTargets:
    """What one session asks of the engine; None: no target of that kind.

    Example::

        SLOTargets(ttff_s=1.5, fps=16.0).chunk_deadline_s(12)   # -> 0.75
    """

    ttff_s: float | None = None
    """Time to first frame: from the open request to the session's first chunk leaving the engine, in seconds."""
    fps: float | None = None
    """Frame rate the session must keep up with: each chunk after the first is due ``frames_per_chunk / fps``
    seconds after the previous one."""

    def __post_init__(self) -> None:
        _positive_or_none("ttff_s", self.ttff_s)
        _positive_or_none("fps", self.fps)

    @property
    def any(self) -> bool:
        return self.ttff_s is not None or self.fps is not None

    def chunk_deadline_s(self, frames_per_chunk: int) -> float | None:
        """Most seconds allowed between two output chunks (None without an fps target)."""
        return None if self.fps is None else frames_per_chunk / self.fps

    def to_json(self, frames_per_chunk: int) -> dict:
        return {"ttff_s": self.ttff_s, "fps": self.fps, "chunk_deadline_s": self.chunk_deadline_s(frames_per_chunk)}


@dataclass(frozen=True)
class SLOConfig:
    """Settings of the SLO-aware scheduler (``EngineConfig.scheduler = "slo"``)."""

    ewma_alpha: float = 0.3
    """Weight of the newest median in each cost estimate (1: follow measurements at once)."""
    window: int = 5
    """Samples in each cost estimate's running median (a single outlier among them does not move it)."""
    headroom: float = 1.2
    """Predicted times are multiplied by this before they are compared with targets: a 20% margin for the noise of
    the measurements and for the work that runs between the decision and the chunk (1: none)."""
    max_utilization: float = 1.0
    """Admission: the share of the engine's time that the frame deadlines of all sessions may claim together."""
    stream_batch: bool = True
    """Whether the scheduler may put text-to-video sessions on the stream-batch schedule."""
    max_sessions_per_forward: int = 4
    """Most sessions that may share one forward (``pipelines.wan.batching``: sequential chunks of one workload).
    The scheduler groups sessions only where the measured costs say it pays (the calibration measures every group
    size up to this one); 1 never groups."""
    admission: bool = True
    """Refuse a session whose targets are infeasible under the current load (``EngineBusy``, code
    ``slo_infeasible``). False: admit it and report its violations as they come."""
    calibrate: bool = True
    """Measure the forward and decode times of the default workload when the engine starts (a few forwards of a
    scratch session), so the first admissions have numbers to go by."""
    default_ttff_s: float | None = None
    """Time-to-first-frame target of sessions that give none (None: no target)."""
    default_fps: float | None = None
    """Frame-rate target of sessions that give none (None: no frame deadline)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not 1.0 <= self.headroom < math.inf:
            raise ValueError(f"headroom must be a finite number >= 1, got {self.headroom!r}")
        if not 0.0 < self.max_utilization <= 1.0:
            raise ValueError(f"max_utilization must be in (0, 1], got {self.max_utilization!r}")
        if not isinstance(self.max_sessions_per_forward, int) or self.max_sessions_per_forward < 1:
            raise ValueError(f"max_sessions_per_forward must be an integer >= 1, got {self.max_sessions_per_forward!r}")
        _positive_or_none("default_ttff_s", self.default_ttff_s)
        _positive_or_none("default_fps", self.default_fps)

    def targets(self, ttff_s: float | None, fps: float | None) -> SLOTargets:
        """A session's targets, the defaults filling what it did not give."""
        return SLOTargets(self.default_ttff_s if ttff_s is None else ttff_s, self.default_fps if fps is None else fps)


@dataclass(frozen=True)
class SessionSpec:
    """What the scheduler needs to know about a session."""

    workload: Workload
    passes: int
    """Forwards per chunk: denoising steps, plus one for the context pass."""
    frames_per_chunk: int
    """Output frames of a chunk after the first (what the frame deadline is counted in)."""
    targets: SLOTargets = SLOTargets()
    batchable: bool = True
    """Whether the stream batch is possible for it (text-to-video without cross-step reuse)."""

    def __post_init__(self) -> None:
        for name in ("passes", "frames_per_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Violation:
    """A target that was (``missed``) or will be (``infeasible``) missed, with the numbers."""

    session: int
    target: str
    """``ttff`` or ``chunk_interval``."""
    reason: str
    """``infeasible``: predicted before the chunk ran, no choice meets it. ``missed``: measured after it came out."""
    chunk: int
    """Index of the chunk concerned in the session."""
    target_s: float
    """The target: time to first frame, or the chunk deadline."""
    value_s: float
    """Predicted (``infeasible``) or measured (``missed``) time to first frame, or chunk interval on the playback
    clock (from the time the previous chunk was due, or came out if it was late, to this chunk)."""

    def to_json(self) -> dict:
        name = "predicted_s" if self.reason == "infeasible" else "measured_s"
        return {"target": self.target, "reason": self.reason, "chunk": self.chunk, "target_s": self.target_s,
                name: self.value_s}  # fmt: skip


@dataclass(frozen=True)
class Decision:
    """What to run in one engine tick."""

    sessions: tuple[int, ...]
    """The sessions that share this tick's forwards (one unless ``max_sessions_per_forward`` allows more)."""
    schedule: str
    """``sequential`` or ``batch``: the denoising schedule of every session in it for this chunk."""
    forwards: tuple[Shape, ...]
    """The forwards it runs, as ``(chunks per session, sessions)`` (for the cost model's attribution)."""
    predicted_s: float | None
    """Predicted wall time of the tick (None: no cost known yet)."""
    violations: tuple[Violation, ...] = ()
    """Targets found infeasible while deciding (reported once each)."""


@dataclass
class _Track:
    spec: SessionSpec
    opened_at: float
    schedule: str = SEQUENTIAL
    in_flight: int = 0
    chunks: int = 0
    anchor: tuple[float, int] | None = None
    """(time, chunk index) of the playback clock: chunk ``i`` is due ``anchor time + (i - anchor chunk) * d``."""
    runnable_since: float | None = None
    last_served: float = -math.inf
    reported: set = field(default_factory=set)

    def due(self) -> tuple[float, str, float, float] | None:
        """(due time, target kind, reference time, target seconds) of the next chunk, or None."""
        targets, start = self.spec.targets, self.opened_at
        if self.chunks == 0:
            if targets.ttff_s is not None:
                return start + targets.ttff_s, TTFF, start, targets.ttff_s
            return None
        deadline = targets.chunk_deadline_s(self.spec.frames_per_chunk)
        if deadline is None or self.runnable_since is None or self.anchor is None:
            return None
        at, index = self.anchor
        due = at + (self.chunks - index) * deadline
        return due, CHUNK_INTERVAL, due - deadline, deadline

    def became_runnable(self, now: float) -> None:
        self.runnable_since = now
        deadline = self.spec.targets.chunk_deadline_s(self.spec.frames_per_chunk)
        if deadline is not None and self.anchor is not None:
            due = self.anchor[0] + (self.chunks - self.anchor[1]) * deadline
            if due < now + deadline:  # the time it could not run is not owed
                self.anchor = (now, self.chunks - 1)


class SLOScheduler:
    """Decides each engine tick from measured costs; see the module docstring. Thread-safe."""

    def __init__(self, costs: CostModel, config: SLOConfig | None = None) -> None:
        self.costs = costs
        self.config = config or SLOConfig()
        self._lock = threading.RLock()
        self._tracks: dict[int, _Track] = {}

    # -- sessions

    def add(self, sid: int, spec: SessionSpec, opened_at: float) -> None:
        with self._lock:
            self._tracks[sid] = _Track(spec, opened_at)

    def remove(self, sid: int) -> None:
        with self._lock:
            self._tracks.pop(sid, None)

    def sync(self, sid: int, schedule: str, in_flight: int) -> None:
        """Tell the scheduler the session's actual schedule state (e.g. a session opened on the stream batch)."""
        with self._lock:
            track = self._tracks.get(sid)
            if track is not None:
                track.schedule, track.in_flight = schedule, in_flight

    def state(self) -> dict:
        """Per session: schedule, chunks in flight, the next due time's kind (for metrics)."""
        with self._lock:
            out = {}
            for sid, t in self._tracks.items():
                due = t.due()
                out[sid] = {
                    "schedule": t.schedule,
                    "in_flight": t.in_flight,
                    "targets": t.spec.targets.to_json(t.spec.frames_per_chunk),
                    "next_due": None if due is None else due[1],
                }
            return out

    # -- cost predictions

    def _options(self, t: _Track) -> tuple[str, ...]:
        if t.schedule == SEQUENTIAL and t.in_flight > 0:
            return (SEQUENTIAL,)  # a drain finishes before the batch may start again
        if self.config.stream_batch and t.spec.batchable and t.spec.passes > 1:
            return SCHEDULES
        return (SEQUENTIAL,)

    @staticmethod
    def _forwards(t: _Track, schedule: str, group: int = 1) -> list[Shape]:
        """The forwards a call runs until the session's next chunk comes out."""
        p, n = t.spec.passes, t.in_flight
        if schedule == BATCH:
            if n == 0:
                return [(k, group) for k in range(1, p + 1)]  # the warm-up
            return [(min(n + 1, p), group)]
        if n > 0:
            return [(n, group)]  # a drain: no new chunk enters, the oldest leaves
        return [(1, group)] * p

    def _service(self, t: _Track, schedule: str, group: int = 1) -> float | None:
        """Predicted seconds until the next chunk of each of ``group`` such sessions is out (headroom included)."""
        decode = self.costs.decode_s(t.spec.workload)
        total = 0.0
        for chunks, sessions in self._forwards(t, schedule, group):
            cost = self.costs.forward_s(t.spec.workload, chunks, sessions)
            if cost is None or decode is None:
                return None
            total += cost
        return (total + group * decode) * self.config.headroom

    def _steady(self, t: _Track, schedule: str) -> float | None:
        """Predicted seconds per chunk once the schedule is settled (headroom included)."""
        w, p = t.spec.workload, t.spec.passes
        forward = self.costs.forward_s(w, p) if schedule == BATCH else self.costs.forward_s(w, 1)
        decode = self.costs.decode_s(w)
        if forward is None or decode is None:
            return None
        return ((forward if schedule == BATCH else p * forward) + decode) * self.config.headroom

    def _choose(self, t: _Track, start: float, due: tuple | None, fastest: bool) -> tuple[str, float | None]:
        """(schedule, predicted service) for the session's next chunk if it starts at ``start``.

        Preferred: the lowest steady cost among the schedules that meet ``due``; if none does, the fastest for a
        first chunk and the lowest steady cost for later ones (the target is lost anyway, and the fastest next
        chunk, a drain, would make every later one slower). ``fastest``: the soonest next chunk, whatever follows.
        """
        options = [(s, self._service(t, s)) for s in self._options(t)]
        if any(cost is None for _, cost in options):
            return t.schedule if t.schedule in dict(options) else SEQUENTIAL, None
        by_speed = min(options, key=lambda o: (o[1], o[0] != t.schedule))
        if fastest:
            return by_speed
        meeting = [s for s, cost in options if due is None or start + cost <= due[0]]
        if not meeting and due[1] == TTFF:
            return by_speed
        best = min(meeting or dict(options), key=lambda s: (self._steady(t, s), s != t.schedule))
        return best, dict(options)[best]

    def _plan(self, tracks: Sequence[tuple[int, _Track]], now: float, fastest: bool) -> list[tuple]:
        """EDF over the sessions with a due time: (sid, schedule, service, finish, due info) each."""
        plan, clock = [], now
        for sid, t in sorted(tracks, key=lambda it: (it[1].due()[0], it[0])):
            due = t.due()
            schedule, cost = self._choose(t, clock, due, fastest)
            clock += cost or 0.0
            plan.append((sid, schedule, cost, clock, due))
        return plan

    # -- the tick

    def decide(self, runnable: Iterable[int], now: float) -> Decision | None:
        """What to run now among ``runnable`` session ids (None: nothing is runnable)."""
        with self._lock:
            ids = set(runnable)
            for sid, t in self._tracks.items():
                if sid not in ids:
                    t.runnable_since = None
                elif t.runnable_since is None:
                    t.became_runnable(now)
            live = [(sid, self._tracks[sid]) for sid in sorted(ids) if sid in self._tracks]
            if not live:
                return None
            targeted = [(sid, t) for sid, t in live if t.due() is not None]
            best_effort = sorted((it for it in live if it[1].due() is None), key=lambda it: (it[1].last_served, it[0]))
            plan = self._plan(targeted, now, fastest=False)
            violations: list[Violation] = []
            if any(cost is not None and finish > due[0] for _, _, cost, finish, due in plan):
                fastest = self._plan(targeted, now, fastest=True)  # the fastest schedules, still in EDF order
                violations = self._infeasible(fastest)
                if not violations:
                    plan = fastest  # speed saves every target; else the preferred choices keep the long-run rate
            slack = min((due[0] - finish for _, _, _, finish, due in plan), default=math.inf)
            head: tuple[int, str, float | None]
            if best_effort:
                sid, t = best_effort[0]
                schedule, cost = self._choose(t, now, None, fastest=False)
                if not plan or (cost is not None and cost <= slack) or (cost is None and slack > 0):
                    head = (sid, schedule, cost)
                else:
                    head = plan[0][:3]
            else:
                head = plan[0][:3]
            sessions = self._group(head, live, plan, now)
            track = self._tracks[head[0]]
            forwards = tuple(self._forwards(track, head[1], len(sessions)))
            predicted = self._service(track, head[1], len(sessions))
            return Decision(tuple(sessions), head[1], forwards, predicted, tuple(violations))

    def _infeasible(self, plan: list[tuple]) -> list[Violation]:
        out = []
        for sid, _, cost, finish, (due, kind, ref, target) in plan:
            t = self._tracks[sid]
            key = (kind, t.chunks)
            if cost is None or finish <= due or key in t.reported:
                continue
            t.reported.add(key)
            out.append(Violation(sid, kind, "infeasible", t.chunks, target, finish - ref))
        return out

    def _group(self, head: tuple, live: list, plan: list, now: float) -> list[int]:
        """``head`` plus the sessions that may share its forwards (see the module docstring)."""
        sid0, schedule, cost0 = head
        limit = self.config.max_sessions_per_forward
        t0 = self._tracks[sid0]
        if limit == 1 or cost0 is None or schedule != SEQUENTIAL:
            return [sid0]  # shared forwards run sequential chunks only (a stream batch is one session's)
        order = {sid: i for i, (sid, *_) in enumerate(plan)}
        candidates = [
            (sid, t)
            for sid, t in sorted(live, key=lambda it: (order.get(it[0], len(order)), it[1].last_served, it[0]))
            if sid != sid0
            and t.spec.workload == t0.spec.workload
            and t.spec.passes == t0.spec.passes
            and (t.schedule, t.in_flight) == (t0.schedule, t0.in_flight)
            and schedule in self._options(t)
        ]
        group, alone = [sid0], cost0
        for sid, t in candidates:
            if len(group) == limit:
                break
            trial = [*group, sid]
            together = self._service(t0, schedule, len(trial))
            alone_trial = alone + (self._service(t, schedule) or math.inf)
            if together is None or together >= alone_trial:
                continue  # sharing a forward gains nothing over running them in turn
            finish = now + together
            members_ok = all((d := self._tracks[m].due()) is None or finish <= d[0] for m in trial)
            others = [(s, self._tracks[s]) for s, *_ in plan if s not in trial]
            clock, others_ok = finish, True
            for s, t_other in others:  # the rest, in EDF order, after the shared forwards
                c = self._choose(t_other, clock, t_other.due(), fastest=True)[1] or 0.0
                clock += c
                before = next(p for p in plan if p[0] == s)
                if clock > t_other.due()[0] >= before[3]:  # a new miss that running them in turn would avoid
                    others_ok = False
                    break
            if members_ok and others_ok:
                group, alone = trial, alone_trial
        return group

    def observe(
        self,
        decision: Decision,
        now: float,
        denoise_s: float | None,
        decode_s: float | None,
        in_flight: dict[int, int],
        produced: set[int] | frozenset[int],
    ) -> list[Violation]:
        """Record a tick that ran: its measured times (seconds, None if not measured), each session's chunks in
        flight afterwards, and the sessions whose chunk came out (at ``now``). Returns the targets it missed."""
        missed = []
        with self._lock:
            tracks = {sid: self._tracks[sid] for sid in decision.sessions if sid in self._tracks}
            if tracks:
                workload = next(iter(tracks.values())).spec.workload
                if denoise_s is not None:
                    self.costs.observe_forwards(workload, decision.forwards, denoise_s)
                if decode_s is not None and produced:
                    self.costs.observe_decode(workload, decode_s / len(produced))
            for sid, t in tracks.items():
                t.schedule, t.last_served = decision.schedule, now
                t.in_flight = in_flight.get(sid, 0)
                if sid not in produced:
                    continue
                due = t.due()
                if due is not None and now > due[0] and (due[1], t.chunks) not in t.reported:
                    t.reported.add((due[1], t.chunks))
                    missed.append(Violation(sid, due[1], "missed", t.chunks, due[3], now - due[2]))
                if t.anchor is None or (due is not None and now > due[0]):
                    t.anchor = (now, t.chunks)  # a late chunk restarts the clock, as a player re-buffers
                t.chunks += 1
        return missed

    # -- admission

    def admit(self, spec: SessionSpec, now: float) -> str | None:
        """None if a session with ``spec`` can be admitted now, else why its targets are infeasible."""
        targets = spec.targets
        if not targets.any or not self.config.admission:
            return None
        with self._lock:
            probe = _Track(spec, now)
            services = [self._service(probe, s) for s in self._options(probe)]
            steadies = [self._steady(probe, s) for s in self._options(probe)]
            if any(v is None for v in services + steadies):
                return None  # nothing measured yet to judge by: admitted, violations are reported as they come
            margin = f"(predictions include the headroom x{self.config.headroom:g})"
            deadline = targets.chunk_deadline_s(spec.frames_per_chunk)
            if deadline is not None:
                steady = min(steadies)
                if steady > deadline:
                    return (
                        f"slo_fps {targets.fps:g} is infeasible: a chunk of {spec.frames_per_chunk} frames takes "
                        f"{steady:.3f} s at best but would be due every {deadline:.3f} s {margin}; ask for a "
                        "lower fps, fewer steps or a smaller resolution"
                    )
                load = steady / deadline
                for t in self._tracks.values():
                    d = t.spec.targets.chunk_deadline_s(t.spec.frames_per_chunk)
                    if d is not None:
                        load += min(self._steady(t, s) or 0.0 for s in self._options(t)) / d
                if load > self.config.max_utilization:
                    return (
                        f"slo_fps {targets.fps:g} is infeasible under the current load: the frame deadlines of "
                        f"the open sessions and this one would need {load:.0%} of the engine's time (at most "
                        f"{self.config.max_utilization:.0%}) {margin}; try later or ask for a lower fps"
                    )
            if targets.ttff_s is not None:
                due = now + targets.ttff_s
                ahead = 0.0
                for t in self._tracks.values():
                    d = t.due()
                    if d is not None and d[0] <= due:
                        ahead += min(self._service(t, s) or 0.0 for s in self._options(t))
                first = min(services)
                if ahead + first > targets.ttff_s:
                    return (
                        f"slo_ttff_s {targets.ttff_s:g} is infeasible: the first chunk is predicted after "
                        f"{ahead + first:.3f} s ({ahead:.3f} s of other sessions' work due earlier, then "
                        f"{first:.3f} s for the chunk) {margin}; ask for a longer time to first frame"
                    )
        return None
