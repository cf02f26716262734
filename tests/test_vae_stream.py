"""Streaming Wan VAE: chunked encode/decode must equal diffusers' one-shot calls, with constant memory."""

import pytest
import torch
from conftest import assert_close
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from stream_runtime import StreamPipeline
from stream_runtime.pipelines.wan.vae_stream import (
    CausalConvCache,
    StreamingVAEDecoder,
    StreamingVAEEncoder,
    conv3d_onednn,
    conv_weights_channels_last,
    denormalize_latents,
    frames_per_latent,
    normalize_latents,
    rms_norms_rsqrt,
    tiny_vae_config,
)

LATENT_FRAMES = 6
LATENT_HW = (2, 3)  # small and non-square, so a height/width swap would show
BATCH = 2


@pytest.fixture(scope="module", params=[False, True], ids=["wan21", "wan22_residual"])
def vae(request) -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**tiny_vae_config(residual=request.param)).eval()


def _latents(vae: AutoencoderKLWan, frames: int = LATENT_FRAMES, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, vae.config.z_dim, frames, *LATENT_HW, generator=generator)


def _video(vae: AutoencoderKLWan, frames: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    height, width = (n * vae.config.scale_factor_spatial for n in LATENT_HW)
    return torch.rand(BATCH, 3, frames, height, width, generator=generator) * 2 - 1


def _decode_in_chunks(decoder: StreamingVAEDecoder, latents: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return torch.cat([decoder.decode(chunk) for chunk in latents.split(sizes, dim=2)], dim=2)


def test_tiny_config_keeps_wan_factors(vae):
    assert vae.config.scale_factor_temporal == 4
    out = StreamingVAEDecoder(vae).decode(_latents(vae, frames=2))
    spatial = vae.config.scale_factor_spatial
    assert out.shape == (BATCH, 3, 1 + 4, LATENT_HW[0] * spatial, LATENT_HW[1] * spatial)


@pytest.mark.parametrize("sizes", [[1] * LATENT_FRAMES, [3, 3], [1, 2, 3], [4, 1, 1], [LATENT_FRAMES]])
def test_streamed_decode_equals_full_decode(vae, sizes):
    latents = _latents(vae)
    with torch.no_grad():
        expected = vae.decode(denormalize_latents(latents, vae)).sample
    actual = _decode_in_chunks(StreamingVAEDecoder(vae), latents, sizes)
    assert actual.shape == expected.shape
    assert_close(actual, expected)
    assert actual.abs().max() <= 1.0


@torch.no_grad()
def test_channels_last_conv_weights_decode_and_encode_the_same(vae):
    """conv_weights_channels_last changes only the weights' memory order (what StreamPipeline.compile does on CUDA):
    streamed decode and encode give the same values, and enabled=False restores the default order."""
    import copy

    moved = copy.deepcopy(vae)
    conv_weights_channels_last(moved)
    convs = [p for p in moved.parameters() if p.dim() == 5]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)
    latents, video = _latents(vae), _video(vae, 9)
    assert_close(StreamingVAEDecoder(moved).decode(latents), StreamingVAEDecoder(vae).decode(latents))
    assert_close(StreamingVAEEncoder(moved).encode(video), StreamingVAEEncoder(vae).encode(video))
    conv_weights_channels_last(moved, enabled=False)
    assert all(p.is_contiguous() for p in moved.parameters())


def test_decode_frame_counts(vae):
    decoder = StreamingVAEDecoder(vae)
    latents = _latents(vae)
    assert decoder.decode(latents[:, :, :2]).shape[2] == frames_per_latent(True, 2, vae) == 5
    assert decoder.decode(latents[:, :, 2:5]).shape[2] == frames_per_latent(False, 3, vae) == 12


@pytest.mark.parametrize("sizes", [[1, 4, 4, 4], [5, 8], [9, 4], [13]])
def test_streamed_encode_equals_full_encode(vae, sizes):
    video = _video(vae, frames=sum(sizes))
    with torch.no_grad():
        expected = normalize_latents(vae.encode(video).latent_dist.mode(), vae)
    encoder = StreamingVAEEncoder(vae)
    actual = torch.cat([encoder.encode(chunk) for chunk in video.split(sizes, dim=2)], dim=2)
    assert actual.shape == expected.shape
    assert_close(actual, expected)


def test_encode_sample_is_reproducible(vae):
    video = _video(vae, frames=5)
    draw = lambda seed: StreamingVAEEncoder(vae, sample=True).encode(
        video, generator=torch.Generator().manual_seed(seed)
    )
    mode = StreamingVAEEncoder(vae).encode(video)
    assert torch.equal(draw(0), draw(0))
    assert draw(0).shape == mode.shape
    assert not torch.equal(draw(0), mode)


def test_reset_starts_a_fresh_stream(vae):
    first, second = _latents(vae, seed=3), _latents(vae, seed=4)
    decoder = StreamingVAEDecoder(vae)
    decoder.decode(first[:, :, :3])
    decoder.reset()
    assert torch.equal(decoder.decode(second), StreamingVAEDecoder(vae).decode(second))

    video_a, video_b = _video(vae, 5, seed=5), _video(vae, 9, seed=6)
    encoder = StreamingVAEEncoder(vae)
    encoder.encode(video_a)
    encoder.encode(video_a[:, :, 1:])
    encoder.reset()
    assert torch.equal(encoder.encode(video_b), StreamingVAEEncoder(vae).encode(video_b))


def test_normalize_round_trip(vae):
    latents = _latents(vae)
    assert_close(denormalize_latents(normalize_latents(latents, vae), vae), latents)
    with pytest.raises(ValueError, match="`z`"):
        normalize_latents(latents[:, :1], vae)


@pytest.fixture(scope="module")
def wan21_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**tiny_vae_config()).eval()


