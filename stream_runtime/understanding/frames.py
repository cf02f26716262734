"""Processor-free path from RGB frames to Qwen2-VL ``pixel_values_videos`` and ``video_grid_thw``.

Does what ``Qwen2VLVideoProcessor`` does after resizing (rescale by 1/255, normalise with the CLIP mean/std,
repeat the last frame up to a multiple of ``temporal_patch_size``, patchify in the merge-block order the vision
tower expects) with plain torch, so it needs neither torchvision nor a downloaded processor config. It does not
resize: hand it frames whose sides are multiples of ``patch_size * spatial_merge_size`` (the ingest
``Resize`` can produce them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

UINT8_MAX = 255.0


def frames_to_patches(
    frames: torch.Tensor | np.ndarray,
    patch_size: int,
    spatial_merge_size: int,
    temporal_patch_size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flatten a chunk of frames into the vision tower's patch rows.

    Args:
        frames: ``[T, H, W, C]`` uint8 RGB (what the ingest sources yield, stacked).
        patch_size, spatial_merge_size, temporal_patch_size: from the model's vision config.
        mean, std: per-channel normalisation (Qwen2-VL's processor uses the OpenAI CLIP values).

    Returns:
        ``pixel_values`` ``[grid_t * grid_h * grid_w, C * temporal_patch_size * patch_size**2]`` fp32 and the
        patch grid ``(grid_t, grid_h, grid_w)`` with ``grid_t = ceil(T / temporal_patch_size)``.

    Example::

        pixels, grid = frames_to_patches(np.zeros((2, 56, 84, 3), np.uint8), 14, 2, 2)  # grid (1, 4, 6)
    """
    video = torch.as_tensor(frames)
    if video.dtype != torch.uint8 or video.ndim != 4:
        raise ValueError(f"frames: expected uint8 [T, H, W, C], got {video.dtype} of shape {tuple(video.shape)}")
    num_frames, height, width, channels = video.shape
    factor = patch_size * spatial_merge_size
    if num_frames < 1 or height % factor or width % factor:
        raise ValueError(
            f"frames: expected T >= 1 and H, W multiples of patch_size * spatial_merge_size = {factor}, "
            f"got [T, H, W] = [{num_frames}, {height}, {width}]; resize first (e.g. ingest Resize)"
        )
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std: expected {channels} values each, got {len(mean)} and {len(std)}")

    x = video.permute(0, 3, 1, 2).float() * (1.0 / UINT8_MAX)  # [T, C, H, W]
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    if pad := -num_frames % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    grid_t = x.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    merge = spatial_merge_size
    x = x.reshape(
        grid_t, temporal_patch_size, channels, grid_h // merge, merge, patch_size, grid_w // merge, merge, patch_size
    )
    # -> [t, h/m, w/m, m, m, C, tp, p, p]: merge blocks contiguous, then the conv's (C, tp, p, p) kernel layout
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return pixel_values, (grid_t, grid_h, grid_w)
