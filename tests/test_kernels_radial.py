"""Streaming radial block tables: against the token-level rule, a hand-checked case, and through the kernel.

Without CUDA, ``TRITON_INTERPRET=1`` must be set before the kernels are imported (see test_kernels_block_sparse.py).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_close  # noqa: E402

from stream_runtime.kernels.block_sparse_attn import block_sparse_attention, naive_attention  # noqa: E402
from stream_runtime.kernels.radial import (  # noqa: E402
    StreamFrameLayout,
    radial_bands,
    radial_block_table,
    radial_token_mask,
    rolling_cache_layout,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def block_or(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """[Lq, Lk] token mask -> [n_q_blocks, n_k_blocks]: True where any pair in the tile is True."""
    q_len, k_len = mask.shape
    n_q, n_k = -(-q_len // block_m), -(-k_len // block_n)
    padded = torch.zeros(n_q * block_m, n_k * block_n, dtype=torch.bool)
    padded[:q_len, :k_len] = mask
    return padded.view(n_q, block_m, n_k, block_n).any(3).any(1)


LAYOUTS = {
    "chunk1": rolling_cache_layout(sink_frames=1, window_frames=6, chunk_frames=1),
    "chunk3": rolling_cache_layout(sink_frames=1, window_frames=6, chunk_frames=3),
    "warmup": rolling_cache_layout(sink_frames=2, window_frames=6, chunk_frames=3, chunk_start=4),
    "far": rolling_cache_layout(sink_frames=1, window_frames=4, chunk_frames=3, chunk_start=40),
}


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (64, 64)])
@pytest.mark.parametrize("name", LAYOUTS)
def test_table_is_block_cover_of_token_rule(name, blocks):
    """The table lists exactly the tiles that hold an allowed pair; its dense mask covers the token rule."""
    layout, grid = LAYOUTS[name], (4, 6)
    table = radial_block_table(grid, layout, *blocks)
    tokens = radial_token_mask(grid, layout)
    assert torch.equal(table.to_block_mask()[0, 0], block_or(tokens, *blocks))
    dense = table.to_mask()[0, 0]
    assert dense.shape == tokens.shape and not (tokens & ~dense).any()


def test_hand_checked_table():
    """8x8 patches per frame, 16-token blocks (two patch rows, four blocks per frame). One query frame at t=7;
    key frames: a sink at t=0, t=3 (d=4), t=5 (d=2), t=6 (d=1), t=7 (the chunk's own)."""
    layout = StreamFrameLayout(
        key_times=(0, 3, 5, 6, 7), key_is_sink=(True, False, False, False, False), query_times=(7,)
    )
    # base_band 20 at d=2 reaches blocks two away (smallest gap 17); the half band 10 at d=4 only neighbours (gap 1).
    assert radial_bands(layout, 64, base_band=20, min_band=0).tolist() == [[64, 10, 20, 64, 64]]
    table = radial_block_table((8, 8), layout, 16, 16, base_band=20, min_band=0)
    #           sink  d=4   d=2   d=1   own
    expected = ["1111 1100 1110 1111 1111",
                "1111 1110 1111 1111 1111",
                "1111 0111 1111 1111 1111",
                "1111 0011 0111 1111 1111"]  # fmt: skip
    got = [
        " ".join("".join(str(int(x)) for x in row[4 * f : 4 * f + 4]) for f in range(5))
        for row in table.to_block_mask()[0, 0]
    ]
    assert got == expected
    assert table.block_count.tolist() == [[[17, 19, 19, 17]]]
    assert table.density() == pytest.approx(72 / 80)
    # min_band lifts the far frame to the d=2 pattern.
    wide = radial_block_table((8, 8), layout, 16, 16, base_band=20, min_band=20).to_block_mask()[0, 0]
    assert torch.equal(wide[:, 4:8], wide[:, 8:12])


def test_band_rule():
    layout = StreamFrameLayout(
        key_times=(0, 1, 2, 4, 6, 8, 12, 16, 32, 33, 34), key_is_sink=(True,) + (False,) * 10, query_times=(33, 34)
    )
    bands = radial_bands(layout, tokens_per_frame=1000, base_band=400, min_band=30)
    # query t=33 vs keys at d = 33(sink) 32 31 29 27 25 21 17 1 0(own) 1(own)
    assert bands[0].tolist() == [1000, 30, 50, 50, 50, 50, 50, 50, 1000, 1000, 1000]
    # query t=34: d = 34(sink) 33 32 30 28 26 22 18 2 1 0
    assert bands[1].tolist() == [1000, 30, 30, 50, 50, 50, 50, 50, 400, 1000, 1000]


def test_density_decreases_with_distance():
    grid = (8, 16)
    tpf = grid[0] * grid[1]
    layout = StreamFrameLayout(key_times=tuple(range(33)), key_is_sink=(False,) * 33, query_times=(32,))
    table = radial_block_table(grid, layout, 16, 16, min_band=0)
    tokens = radial_token_mask(grid, layout, min_band=0)
    # Key frames in order of increasing distance 0 .. 32 from the query frame.
    by_distance = range(32, -1, -1)
    token_density = [tokens[:, f * tpf : (f + 1) * tpf].float().mean().item() for f in by_distance]
    block_density = [table.to_mask()[0, 0, :, f * tpf : (f + 1) * tpf].float().mean().item() for f in by_distance]
    for density in (token_density, block_density):
        assert density[0] == density[1] == 1.0
        assert all(a >= b for a, b in zip(density, density[1:], strict=False))
    assert token_density[2] > token_density[4] > token_density[8] > token_density[16] > token_density[32]
    # At 16-token blocks every band >= 1 keeps the neighbouring block: the block density levels off at d >= 4.
    assert block_density[2] > block_density[4] >= block_density[32]
    assert table.density() < 0.5


def test_rolling_cache_layout():
    steady = rolling_cache_layout(sink_frames=1, window_frames=4, chunk_frames=3)
    assert steady.key_times == (0, 1, 2, 3, 4, 5, 6, 7) and steady.query_times == (5, 6, 7)
    assert steady.key_is_sink == (True,) + (False,) * 7
    later = rolling_cache_layout(sink_frames=1, window_frames=4, chunk_frames=3, chunk_start=20)
    assert later.key_times == (0, 16, 17, 18, 19, 20, 21, 22)
    young = rolling_cache_layout(sink_frames=2, window_frames=4, chunk_frames=1, chunk_start=3)
    assert young.key_times == (0, 1, 2, 3) and young.key_is_sink == (True, True, False, False)
    with pytest.raises(ValueError, match="key_is_sink"):
        StreamFrameLayout(key_times=(0, 1), key_is_sink=(True,), query_times=(1,))
    with pytest.raises(ValueError, match="frame_grid"):
        radial_block_table((4,), steady)


KERNEL_LAYOUTS = {
    # One query frame against a sink and frames at distances 8, 4, 2, 1 and its own.
    "chunk1": StreamFrameLayout(key_times=(0, 1, 5, 7, 8, 9), key_is_sink=(True,) + (False,) * 5, query_times=(9,)),
    "chunk3": rolling_cache_layout(sink_frames=1, window_frames=6, chunk_frames=3),
}


@pytest.mark.parametrize("name", KERNEL_LAYOUTS)
def test_kernel_with_radial_table(name):
    """1- and 3-frame chunks of 5x8-patch frames: 40 tokens, so 16-token blocks straddle frame borders, and narrow
    bands so that some tiles are skipped (4x6 frames are too small for any 16-token tile to fall outside a band)."""
    layout, grid = KERNEL_LAYOUTS[name], (5, 8)
    table = radial_block_table(grid, layout, 16, 16, base_band=4, min_band=0, device=DEVICE)
    assert table.density() < 0.95
    gen = torch.Generator().manual_seed(0)
    q_len, k_len, h, d = table.q_len, table.k_len, 1, 32
    q = torch.randn(1, q_len, h, d, generator=gen).to(DEVICE, torch.float16)
    k = torch.randn(1, k_len, h, d, generator=gen).to(DEVICE, torch.float16)
    v = torch.randn(1, k_len, h, d, generator=gen).to(DEVICE, torch.float16)
    out, lse = block_sparse_attention(q, k, v, table)
    ref_out, ref_lse = naive_attention(q, k, v, mask=table.to_mask())
    assert_close(out, ref_out, dtype=torch.float16)
    assert_close(lse, ref_lse, dtype=torch.float16)
