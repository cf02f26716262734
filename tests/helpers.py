"""Tiny models and media shared by the tests."""

from pathlib import Path

import av
import numpy as np
import torch
from diffusers import WanTransformer3DModel

from stream_runtime.cache import CacheLayout, RollingKVCache
from stream_runtime.pipelines.wan.presets import tiny_transformer_config
from stream_runtime.pipelines.wan.transformer import StreamingWanTransformer


def tiny_net(seed: int = 0, **overrides) -> StreamingWanTransformer:
    torch.manual_seed(seed)
    wan = WanTransformer3DModel(**tiny_transformer_config(**overrides)).eval().requires_grad_(False)
    return StreamingWanTransformer(wan)


def make_cache(net, grid, sink, window, chunk, latent_shape=None) -> RollingKVCache:
    layout = CacheLayout(grid[0] * grid[1], sink, window, chunk)
    return RollingKVCache(layout, net.num_layers, 1, net.heads, net.head_dim, latent_shape=latent_shape)


def write_clip(path: Path, frames: np.ndarray, fps: int) -> Path:
    """Write uint8 RGB ``frames [T, H, W, 3]`` as an H.264 MP4 at ``fps``; returns ``path``."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path
