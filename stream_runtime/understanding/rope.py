"""M-RoPE positions of streamed tokens and re-rotation of cached keys (Qwen2-VL family).

Qwen2-VL gives every token a 3-D position ``(temporal, height, width)``. A text token at running position ``p``
gets ``(p, p, p)`` and advances ``p`` by 1. A vision grid of ``t x h x w`` LLM tokens (after the 2x2 spatial
merge) starting at ``p`` gets ``(p + floor(i_t * interval), p + i_h, p + i_w)`` and advances ``p`` by
``max(h, w)``; this mirrors ``Qwen2VLModel.get_rope_index`` in transformers 5.23 (``interval`` is 1 for
Qwen2-VL, ``tokens_per_second * seconds_per_grid`` for Qwen2.5-VL videos).

Every position inside a unit (a text token, or a frame chunk with its vision markers) is its start plus a fixed
offset, so moving a unit moves all three axes by the same scalar ``delta``. The text model rotates each
frequency pair ``i`` by ``position[axis(i)] * inv_freq[i]``; with equal shifts on every axis the section layout
(``mrope_section``) drops out and a shift is a plain 1-D rotation by ``delta * inv_freq``.
"""

from __future__ import annotations

import torch

VISION_MARKERS = 2
"""``<|vision_start|>`` and ``<|vision_end|>`` around every frame chunk; each takes one text position."""


def vision_unit_extent(grid: tuple[int, int, int]) -> int:
    """Positions a frame chunk unit advances the running position by: markers plus ``max(h, w)``.

    ``grid`` is the LLM grid ``(t, h, w)`` after the spatial merge.
    """
    _, h, w = grid
    return VISION_MARKERS + max(h, w)


def vision_unit_positions(start: int, grid: tuple[int, int, int], time_interval: float = 1.0) -> torch.Tensor:
    """Positions of one frame chunk unit: ``<|vision_start|>``, ``t*h*w`` vision tokens, ``<|vision_end|>``.

    Args:
        start: running position of ``<|vision_start|>``.
        grid: LLM grid ``(t, h, w)`` of the chunk after the spatial merge.
        time_interval: spacing of temporal positions (1 for Qwen2-VL).

    Returns:
        ``[3, 2 + t*h*w]`` long positions (temporal, height, width rows), in token order (t, then h, then w).
    """
    t, h, w = grid
    grid_start = start + 1
    # Same arithmetic as transformers' get_vision_position_ids: a float product truncated to long.
    temporal = (torch.arange(t) * time_interval).long()
    tt, hh, ww = torch.meshgrid(temporal, torch.arange(h), torch.arange(w), indexing="ij")
    grid_pos = torch.stack([tt, hh, ww]).reshape(3, -1) + grid_start
    begin = torch.full((3, 1), start, dtype=torch.long)
    end = torch.full((3, 1), grid_start + max(h, w), dtype=torch.long)
    return torch.cat([begin, grid_pos, end], dim=1)


def text_positions(start: int, count: int) -> torch.Tensor:
    """``[3, count]`` positions of ``count`` text tokens from running position ``start`` (equal on all axes)."""
    return (torch.arange(count) + start).expand(3, count).clone()


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE'd keys to new positions: ``R(p + delta) k = R(delta) R(p) k`` (rotations compose).

    Args:
        keys: ``[batch, kv_heads, tokens, head_dim]`` keys already rotated at their old positions, as
            transformers' caches store them.
        delta: ``[tokens]`` integer shift of each token's position, the same on the t/h/w axes.
        inv_freq: ``[head_dim // 2]`` inverse frequencies of the text rotary embedding.

    Returns:
        Keys of the same shape and dtype, rotated as if computed at ``position + delta``. The rotation is done
        in fp32 with angles in fp64, then cast back.

    Example::

        moved = rotate_keys(layer.keys, torch.full((n,), -40), rotary_emb.inv_freq)
    """
    return apply_rotation(keys, *rotation(delta, inv_freq, keys.shape))


def rotation(delta: torch.Tensor, inv_freq: torch.Tensor, keys_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[tokens, head_dim]`` fp32 of a shift by ``delta`` ``[tokens]``, for :func:`apply_rotation`."""
    tokens, head_dim = keys_shape[-2], keys_shape[-1]
    if delta.shape != (tokens,):
        raise ValueError(f"rotate_keys: expected delta of shape [{tokens}], got {tuple(delta.shape)}")
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"rotate_keys: expected inv_freq of shape [{head_dim // 2}], got {tuple(inv_freq.shape)}")
    angles = delta.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [N, D/2]
    # Duplicated halves: pair (i, i + D/2) shares a frequency, the layout of transformers' rotate_half.
    return angles.cos().float().repeat(1, 2), angles.sin().float().repeat(1, 2)


def apply_rotation(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``keys`` ``[..., tokens, head_dim]`` by ``cos, sin`` ``[tokens, head_dim]`` in fp32."""
    half = keys.shape[-1] // 2
    k = keys.float()
    k_half_rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    cos, sin = cos.to(keys.device), sin.to(keys.device)
    return (k * cos + k_half_rotated * sin).to(keys.dtype)
