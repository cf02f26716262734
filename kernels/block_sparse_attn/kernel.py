"""Block-sparse flash attention forward in Triton: online softmax over the key blocks a :class:`BlockTable` lists.

Layout: q ``[B, Lq, H, D]``, k/v ``[B, Lk, H, D]`` (tokens before heads), any float16/bfloat16/float32, fp32
accumulation. One program computes one ``[BLOCK_M, D]`` query tile of one (batch, head) and walks the table row of
its query block; each listed table block of ``block_n`` keys is visited as ``block_n // BLOCK_N`` key tiles. With
``splits`` > 1 the key tiles of a row are shared out among that many programs (split-K), whose fp32 partial results
are merged by their log-sum-exps afterwards: more programs for grids that fill the GPU's last wave poorly.

Without a CUDA device this module switches Triton to its interpreter (``TRITON_INTERPRET=1``, only if the variable
is unset) before any kernel is decorated (see ``stream_runtime.kernels._interpreter``): the compiled path cannot run
on CPU tensors.
"""

from __future__ import annotations

import math

import torch

from .._interpreter import use_interpreter_without_cuda

use_interpreter_without_cuda()

import triton  # noqa: E402  (must follow use_interpreter_without_cuda)
import triton.language as tl  # noqa: E402

from ..merge import merge_partials  # noqa: E402
from .table import BlockTable  # noqa: E402

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = math.log2(math.e)


