"""Block-sparse attention kernel vs the fp32 reference, on CPU through Triton's interpreter.

Without CUDA, ``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is decorated. This module sets it
before importing the kernels, and the kernel module does too (``stream_runtime.kernels._interpreter``, which also
repairs triton.language when another test module imported triton first, e.g. through diffusers), so the order in
which pytest imports test modules does not matter. The interpreter gets bf16 arithmetic wrong, so
bf16 runs only on a GPU (``-m gpu``); shapes stay tiny because the interpreter is slow.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_close  # noqa: E402

from stream_runtime.kernels.block_sparse_attn import (  # noqa: E402
    BlockTable,
    block_sparse_attention,
    dense_block_table,
    merge_attention,
    naive_attention,
    naive_block_sparse_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled tensors, so any output the kernel fails to write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def empty_like(*args, **kwargs):
        out = real_empty_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def make_qkv(b, q_len, k_len, h, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, q_len, h, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(b, k_len, h, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(b, k_len, h, d, generator=gen).to(DEVICE, dtype)
    return q, k, v


def random_table(b, h, q_len, k_len, block_m, block_n, density, seed=0) -> BlockTable:
    """A per-(batch, head) random table with one empty and one full query-block row forced in."""
    gen = torch.Generator().manual_seed(seed)
    n_q, n_k = -(-q_len // block_m), -(-k_len // block_n)
    mask = torch.rand(b, h, n_q, n_k, generator=gen) < density
    mask[0, 0, 0] = False  # empty row: out = 0, lse = -inf
    mask[-1, -1, -1] = True  # full row, including the short last key block
    table = BlockTable.from_block_mask(mask, block_m, block_n, q_len, k_len)
    table.validate()
    return table.to(DEVICE)


def check_against_reference(q, k, v, table, scale=None, **kernel_kwargs):
    out, lse = block_sparse_attention(q, k, v, table, scale, **kernel_kwargs)
    ref_out, ref_lse = naive_block_sparse_attention(q, k, v, table, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert not out.isnan().any() and not lse.isnan().any()
    assert_close(out, ref_out, dtype=q.dtype)
    # -inf rows compare equal under assert_close; lse is fp32 whatever the input dtype.
    assert_close(lse, ref_lse, dtype=q.dtype)
    return out, lse


# (q_len, k_len, block_m, block_n): multiples of the block, tails on either side, a single short block.
SHAPES = [(64, 128, 32, 32), (72, 200, 32, 32), (50, 115, 16, 32), (9, 40, 16, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "q{}k{}b{}x{}".format(*s))
def test_dense_matches_reference(shape, dtype):
    q_len, k_len, block_m, block_n = shape
    q, k, v = make_qkv(1, q_len, k_len, 2, 32, dtype)
    check_against_reference(q, k, v, dense_block_table(q_len, k_len, block_m, block_n, device=DEVICE))


@pytest.mark.parametrize("d", [16, 64, 40, 128])
def test_head_dims(d):
    """Power-of-two head dims, and 40 (padded to a 64-wide tile with masked lanes)."""
    q, k, v = make_qkv(1, 40, 72, 1, d, torch.float16, seed=d)
    check_against_reference(q, k, v, dense_block_table(40, 72, 32, 32, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_per_batch_and_head(dtype):
    q, k, v = make_qkv(2, 72, 150, 2, 32, dtype)
    table = random_table(2, 2, 72, 150, 16, 32, density=0.4)
    out, lse = check_against_reference(q, k, v, table)
    assert (out[0, :16, 0] == 0).all() and torch.isneginf(lse[0, 0, :16]).all()


def test_table_shared_by_heads_batch_broadcast():
    """A [B, 1, ...] table: each batch entry its own rows, shared by every head."""
    q, k, v = make_qkv(2, 40, 96, 3, 16, torch.float32)
    check_against_reference(q, k, v, random_table(2, 1, 40, 96, 16, 16, density=0.5, seed=1))


def test_all_rows_empty():
    q, k, v = make_qkv(1, 20, 48, 2, 16, torch.float32)
    mask = torch.zeros(1, 1, 2, 3, dtype=torch.bool)
    out, lse = block_sparse_attention(q, k, v, BlockTable.from_block_mask(mask, 16, 16, 20, 48).to(DEVICE))
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_kernel_tiles_smaller_than_table_blocks():
    """Kernel tiles 16x16 inside a 32x64 table; k_len=70 leaves the last table block's later sub-tiles past the
    keys entirely (a tile where every score is masked)."""
    q, k, v = make_qkv(1, 45, 70, 2, 32, torch.float32)
    table = random_table(1, 2, 45, 70, 32, 64, density=0.6, seed=2)
    check_against_reference(q, k, v, table, block_m=16, block_n=16)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "q{}k{}b{}x{}".format(*s))
def test_dense_walk_equals_the_indexed_walk_of_a_full_table(shape):
    """dense_block_table's tables skip the index loads (DENSE); a full table built from a mask reads them: same
    output, including the short last key block."""
    q_len, k_len, block_m, block_n = shape
    q, k, v = make_qkv(1, q_len, k_len, 2, 32, torch.float32, seed=6)
    dense = dense_block_table(q_len, k_len, block_m, block_n, device=DEVICE)
    mask = torch.ones(1, 1, dense.n_q_blocks, dense.n_k_blocks, dtype=torch.bool)
    indexed = BlockTable.from_block_mask(mask, block_m, block_n, q_len, k_len).to(DEVICE)
    assert dense.dense and not indexed.dense
    out_dense, lse_dense = check_against_reference(q, k, v, dense)
    out_indexed, lse_indexed = block_sparse_attention(q, k, v, indexed)
    assert_close(out_dense, out_indexed, dtype=torch.float32)
    assert_close(lse_dense, lse_indexed, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_k_matches_reference(splits, dtype):
    """Split-K shares each row's key tiles among programs and merges their partials: dense tables with a short
    last key block, sparse tables with empty rows, and more splits than a row has tiles (empty splits)."""
    q, k, v = make_qkv(2, 72, 150, 2, 32, dtype)
    check_against_reference(q, k, v, dense_block_table(72, 150, 32, 32, device=DEVICE), splits=splits)
    out, lse = check_against_reference(q, k, v, random_table(2, 2, 72, 150, 16, 32, density=0.4), splits=splits)
    assert out.dtype == dtype
    check_against_reference(
        q, k, v, random_table(1, 2, 72, 150, 32, 64, density=0.6, seed=2), splits=splits, block_n=16
    )


def test_split_k_rejects_a_bad_count():
    q, k, v = make_qkv(1, 20, 48, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="splits must be"):
        block_sparse_attention(q, k, v, dense_block_table(20, 48, 16, 16, device=DEVICE), splits=0)


def test_a_table_marked_dense_must_be_full():
    mask = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    mask[0, 0, 1, 2] = False
    partial = BlockTable.from_block_mask(mask, 16, 16, 32, 48)
    marked = BlockTable(partial.block_idx, partial.block_count, 16, 16, 32, 48, dense=True)
    with pytest.raises(ValueError, match="marked dense"):
        marked.validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_loads_match_reference(dtype):
    """Key/value tiles through tensor descriptors: dense and sparse tables, a short last key block (zero-filled past
    the keys), kernel tiles smaller than the table's blocks."""
    q, k, v = make_qkv(2, 72, 150, 2, 32, dtype)
    check_against_reference(q, k, v, dense_block_table(72, 150, 32, 32, device=DEVICE), tma=True)
    check_against_reference(q, k, v, random_table(2, 2, 72, 150, 16, 32, density=0.4), tma=True)
    q, k, v = make_qkv(1, 45, 70, 2, 32, dtype, seed=4)
    check_against_reference(q, k, v, random_table(1, 2, 45, 70, 32, 64, density=0.6, seed=2), tma=True, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_warp_specialized_loop_matches_reference(dtype):
    """``warp_specialize`` only annotates the key loop for the compiler: same results, dense and sparse, with and
    without TMA, short last key block included."""
    q, k, v = make_qkv(2, 72, 150, 2, 32, dtype, seed=6)
    check_against_reference(q, k, v, dense_block_table(72, 150, 32, 32, device=DEVICE), warp_specialize=True)
    table = random_table(2, 2, 72, 150, 16, 32, density=0.4, seed=3)
    check_against_reference(q, k, v, table, warp_specialize=True, tma=True)


def test_tma_falls_back_where_the_layout_forbids_it():
    """A head dim of 40 (not a power of two) takes the pointer loads and still matches."""
    q, k, v = make_qkv(1, 40, 72, 1, 40, torch.float16, seed=5)
    check_against_reference(q, k, v, dense_block_table(40, 72, 32, 32, device=DEVICE), tma=True)


def test_scale_and_strided_inputs():
    """A softmax scale other than 1/sqrt(D), and q/k/v as strided views of a packed [B, L, H, 3, D] tensor."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 48, 2, 3, 32, generator=gen).to(DEVICE)
    q, k, v = qkv.unbind(3)
    check_against_reference(q, k, v, dense_block_table(48, 48, 16, 16, device=DEVICE), scale=0.3)


def test_merge_two_partial_results_equals_one_pass():
    """Cache keys and the chunk's own keys attended separately (the cache side sparse, with empty rows), merged,
    equal one pass over all keys with the union table."""
    q_len, k_cache, k_new, block = 40, 64, 40, 16
    q, k, v = make_qkv(1, q_len, k_cache + k_new, 2, 16, torch.float32, seed=4)
    cache_table = random_table(1, 2, q_len, k_cache, block, block, density=0.5, seed=4)
    new_table = dense_block_table(q_len, k_new, block, block, device=DEVICE)
    out_a, lse_a = block_sparse_attention(q, k[:, :k_cache], v[:, :k_cache], cache_table)
    out_b, lse_b = block_sparse_attention(q, k[:, k_cache:], v[:, k_cache:], new_table)
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)

    mask = torch.cat([cache_table.to_mask(), new_table.to_mask().expand(1, 2, -1, -1)], dim=-1)
    ref_out, ref_lse = naive_attention(q, k, v, mask=mask)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


def test_merge_with_empty_sides():
    gen = torch.Generator().manual_seed(5)
    out_a = torch.randn(1, 6, 2, 8, generator=gen)
    lse_a = torch.randn(1, 2, 6, generator=gen)
    out_b = torch.zeros_like(out_a)
    lse_b = torch.full_like(lse_a, float("-inf"))
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert_close(out, out_a)
    assert_close(lse, lse_a)
    out, lse = merge_attention(out_b, lse_b, out_b, lse_b)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_naive_reference_matches_sdpa():
    """The reference itself, against PyTorch's math SDPA with the same boolean mask."""
    q, k, v = make_qkv(1, 24, 40, 2, 16, torch.float32, seed=6)
    mask = random_table(1, 2, 24, 40, 16, 16, density=0.7, seed=6).to_mask()
    mask[..., 0] = True  # SDPA returns NaN on fully masked rows
    out, _ = naive_attention(q, k, v, mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    assert_close(out, ref)


def test_table_roundtrip_and_density():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)[None, None]
    table = BlockTable.from_block_mask(mask, 16, 16, q_len=20, k_len=40)
    assert table.block_count.tolist() == [[[2, 0]]]
    assert table.block_idx.tolist() == [[[[0, 2], [-1, -1]]]]
    assert torch.equal(table.to_block_mask(), mask)
    # Row 0 (16 queries) sees key blocks 0 (16 keys) and 2 (8 keys): 16 * 24 of 20 * 40 pairs.
    assert table.density() == pytest.approx(16 * 24 / (20 * 40))
    assert torch.equal(table.to_mask().float().mean(), torch.tensor(table.density(), dtype=torch.float32))
    assert dense_block_table(20, 40, 16, 16).density() == 1.0


def test_bad_arguments_raise():
    q, k, v = make_qkv(1, 20, 48, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="built for"):
        block_sparse_attention(q, k, v, dense_block_table(20, 40, 16, 16, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_attention(q, k.half(), v, dense_block_table(20, 48, 16, 16, device=DEVICE))
    with pytest.raises(ValueError, match="block_n"):
        block_sparse_attention(q, k, v, dense_block_table(20, 48, 16, 16, device=DEVICE), block_n=32)
    with pytest.raises(ValueError, match="power of two"):
        dense_block_table(20, 48, 24, 16)
    bad = BlockTable(
        torch.tensor([[[[1, 0]]]], dtype=torch.int32), torch.tensor([[[2]]], dtype=torch.int32), 16, 16, 8, 32
    )
    with pytest.raises(ValueError, match="ascending"):
        bad.validate()


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_bf16_on_gpu(d):
    q, k, v = make_qkv(2, 1000, 3000, 3, d, torch.bfloat16)
    for tma, splits in ((False, 1), (True, 1), (False, 2), (True, 3)):
        check_against_reference(q, k, v, random_table(1, 3, 1000, 3000, 128, 128, density=0.5), tma=tma, splits=splits)
        check_against_reference(q, k, v, dense_block_table(1000, 3000, 128, 128, device=DEVICE), tma=tma, splits=splits)
