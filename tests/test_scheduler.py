"""The SLO scheduler's choices, simulated on recorded forward and decode times with a fake clock.

A forward of ``k`` chunks costs ``PASS_S + EXTRA_CHUNK_S * (k - 1)`` (the stream batch is cheaper per chunk than
``k`` sequential passes, dearer per forward), each extra session sharing a forward adds ``EXTRA_SESSION`` of it, and
a decode costs ``DECODE_S``. The simulated sessions follow the same schedule rules as ``StreamSession``: nothing is
timed, nothing sleeps.
"""

import pytest

from stream_runtime.serving.cost_model import CostModel, RobustEstimator, Workload
from stream_runtime.serving.scheduler import (
    BATCH,
    SEQUENTIAL,
    SessionSpec,
    SLOConfig,
    SLOScheduler,
    SLOTargets,
    Violation,
)

PASS_S, EXTRA_CHUNK_S, EXTRA_SESSION, DECODE_S = 0.10, 0.03, 0.2, 0.05
PASSES = 5  # 4 steps + the context pass
FRAMES = 12  # output frames per chunk
W = Workload("t2v 32x32", 1.0)
# Derived, for the asserts: a sequential chunk, a cold stream batch (warm-up), a steady stream-batch chunk.
SEQ_S = PASSES * PASS_S + DECODE_S  # 0.55
COLD_S = sum(PASS_S + EXTRA_CHUNK_S * k for k in range(PASSES)) + DECODE_S  # 0.85
STEADY_S = PASS_S + EXTRA_CHUNK_S * (PASSES - 1) + DECODE_S  # 0.27


def forward_s(chunks: int, sessions: int = 1) -> float:
    return (PASS_S + EXTRA_CHUNK_S * (chunks - 1)) * (1 + EXTRA_SESSION * (sessions - 1))


def calibrated(groups: int = 1) -> CostModel:
    costs = CostModel()
    for k in range(1, PASSES + 1):
        for g in range(1, groups + 1):
            costs.seed(W, (k, g), forward_s(k, g))
    costs.seed_decode(W, DECODE_S)
    return costs


def spec(ttff_s=None, fps=None, **kw) -> SessionSpec:
    return SessionSpec(W, PASSES, FRAMES, SLOTargets(ttff_s, fps), **kw)


def fps_for(deadline_s: float) -> float:
    return FRAMES / deadline_s


class Sim:
    """Runs the scheduler's decisions on the cost table above with a fake clock."""

    def __init__(self, config: SLOConfig | None = None, costs: CostModel | None = None) -> None:
        self.sched = SLOScheduler(costs or calibrated(), config or SLOConfig(headroom=1.0))
        self.now = 0.0
        self.state: dict[int, list] = {}  # sid -> [schedule, chunks in flight]
        self.log: list[tuple[float, tuple[int, ...], str]] = []
        self.violations: list[Violation] = []

    def open(self, sid: int, s: SessionSpec, check: bool = True) -> None:
        if check:
            assert self.sched.admit(s, self.now) is None
        self.sched.add(sid, s, self.now)
        self.state[sid] = [SEQUENTIAL, 0]

    def tick(self, runnable=None) -> None:
        decision = self.sched.decide(self.state if runnable is None else runnable, self.now)
        group = len(decision.sessions)
        self.now += sum(forward_s(k, g) for k, g in decision.forwards) + group * DECODE_S
        in_flight = {}
        for sid in decision.sessions:
            n = self.state[sid][1]
            if decision.schedule == BATCH:
                n = PASSES - 1 if n == 0 else n  # the warm-up fills it; then one in, one out per forward
            else:
                n = max(n - 1, 0)  # a drain, or sequential
            self.state[sid] = [decision.schedule, n]
            in_flight[sid] = n
        self.violations += decision.violations
        self.violations += self.sched.observe(
            decision, self.now, None, None, in_flight=in_flight, produced=set(decision.sessions)
        )
        self.log.append((self.now, decision.sessions, decision.schedule))

    def schedules(self, sid: int) -> list[str]:
        return [schedule for _, sessions, schedule in self.log if sid in sessions]


# -- choices


