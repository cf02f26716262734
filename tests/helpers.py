"""Tiny models shared by the tests."""

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
