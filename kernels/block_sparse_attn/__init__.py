"""Block-sparse flash attention forward (Triton) with an fp32 reference.

Public API::

    from stream_runtime.kernels.block_sparse_attn import (
        BlockTable, dense_block_table, block_sparse_attention, merge_attention,
    )

    table = dense_block_table(q.shape[1], k.shape[1], device=q.device)  # or a radial table
    out, lse = block_sparse_attention(q, k, v, table)  # q [B, Lq, H, D], k/v [B, Lk, H, D]

Importing this package without a CUDA device sets ``TRITON_INTERPRET=1`` (if unset) so the kernel runs, slowly,
in Triton's interpreter on CPU tensors.
"""

from ..merge import merge_attention
from .kernel import block_sparse_attention
from .naive import naive_attention, naive_block_sparse_attention
from .table import BlockTable, dense_block_table

__all__ = [
    "BlockTable",
    "block_sparse_attention",
    "dense_block_table",
    "merge_attention",
    "naive_attention",
    "naive_block_sparse_attention",
]
