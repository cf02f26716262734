"""GPU checks (bf16): run on the GPU machine; skipped without CUDA."""

import pytest
import torch
from conftest import assert_close
from diffusers import WanTransformer3DModel

from stream_runtime.cache import CacheLayout, RollingKVCache
from stream_runtime.pipelines.wan.presets import tiny_transformer_config
from stream_runtime.pipelines.wan.transformer import StreamingWanTransformer, block_causal_mask

pytestmark = pytest.mark.gpu
GRID = (6, 8)


def net_on(dtype):
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**tiny_transformer_config(attention_head_dim=64, num_attention_heads=4))
    return StreamingWanTransformer(wan.to("cuda", dtype).eval())


def run_stream(net, backend, chunks=5, chunk=3, sink=3, window=6, reuse=None):
    text = net.text_kv(torch.randn(1, 16, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1)))
    layout = CacheLayout(GRID[0] * GRID[1], sink, window, chunk)
    cache = RollingKVCache(layout, net.num_layers, 1, net.heads, net.head_dim, dtype=net.dtype, device="cuda")
    g = torch.Generator("cuda").manual_seed(2)
    outs, clean = [], []
    for c in range(chunks):
        x = torch.randn(1, 4, chunk, 12, 16, device="cuda", generator=g)
        extra = {} if reuse is None else {"reuse": reuse}
        if reuse is not None:
            reuse.begin_step(0)
        outs.append(net.forward_chunk(x, 600.0, text, cache, c * chunk, backend=backend, **extra).float())
        if reuse is not None:
            reuse.begin_step(None)
        net.forward_chunk(x, 0.0, text, cache, c * chunk, backend=backend, **extra)
        cache.commit(c * chunk, chunk)
        clean.append(x)
    return torch.cat(outs, 2), torch.cat(clean, 2), text


@torch.no_grad()
def test_bf16_stream_matches_fp32_full_pass():
    net16 = net_on(torch.bfloat16)
    out16, clean, _ = run_stream(net16, "sdpa")
    net32 = net_on(torch.float32)
    text32 = net32.text_kv(torch.randn(1, 16, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1)))
    refs = []
    for c in range(5):
        lo, hi = 3 * c, 3 * c + 3
        steps = torch.tensor([[0.0] * lo + [600.0] * 3], device="cuda")
        mask = block_causal_mask(hi, 3, 3, 6, device="cuda")
        refs.append(net32.forward_full(clean[:, :, :hi].float(), steps, text32, frame_mask=mask)[:, :, lo:hi])
    assert_close(out16, torch.cat(refs, 2), dtype=torch.bfloat16, scale=5)


@pytest.mark.parametrize("backend", ["blocksparse", "radial"])
@torch.no_grad()
def test_triton_backends_in_bf16_stream(backend):
    net = net_on(torch.bfloat16)
    ref = run_stream(net, "sdpa")[0]
    got = run_stream(net, backend)[0]
    if backend == "blocksparse":
        assert_close(got, ref, dtype=torch.bfloat16, scale=5)
    else:  # radial is an approximation: close to dense, not equal
        assert torch.isfinite(got).all()
        assert (got - ref).abs().mean() < 0.1 * ref.abs().mean()


@torch.no_grad()
def test_radial_with_exact_reuse_matches_radial_in_bf16():
    """The reuse split keeps the radial table (cached blocks through the kernel, own part dense)."""
    from stream_runtime.reuse import CrossStepReuse

    net = net_on(torch.bfloat16)
    radial = run_stream(net, "radial", window=9)[0]
    assert_close(run_stream(net, "radial", window=9, reuse=CrossStepReuse(1))[0], radial, dtype=torch.bfloat16, scale=5)


@torch.no_grad()
def test_ffn_gelu_epilogue_matches_the_module_in_bf16():
    """cuBLASLt's GELU epilogue computes Wan's tanh-GELU: the compiled stream with it matches the eager stream."""
    net = net_on(torch.bfloat16)
    ref = run_stream(net, "sdpa")[0]
    net.compile_blocks(ffn_epilogue=True)
    try:
        got = run_stream(net, "sdpa")[0]
    finally:
        net.compile_blocks(False)
    assert_close(got, ref, dtype=torch.bfloat16, scale=5)


@torch.no_grad()
def test_session_on_gpu_bf16():
    from stream_runtime import StreamPipeline

    pipe = StreamPipeline.tiny_random(device="cuda", dtype=torch.bfloat16)
    with pipe.session("a red fox", seed=0, attention_reuse=2) as s:
        frames = [next(s) for _ in range(3)]
    assert [f.shape[0] for f in frames] == [9, 12, 12]


