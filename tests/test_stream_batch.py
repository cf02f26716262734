"""The stream batch (fp32, tiny model) against a slow sequential reference with the same semantics."""

import numpy as np
import pytest
import torch
from conftest import assert_close
from helpers import make_cache, tiny_net

from stream_runtime.cache import CacheLayout, RollingKVCache
from stream_runtime.config import StreamConfig
from stream_runtime.pipelines.wan import sampling
from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.stream_batch import StreamBatchSchedule, pass_noise

SIZE = 32  # pixels: a 4 x 4 latent, a 2 x 2 patch grid


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(seed=0, height=SIZE, width=SIZE)


# -- the schedule


@pytest.mark.parametrize("passes,stride", [(1, 1), (3, 1), (5, 1), (3, 2), (4, 3)])
def test_schedule_runs_every_pass_of_every_chunk_once_in_order(passes, stride):
    sched = StreamBatchSchedule(passes, stride)
    num_chunks = 7
    seen: dict[int, list[tuple[int, int]]] = {}
    for f in range(sched.total_forwards(num_chunks)):
        items = sched.items(f, num_chunks)
        assert [p for _, p in items] == sorted(p for _, p in items)
        for chunk, p in items:
            seen.setdefault(chunk, []).append((f, p))
        leaving = sched.leaving(f, num_chunks)
        if leaving is not None:
            assert items[-1] == (leaving, passes - 1)
            assert seen[leaving][-1] == (f, passes - 1)
    for chunk in range(num_chunks):
        assert [p for _, p in seen[chunk]] == list(range(passes))
        forwards = [f for f, _ in seen[chunk]]
        assert all(b - a == stride for a, b in zip(forwards, forwards[1:], strict=False))
        assert forwards[-1] == sched.leave_forward(chunk)
    # After the warm-up one chunk leaves per forward.
    leaves = [sched.leaving(f) for f in range(sched.warmup_forwards - 1, sched.warmup_forwards + 5)]
    assert leaves == list(range(6))
    assert all(sched.leaving(f) is None for f in range(sched.warmup_forwards - 1))


def test_schedule_and_config_reject_bad_values():
    with pytest.raises(ValueError, match="stride"):
        StreamBatchSchedule(3, 0)
    with pytest.raises(ValueError, match="needs stream_batch"):
        StreamConfig(stream_batch_stride=2)
    with pytest.raises(ValueError, match="prompt_switch='reset'"):
        StreamConfig(stream_batch=True, prompt_switch="reset")
    with pytest.raises(ValueError, match="attention_reuse"):
        StreamConfig(stream_batch=True, attention_reuse=1)
    with pytest.raises(ValueError, match="seed"):
        pass_noise(-1, 0, 0, (1,))


def test_pass_noise_depends_on_chunk_and_pass_only():
    a = pass_noise(3, 4, 1, (2, 5))
    assert torch.equal(a, pass_noise(3, 4, 1, (2, 5)))
    assert not torch.equal(a, pass_noise(3, 4, 2, (2, 5)))
    assert not torch.equal(a, pass_noise(3, 5, 1, (2, 5)))


# -- the batched forward


