"""The engine with ``scheduler="slo"`` on the tiny random model: calibration, targets in ``opened``, admission
refusing infeasible targets, ``slo_violation`` events and metrics; the protocol's optional target fields.

Targets are chosen so that no timing decides the outcome: generous ones (days) are always met, impossible ones
(a chunk every nanosecond) never are. Waiting is on the outboxes' notify callbacks, as in test_serving_engine.
"""

import json

import pytest
from test_serving_engine import Collector, request

from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.serving import Engine, EngineConfig, SLOInfeasible
from stream_runtime.serving.protocol import ProtocolError, parse_message, parse_open
from stream_runtime.serving.scheduler import SCHEDULES, SLOConfig

SIZE = 32
GENEROUS_S = 1e6  # a target no run can miss
IMPOSSIBLE_FPS = 1e9  # a chunk of frames every few nanoseconds


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(height=SIZE, width=SIZE)


def slo_engine(make_engine, **slo) -> Engine:
    """A started engine with the SLO scheduler and up to three sessions; ``slo``: :class:`SLOConfig` fields."""
    return make_engine(max_sessions=3, scheduler="slo", slo=SLOConfig(**slo)).start()


def test_slo_engine_runs_sessions_to_their_targets_and_refuses_infeasible_ones(make_engine):
    engine = slo_engine(make_engine)
    calibration = engine.metrics()["scheduler"]["calibration"]
    assert calibration["pass_s"] > 0 and calibration["decode_s"] >= 0 and calibration["batch_forward_s"] > 0
    c = Collector(engine, 2)
    sid = engine.open(request(slo_ttff_s=GENEROUS_S, slo_fps=1 / GENEROUS_S), c.outboxes[0])
    best_effort = engine.open(request("a blue sea"), c.outboxes[1])
    with pytest.raises(SLOInfeasible, match=r"slo_fps 1e\+09 is infeasible: a chunk of \d+ frames takes") as info:
        engine.open(request(slo_fps=IMPOSSIBLE_FPS), c.outboxes[1])
    assert info.value.code == "slo_infeasible"
    c.until(lambda: len(c.chunks(0)) >= 4 and len(c.chunks(1)) >= 2)
    opened = c.events(0, "opened")[0].data
    assert opened["slo"] == {"ttff_s": GENEROUS_S, "fps": 1 / GENEROUS_S, "chunk_deadline_s": pytest.approx(
        GENEROUS_S * opened["frames_per_chunk"])}  # fmt: skip
    assert [chunk.index for chunk in c.chunks(0)[:4]] == [0, 1, 2, 3]  # continuous across schedule switches
    snap = engine.metrics()
    assert snap["scheduler"]["sessions"][sid]["schedule"] in SCHEDULES
    assert snap["scheduler"]["sessions"][best_effort]["targets"]["fps"] is None
    (costs,) = snap["scheduler"]["costs"].values()
    assert costs["samples"] > 0 and costs["forward_s"]["1x1"] > 0
    assert snap["sessions_rejected_slo"] == 1 and snap["sessions_rejected"] == 1
    assert c.events(0, "slo_violation") == [] and snap["slo_violations"] == []
    engine.close(sid)
    engine.close(best_effort)
    c.until(lambda: c.events(0, "closed") and c.events(1, "closed"))


def test_admitted_impossible_targets_are_reported_to_the_client_and_the_metrics(make_engine):
    engine = slo_engine(make_engine, admission=False)
    c = Collector(engine)
    sid = engine.open(request(slo_fps=IMPOSSIBLE_FPS), c.outboxes[0])
    c.until(lambda: len(c.events(0, "slo_violation")) >= 2)
    first = c.events(0, "slo_violation")[0]
    assert first.session == sid and first.data["target"] == "chunk_interval" and first.data["chunk"] >= 1
    assert first.data["reason"] == "infeasible" and first.data["predicted_s"] > first.data["target_s"]
    snap = engine.metrics()
    assert snap["sessions"][sid]["slo_violations"] >= 2
    assert sum(v["count"] for v in snap["slo_violations"]) >= 2
    text = engine.prometheus()
    assert 'stream_runtime_slo_violations_total{target="chunk_interval",reason="infeasible"}' in text
    assert "stream_runtime_sessions_rejected_slo_total 0" in text
    engine.close(sid)
    c.until(lambda: c.events(0, "closed"))


def test_the_default_engine_keeps_round_robin_and_rejects_bad_targets(pipe):
    engine = Engine(pipe, EngineConfig())
    assert engine.metrics()["scheduler"] == {"policy": "round_robin"}
    with pytest.raises(ValueError, match="slo_fps must be a finite number > 0, got -1"):
        engine.open(request(slo_fps=-1), engine.new_outbox())
    with pytest.raises(ValueError, match="scheduler must be one of"):
        EngineConfig(scheduler="fifo")


def test_protocol_open_takes_optional_targets():
    msg = parse_message(json.dumps({"type": "open", "prompt": "a fox", "slo_ttff_s": 1.5, "slo_fps": 16}))
    req, _ = parse_open(msg)
    assert (req.slo_ttff_s, req.slo_fps) == (1.5, 16.0)
    req, _ = parse_open(parse_message(json.dumps({"type": "open", "prompt": "a fox"})))
    assert (req.slo_ttff_s, req.slo_fps) == (None, None)
    for bad in ({"slo_fps": 0}, {"slo_ttff_s": "soon"}, {"slo_fps": True}):
        with pytest.raises(ProtocolError, match=next(iter(bad))) as info:
            parse_open(parse_message(json.dumps({"type": "open", "prompt": "a fox", **bad})))
        assert info.value.code == "bad_params"