@torch.no_grad()
def test_text_encoder_on_the_cpu_streams_like_on_the_gpu():
    """StreamPipeline.to(device, text_encoder_device="cpu"): embeddings move to the GPU; the frames match a pipeline
    whose encoder is on the GPU (fp32, so the two encoders agree to rounding)."""
    from stream_runtime import StreamPipeline

    pipe = StreamPipeline.tiny_random(device="cuda", dtype=torch.float32)
    with pipe.session("a red fox", seed=0) as s:
        want = [next(s) for _ in range(2)]
    pipe.to("cuda", text_encoder_device="cpu")
    pipe.prompts._cache.clear()
    assert pipe.text_encoder.device.type == "cpu" and pipe.encode_prompt("a red fox").device.type == "cuda"
    with pipe.session("a red fox", seed=0) as s:
        got = [next(s) for _ in range(2)]
    for a, b in zip(want, got, strict=True):
        assert abs(a.astype(int) - b.astype(int)).max() <= 2


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_cudnn"])
@torch.no_grad()
def test_compiled_bf16_stream_matches_eager(backend):
    """Inductor's fused block halves on CUDA stay within bf16 rounding of the eager stream."""
    net = net_on(torch.bfloat16)
    ref = run_stream(net, backend)[0]
    net.compile_blocks()
    try:
        got = run_stream(net, backend)[0]
    finally:
        net.compile_blocks(False)
    assert_close(got, ref, dtype=torch.bfloat16, scale=5)


@torch.no_grad()
def test_compiled_pipeline_session_on_gpu_bf16():
    """StreamPipeline.compile with inductor (blocks + Wan VAE encoder/decoder): frames stay close to eager."""
    import numpy as np

    from stream_runtime import StreamPipeline

    pipe = StreamPipeline.tiny_random(device="cuda", dtype=torch.bfloat16)
    frames_in = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)

    def run(mode):
        with pipe.session("a red fox", seed=0, mode=mode, height=32, width=32) as s:
            if mode == "v2v":
                s.push_frames(frames_in)
            return np.concatenate([s.next_chunk() for _ in range(4)]).astype(np.float32)

    eager = {mode: run(mode) for mode in ("t2v", "v2v")}
    pipe.compile()
    try:
        compiled = {mode: run(mode) for mode in ("t2v", "v2v")}
    finally:
        pipe.compile(False)
    for mode in eager:
        assert compiled[mode].shape == eager[mode].shape
        # bf16: fused kernels round differently; the frames must still agree to a few levels on average
        assert np.abs(compiled[mode] - eager[mode]).mean() < 4.0, mode


@torch.no_grad()
def test_decode_ahead_on_gpu_matches_next_chunk():
    """The decode on a side CUDA stream (after the producer's event) gives next_chunk's frames."""
    import numpy as np

    from stream_runtime import StreamPipeline
    from stream_runtime.pipelines.wan.decode_ahead import DecodeAhead

    pipe = StreamPipeline.tiny_random(device="cuda", dtype=torch.bfloat16)
    with pipe.session("a red fox", seed=0, height=32, width=32) as s:
        ref = np.concatenate([s.next_chunk() for _ in range(5)]).astype(np.float32)
    with pipe.session("a red fox", seed=0, height=32, width=32) as s, DecodeAhead(s, depth=2) as ahead:
        got = np.concatenate([next(ahead) for _ in range(5)]).astype(np.float32)
    assert got.shape == ref.shape
    assert np.abs(got - ref).mean() < 0.5


@torch.no_grad()
def test_cuda_graph_sessions_match_eager():
    """Real CUDA graphs (eager and compiled, t2v and v2v, plain and through DecodeAhead, whose producer thread
    captures while the caller decodes) give the frames of the eager session."""
    import numpy as np

    from stream_runtime import StreamPipeline
    from stream_runtime.pipelines.wan.decode_ahead import DecodeAhead

    pipe = StreamPipeline.tiny_random(device="cuda", dtype=torch.bfloat16)
    frames_in = np.random.default_rng(0).integers(0, 256, (80, 32, 32, 3), dtype=np.uint8)

    def run(mode, ahead=False):
        with pipe.session("a red fox", seed=0, mode=mode, height=32, width=32) as s:
            if ahead:
                with DecodeAhead(s, frames=list(frames_in) if mode == "v2v" else None) as runner:
                    out = [next(runner) for _ in range(8)]
            else:
                if mode == "v2v":
                    s.push_frames(frames_in)
                out = [s.next_chunk() for _ in range(8)]
            replays = 0 if s.graphs is None else s.graphs.replays
            return np.concatenate(out).astype(np.float32), replays

    for compiled in (False, True):
        if compiled:
            pipe.compile()
        try:
            for mode in ("t2v", "v2v"):
                ref, _ = run(mode)
                pipe.enable_cuda_graphs()
                try:
                    for ahead in (False, True):
                        got, replays = run(mode, ahead)
                        assert replays > 0, (mode, compiled, ahead)
                        assert got.shape == ref.shape
                        assert np.abs(got - ref).mean() < 0.5, (mode, compiled, ahead)
                finally:
                    pipe.enable_cuda_graphs(False)
        finally:
            pipe.compile(False)
