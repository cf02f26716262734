"""fp32 PyTorch reference for block-sparse attention (and for :func:`merge_attention`)."""

from __future__ import annotations

import torch

from .table import BlockTable


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in fp32, materialising the whole score matrix.

    Args:
        q: ``[B, Lq, H, D]``.
        k, v: ``[B, Lk, H, D]``.
        scale: softmax scale, default ``D ** -0.5``.
        mask: optional bool ``[B or 1, H or 1, Lq, Lk]``, True = attend.

    Returns:
        out ``[B, Lq, H, D]`` fp32 and lse ``[B, H, Lq]`` fp32 (natural log). A query with no allowed key gets
        ``out = 0`` and ``lse = -inf``, the same convention as the kernel.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.float(), k.float(), v.float()
    # [B, Lq, H, D] x [B, Lk, H, D] -> [B, H, Lq, Lk]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - -inf) would be NaN on fully masked rows; shift those by 0 so that every weight is exactly 0.
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse


def naive_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: BlockTable, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``block_sparse_attention(q, k, v, table, scale)``: dense attention under ``table.to_mask()``."""
    return naive_attention(q, k, v, scale, mask=table.to(q.device).to_mask())
