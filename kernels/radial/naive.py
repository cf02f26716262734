"""Token-level reference for the streaming radial mask (materialises ``[Lq, Lk]``; small shapes only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import StreamFrameLayout, radial_bands, resolve_bands


def radial_token_mask(
    frame_grid: Sequence[int],
    layout: StreamFrameLayout,
    base_band: int | None = None,
    min_band: int | None = None,
) -> torch.Tensor:
    """Bool ``[Lq, Lk]``, True where query token ``i`` may attend to key token ``j`` under the radial rule.

    ``Lq = n_query_frames * rows * cols``, ``Lk = n_key_frames * rows * cols``; see :func:`radial_bands` for the rule.
    The block table from :func:`radial_block_table` covers this mask (every True lies in a listed tile).
    """
    tokens_per_frame, base_band, min_band = resolve_bands(frame_grid, base_band, min_band)
    bands = radial_bands(layout, tokens_per_frame, base_band, min_band)
    q_pos = torch.arange(layout.n_query_frames * tokens_per_frame)
    k_pos = torch.arange(layout.n_key_frames * tokens_per_frame)
    q_frame, q_spatial = q_pos // tokens_per_frame, q_pos % tokens_per_frame
    k_frame, k_spatial = k_pos // tokens_per_frame, k_pos % tokens_per_frame
    band = bands[q_frame][:, k_frame]
    return (q_spatial[:, None] - k_spatial[None, :]).abs() <= band