def test_a_tight_time_to_first_frame_gets_a_sequential_first_chunk_then_the_stream_batch():
    sim = Sim()
    sim.open(1, spec(ttff_s=0.6, fps=fps_for(1.0)))  # sequential fits (0.55 s), the batch's warm-up (0.85 s) not
    for _ in range(10):
        sim.tick()
    assert sim.schedules(1) == [SEQUENTIAL] + [BATCH] * 9  # the warm-up (0.85 s) fits in the 1 s deadline
    assert sim.log[0][0] == pytest.approx(SEQ_S)
    assert sim.violations == []


def test_a_loose_time_to_first_frame_starts_on_the_stream_batch():
    sim = Sim()
    sim.open(1, spec(ttff_s=2.0, fps=fps_for(1.0)))
    sim.tick()
    assert sim.schedules(1) == [BATCH] and sim.now == pytest.approx(COLD_S)


def test_a_throughput_bound_load_runs_on_the_stream_batch_and_meets_every_deadline():
    sim = Sim()
    for sid in (1, 2, 3):  # 3 x 0.55 s per 1 s sequentially: only the batch (3 x 0.27 s) keeps up
        sim.open(sid, spec(ttff_s=4.0, fps=fps_for(1.0)))
    for _ in range(60):
        sim.tick()
    assert sim.violations == []
    for sid in (1, 2, 3):
        assert sim.schedules(sid)[-10:] == [BATCH] * 10
    # Without the stream batch the same load is refused at admission, with the numbers.
    seq_only = Sim(SLOConfig(headroom=1.0, stream_batch=False))
    seq_only.open(1, spec(fps=fps_for(1.0)))
    reason = seq_only.sched.admit(spec(fps=fps_for(1.0)), now=0.0)
    assert reason is not None and "110%" in reason and "slo_fps" in reason


def test_an_impossible_deadline_is_refused_at_admission_and_reported_when_admitted_anyway():
    deadline = 0.2  # a steady batch chunk takes 0.27 s
    impossible = spec(fps=fps_for(deadline))
    sim = Sim()
    reason = sim.sched.admit(impossible, 0.0)
    assert "slo_fps 60 is infeasible" in reason and f"{STEADY_S:.3f} s at best" in reason and "0.200 s" in reason
    late_first = spec(ttff_s=0.3)
    assert "slo_ttff_s 0.3 is infeasible" in sim.sched.admit(late_first, 0.0)

    sim = Sim(SLOConfig(headroom=1.0, admission=False))
    sim.open(1, impossible)
    for _ in range(4):
        sim.tick()
    # Chunk 0 has no target; chunks 1.. are predicted late before they run: reported once each, never as missed.
    assert [(v.target, v.reason, v.chunk) for v in sim.violations] == [
        ("chunk_interval", "infeasible", c) for c in (1, 2, 3)
    ]
    first = sim.violations[0]
    assert first.target_s == pytest.approx(deadline)
    # Predicted: the fastest choice for that chunk, a drain of the batch (one forward of 4 chunks)...
    assert first.value_s == pytest.approx(forward_s(PASSES - 1) + DECODE_S)
    assert sim.schedules(1) == [BATCH] * 4  # ...but the batch goes on: its steady rate is the best there is
    assert first.to_json() == {
        "target": "chunk_interval",
        "reason": "infeasible",
        "chunk": 1,
        "target_s": first.target_s,
        "predicted_s": first.value_s,
    }


def test_a_chunk_that_comes_out_late_unpredicted_is_reported_as_missed():
    optimistic = CostModel()  # the calibration says a pass takes 10 ms; the device takes 100 ms
    for k in range(1, PASSES + 1):
        optimistic.seed(W, (k, 1), forward_s(k) / 10)
    optimistic.seed_decode(W, DECODE_S / 10)
    sim = Sim(costs=optimistic)
    sim.open(1, spec(ttff_s=0.2))
    sim.tick()
    (v,) = sim.violations
    assert (v.target, v.reason, v.chunk, v.target_s) == ("ttff", "missed", 0, 0.2)
    assert v.value_s == pytest.approx(sim.now)
    assert v.to_json()["measured_s"] == v.value_s