@pytest.mark.parametrize("mode", ["absolute", "bounded"])
def test_forward_batch_equals_forward_chunk_per_item(mode):
    """Each chunk of a batch gets what forward_chunk gives it alone against the same cache; the committed chunk's
    K/V are the ones forward_chunk would have stored."""
    net = tiny_net()
    chunk, grid = 2, (2, 3)
    text = net.text_kv(torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(2)
    batched, single = (make_cache(net, grid, 1, 5, chunk) for _ in range(2))
    for c in range(3):  # fill both caches with the same history (evicting)
        x = torch.randn(1, 4, chunk, 4, 6, generator=g)
        for cache in (batched, single):
            net.forward_chunk(x, 0.0, text, cache, c * chunk, position_mode=mode)
            cache.commit(c * chunk, chunk)
    x = torch.randn(3, 4, chunk, 4, 6, generator=g)
    t = torch.tensor([900.0, 500.0, 0.0])
    firsts = [12, 10, 6]
    got = net.forward_batch(x, t, firsts, text, batched, commit_item=2, position_mode=mode)
    for b in range(3):
        ref = net.forward_chunk(x[b : b + 1], t[b], text, single, firsts[b], position_mode=mode)
        assert_close(got[b : b + 1], ref)
    for cache in (batched, single):
        cache.commit(firsts[2], chunk)
    for layer in range(net.num_layers):
        assert_close(batched.kept(layer)[0], single.kept(layer)[0])


# -- the session against the sequential reference


def reference_stream(pipe, config, prompt, seed, num_chunks, switches=(), inputs=None):
    """One chunk and one pass at a time through forward_chunk, visiting forwards in order: the chunks of forward f
    in increasing pass order (the leaving one last, so the scratch holds its K/V at commit), the cache committed
    between forwards. ``switches``: (forward, prompt) applied before that forward. ``inputs``: video-to-video, the
    clean latents of each chunk's input, noised to the first level of the step list after ``config.strength``."""
    net = pipe.net
    grid = net.grid(SIZE // 8, SIZE // 8)
    latent_shape = (pipe.vae.config.z_dim, SIZE // 8, SIZE // 8)
    layout = CacheLayout(grid[0] * grid[1], config.sink_frames, config.window_frames, config.chunk_frames)
    cache = RollingKVCache(layout, net.num_layers, 1, net.heads, net.head_dim, latent_shape=latent_shape)
    text = net.text_kv(pipe.encode_prompt(prompt))
    steps = len(config.timesteps)
    passes = steps + int(config.context_pass)
    stride = config.stream_batch_stride
    sigmas = sampling.sigmas_for(config.timesteps, config.shift, config.strength if inputs is not None else 1.0)
    fc = config.chunk_frames
    state, out = {}, []
    switches = dict(switches)
    f = 0
    while len(out) < num_chunks:
        if f in switches:
            text = net.text_kv(pipe.encode_prompt(switches[f]))
            if config.prompt_switch == "recache":
                frames, latents = cache.kept_latents()
                cache.reset()
                for i in range(0, len(frames), fc):  # kept frames come in whole chunks here
                    x = latents[:, :, i : i + fc]
                    net.forward_chunk(x, 0.0, text, cache, frames[i], position_mode=config.position_mode)
                    cache.commit(frames[i], fc, latents=x)
        leaving = None
        for p in range(passes):
            c = f - p * stride
            if c < 0:
                continue
            if p:
                x = state.pop(c)
            elif inputs is None:
                x = pass_noise(seed, c, 0, (1, *latent_shape[:1], fc, *latent_shape[1:]))
            else:
                x = sampling.add_noise(inputs[c], pass_noise(seed, c, 0, inputs[c].shape), sigmas[0])
            t = sigmas[p] * 1000.0 if p < steps else 0.0
            flow = net.forward_chunk(x, t, text, cache, c * fc, position_mode=config.position_mode)
            x0 = x if p == steps else sampling.to_x0(x, flow, sigmas[p])
            if p + 1 < steps and config.sampler == "euler":  # one Euler step of the flow ODE dx/dsigma = flow
                state[c] = x + (sigmas[p + 1] - sigmas[p]) * flow
            elif p + 1 < steps:
                state[c] = sampling.add_noise(x0, pass_noise(seed, c, p + 1, x0.shape), sigmas[p + 1])
            elif p + 1 == steps and config.context_pass:
                state[c] = x0
            if p == passes - 1:
                leaving = (c, x0)
        if leaving is not None:
            c, x0 = leaving
            cache.commit(c * fc, fc, latents=x0)
            out.append(x0)
        f += 1
    return out


CASES = {
    "context-absolute": dict(chunk_frames=1, sink_frames=1, window_frames=3, timesteps=(1000, 750, 500)),
    "context-bounded": dict(
        chunk_frames=2, sink_frames=1, window_frames=4, timesteps=(1000, 500), position_mode="bounded"
    ),
    "no-context": dict(chunk_frames=1, sink_frames=1, window_frames=2, timesteps=(1000, 600, 300), context_pass=False),
    "stride-2": dict(chunk_frames=1, sink_frames=1, window_frames=3, timesteps=(1000, 500), stream_batch_stride=2),
    "stride-2-euler": dict(
        chunk_frames=1,
        sink_frames=1,
        window_frames=3,
        timesteps=(1000, 700, 400),
        stream_batch_stride=2,
        sampler="euler",
    ),
    "stride-3-bounded": dict(
        chunk_frames=1,
        sink_frames=0,
        window_frames=3,
        timesteps=(1000, 500),
        stream_batch_stride=3,
        position_mode="bounded",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stream_batch_session_equals_sequential_reference(pipe, case):
    config = StreamConfig(stream_batch=True, shift=5.0, **CASES[case])
    num_chunks = 7
    ref = reference_stream(pipe, config, "a red fox", seed=3, num_chunks=num_chunks)
    with pipe.session("a red fox", seed=3, height=SIZE, width=SIZE, config=config) as s:
        lag = s._stream_batch.schedule.lag
        for k in range(num_chunks):
            got = s.generate_latents()
            assert_close(got, ref[k])
            # One forward per chunk after the warm-up of lag + 1 forwards.
            assert s._stream_batch.forward_index == k + lag + 1
            assert s.chunk_index == k + 1


@pytest.mark.parametrize("policy", ["recache", "keep"])
def test_stream_batch_prompt_switch_equals_reference(pipe, policy):
    config = StreamConfig(
        stream_batch=True, chunk_frames=1, sink_frames=1, window_frames=3, timesteps=(1000, 500), prompt_switch=policy
    )
    num_chunks, switch_after = 8, 3
    with pipe.session("a red fox", seed=5, height=SIZE, width=SIZE, config=config) as s:
        lag = s._stream_batch.schedule.lag
        got = [s.generate_latents() for _ in range(switch_after)]
        # set_prompt between two calls acts before the next forward, whichever chunks are in flight.
        s.set_prompt("a blue sea")
        got += [s.generate_latents() for _ in range(num_chunks - switch_after)]
    ref = reference_stream(pipe, config, "a red fox", 5, num_chunks, switches=[(switch_after + lag, "a blue sea")])
    for a, b in zip(got, ref, strict=True):
        assert_close(a, b)
    # The switch changed the chunks still in flight: the last ones differ from a run without it.
    plain = reference_stream(pipe, config, "a red fox", 5, num_chunks)
    assert (got[-1] - plain[-1]).abs().max() > 1e-3


def test_stream_batch_session_decodes_frames_and_rejects_what_it_cannot_do(pipe):
    config = StreamConfig(stream_batch=True, chunk_frames=1, sink_frames=1, window_frames=2, timesteps=(1000, 500))
    with pipe.session("a cat", seed=0, height=SIZE, width=SIZE, config=config) as s:
        frames = s.next_chunk()
        assert frames.dtype.name == "uint8" and frames.shape[1:] == (SIZE, SIZE, 3)
        with pytest.raises(ValueError, match="number of passes"):
            s.set_config(config.replace(timesteps=(1000, 750, 500)))
        with pytest.raises(ValueError, match="stream_batch"):
            s.set_config(config.replace(stream_batch=False))
        s.set_config(config.replace(shift=3.0))  # same passes: allowed


@pytest.mark.parametrize("context_pass", [False, True])
def test_video_to_video_stream_batch_equals_sequential_reference(pipe, context_pass):
    """StreamDiffusionV2's video-to-video setting on the stream batch: each chunk enters with its encoded input noised
    to its first level; a forward waits (returns None) until the entering chunk's input is buffered."""
    from stream_runtime.pipelines.wan.vae_stream import StreamingVAEEncoder

    config = StreamConfig(
        stream_batch=True,
        chunk_frames=1,
        sink_frames=1,
        window_frames=3,
        timesteps=(700.0, 500.0),
        shift=8.0,
        strength=0.8,
        context_pass=context_pass,
    )
    num_chunks = 5
    clip = np.random.default_rng(0).integers(0, 256, (1 + 4 * (num_chunks + 2), SIZE, SIZE, 3), dtype=np.uint8)
    encoder, inputs, start = StreamingVAEEncoder(pipe.vae), [], 0
    for c in range(num_chunks + 2):  # the chunks in flight when the last one leaves have entered too
        n = 1 if c == 0 else 4
        pixels = torch.from_numpy(clip[start : start + n]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        inputs.append(encoder.encode(pixels).float())
        start += n
    ref = reference_stream(pipe, config, "a red fox", seed=3, num_chunks=num_chunks, inputs=inputs)
    with pipe.session("a red fox", seed=3, mode="v2v", height=SIZE, width=SIZE, config=config) as s:
        lag = s._stream_batch.schedule.lag
        assert s.frames_needed() == 1 and s.generate_latents() is None  # no input: nothing runs
        s.push_frames(clip[:1])
        assert s.generate_latents() is None  # chunk 0 entered; chunk 1's input is missing
        assert s._stream_batch.forward_index == 1 and s.frames_needed() == 4
        s.push_frames(clip[1:])
        for k in range(num_chunks):
            assert_close(s.generate_latents(), ref[k])
            assert s._stream_batch.forward_index == k + lag + 1