@pytest.mark.parametrize(
    "make_latents, match",
    [
        (lambda z: z[:, :, 0], "5-D"),
        (lambda z: z[:, :2], "channels"),
        (lambda z: z[:, :, :0], "at least 1 latent frame"),
        (lambda z: z.double(), "dtype and device"),
        (lambda z: z.to("meta"), "dtype and device"),
    ],
)
def test_decode_rejects_bad_latents(wan21_vae, make_latents, match):
    with pytest.raises(ValueError, match=f"`latents`.*{match}"):
        StreamingVAEDecoder(wan21_vae).decode(make_latents(_latents(wan21_vae)))


def test_decode_rejects_shape_change_mid_stream(wan21_vae):
    decoder = StreamingVAEDecoder(wan21_vae)
    latents = _latents(wan21_vae)
    decoder.decode(latents[:, :, :1])
    with pytest.raises(ValueError, match="`latents`.*reset"):
        decoder.decode(latents[:1, :, 1:2])
    decoder.reset()
    decoder.decode(latents[:1, :, :1])  # a new stream may change shape


@pytest.mark.parametrize(
    "make_frames, first, match",
    [
        (lambda v: v[:, :, 0], True, "5-D"),
        (lambda v: v[:, :1], True, "3 channels"),
        (lambda v: v[:, :, :4], True, r"1 \+ 4k frames.*got 4"),
        (lambda v: v[:, :, :5], False, r"4k frames.*got 5"),
        (lambda v: v[:, :, :1, :12], True, "multiples of 8.*got 12x24"),
        (lambda v: v[:, :, :1].half(), True, "dtype and device"),
        (lambda v: v[:, :, :1].to("meta"), True, "dtype and device"),
    ],
)
def test_encode_rejects_bad_frames(wan21_vae, make_frames, first, match):
    encoder = StreamingVAEEncoder(wan21_vae)
    video = _video(wan21_vae, frames=5)
    if not first:
        encoder.encode(video[:, :, :1])
    with pytest.raises(ValueError, match=f"`frames`.*{match}"):
        encoder.encode(make_frames(video))


def test_rejects_vae_with_inconsistent_factors():
    vae = AutoencoderKLWan(**{**tiny_vae_config(), "scale_factor_temporal": 2})
    with pytest.raises(ValueError, match="scale_factor_temporal"):
        StreamingVAEDecoder(vae)


def test_cache_stays_constant_over_a_long_stream(wan21_vae):
    """Each causal conv caches at most two frames, so the cache stops growing after the first few frames."""
    stream_frames, settle_frames = 50, 3
    decoder = StreamingVAEDecoder(wan21_vae)
    assert any(p.requires_grad for p in wan21_vae.parameters())  # no_grad must keep autograd history out
    latents = _latents(wan21_vae, frames=stream_frames)
    sizes = []
    for i in range(stream_frames):
        decoder.decode(latents[:, :, i : i + 1])
        sizes.append(decoder.cache.num_elements())
    assert sizes[0] > 0
    assert len(set(sizes[settle_frames:])) == 1, sizes
    assert all(s.grad_fn is None for s in decoder.cache.slots if isinstance(s, torch.Tensor))


