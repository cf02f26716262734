"""Radial block tables for streaming attention against a sink + window cache.

Public API::

    from stream_runtime.kernels.radial import rolling_cache_layout, radial_block_table

    layout = rolling_cache_layout(sink_frames=1, window_frames=8, chunk_frames=3)
    table = radial_block_table((30, 52), layout, device="cuda")  # once per (resolution, cache layout)
    table.density()  # fraction of (query, key) pairs computed
    # then: block_sparse_attention(q, k, v, table) from stream_runtime.kernels.block_sparse_attn
"""

from .layout import StreamFrameLayout, radial_bands, rolling_cache_layout
from .naive import radial_token_mask
from .table import radial_block_table

__all__ = ["StreamFrameLayout", "radial_bands", "radial_block_table", "radial_token_mask", "rolling_cache_layout"]
