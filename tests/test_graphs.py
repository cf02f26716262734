"""ChunkGraphs on the CPU: a stand-in capture that replays the pass by rerunning it over the graph's static inputs
while leaving the host state (the cache's bookkeeping) as it was, which is what a CUDA graph replay does. The frames
must equal those of a session without graphs; the GPU test (tests/test_gpu.py) runs real CUDA graphs."""

import copy

import numpy as np
import pytest
import torch

from stream_runtime import StreamPipeline
from stream_runtime.pipelines.wan.graphs import ChunkGraphs

DEVICE_STATE = ("k", "v", "latents")


def replay_capture(cache):
    """``capture`` for ChunkGraphs: the first call runs the pass once (its result is the garbage a capture leaves:
    the static inputs are still empty), each replay reruns it into the same output and then restores the cache's
    host state, since a real replay runs no Python."""

    def capture(fn):
        out = fn()

        def replay():
            host = {k: copy.deepcopy(v) for k, v in vars(cache).items() if k not in DEVICE_STATE}
            out.copy_(fn())
            vars(cache).update(host)

        return replay, out

    return capture


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(seed=0, height=32, width=32)


def with_graphs(session):
    session.graphs = ChunkGraphs(session.net, session.cache, capture=replay_capture(session.cache))
    return session.graphs


def stream(pipe, graphs: bool, chunks: int = 6, mode: str = "t2v", switch_at: int | None = None, blend=0, **kw):
    frames_in = np.random.default_rng(0).integers(0, 256, (80, 32, 32, 3), dtype=np.uint8)
    with pipe.session("a red fox", seed=0, mode=mode, **kw) as s:
        g = with_graphs(s) if graphs else None
        if mode == "v2v":
            s.push_frames(frames_in)
        out = []
        for i in range(chunks):
            if i == switch_at:
                s.set_prompt("a blue cat moving", blend_chunks=blend)
            out.append(s.next_chunk())
        return out, g


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_t2v_replays_equal_eager(pipe):
    ref, _ = stream(pipe, False)
    got, g = stream(pipe, True)
    assert_same(got, ref)
    # cache 3 sink + 9 window - 3 chunk frames: full after 3 chunks; the first full pass is eager, the next captured
    assert g.captures == 1
    assert g.replays > 5


@pytest.mark.parametrize("blend", [0, 2])
def test_prompt_switch_reaches_the_graph(pipe, blend):
    """A new prompt's text K/V are copied into the graph's static buffers (immediately, or over a blend)."""
    ref, _ = stream(pipe, False, chunks=7, switch_at=5, blend=blend)
    got, g = stream(pipe, True, chunks=7, switch_at=5, blend=blend)
    assert_same(got, ref)
    assert g.replays > 0
    plain, _ = stream(pipe, False, chunks=7)
    assert not np.array_equal(got[-1], plain[-1])  # the switch changed the output


def test_v2v_guided_and_bounded_replays_equal_eager(pipe):
    for kw in ({"mode": "v2v"}, {"guidance_scale": 3.0}, {"position_mode": "bounded"}):
        ref, _ = stream(pipe, False, chunks=8, **kw)
        got, g = stream(pipe, True, chunks=8, **kw)
        assert_same(got, ref)
        assert g.replays > 0, kw


def test_passes_that_cannot_replay_run_eagerly(pipe):
    """Attention reuse and the radial backend make host decisions per pass: no graph, same frames."""
    for kw in ({"attention_reuse": 2}, {"attention_backend": "radial"}):
        ref, _ = stream(pipe, False, **kw)
        got, g = stream(pipe, True, **kw)
        assert_same(got, ref)
        assert g.captures == g.replays == 0, kw


def test_stand_in_detects_missing_host_bookkeeping(pipe, monkeypatch):
    """The replay leaves the cache's host state alone: without note_stored the commit after a replay fails, so the
    stand-in really models a replay (and the runner's note_stored is what makes it work)."""
    from stream_runtime.cache import RollingKVCache

    monkeypatch.setattr(RollingKVCache, "note_stored", lambda self, frames: None)
    monkeypatch.setattr(RollingKVCache, "store_current", _store_without_note)
    with pytest.raises(ValueError, match="commit of"):
        stream(pipe, True)


def _store_without_note(self, layer, k, v):
    start, n = self.valid_tokens, k.shape[1]
    self.k[layer][:, start : start + n] = k
    self.v[layer][:, start : start + n] = v
    self._pending = n // self.layout.frame_tokens
    return self.k[layer][:, : start + n], self.v[layer][:, : start + n]


def test_cuda_graphs_need_cuda(pipe):
    with pytest.raises(ValueError, match="CUDA graphs need"):
        pipe.enable_cuda_graphs()
    assert not pipe.cuda_graphs
    pipe.cuda_graphs = True  # set behind the method's back: the session refuses
    try:
        with pytest.raises(ValueError, match="CUDA graphs need"):
            pipe.session("a red fox")
    finally:
        pipe.cuda_graphs = False


def test_graph_memory_is_dropped_on_close(pipe):
    _, g = stream(pipe, True)
    assert g.captures == 1 and not g._graphs


@torch.no_grad()
def test_timestep_tensor_and_float_give_the_same_pass(pipe):
    """The graph feeds the timestep as a device tensor; the eager pass gets a float: same embedding."""
    net = pipe.net
    t_float = net._time(600.0, 1, 2)
    t_tensor = net._time(torch.tensor(600.0), 1, 2)
    for a, b in zip(t_float, t_tensor, strict=True):
        assert torch.equal(a, b)