class _ViewCachingModule(torch.nn.Module):
    """Writes its cache the way a compiled decoder can: slot 0 as a view into the whole input, slot 1 owned."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList([WanCausalConv3d(1, 1, 3, padding=1) for _ in range(2)])

    def forward(self, x, feat_cache, feat_idx):
        feat_cache[0] = x[:, :, -2:]
        feat_cache[1] = x[:, :, -2:].clone()
        return x


def test_cache_slots_that_view_a_larger_buffer_are_compacted():
    """A slot that is a view keeps its whole parent activation alive between chunks: the cache copies it out."""
    module = _ViewCachingModule()
    cache = CausalConvCache(module)
    x = torch.randn(1, 4, 8, 3, 5)
    cache.run(module, x)
    view_slot, owned_slot = cache.slots
    assert view_slot.untyped_storage().nbytes() == view_slot.nbytes  # no longer holds the 8-frame input
    assert view_slot.data_ptr() != x.data_ptr()
    assert torch.equal(view_slot, x[:, :, -2:]) and torch.equal(owned_slot, x[:, :, -2:])
    owned_ptr = owned_slot.data_ptr()
    cache.compact()
    assert cache.slots[1].data_ptr() == owned_ptr  # a slot that owns its storage is not copied again


def test_conv3d_through_onednn_gives_the_default_paths_output(vae, monkeypatch):
    """``conv3d_onednn``: streamed decode and encode equal PyTorch's own conv path; the oneDNN op really runs
    (counted); with gradients the layers keep their own forward, and ``enabled=False`` removes the routing."""
    latents, video = _latents(vae), _video(vae, 9)
    with torch.no_grad():
        expected = _decode_in_chunks(StreamingVAEDecoder(vae), latents, [1, 2, 3])
        expected_z = StreamingVAEEncoder(vae).encode(video)
    calls = []
    onednn = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *args: calls.append(1) or onednn(*args))
    convs = sum(isinstance(m, torch.nn.Conv3d) for m in vae.modules())
    assert conv3d_onednn(vae) == convs > 0
    try:
        with torch.no_grad():
            actual = _decode_in_chunks(StreamingVAEDecoder(vae), latents, [1, 2, 3])
            actual_z = StreamingVAEEncoder(vae).encode(video)
        assert len(calls) > convs
        assert_close(actual, expected)
        assert_close(actual_z, expected_z)
        calls.clear()
        conv = next(m for m in vae.modules() if isinstance(m, torch.nn.Conv3d))
        x = torch.randn(1, conv.in_channels, 3, 4, 4, requires_grad=True)
        conv(x).sum().backward()  # training: the layer's own forward, with autograd
        assert not calls and x.grad is not None and x.grad.abs().sum() > 0
    finally:
        conv3d_onednn(vae, False)
    assert not any("_conv_forward" in m.__dict__ for m in vae.modules())


def test_rsqrt_rms_norms_give_diffusers_output(vae, monkeypatch):
    """``rms_norms_rsqrt``: every norm of the VAE rerouted (diffusers' ``F.normalize`` no longer runs); streamed
    decode and encode equal diffusers' norms, a zero input stays zero (the eps clamp), and ``enabled=False``
    removes the routing."""
    latents, video = _latents(vae), _video(vae, 9)
    with torch.no_grad():
        expected = _decode_in_chunks(StreamingVAEDecoder(vae), latents, [1, 2, 3])
        expected_z = StreamingVAEEncoder(vae).encode(video)
    calls = []
    normalize = torch.nn.functional.normalize
    monkeypatch.setattr(torch.nn.functional, "normalize", lambda *a, **k: calls.append(1) or normalize(*a, **k))
    norms = [m for m in vae.modules() if isinstance(m, WanRMS_norm)]
    assert rms_norms_rsqrt(vae) == len(norms) > 0
    try:
        with torch.no_grad():
            actual = _decode_in_chunks(StreamingVAEDecoder(vae), latents, [1, 2, 3])
            actual_z = StreamingVAEEncoder(vae).encode(video)
            zero = torch.zeros(1, norms[0].gamma.shape[0], 2, 3, 3)
            assert norms[0](zero).abs().max() == 0
        assert_close(actual, expected)
        assert_close(actual_z, expected_z)
        assert not calls
    finally:
        rms_norms_rsqrt(vae, False)
    assert not any("forward" in m.__dict__ for m in norms)


def test_the_cpu_pipeline_routes_its_vae_convs_while_eager():
    pipe = StreamPipeline.tiny_random()

    def routed():
        convs = any("_conv_forward" in m.__dict__ for m in pipe.vae.modules())
        norms = [("forward" in m.__dict__) for m in pipe.vae.modules() if isinstance(m, WanRMS_norm)]
        assert norms and all(n == convs for n in norms)
        return convs

    assert routed()
    pipe.compile(backend="eager")  # a compiled VAE picks its own kernels
    assert not routed()
    pipe.compile(False)
    assert routed()
