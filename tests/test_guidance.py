"""Classifier-free guidance in a stream: the batched session against two separate streams combined by hand."""

import numpy as np
import pytest
import torch
from conftest import assert_close

from stream_runtime import StreamConfig, StreamPipeline
from stream_runtime.cache import CacheLayout, RollingKVCache
from stream_runtime.pipelines.tinyworld import train_dit
from stream_runtime.pipelines.wan import sampling

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEGATIVE = "a red fox in snow", "a blue cat"
STREAM = dict(chunk_frames=1, sink_frames=1, window_frames=2, timesteps=(1000.0, 600.0, 300.0), shift=1.0)


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(seed=0, height=32, width=32)


def reference_guided_stream(pipe, chunks: int, scale: float, sampler: str, seed: int) -> list[torch.Tensor]:
    """Guidance spelled out: one batch-1 cache per branch, each branch's pass run on its own, flows combined as
    ``uncond + scale * (cond - uncond)``, the combined chunk written into both caches by a context pass under each
    branch's prompt. Noise is drawn in the session's order (the chunk's start, then one draw per later step)."""
    net, config = pipe.net, pipe.stream_config(**STREAM, sampler=sampler)
    c, lh, lw = pipe.vae.config.z_dim, 32 // 8, 32 // 8
    grid = net.grid(lh, lw)
    layout = CacheLayout(grid[0] * grid[1], config.sink_frames, config.window_frames, config.chunk_frames)
    branches = []
    for prompt in (pipe.encode_prompt(PROMPT), pipe.encode_negative_prompt(NEGATIVE)):
        cache = RollingKVCache(layout, net.num_layers, 1, net.heads, net.head_dim, (c, lh, lw))
        branches.append((net.text_kv(prompt), cache))
    generator = torch.Generator().manual_seed(seed)
    sigmas = sampling.sigmas_for(config.timesteps, config.shift)
    out = []
    for frame in range(chunks):
        x = torch.randn((1, c, 1, lh, lw), generator=generator)
        for i, sigma in enumerate(sigmas):
            cond, uncond = (
                net.forward_chunk(x, sigma * 1000.0, text, cache, frame, position_mode=config.position_mode).float()
                for text, cache in branches
            )
            flow = uncond + scale * (cond - uncond)
            x0 = sampling.to_x0(x, flow, sigma)
            if i + 1 < len(sigmas):
                noise = torch.randn(x0.shape, generator=generator)
                x = sampling.next_sample(x0, x, flow, sigma, sigmas[i + 1], noise, sampler)
        for text, cache in branches:
            net.forward_chunk(x0, 0.0, text, cache, frame, position_mode=config.position_mode)
            cache.commit(frame, 1, latents=x0)
        out.append(x0)
    return out


@pytest.mark.parametrize("sampler", ["euler", "renoise"])
def test_guided_session_equals_two_streams_combined(pipe, sampler):
    chunks = 4  # past the window: eviction in both branches' caches
    expected = reference_guided_stream(pipe, chunks, scale=3.0, sampler=sampler, seed=5)
    s = pipe.session(PROMPT, seed=5, guidance_scale=3.0, negative_prompt=NEGATIVE, sampler=sampler, **STREAM)
    got = [s.generate_latents() for _ in range(chunks)]
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape == (1, pipe.vae.config.z_dim, 1, 4, 4)
        assert_close(a, b)
    unguided = pipe.session(PROMPT, seed=5, sampler=sampler, **STREAM)
    assert not torch.allclose(got[-1], [unguided.generate_latents() for _ in range(chunks)][-1])


def test_negative_prompt_equal_to_the_prompt_gives_the_unguided_stream(pipe):
    """cond == uncond makes any scale a no-op, through steps, context passes, a recache and video-to-video."""

    def run(mode, **guidance):
        s = pipe.session(PROMPT, seed=2, mode=mode, prompt_switch="recache", **STREAM, **guidance)
        if mode == "v2v":
            s.push_frames(np.random.default_rng(0).integers(0, 256, (13, 32, 32, 3), dtype=np.uint8))
        out = [s.next_chunk() for _ in range(2)]
        s.recache()
        out.append(s.next_chunk())
        return out

    for mode in ("t2v", "v2v"):
        plain, guided = run(mode), run(mode, guidance_scale=6.0, negative_prompt=PROMPT)
        for a, b in zip(plain, guided, strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batch of 2 vs 1: float rounding only


def test_guidance_changes_the_frames_and_costs_one_batch(pipe):
    s = pipe.session(PROMPT, seed=1, guidance_scale=4.0, **STREAM)
    plain = pipe.session(PROMPT, seed=1, **STREAM)
    assert s.cache.k[0].shape[0] == 2 and plain.cache.k[0].shape[0] == 1
    assert not np.array_equal(s.next_chunk(), plain.next_chunk())


def test_guidance_arguments(pipe):
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 1"):
        StreamConfig(guidance_scale=0.5)
    with pytest.raises(ValueError, match="negative_prompt must be a string"):
        StreamConfig(negative_prompt=None)
    with pytest.raises(ValueError, match="stream_batch does not support classifier-free guidance"):
        StreamConfig(stream_batch=True, guidance_scale=2.0)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        pipe.session("", guidance_scale=2.0)
    s = pipe.session(PROMPT, guidance_scale=2.0, **STREAM)
    with pytest.raises(ValueError, match="guidance cannot be turned on or off"):
        s.set_config(s.config.replace(guidance_scale=1.0))
    s.set_config(s.config.replace(guidance_scale=5.0, negative_prompt=NEGATIVE))  # scale and negative may change
    assert s.next_chunk().shape == (1, 32, 32, 3)


def test_caption_dropout_rows():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert train_dit.caption_dropout(8, 0.0, generator) is None
    assert torch.equal(generator.get_state(), state)  # no draw: runs without dropout repeat exactly
    assert train_dit.caption_dropout(8, 1.0, generator).all()
    share = train_dit.caption_dropout(4000, 0.2, generator).float().mean().item()
    assert 0.17 < share < 0.23
    with pytest.raises(ValueError, match="uncond_prob"):
        train_dit.caption_dropout(8, 1.5, generator)
