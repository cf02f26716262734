"""StreamingWanTransformer.compile_blocks: the compiled block halves give the eager stream (fp32 CPU)."""

import pytest
import torch
from conftest import assert_close
from helpers import make_cache, tiny_net

C, GRID = 4, (2, 2)


def stream(net, chunks=3, sink=1, window=2, batch=1):
    text = net.text_kv(torch.randn(batch, 5, 32, generator=torch.Generator().manual_seed(1)))
    cache = make_cache(net, GRID, sink, window, 1)
    if batch > 1:
        cache = type(cache)(cache.layout, net.num_layers, batch, net.heads, net.head_dim)
    outs = []
    for c in range(chunks):
        x = torch.randn(batch, C, 1, 4, 4, generator=torch.Generator().manual_seed(c))
        for t in (900.0, 500.0):
            outs.append(net.forward_chunk(x, t, text, cache, c))
        net.forward_chunk(x, 0.0, text, cache, c)
        cache.commit(c, 1)
    return torch.stack(outs)


class Counting:
    """A torch.compile backend that runs the traced graph eagerly and keeps it, to count distinct graphs."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def test_blocks_share_one_graph_per_shape():
    """Every block reuses the same traced graphs: 3 regions x 2 batch sizes, not one set per block."""
    torch._dynamo.reset()
    net = tiny_net(num_layers=3)
    counting = Counting()
    net.compile_blocks(backend=counting)
    try:
        stream(net)
        stream(net, batch=2)
    finally:
        net.compile_blocks(False)
    assert len(counting.graphs) == 6


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_stream_equals_eager(backend):
    torch._dynamo.reset()
    net = tiny_net()
    eager = stream(net)
    net.compile_blocks(backend=backend)
    try:
        compiled = stream(net)
        # Guidance-sized batches compile a second graph; the stream still matches eager.
        net.compile_blocks(False)
        eager2 = stream(net, batch=2)
        net.compile_blocks(backend=backend)
        compiled2 = stream(net, batch=2)
    finally:
        net.compile_blocks(False)
    assert_close(compiled, eager, scale=10)
    assert_close(compiled2, eager2, scale=10)


def test_compiled_full_sequence_equals_eager():
    """The reference pass shares the block code, so compiling it changes nothing either."""
    torch._dynamo.reset()
    net = tiny_net()
    x = torch.randn(1, C, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    text = net.text_kv(torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1)))
    t = torch.full((1, 3), 700.0)
    eager = net.forward_full(x, t, text)
    net.compile_blocks(backend="aot_eager")
    try:
        compiled = net.forward_full(x, t, text)
    finally:
        net.compile_blocks(False)
    assert_close(compiled, eager, scale=10)


@pytest.mark.parametrize("mode", ["t2v", "v2v"])
def test_compiled_pipeline_session_equals_eager(mode):
    """StreamPipeline.compile (blocks, VAE encoder and decoder) leaves a session's frames as they were."""
    import numpy as np

    from stream_runtime import StreamPipeline

    torch._dynamo.reset()
    pipe = StreamPipeline.tiny_random()
    frames_in = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)

    def run():
        with pipe.session("a red fox", seed=0, mode=mode, height=32, width=32) as s:
            if mode == "v2v":
                s.push_frames(frames_in)
            return np.concatenate([s.next_chunk() for _ in range(4)])

    eager = run()
    counting = Counting()
    pipe.compile(backend=counting)
    try:
        compiled = run()
    finally:
        pipe.compile(False)
    assert counting.graphs, "nothing was compiled"
    # uint8 frames: fp32 reassociation may move a value across a rounding boundary, by one level at most
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1


def test_warm_up_builds_every_graph_a_default_session_needs():
    """After compile + warm_up, new default sessions (text- and video-to-video) compile nothing more."""
    import numpy as np

    from stream_runtime import StreamPipeline

    torch._dynamo.reset()
    pipe = StreamPipeline.tiny_random()
    counting = Counting()
    pipe.compile(backend=counting)
    try:
        lines = []
        pipe.warm_up(chunks=4, progress=lines.append)
        assert len(lines) == 2 * (4 + 1) and lines[0].startswith("warm-up t2v, first stream, chunk 1/4")
        built = len(counting.graphs)
        for mode in ("t2v", "v2v"):
            with pipe.session("a red fox", seed=3, mode=mode) as s:
                if mode == "v2v":
                    h, w = pipe.default_resolution
                    s.push_frames(np.full((40, h, w, 3), 99, dtype=np.uint8))
                for _ in range(5):
                    s.next_chunk()
    finally:
        pipe.compile(False)
    assert built > 0 and len(counting.graphs) == built


def test_ffn_epilogue_option_is_wired_and_falls_back_off_cuda():
    """``ffn_epilogue`` reaches the block (compiled and eager); off CUDA it runs the module as is, since PyTorch's CPU
    ``_addmm_activation`` computes the exact GELU, not Wan's tanh form (tests/test_gpu.py checks the CUDA path)."""
    from stream_runtime.pipelines.wan.transformer import ffn_forward

    torch._dynamo.reset()
    net = tiny_net()
    ffn = net.wan.blocks[0].ffn
    h = torch.randn(2, 6, ffn.net[0].proj.in_features)
    torch.testing.assert_close(ffn_forward(ffn, h, epilogue=True), ffn(h), rtol=0, atol=0)
    eager = stream(net)
    try:
        net.compile_blocks(backend="aot_eager", ffn_epilogue=True)
        compiled = stream(net)
        net.compile_blocks(False, ffn_epilogue=True)
        uncompiled = stream(net)
    finally:
        net.compile_blocks(False)
    assert_close(compiled, eager, scale=10)
    torch.testing.assert_close(uncompiled, eager, rtol=0, atol=0)
