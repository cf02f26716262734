"""The engine running several sessions' chunks in shared forwards (``max_sessions_per_forward``)."""

import numpy as np
import pytest
from test_serving_engine import Collector, request

from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.serving import EngineConfig, SessionRequest
from stream_runtime.serving.scheduler import SLOConfig

SIZE = 32
PROMPTS = ("a red fox", "a blue cat", "a green dog")


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(height=SIZE, width=SIZE)


def test_round_robin_shares_forwards_and_each_stream_is_what_it_is_alone(make_engine, pipe):
    engine = make_engine(max_sessions_per_forward=3)
    c = Collector(engine, 3)
    # Opened before the engine starts: its first drain creates all three, so the first pick groups them.
    sids = [engine.open(request(p, seed=i), c.outboxes[i]) for i, p in enumerate(PROMPTS)]
    engine.start()
    c.until(lambda: all(len(c.chunks(i)) >= 3 for i in range(3)))
    for i in range(3):
        assert [chunk.index for chunk in c.chunks(i)[:3]] == [0, 1, 2]
    firsts = [c.chunks(i)[0] for i in range(3)]
    assert len({(chunk.started_at, chunk.finished_at) for chunk in firsts}) == 1  # one shared call made all three
    for i, prompt in enumerate(PROMPTS):
        config, height, width = engine.resolve(request(prompt, seed=i))
        with pipe.session(prompt, seed=i, height=height, width=width, config=config) as alone:
            for chunk in c.chunks(i)[:3]:
                expected = alone.next_chunk()
                assert np.abs(chunk.frames.astype(int) - expected.astype(int)).max() <= 1
    for sid in sids:
        engine.close(sid)
    c.until(lambda: all(c.events(i, "closed") for i in range(3)))


def test_sessions_with_other_settings_do_not_share(make_engine):
    engine = make_engine(max_sessions_per_forward=3)
    c = Collector(engine, 2)
    engine.open(request("a red fox"), c.outboxes[0])
    other = SessionRequest(prompt="a blue cat", height=SIZE, width=SIZE, steps=2)  # other noise levels per forward
    engine.open(other, c.outboxes[1])
    engine.start()
    c.until(lambda: len(c.chunks(0)) >= 2 and len(c.chunks(1)) >= 2)
    calls = {(chunk.started_at, chunk.finished_at) for i in range(2) for chunk in c.chunks(i)[:2]}
    assert len(calls) == 4


def test_a_failure_in_a_shared_forward_ends_every_session_of_the_group(make_engine, monkeypatch):
    import stream_runtime.serving.engine as engine_module

    def broken(sessions):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine_module, "next_chunks", broken)
    engine = make_engine(max_sessions_per_forward=2)
    c = Collector(engine, 2)
    for i in range(2):
        engine.open(request(PROMPTS[i]), c.outboxes[i])
    engine.start()
    c.until(lambda: all(c.events(i, "closed") for i in range(2)))
    for i in range(2):
        (error,) = c.events(i, "error")
        assert error.data["code"] == "session_failed" and "device lost" in error.data["message"]
    assert engine.alive  # the engine goes on


def test_slo_calibration_measures_every_group_size(make_engine):
    engine = make_engine(max_sessions=3, scheduler="slo", slo=SLOConfig(max_sessions_per_forward=3)).start()
    calibration = engine.metrics()["scheduler"]["calibration"]
    assert calibration["shared_pass_s_2"] > 0 and calibration["shared_pass_s_3"] > 0
    forwards = next(iter(engine.metrics()["scheduler"]["costs"].values()))["forward_s"]
    assert {"1x1", "1x2", "1x3"} <= set(forwards)


def test_engine_config_checks_the_group_limit():
    with pytest.raises(ValueError, match="max_sessions_per_forward"):
        EngineConfig(max_sessions_per_forward=0)


def test_admission_counts_a_guided_sessions_two_cache_rows(make_engine, pipe):
    engine = make_engine()
    config, height, width = engine.resolve(request())
    plain = engine.estimate_bytes(config, height, width)
    guided = engine.estimate_bytes(config.replace(guidance_scale=3.0), height, width)
    with pipe.session("a red fox", height=height, width=width, config=config.replace(guidance_scale=3.0)) as s:
        assert guided == s.cache.memory_bytes() == 2 * plain


def test_guidance_over_the_protocol_opens_changes_and_refuses_a_toggle(make_engine):
    from stream_runtime.serving import SessionUpdate
    from stream_runtime.serving.protocol import parse_open, parse_update

    msg = {"type": "open", "prompt": "a red fox", "height": SIZE, "width": SIZE, "steps": 1, "guidance_scale": 3}
    req, _ = parse_open(msg)
    assert req.guidance_scale == 3.0
    assert parse_update({"type": "update", "guidance_scale": 5}).guidance_scale == 5.0
    engine = make_engine().start()
    c = Collector(engine)
    sid = engine.open(req, c.outboxes[0])
    c.until(lambda: c.chunks())
    assert c.events(0, "opened")[0].data["guidance_scale"] == 3.0
    engine.update(sid, SessionUpdate(guidance_scale=5.0))
    c.until(lambda: c.events(0, "updated"))
    assert c.events(0, "updated")[0].data["guidance_scale"] == 5.0
    engine.update(sid, SessionUpdate(guidance_scale=1.0))  # off: refused, the stream goes on guided
    c.until(lambda: c.events(0, "error"))
    error = c.events(0, "error")[0].data
    assert error["code"] == "bad_params" and not error["fatal"] and "keeps" in error["message"]
    first = c.chunks()[-1].index
    c.until(lambda: c.chunks()[-1].index >= first + 1)
    engine.close(sid)
    c.until(lambda: c.events(0, "closed"))
