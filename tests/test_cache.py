"""RollingKVCache bookkeeping on its own (the model-level equivalence tests are in test_streaming.py)."""

import pytest
import torch

from stream_runtime.cache import CacheLayout, RollingKVCache


def cache(sink=2, window=5, chunk=2, frame_tokens=3):
    layout = CacheLayout(frame_tokens, sink, window, chunk)
    return RollingKVCache(layout, num_layers=1, batch=1, heads=1, head_dim=4, latent_shape=(1, 1, 1))


def write_chunk(c, first, n):
    ft = c.layout.frame_tokens
    # each token carries its frame number, so slots can be read back
    kv = torch.arange(first, first + n).repeat_interleave(ft).float().view(1, n * ft, 1, 1).expand(1, n * ft, 1, 4)
    c.store_current(0, kv, kv)
    c.commit(first, n, latents=torch.arange(first, first + n).float().view(1, 1, n, 1, 1))


def test_slots_hold_sinks_then_the_most_recent_frames():
    c = cache()
    for first in range(0, 12, 2):
        write_chunk(c, first, 2)
    # ring = window - chunk = 3 frames: the last three frames stay, round-robin in the slots
    assert c.kept_frames() == [0, 1, 9, 10, 11]
    ft = c.layout.frame_tokens
    stored = [int(c.k[0][0, s * ft, 0, 0]) for s in range(c.layout.cache_frames)]
    assert sorted(stored) == [0, 1, 9, 10, 11]
    assert stored == c.slot_frames
    frames, latents = c.kept_latents()
    assert frames == [0, 1, 9, 10, 11] and latents.flatten().tolist() == [0, 1, 9, 10, 11]
    assert c.slot_positions("bounded") == [[0, 1, 9, 10, 11].index(f) for f in c.slot_frames]


def test_commit_checks_order_and_size():
    c = cache()
    write_chunk(c, 0, 2)
    with pytest.raises(ValueError, match="stream order"):
        c.store_current(0, torch.zeros(1, 6, 1, 4), torch.zeros(1, 6, 1, 4))
        c.commit(0, 2)
    c.store_current(0, torch.zeros(1, 6, 1, 4), torch.zeros(1, 6, 1, 4))
    with pytest.raises(ValueError, match="last stored chunk had 2"):
        c.commit(2, 1)
    with pytest.raises(ValueError, match="does not fit"):
        c.store_current(0, torch.zeros(1, 9, 1, 4), torch.zeros(1, 9, 1, 4))


def test_memory_is_fixed_and_reset_reuses_buffers():
    c = cache()
    ptr, size = c.k[0].data_ptr(), c.memory_bytes()
    for first in range(0, 40, 2):
        write_chunk(c, first, 2)
    c.reset()
    assert c.valid_frames == 0 and c.k[0].data_ptr() == ptr and c.memory_bytes() == size