def test_best_effort_sessions_run_in_the_slack_of_targeted_ones():
    sim = Sim()
    sim.open(1, spec(ttff_s=4.0, fps=fps_for(1.0)))
    sim.open(2, spec())  # no targets
    sim.open(3, spec())
    for _ in range(40):
        sim.tick()
    assert sim.violations == []
    served = {sid: len(sim.schedules(sid)) for sid in (1, 2, 3)}
    assert served[2] > 5 and served[3] > 5 and abs(served[2] - served[3]) <= 1  # fair among themselves
    # The targeted session runs at about its frame rate, not more: the rest of the time goes to the others.
    assert served[1] <= sim.now / 1.0 + 2


def test_sessions_share_a_forward_when_it_pays_and_every_due_time_holds():
    config = SLOConfig(headroom=1.0, max_sessions_per_forward=3, stream_batch=False)
    sim = Sim(config, calibrated(groups=3))
    for sid in (1, 2, 3):
        sim.open(sid, spec(ttff_s=2.0, fps=fps_for(1.7)))  # admission counts chunks in turn: 3 x 0.55 s in 1.7 s
    sim.tick()
    # Together: 5 passes x 0.1 s x 1.4 + 3 decodes = 0.85 s for the three chunks; in turn they would take 1.65 s.
    assert sim.log[0][1:] == ((1, 2, 3), SEQUENTIAL)
    for _ in range(20):
        sim.tick()
    assert sim.violations == []
    assert all(len(sessions) == 3 for _, sessions, _ in sim.log)

    tight = Sim(config, calibrated(groups=3))
    tight.open(1, spec(ttff_s=0.6, fps=fps_for(1.5)))  # only a lone sequential chunk is in time for it
    tight.open(2, spec(ttff_s=3.0, fps=fps_for(1.5)))
    tight.tick()
    assert tight.log[0][1:] == ((1,), SEQUENTIAL)


def test_stream_batches_are_never_shared():
    """A stream batch is one session's chunks at different passes: the engine runs shared forwards for sequential
    chunks only, so the scheduler never groups sessions on the batch schedule, however cheap it would be."""
    sim = Sim(SLOConfig(headroom=1.0, max_sessions_per_forward=3), calibrated(groups=3))
    for sid in (1, 2, 3):
        sim.open(sid, spec(ttff_s=3.0, fps=fps_for(1.5)))
    for _ in range(12):
        sim.tick()
    assert any(schedule == BATCH for _, _, schedule in sim.log)
    assert all(len(sessions) == 1 for _, sessions, schedule in sim.log if schedule == BATCH)


def test_leaving_the_batch_drains_it_before_sequential_chunks():
    sim = Sim()
    sim.open(1, spec(ttff_s=2.0, fps=fps_for(1.0)))
    sim.tick()
    assert sim.state[1] == [BATCH, PASSES - 1]
    sim.open(2, spec(ttff_s=0.6))  # only sequential meets it, so the next tick is session 2's
    sim.sched.config = SLOConfig(headroom=1.0, stream_batch=False)  # and no batch any more for anyone
    sim.tick()
    assert sim.log[-1][1:] == ((2,), SEQUENTIAL)
    for _ in range(PASSES - 1):
        sim.tick([1])
        assert sim.log[-1][2] == SEQUENTIAL  # draining: one forward of the chunks left in flight
    assert sim.state[1] == [SEQUENTIAL, 0]
    decision = sim.sched.decide([1], sim.now)
    assert decision.forwards == ((1, 1),) * PASSES


def test_a_session_that_could_not_run_owes_nothing_for_that_time():
    sim = Sim()
    sim.open(1, spec(ttff_s=2.0, fps=fps_for(1.0)))
    sim.open(2, spec())
    for _ in range(3):
        sim.tick()
    for _ in range(10):  # session 1 paused (not runnable) for several of its deadlines
        sim.tick([2])
    for _ in range(5):
        sim.tick()
    assert sim.violations == []


def test_unknown_costs_admit_and_decide_without_predictions():
    sched = SLOScheduler(CostModel(), SLOConfig())
    assert sched.admit(spec(ttff_s=0.01, fps=1000.0), 0.0) is None
    sched.add(1, spec(ttff_s=0.01), 0.0)
    decision = sched.decide([1], 0.0)
    assert decision.sessions == (1,) and decision.predicted_s is None and decision.violations == ()
    assert sched.decide([], 0.0) is None


