"""The streaming transformer against full-sequence references (fp32, tiny model)."""

import pytest
import torch
from conftest import assert_close
from helpers import make_cache, tiny_net

from stream_runtime.pipelines.wan.rope import apply_rope, apply_rope_real, rope_cos_sin
from stream_runtime.pipelines.wan.transformer import block_causal_mask

C, LH, LW = 4, 4, 6  # latent channels and size: a 2 x 3 patch grid
GRID = (LH // 2, LW // 2)
TEXT_LEN, TEXT_DIM = 5, 32


def text_kv(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    return net.text_kv(torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g))


def latents(frames, seed):
    return torch.randn(1, C, frames, LH, LW, generator=torch.Generator().manual_seed(seed))


def test_block_code_matches_diffusers_forward():
    """Full attention and one timestep: our block code equals WanTransformer3DModel.forward."""
    net = tiny_net()
    x = latents(3, 0)
    embeds = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([637.0])
    expected = net.wan(x, t, embeds, return_dict=False)[0]
    actual = net.forward_full(x, t, net.text_kv(embeds))
    assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_complex_rope_equals_real_form(dtype):
    """The CPU's complex-product RoPE against the real form, on contiguous, strided (a cache slice, a head view)
    and odd-offset inputs, with shared and per-row tables."""
    gen = torch.Generator().manual_seed(0)
    cos, sin = rope_cos_sin([0, 5, 9], (2, 3), 32)  # [18, 1, 16]
    base = torch.randn(3, 40, 4, 32, generator=gen).to(dtype)
    views = {
        "contiguous": base[:2, :18],
        "token slice": base[:, 7:25],
        "heads of a fused projection": torch.randn(2, 18, 12, 32, generator=gen).to(dtype)[:, :, 4:8],
        "odd offset": torch.randn(2 * 18 * 4 * 32 + 1, generator=gen).to(dtype)[1:].view(2, 18, 4, 32),
    }
    for x in views.values():
        assert_close(apply_rope(x, cos, sin), apply_rope_real(x, cos, sin))
    per_row = (torch.stack([cos, cos.flip(0)]), torch.stack([sin, sin.flip(0)]))  # [2, 18, 1, 16]
    x = views["contiguous"]
    assert_close(apply_rope(x, *per_row), apply_rope_real(x, *per_row))


def stream_vs_full(net, chunk, num_chunks, sink, window, mode, t=412.0, evicting=False):
    """Stream chunks with a clean context pass; compare each chunk's prediction with the full-sequence pass over
    [clean earlier chunks at t=0 | this chunk at t] under the (windowed) block-causal mask."""
    text = text_kv(net)
    cache = make_cache(net, GRID, sink, window, chunk)
    clean = latents(chunk * num_chunks, 10)
    noisy = latents(chunk * num_chunks, 11)
    worst = 0.0
    for c in range(num_chunks):
        lo, hi = c * chunk, (c + 1) * chunk
        got = net.forward_chunk(noisy[:, :, lo:hi], t, text, cache, lo, position_mode=mode)
        net.forward_chunk(clean[:, :, lo:hi], 0.0, text, cache, lo, position_mode=mode)
        cache.commit(lo, chunk)

        seq = torch.cat([clean[:, :, :lo], noisy[:, :, lo:hi]], dim=2)
        steps = torch.tensor([[0.0] * lo + [t] * chunk])
        mask = block_causal_mask(hi, chunk, sink if evicting else None, window if evicting else None)
        ref = net.forward_full(seq, steps, text, frame_mask=mask)[:, :, lo:hi]
        assert_close(got, ref)
        worst = max(worst, (got - ref).abs().max().item())
    return worst


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("mode", ["absolute", "bounded"])
def test_stream_without_eviction_equals_block_causal_full_pass(chunk, mode):
    num_chunks = 4
    net = tiny_net()
    # The cache holds everything: no frame is ever evicted, so both position modes give the same positions.
    worst = stream_vs_full(net, chunk, num_chunks, sink=1, window=chunk * num_chunks + 1, mode=mode)
    assert worst <= 1e-5


@pytest.mark.parametrize("chunk,sink,window", [(1, 1, 3), (2, 1, 4), (3, 3, 6), (2, 0, 5), (3, 2, 4)])
def test_stream_with_eviction_equals_sink_window_full_pass(chunk, sink, window):
    """Absolute positions: after eviction the ring buffer gives exactly the sink + window mask."""
    net = tiny_net()
    stream_vs_full(net, chunk, num_chunks=7, sink=sink, window=window, mode="absolute", evicting=True)


class HistoryCache:
    """Naive reference cache: keeps every frame's K/V in a dict and picks sinks + the last window frames by
    frame number at each chunk. Shares no code with RollingKVCache's ring bookkeeping."""

    def __init__(self, layout, num_layers):
        self.layout = layout
        self.frames: dict[int, list] = {}
        self.current: dict[int, tuple] = {}

    def _kept(self):
        kept = sorted(self.frames)
        sinks = kept[: self.layout.sink_frames]
        rest = [f for f in kept if f not in sinks]
        ring = rest[len(rest) - self.layout.ring_frames :] if self.layout.ring_frames else []
        return sinks + ring

    @property
    def valid_frames(self):
        return len(self._kept())

    def slot_positions(self, mode):
        kept = self._kept()
        return kept if mode == "absolute" else list(range(len(kept)))

    def chunk_positions(self, first, n, mode):
        start = first if mode == "absolute" else self.valid_frames
        return list(range(start, start + n))

    def store_current(self, layer, k, v):
        self.current[layer] = (k, v)
        ft = self.layout.frame_tokens
        ks = [self.frames[f][layer][0] for f in self._kept()] + [k]
        vs = [self.frames[f][layer][1] for f in self._kept()] + [v]
        assert all(x.shape[1] % ft == 0 for x in ks)
        return torch.cat(ks, 1), torch.cat(vs, 1)

    def commit(self, first, n):
        ft = self.layout.frame_tokens
        for i in range(n):
            self.frames[first + i] = {
                layer: (k[:, i * ft : (i + 1) * ft], v[:, i * ft : (i + 1) * ft])
                for layer, (k, v) in self.current.items()
            }


@pytest.mark.parametrize("mode", ["absolute", "bounded"])
@pytest.mark.parametrize("chunk,sink,window", [(1, 2, 3), (2, 1, 5), (3, 3, 9)])
def test_ring_buffer_equals_naive_history_after_eviction(mode, chunk, sink, window):
    net = tiny_net()
    text = text_kv(net)
    ring = make_cache(net, GRID, sink, window, chunk)
    naive = HistoryCache(ring.layout, net.num_layers)
    for c in range(8):
        lo = c * chunk
        noisy, clean = latents(chunk, 100 + c), latents(chunk, 200 + c)
        got = net.forward_chunk(noisy, 500.0, text, ring, lo, position_mode=mode)
        ref = net.forward_chunk(noisy, 500.0, text, naive, lo, position_mode=mode)
        assert_close(got, ref)
        for cache in (ring, naive):
            net.forward_chunk(clean, 0.0, text, cache, lo, position_mode=mode)
            cache.commit(lo, chunk)
        assert ring.kept_frames() == naive._kept()
    if mode == "bounded":
        assert max(ring.slot_positions("bounded")) < sink + window


def test_bounded_positions_equal_absolute_before_eviction():
    net = tiny_net()
    text = text_kv(net)
    outs = {}
    for mode in ("absolute", "bounded"):
        cache = make_cache(net, GRID, 2, 8, 2)
        for c in range(3):
            x = latents(2, c)
            outs[mode, c] = net.forward_chunk(x, 300.0, text, cache, 2 * c, position_mode=mode)
            net.forward_chunk(x, 0.0, text, cache, 2 * c, position_mode=mode)
            cache.commit(2 * c, 2)
    for c in range(3):
        assert_close(outs["bounded", c], outs["absolute", c])


def test_per_frame_timesteps_match_uniform_calls():
    """A [B, F] timestep gives each frame the modulation of its own step (diffusion forcing)."""
    net = tiny_net()
    text = text_kv(net)
    x = latents(2, 5)
    mixed = net.forward_full(x, torch.tensor([[100.0, 900.0]]), text, frame_mask=torch.eye(2, dtype=torch.bool))
    for i, t in enumerate((100.0, 900.0)):
        alone = net.forward_full(x[:, :, i : i + 1], t, text)
        assert_close(mixed[:, :, i : i + 1], alone)


def test_bad_inputs_name_the_argument():
    net = tiny_net()
    text = text_kv(net)
    cache = make_cache(net, GRID, 1, 3, 1)
    with pytest.raises(ValueError, match="latents must be"):
        net.forward_chunk(torch.zeros(1, C + 1, 1, LH, LW), 0.0, text, cache, 0)
    with pytest.raises(ValueError, match="patch size"):
        net.forward_chunk(torch.zeros(1, C, 1, LH + 1, LW), 0.0, text, cache, 0)
    with pytest.raises(ValueError, match="timestep"):
        net.forward_chunk(torch.zeros(1, C, 1, LH, LW), torch.zeros(3), text, cache, 0)
    other = make_cache(net, (1, 1), 1, 3, 1)
    with pytest.raises(ValueError, match="tokens per frame"):
        net.forward_chunk(torch.zeros(1, C, 1, LH, LW), 0.0, text, other, 0)
