"""Combine attention results over disjoint key sets, given each part's log-sum-exp (plain PyTorch: importing this
module does not import Triton, so the cross-step reuse path uses it on any machine)."""

from __future__ import annotations

import torch


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge softmax attention over keys ``A`` and over keys ``B`` into attention over ``A ∪ B`` (A, B disjoint).

    ``out = w_a * out_a + w_b * out_b`` with ``w_x = exp(lse_x - lse)``, ``lse = logaddexp(lse_a, lse_b)``,
    computed in fp32. A side with ``lse = -inf`` (no keys, e.g. an empty block list) gets weight exactly 0; if both
    sides are ``-inf`` the result is ``out = 0``, ``lse = -inf``.

    Args:
        out_a, out_b: ``[B, L, H, D]``, any float dtype (the result has ``out_a``'s dtype).
        lse_a, lse_b: ``[B, H, L]`` (natural log, as returned by ``block_sparse_attention``).

    Returns:
        ``(out [B, L, H, D], lse [B, H, L] fp32)``.

    Example::

        out_c, lse_c = block_sparse_attention(q, k_cache, v_cache, table_cache)
        out_n, lse_n = block_sparse_attention(q, k_new, v_new, table_new)
        out, lse = merge_attention(out_c, lse_c, out_n, lse_n)
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(
            f"both sides must have the same shapes, got out {tuple(out_a.shape)} vs {tuple(out_b.shape)} and "
            f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}"
        )
    b, length, h, _ = out_a.shape
    if tuple(lse_a.shape) != (b, h, length):
        raise ValueError(f"lse must be [B, H, L] = {(b, h, length)} for out [B, L, H, D], got {tuple(lse_a.shape)}")
    out, lse = merge_partials(torch.stack([out_a.float(), out_b.float()]), torch.stack([lse_a.float(), lse_b.float()]))
    return out.to(out_a.dtype), lse


def merge_partials(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``S`` partial results over disjoint key sets, ``out [S, B, L, H, D]`` and ``lse [S, B, H, L]``, into
    ``(out [B, L, H, D] fp32, lse [B, H, L] fp32)``: ``out = sum_s exp(lse_s - lse) out_s``,
    ``lse = logsumexp_s lse_s``. Parts without keys (``lse = -inf``) weigh exactly 0; a row no part saw stays
    ``out = 0``, ``lse = -inf``. :func:`merge_attention` is the two-part case; the kernel's split-K uses it too."""
    lse = lse.float()
    total = torch.logsumexp(lse, dim=0)
    # Where every part is empty, total is -inf and lse_s - total would be NaN: shift by 0 so all weights are 0.
    shift = torch.where(torch.isneginf(total), 0.0, total)
    # [S, B, H, L] -> [S, B, L, H, 1], to broadcast over out's head_dim
    weights = torch.exp(lse - shift).transpose(2, 3).unsqueeze(-1)
    return (weights * out.float()).sum(dim=0), total
