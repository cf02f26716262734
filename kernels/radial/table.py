"""Build the block table of the streaming radial mask, once per (resolution, cache layout)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..block_sparse_attn.table import BlockTable
from .layout import StreamFrameLayout, radial_bands, resolve_bands


def _frame_segments(n_tokens: int, block: int, tokens_per_frame: int) -> torch.Tensor:
    """``[n_segments, 4]`` int64 rows ``(block, frame, first, last)``: each block cut at frame borders, with the
    in-frame index range ``[first, last]`` it covers in that frame."""
    rows = []
    for b in range(math.ceil(n_tokens / block)):
        start, stop = b * block, min((b + 1) * block, n_tokens)
        for f in range(start // tokens_per_frame, (stop - 1) // tokens_per_frame + 1):
            first = max(start, f * tokens_per_frame) - f * tokens_per_frame
            last = min(stop, (f + 1) * tokens_per_frame) - 1 - f * tokens_per_frame
            rows.append((b, f, first, last))
    return torch.tensor(rows, dtype=torch.int64)


def radial_block_table(
    frame_grid: Sequence[int],
    layout: StreamFrameLayout,
    block_m: int = 128,
    block_n: int = 128,
    base_band: int | None = None,
    min_band: int | None = None,
    device: torch.device | str | None = None,
) -> BlockTable:
    """Block table for the streaming radial mask: the tiles that hold any pair :func:`radial_token_mask` allows.

    The kernel computes every pair in a listed tile, so the attention it runs is ``table.to_mask()``, a superset of
    the token-level rule (as in Radial Attention, the rule is applied at block granularity). Heads and batch share
    the table (leading dims 1).

    Why a band in flattened in-frame order (``|s - s'|`` with ``s = row * cols + col``) rather than a 2-D
    distance: key blocks are runs of consecutive tokens, usually longer than a patch row (128 tokens against 52
    columns at 480x832), so any 2-D neighbourhood still lands on whole rows at block granularity; the 1-D band is
    exactly the set of whole-or-partial rows around the query's row, maps to one contiguous range of key blocks per
    (query block, key frame), and matches Radial Attention so its quality results carry over.

    Args:
        frame_grid: ``(rows, cols)`` latent patches per frame, e.g. ``(30, 52)`` at 480x832 for Wan2.1.
        layout: key and query frames (:func:`rolling_cache_layout` for the sink + window cache).
        block_m, block_n: table block sizes (the kernel tiles divide them).
        base_band: in-frame half-band at temporal distance 2-3, halved for each doubling of the distance; default
            ``rows * cols // 4``.
        min_band: floor of the half-band; default ``cols`` (one patch row).
        device: where to put the table (build once, then reuse for all layers and steps).

    Example::

        layout = rolling_cache_layout(sink_frames=1, window_frames=8, chunk_frames=3)
        table = radial_block_table((30, 52), layout, device="cuda")
        print(f"density {table.density():.2f}")
        out, lse = block_sparse_attention(q, k, v, table)
    """
    tokens_per_frame, base_band, min_band = resolve_bands(frame_grid, base_band, min_band)
    bands = radial_bands(layout, tokens_per_frame, base_band, min_band)
    q_len, k_len = layout.n_query_frames * tokens_per_frame, layout.n_key_frames * tokens_per_frame
    q_seg = _frame_segments(q_len, block_m, tokens_per_frame)
    k_seg = _frame_segments(k_len, block_n, tokens_per_frame)
    # Smallest |s - s'| between a query segment's in-frame range and a key segment's: [n_q_seg, n_k_seg]
    gap = torch.maximum(k_seg[None, :, 2] - q_seg[:, None, 3], q_seg[:, None, 2] - k_seg[None, :, 3]).clamp(min=0)
    active = gap <= bands[q_seg[:, 1]][:, k_seg[:, 1]]
    n_q_blocks, n_k_blocks = math.ceil(q_len / block_m), math.ceil(k_len / block_n)
    hits = torch.zeros(n_q_blocks, n_k_blocks, dtype=torch.int64)
    rows, cols = torch.broadcast_tensors(q_seg[:, None, 0], k_seg[None, :, 0])
    hits.index_put_((rows, cols), active.long(), accumulate=True)
    table = BlockTable.from_block_mask((hits > 0)[None, None], block_m, block_n, q_len, k_len)
    table.validate()
    return table if device is None else table.to(device)