@triton.jit
def _load_tile(ptrs, desc, row, mask_n, mask_d, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr):
    """One ``[BLOCK_N, BLOCK_D]`` key or value tile starting at key ``row``; keys past the end load as zeros."""
    if USE_TMA:
        # The tensor-memory-accelerator copy: rows past k_len arrive as zeros (and are masked in qk).
        tile = desc.load([row, 0])
    elif MASK_N:
        tile = tl.load(ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    elif EVEN_D:
        # Full tiles of a power-of-two head dim load unmasked (the common case: D = 64 or 128).
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return tile


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    t,
    k_head,
    v_head,
    k_desc,
    v_desc,
    idx_row,
    k_len,
    stride_kn,
    stride_vn,
    qk_scale,
    offs_n,
    offs_d,
    mask_d,
    TABLE_N: tl.constexpr,
    SUB_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_TMA: tl.constexpr,
    DENSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) by key tile ``t`` of one table row."""
    # Tile t is sub-tile (t % SUB_N) of the (t // SUB_N)-th listed table block.
    if DENSE:
        kb = t // SUB_N  # every block, in order: no index load for the key loads to wait on
    else:
        kb = tl.load(idx_row + t // SUB_N)
    offs_kn = kb * TABLE_N + (t % SUB_N) * BLOCK_N + offs_n
    k_ptrs = k_head + offs_kn[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_head + offs_kn[:, None] * stride_vn + offs_d[None, :]
    row = kb * TABLE_N + (t % SUB_N) * BLOCK_N
    mask_n = offs_kn < k_len
    k = _load_tile(k_ptrs, k_desc, row, mask_n, mask_d, MASK_N, EVEN_D, USE_TMA)
    # [BLOCK_M, BLOCK_D] @ [BLOCK_D, BLOCK_N] -> [BLOCK_M, BLOCK_N]; scores in log2 units (qk_scale folds in log2 e)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASK_N:
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen only masked keys keeps m = -inf; shifting it by 0 keeps every weight 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_shift[:, None])
    else:
        # An unmasked tile gives every row a finite maximum; scale and shift fuse into one multiply-add.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_shift = m_new
        p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_ptrs, v_desc, row, mask_n, mask_d, MASK_N, EVEN_D, USE_TMA)
    # [BLOCK_M, BLOCK_N] @ [BLOCK_N, BLOCK_D] -> [BLOCK_M, BLOCK_D]
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_key_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_head,
    v_head,
    k_desc,
    v_desc,
    idx_row,
    tile_start,
    tile_stop,
    k_len,
    stride_kn,
    stride_vn,
    qk_scale,
    TABLE_N: tl.constexpr,
    SUB_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D: tl.constexpr,
    MASK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_TMA: tl.constexpr,
    DENSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) over key tiles [tile_start, tile_stop) of one table row.
    ``WARP_SPEC``: the loop as ``tl.range(..., warp_specialize=True)``; otherwise the plain loop as before."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if WARP_SPEC:
        for t in tl.range(tile_start, tile_stop, warp_specialize=True):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, t, k_head, v_head, k_desc, v_desc, idx_row, k_len, stride_kn, stride_vn, qk_scale,
                offs_n, offs_d, mask_d, TABLE_N, SUB_N, BLOCK_N, MASK_N, EVEN_D, USE_TMA, DENSE, DOT_PRECISION,
            )  # fmt: skip
    else:
        for t in range(tile_start, tile_stop):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, t, k_head, v_head, k_desc, v_desc, idx_row, k_len, stride_kn, stride_vn, qk_scale,
                offs_n, offs_d, mask_d, TABLE_N, SUB_N, BLOCK_N, MASK_N, EVEN_D, USE_TMA, DENSE, DOT_PRECISION,
            )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _block_sparse_attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    idx_ptr,
    count_ptr,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_os,
    stride_ob,
    stride_om,
    stride_oh,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_ib,
    stride_ih,
    stride_im,
    stride_cb,
    stride_ch,
    H,
    q_len,
    k_len,
    n_k_blocks,
    n_splits,
    qk_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS_PER_TABLE_BLOCK: tl.constexpr,
    TABLE_N: tl.constexpr,
    SUB_N: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_TMA: tl.constexpr,
    DENSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    # int64 batch offsets: B * L * H * D can pass 2**31 elements.
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < D
    q_tile_mask = mask_m[:, None] & mask_d[None, :]

    # [BLOCK_M, BLOCK_D]; rows past q_len load as 0 and are never stored.
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=q_tile_mask,
        other=0.0,
    )
    k_head = k_ptr + b * stride_kb + h * stride_kh
    v_head = v_ptr + b * stride_vb + h * stride_vh
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_head, shape=[k_len, D], strides=[stride_kn, 1], block_shape=[BLOCK_N, D])
        v_desc = tl.make_tensor_descriptor(v_head, shape=[k_len, D], strides=[stride_vn, 1], block_shape=[BLOCK_N, D])
    else:
        k_desc = None
        v_desc = None

    # Broadcast table dims have stride 0, so (b, h) index them unchanged.
    table_row = pid_m // ROWS_PER_TABLE_BLOCK
    if DENSE:
        count = n_k_blocks
    else:
        count = tl.load(count_ptr + b * stride_cb + h * stride_ch + table_row)
    idx_row = idx_ptr + b * stride_ib + h * stride_ih + table_row * stride_im

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if EVEN_N:
        n_full = count
    else:
        # Rows list blocks ascending, so the short last key block, when listed, is the last entry: every block before
        # it runs unmasked, and only that one pays for the key mask.
        if DENSE:
            n_full = count - 1  # the short last key block is listed, last
        else:
            last = tl.load(idx_row + count - 1, mask=count > 0, other=0)
            n_full = count - ((count > 0) & (last == n_k_blocks - 1)).to(tl.int32)
    # This program's share of the row's key tiles (all of them unless split-K).
    tiles = count * SUB_N
    per_split = tl.cdiv(tiles, n_splits)
    first = tl.minimum(split * per_split, tiles)
    last = tl.minimum(first + per_split, tiles)
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, k_desc, v_desc, idx_row, first, tl.minimum(last, n_full * SUB_N), k_len,
        stride_kn, stride_vn, qk_scale, TABLE_N, SUB_N, BLOCK_N, BLOCK_D, D, False, EVEN_D, USE_TMA, DENSE,
        DOT_PRECISION, WARP_SPEC,
    )  # fmt: skip
    if not EVEN_N:
        acc, m_i, l_i = _attend_key_tiles(
            acc, m_i, l_i, q, k_head, v_head, k_desc, v_desc, idx_row, tl.maximum(first, n_full * SUB_N), last,
            k_len, stride_kn, stride_vn, qk_scale, TABLE_N, SUB_N, BLOCK_N, BLOCK_D, D, True, EVEN_D, USE_TMA, DENSE,
            DOT_PRECISION, False,
        )  # fmt: skip

    # Empty rows (no listed block) have l = 0: out = 0 and lse = -inf by convention.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    # m_i and log2(l_i) are in log2 units; lse is natural log.
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(
        out_ptr + split * stride_os + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_tile_mask,
    )
    tl.store(lse_ptr + split * stride_ls + b * stride_lb + h * stride_lh + offs_m, lse, mask=mask_m)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: BlockTable) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be [B, L, H, D] (tokens before heads), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, q_len, h, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, h, d):
        raise ValueError(f"k/v must be [B, Lk, H, D] with B={b}, H={h}, D={d} from q, got {tuple(k.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype of {_SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == table.device):
        raise ValueError(
            f"q, k, v and the table must be on one device, got {q.device}, {k.device}, {v.device}, {table.device} "
            "(move the table once with table.to(device))"
        )
    if (table.q_len, table.k_len) != (q_len, k.shape[1]):
        raise ValueError(
            f"the table was built for q_len={table.q_len}, k_len={table.k_len}, got q_len={q_len}, "
            f"k_len={k.shape[1]}: build one table per (resolution, cache layout)"
        )
    tb, th = table.block_count.shape[:2]
    if tb not in (1, b) or th not in (1, h):
        raise ValueError(f"the table's leading dims must be (1 or B={b}, 1 or H={h}), got ({tb}, {th})")
    if d > 256:
        raise ValueError(f"head_dim up to 256 is supported, got {d}")


def _tma_layout_ok(k: torch.Tensor, v: torch.Tensor, d: int) -> bool:
    """Tensor descriptors need a power-of-two tile width and 16-byte aligned bases and row strides."""
    if triton.next_power_of_2(d) != d or d < 16:
        return False
    size = k.element_size()
    return all(x.data_ptr() % 16 == 0 and all(stride * size % 16 == 0 for stride in x.stride()[:3]) for x in (k, v))


_ALLOCATOR_SET = False


def _ensure_allocator() -> None:
    """Descriptors made inside a kernel need scratch memory from Triton's allocator hook (set once, CUDA only)."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def _default_config(table: BlockTable, d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) used when the caller sets none.

    Measured on an H100 (bench/bench_attention.py, bf16, D=128, 4,680 x 18,720): 128x128 tiles, 8 warps, 3 stages
    ran 1.5x faster than 128x64 (412 against 274 TFLOP/s at 40 heads). fp32 tiles take twice the shared memory, so
    they stay 64 keys wide with 2 stages.
    """
    block_m = min(table.block_m, 128)
    if dtype == torch.float32:
        return block_m, min(table.block_n, 64), 4, 2
    num_warps = 8 if block_m >= 128 and d >= 128 else 4
    return block_m, min(table.block_n, 128), num_warps, 3


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: BlockTable,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tma: bool = False,
    splits: int = 1,
    warp_specialize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the key blocks ``table`` lists, one pass, no score matrix in memory.

    Args:
        q: ``[B, Lq, H, D]``, float16/bfloat16/float32, last dim contiguous (copied otherwise).
        k, v: ``[B, Lk, H, D]``, same dtype and device as ``q``.
        table: which key blocks each query block visits (:func:`dense_block_table` for full attention,
            ``radial_block_table`` for the streaming radial mask); built for exactly ``(Lq, Lk)`` and on ``q``'s
            device.
        scale: softmax scale, default ``D ** -0.5``.
        block_m, block_n: kernel tile sizes (powers of two >= 16 dividing ``table.block_m``/``table.block_n``);
            default ``min(table.block_m, 128)`` and ``min(table.block_n, 128)`` (64 for float32).
        num_warps, num_stages: Triton launch settings (defaults suit an H100; ignored by the interpreter).
        tma: load key/value tiles through tensor descriptors (Hopper's TMA copy engine) where the layout allows it
            (power-of-two head dim, 16-byte aligned rows); plain pointer loads otherwise.
        splits: split-K, the key tiles of each table row shared out among this many programs, whose fp32 partial
            results are then merged exactly by their log-sum-exps (:func:`merge_partials`). It adds programs where
            the grid (query tiles x batch x heads) leaves the GPU's last wave mostly idle.
        warp_specialize: ask Triton to warp-specialise the main key loop (``tl.range(..., warp_specialize=True)``:
            loads, matmuls and the softmax in separate warp partitions; Triton 3.6 has a Hopper pass for it). An
            experiment for the GPU benchmark (``bench/bench_attention.py --configs ws``), off by default; the short
            masked last tile always runs in the plain loop.

    Returns:
        ``out [B, Lq, H, D]`` in ``q``'s dtype and ``lse [B, H, Lq]`` fp32 (natural log of the softmax
        denominator, scale included). Queries whose row lists no block get ``out = 0``, ``lse = -inf``;
        :func:`merge_attention` combines such partial results exactly.

    Example::

        table = radial_block_table((30, 52), rolling_cache_layout(1, 8, 3)).to("cuda")  # once per layout
        out, lse = block_sparse_attention(q, k, v, table)  # every layer, every step
    """
    _check_inputs(q, k, v, table)
    batch, q_len, heads, d = q.shape
    k_len = k.shape[1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))

    default_m, default_n, default_warps, default_stages = _default_config(table, d, q.dtype)
    block_m = default_m if block_m is None else block_m
    block_n = default_n if block_n is None else block_n
    for name, tile, table_size in (("block_m", block_m, table.block_m), ("block_n", block_n, table.block_n)):
        if tile < 16 or tile & (tile - 1) or table_size % tile:
            raise ValueError(
                f"{name} must be a power of two >= 16 dividing the table's {name}={table_size}, got {tile}"
            )
    scale = d**-0.5 if scale is None else float(scale)

    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be an integer >= 1, got {splits!r}")
    if splits == 1:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
        stride_os = stride_ls = 0
    else:  # fp32 partial results, one per split
        out = torch.empty(splits, batch, q_len, heads, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, batch, heads, q_len, dtype=torch.float32, device=q.device)
        stride_os, stride_ls = out.stride(0), lse.stride(0)
    idx, count = table.block_idx.contiguous(), table.block_count.contiguous()
    # Stride 0 on a table dim of size 1 shares it across the batch or the heads.
    stride_ib, stride_ih = (s if n > 1 else 0 for s, n in zip(idx.stride()[:2], idx.shape[:2], strict=True))
    stride_cb, stride_ch = (s if n > 1 else 0 for s, n in zip(count.stride()[:2], count.shape[:2], strict=True))

    use_tma = tma and _tma_layout_ok(k, v, d)
    if use_tma and q.is_cuda:
        _ensure_allocator()
    grid = (triton.cdiv(q_len, block_m), batch * heads, splits)
    _block_sparse_attn_fwd_kernel[grid](
        q, k, v, out, lse, idx, count,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_os, out.stride(-4), out.stride(-3), out.stride(-2),
        stride_ls, lse.stride(-3), lse.stride(-2),
        stride_ib, stride_ih, idx.stride(2),
        stride_cb, stride_ch,
        heads, q_len, k_len, table.n_k_blocks, splits, scale * _LOG2E,
        D=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        ROWS_PER_TABLE_BLOCK=table.block_m // block_m,
        TABLE_N=table.block_n,
        SUB_N=table.block_n // block_n,
        EVEN_N=k_len % table.block_n == 0,
        EVEN_D=triton.next_power_of_2(d) == d and d >= 16,
        USE_TMA=use_tma,
        DENSE=table.dense,
        # Triton's fp32 dot defaults to tf32; fp32 inputs exist for exactness (references, tiny models).
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WARP_SPEC=bool(warp_specialize),
        num_warps=default_warps if num_warps is None else num_warps,
        num_stages=default_stages if num_stages is None else num_stages,
    )  # fmt: skip
    if splits == 1:
        return out, lse
    merged, lse = merge_partials(out, lse)
    return merged.to(q.dtype), lse
