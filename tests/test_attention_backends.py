"""Attention backends and cross-step reuse inside the streaming transformer (fp32 CPU; Triton via interpreter)."""

import pytest
import torch
from conftest import assert_close
from helpers import make_cache, tiny_net

from stream_runtime.attention import attention, available_backends
from stream_runtime.reuse import CrossStepReuse

C = 4
GRID = (2, 2)


def stream(net, backend, chunks=4, chunk=1, sink=1, window=3, reuse=None, steps=(900.0, 500.0), grid=GRID):
    """Outputs of every denoising pass of a stream of random chunks (token grid ``grid``: latents twice as wide)."""
    text = net.text_kv(torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1)))
    cache = make_cache(net, grid, sink, window, chunk)
    outs = []
    for c in range(chunks):
        x = torch.randn(1, C, chunk, 2 * grid[0], 2 * grid[1], generator=torch.Generator().manual_seed(c))
        extra = {"reuse": reuse} if reuse is not None else {}
        for i, t in enumerate(steps):
            if reuse is not None:
                reuse.begin_step(i)
            outs.append(net.forward_chunk(x, t, text, cache, c * chunk, backend=backend, **extra))
        if reuse is not None:
            reuse.begin_step(None)
        net.forward_chunk(x, 0.0, text, cache, c * chunk, backend=backend, **extra)
        cache.commit(c * chunk, chunk)
    return torch.stack(outs)


# The Triton backends run here through Triton's interpreter on CPU tensors; on a CUDA machine the compiled kernels
# need CUDA tensors, and tests/test_gpu.py covers them in bf16.
cpu_triton = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; test_gpu.py covers CUDA")


def test_backends_are_listed():
    assert {"sdpa", "naive", "blocksparse", "radial"} <= set(available_backends())
    with pytest.raises(ValueError, match="attention backend must be one of"):
        attention(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), backend="nope")


@pytest.mark.parametrize("backend", ["naive", pytest.param("blocksparse", marks=cpu_triton)])
def test_backend_equals_sdpa_in_a_stream(backend):
    net = tiny_net()
    assert_close(stream(net, backend), stream(net, "sdpa"), scale=10)


@cpu_triton
def test_radial_is_dense_when_every_frame_is_near():
    """Sinks and frames at distance <= 1 are dense: with a 2-frame window the radial table lists every block."""
    net = tiny_net()
    assert_close(stream(net, "radial", window=2), stream(net, "sdpa", window=2), scale=10)


@cpu_triton
def test_radial_tables_are_built_once_per_ring_phase():
    from stream_runtime import attention as dispatch

    net = tiny_net()
    dispatch._TABLES.clear()
    stream(net, "radial", chunks=12, chunk=1, sink=1, window=4)
    radial_tables = [k for k in dispatch._TABLES if k[0] == "radial" and "cached" not in k]
    # warm-up (cache filling) plus one per ring phase: far fewer than the 12 chunks x 3 passes x 2 layers
    assert len(radial_tables) <= 4 + 3


def test_radial_blocks_follow_the_frame_size():
    from stream_runtime.attention import radial_block_size
    from stream_runtime.kernels.radial import radial_block_table, rolling_cache_layout

    assert [radial_block_size(n) for n in (1560, 512, 256, 64, 16)] == [128, 128, 64, 16, 16]
    # the tiny-world model's frames (8x8 tokens) against a 1 sink + 4 window cache: sparse at 16-token blocks
    layout = rolling_cache_layout(1, 4, 1)
    assert radial_block_table((8, 8), layout, 16, 16).density() < 0.9
    assert radial_block_table((8, 8), layout, 128, 128).density() == 1.0


@cpu_triton
def test_radial_on_small_frames_is_the_kernel_over_its_table():
    """8x8-token frames against a 1 sink + 4 window cache: the stream through the radial backend equals a stream
    whose attention to the cache is the naive reference under the same table's token mask."""
    from stream_runtime import attention as dispatch
    from stream_runtime.attention import radial_table, register_backend

    def masked(q, k, v, mask=None, cache=None, frame_grid=None, **_):
        if mask is not None or cache is None:
            return dispatch.naive_attention(q, k, v, mask=mask)
        return dispatch.naive_attention(q, k, v, mask=radial_table(q, cache, frame_grid).to_mask()[0, 0])

    net = tiny_net()
    small = dict(chunks=6, window=4, grid=(8, 8), steps=(900.0,))  # chunks 4-5 see frames at distance >= 2
    dispatch._TABLES.clear()
    register_backend("test-radial-masked", masked)
    try:
        radial = stream(net, "radial", **small)
        tables = [t for key, t in dispatch._TABLES.items() if key[0] == "radial"]
        assert tables and min(t.density() for t in tables) < 0.9  # some chunks really skip blocks
        reference = stream(net, "test-radial-masked", **small)
    finally:
        dispatch._BACKENDS.pop("test-radial-masked")
    assert_close(radial, reference, scale=10)
    assert not torch.allclose(radial, stream(net, "sdpa", **small), atol=1e-4)


@cpu_triton
def test_radial_with_exact_reuse_equals_radial():
    """Cross-step reuse with the radial backend splits the radial attention (cached part under the radial table's
    cached blocks, own part dense): exact mode equals the radial stream, so radial + reuse keeps the sparsity."""
    net = tiny_net()
    small = dict(chunks=5, window=4, grid=(8, 8), steps=(900.0,))
    radial = stream(net, "radial", **small)
    assert_close(stream(net, "radial", reuse=CrossStepReuse(1), **small), radial, scale=10)
    assert not torch.allclose(stream(net, "sdpa", reuse=CrossStepReuse(1), **small), radial, atol=1e-4)


def test_reuse_refresh_every_step_equals_plain_attention():
    net = tiny_net()
    assert_close(stream(net, "sdpa", reuse=CrossStepReuse(1)), stream(net, "sdpa"), scale=10)


def test_reuse_skips_the_cached_part_between_refreshes():
    net = tiny_net()
    reuse = CrossStepReuse(refresh_every=4)
    steps = (1000.0, 750.0, 500.0, 250.0)
    out = stream(net, "sdpa", reuse=reuse, steps=steps)
    exact = stream(net, "sdpa", steps=steps)
    assert torch.isfinite(out).all()
    # steps 1-3 of every chunk but the first (empty cache) reuse the cached part in both layers
    assert reuse.reused == 3 * 3 * net.num_layers
    # step 0 of each chunk is exact; later steps differ only through the reused part
    assert_close(out[::4], exact[::4], scale=10)
    assert not torch.allclose(out, exact)


def test_reuse_argument_checked():
    with pytest.raises(ValueError, match="refresh_every must be an integer >= 1"):
        CrossStepReuse(0)


def test_missing_triton_is_a_clear_error(monkeypatch):
    import sys

    import stream_runtime.kernels

    # Make the import fail whether or not an earlier test imported the kernels already.
    monkeypatch.setitem(sys.modules, "stream_runtime.kernels.block_sparse_attn", None)
    monkeypatch.delattr(stream_runtime.kernels, "block_sparse_attn", raising=False)
    q = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match="need triton"):
        attention(q, q, q, backend="blocksparse")