def test_targets_and_config_validate_their_arguments():
    assert SLOTargets(ttff_s=1.5, fps=16.0).chunk_deadline_s(12) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="fps must be a finite number > 0 or None, got 0"):
        SLOTargets(fps=0)
    with pytest.raises(ValueError, match="ttff_s"):
        SLOTargets(ttff_s=True)
    with pytest.raises(ValueError, match="headroom must be a finite number >= 1, got 0.5"):
        SLOConfig(headroom=0.5)
    with pytest.raises(ValueError, match="max_sessions_per_forward"):
        SLOConfig(max_sessions_per_forward=0)
    with pytest.raises(ValueError, match="passes must be an integer >= 1"):
        SessionSpec(W, 0, FRAMES)
    assert SLOConfig(default_fps=16.0).targets(2.0, None) == SLOTargets(2.0, 16.0)


# -- the cost estimator


def test_robust_estimator_ignores_a_single_outlier_and_follows_a_lasting_change():
    est = RobustEstimator(alpha=0.5, window=3)
    assert est.value is None
    est.add(1.0)
    assert est.value == 1.0  # the first sample sets it
    est.add(1.0)
    est.add(9.0)  # a stall: the median of (1, 1, 9) is 1
    assert est.value == 1.0
    for _ in range(10):
        est.add(2.0)
    assert est.value == pytest.approx(2.0, abs=1e-3)
    assert est.count == 13


def test_robust_estimator_seed_and_arguments():
    est = RobustEstimator(alpha=0.25, window=1)
    est.seed(4.0)
    est.add(0.0)
    assert est.value == pytest.approx(3.0) and est.count == 1
    for bad in ({"alpha": 0.0}, {"alpha": 1.5}, {"window": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RobustEstimator(**bad)
    with pytest.raises(ValueError, match="value must be a number of seconds >= 0, got -1"):
        est.add(-1)


def test_cost_model_splits_a_call_over_its_forwards():
    costs = CostModel(alpha=1.0, window=1)
    costs.observe_forwards(W, [(1, 1)] * PASSES, 0.5)  # a sequential chunk: 5 equal passes
    assert costs.forward_s(W, 1) == pytest.approx(0.1)
    costs.observe_forwards(W, [(PASSES, 1)], 0.22)  # a steady batch forward
    assert costs.forward_s(W, PASSES) == pytest.approx(0.22)
    assert costs.forward_s(W, 3) == pytest.approx(0.16)  # interpolated between 1 and 5 chunks
    # A warm-up call (forwards of 1..5 chunks) is split in proportion to the current estimates.
    costs.observe_forwards(W, [(k, 1) for k in range(1, PASSES + 1)], 2 * 0.8)
    assert costs.forward_s(W, 1) == pytest.approx(0.2) and costs.forward_s(W, PASSES) == pytest.approx(0.44)
    assert costs.forward_s(W, 3) == pytest.approx(0.32)  # measured now
    assert costs.forward_s(W, 2, sessions=2) == pytest.approx(0.2 * 4)  # never measured: no batching gain assumed


def test_cost_model_scales_a_measured_workload_to_an_unmeasured_one():
    costs = CostModel()
    assert costs.forward_s(W, 1) is None and costs.decode_s(W) is None
    costs.seed(W, (1, 1), 0.1)
    costs.seed_decode(W, 0.05)
    big = Workload("t2v 64x64", 4.0)
    assert costs.forward_s(big, 1) == pytest.approx(0.4) and costs.decode_s(big) == pytest.approx(0.2)
    assert costs.known(W) and not costs.known(big)
    costs.observe_decode(W, 0.07)
    snap = costs.snapshot()["t2v 32x32"]
    assert snap["forward_s"] == {"1x1": 0.1} and snap["decode_s"] > 0.05


def test_cost_model_arguments():
    costs = CostModel()
    with pytest.raises(ValueError, match=r"a forward shape must be \(chunks >= 1, sessions >= 1\)"):
        costs.forward_s(W, 0)
    with pytest.raises(ValueError, match="shapes must list the forwards"):
        costs.observe_forwards(W, [], 1.0)
    with pytest.raises(ValueError, match="seconds must be a number of seconds >= 0"):
        costs.observe_forwards(W, [(1, 1)], float("nan"))
    with pytest.raises(ValueError, match="size must be > 0"):
        Workload("x", 0)
