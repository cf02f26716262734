"""Streaming encode/decode with diffusers' Wan VAE (``AutoencoderKLWan``), one chunk at a time.

``AutoencoderKLWan.encode``/``decode`` already run their causal 3D convolutions chunk by chunk over a
feature cache, but they call ``clear_cache()`` at the start and end of every call, so a live stream that
hands them one chunk at a time would restart the causal context at every chunk (visible seams and a
different first-frame treatment for every chunk). The classes here drive ``vae.encoder`` / ``vae.decoder``
directly, with the same per-chunk iteration as ``AutoencoderKLWan._encode`` / ``_decode``, and keep the
cache between calls. In fp32 a streamed result equals the full call's result.

Example::

    vae = AutoencoderKLWan(**tiny_vae_config())
    decoder = StreamingVAEDecoder(vae)
    video = [decoder.decode(chunk) for chunk in normalised_latents.split(3, dim=2)]  # 1 + 4*2 frames, then 4*3 ...
    decoder.reset()  # next stream
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm, patchify, unpatchify
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

# Decoded frames are clamped to the pixel range, as in AutoencoderKLWan._decode.
PIXEL_MIN, PIXEL_MAX = -1.0, 1.0

# A causal video VAE maps the very first pixel frame of a stream to a latent frame of its own (the
# encoder sees it alone); every later latent frame covers `scale_factor_temporal` pixel frames.
FIRST_LATENT_PIXEL_FRAMES = 1

# Number of channels of an RGB frame before patchify.
RGB_CHANNELS = 3


def tiny_vae_config(residual: bool = False) -> dict:
    """Keyword arguments for a tiny ``AutoencoderKLWan`` (about 0.2M parameters) for CPU tests.

    It keeps the real factors: 4x temporal (``temperal_downsample=[False, True, True]``) and 8x spatial
    (four ``dim_mult`` levels, i.e. three 2x downsamples). ``residual=True`` gives a Wan2.2-style VAE
    (residual up/down blocks, ``patch_size=2``, hence 16x spatial), the variant where the decoder's
    ``first_chunk`` flag changes the output.

    Example::

        vae = AutoencoderKLWan(**tiny_vae_config()).eval()
    """
    dim_mult = [1, 2, 2, 2]
    config = {
        "base_dim": 8,
        "z_dim": 4,
        "dim_mult": dim_mult,
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        # Non-trivial statistics (one per z_dim channel) so that tests notice a missing (de)normalisation.
        "latents_mean": [0.1, -0.2, 0.3, -0.4],
        "latents_std": [1.5, 0.5, 2.0, 1.0],
    }
    if residual:
        patch_size = 2
        config.update(
            decoder_base_dim=16,
            is_residual=True,
            patch_size=patch_size,
            in_channels=RGB_CHANNELS * patch_size**2,
            out_channels=RGB_CHANNELS * patch_size**2,
            scale_factor_spatial=2 ** (len(dim_mult) - 1) * patch_size,
        )
    return config


def _latent_stats(z: torch.Tensor, vae: AutoencoderKLWan, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``vae.config.latents_mean`` / ``latents_std`` as ``[1, C, 1, 1, 1]`` tensors on ``z``'s device and dtype."""
    mean, std = vae.config.latents_mean, vae.config.latents_std
    if z.ndim != 5 or z.shape[1] != len(mean):
        raise ValueError(
            f"`{name}` must be a 5-D latent tensor [B, {len(mean)}, F, h, w] "
            f"(channels = len(vae.config.latents_mean)); got shape {tuple(z.shape)}"
        )
    # Memoised per (device, dtype): building them from Python lists is a host-to-device copy, which on a GPU
    # makes the host wait; a streamed chunk must not.
    key = (tuple(mean), tuple(std), z.device, z.dtype)
    if key not in _STATS:
        shape = (1, len(mean), 1, 1, 1)
        _STATS[key] = (
            torch.tensor(mean, dtype=z.dtype).view(shape).to(z.device),
            torch.tensor(std, dtype=z.dtype).view(shape).to(z.device),
        )
    return _STATS[key]


_STATS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def conv_weights_channels_last(module: nn.Module, enabled: bool = True) -> None:
    """Store ``module``'s conv weights channels-last (5-D: ``channels_last_3d``, 4-D: ``channels_last``), or back
    in the default order with ``enabled=False``. cuDNN runs its convolutions in NHWC order; with NCHW weights it
    transposes around every convolution. Values are unchanged; only the memory order is.

    On an H200 (bench_stream, 1.3B shape, 480x832, compiled) this cut the Wan VAE's decode of a 3-latent-frame chunk
    from 175 to 148 ms and its video-to-video encode from 36 to 32 ms."""
    for param in module.parameters():
        if param.dim() in (4, 5):
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[param.dim()] if enabled else None
            param.data = param.data.contiguous(memory_format=fmt or torch.contiguous_format)


def _onednn_conv3d_forward(conv: nn.Conv3d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``nn.Conv3d._conv_forward`` through oneDNN for CPU fp32 inference, else the module's own."""
    if (
        input.device.type == "cpu"
        and input.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
    ):
        return torch.mkldnn_convolution(
            input, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups
        )
    return nn.Conv3d._conv_forward(conv, input, weight, bias)


def conv3d_onednn(module: nn.Module, enabled: bool = True) -> int:
    """Run ``module``'s ``nn.Conv3d`` layers (the Wan VAE's causal convolutions) through oneDNN on the CPU, or as
    PyTorch chooses again with ``enabled=False``; returns the number of layers changed.

    For an fp32 Conv3d with a 3x3x3 kernel and batch 1, PyTorch's CPU dispatch takes its im2col path
    (``slow_conv3d``) unless the input is large; its oneDNN heuristic is tuned for 2D. On this project's 2-core CPU
    that path was 29 % of a tiny-world chunk, and oneDNN ran the decoder's shapes 2-6x faster
    (``tests/test_vae_stream.py`` holds the outputs to the default path). Only CPU fp32 calls without gradients
    take the oneDNN path; everything else (CUDA, bf16, training) runs the layer's own forward. Zero padding only:
    layers with another ``padding_mode`` are left alone."""
    changed = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv3d) and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple):
            if enabled:
                conv._conv_forward = _onednn_conv3d_forward.__get__(conv)
            else:
                conv.__dict__.pop("_conv_forward", None)
            changed += 1
    return changed


def _rsqrt_rms_norm_forward(norm: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    """``WanRMS_norm.forward`` as ``x * rsqrt(max(sum(x^2), eps^2))`` for CPU fp32 eager calls, else its own."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return WanRMS_norm.forward(norm, x)
    inv = torch.rsqrt(x.square().sum(1 if norm.channel_first else -1, keepdim=True).clamp_min_(1e-24))
    out = x * inv * (norm.gamma * norm.scale)
    return out if isinstance(norm.bias, float) and norm.bias == 0.0 else out + norm.bias


def rms_norms_rsqrt(module: nn.Module, enabled: bool = True) -> int:
    """Run ``module``'s ``WanRMS_norm`` layers (every norm of the Wan VAE) as one reduction and an ``rsqrt`` on the
    CPU, or as diffusers writes them again with ``enabled=False``; returns the number of layers changed.

    diffusers normalises with ``F.normalize`` over the channel dimension of ``[B, C, T, H, W]``, whose strided
    norm reduction on the CPU is ~10x slower than a sum of squares over the same dimension (6.2 against 0.5 ms for
    ``[1, 12, 4, 64, 64]`` on 2 cores; five of them made a tenth of a tiny-world chunk). The value is the same up to
    rounding: ``x / max(|x|, 1e-12) = x * rsqrt(max(|x|^2, 1e-24))`` (``tests/test_vae_stream.py``). CPU fp32 eager
    calls only; CUDA, half precision and compiled graphs run diffusers' forward."""
    changed = 0
    for norm in module.modules():
        if isinstance(norm, WanRMS_norm):
            if enabled:
                norm.forward = _rsqrt_rms_norm_forward.__get__(norm)
            else:
                norm.__dict__.pop("forward", None)
            changed += 1
    return changed


def normalize_latents(z: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """VAE latents -> the normalised space the DiT works in: ``(z - latents_mean) / latents_std``.

    z: ``[B, z_dim, F, h, w]``; returns the same shape.
    """
    mean, std = _latent_stats(z, vae, "z")
    return (z - mean) / std


def denormalize_latents(z: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """Inverse of :func:`normalize_latents`: ``z * latents_std + latents_mean``. z: ``[B, z_dim, F, h, w]``."""
    mean, std = _latent_stats(z, vae, "z")
    return z * std + mean


def frames_per_latent(first: bool, latent_frames: int, vae: AutoencoderKLWan) -> int:
    """Number of pixel frames that ``latent_frames`` latent frames stand for.

    The first chunk of a stream: ``1 + s * (latent_frames - 1)``; later chunks: ``s * latent_frames``, with
    ``s = vae.config.scale_factor_temporal`` (4 for Wan). E.g. 3 latent frames -> 9 pixel frames first, 12 later.
    """
    if latent_frames < 1:
        raise ValueError(f"`latent_frames` must be >= 1; got {latent_frames}")
    stride = vae.config.scale_factor_temporal
    if first:
        return FIRST_LATENT_PIXEL_FRAMES + stride * (latent_frames - 1)
    return stride * latent_frames


class CausalConvCache:
    """Temporal context of every causal conv of a Wan VAE encoder or decoder, carried from call to call.

    The layout is diffusers' ``feat_cache``: ``slots[i]`` belongs to the i-th cached conv that one forward
    pass of the module visits (diffusers counts visits in ``feat_idx``). A slot holds

    - ``None`` before that conv has seen a frame (trailing slots stay ``None``: their count, like diffusers',
      includes 1x1 shortcut convs that never cache);
    - ``"Rep"``: diffusers' marker for a decoder temporal upsampler that has seen exactly one latent frame
      (its time conv is skipped for the first frame and zero-padded for the second);
    - a tensor ``[B, C, t, h, w]``: the last ``t <= 2`` (diffusers' ``CACHE_T``) input frames of that conv.

    So the cache holds a bounded number of frames per conv, independent of the stream length.
    """

    def __init__(self, module: nn.Module):
        # One slot per causal conv, as AutoencoderKLWan.clear_cache sizes its feature maps.
        self.num_slots = sum(isinstance(m, WanCausalConv3d) for m in module.modules())
        self.slots: list[torch.Tensor | str | None] = [None] * self.num_slots

    def reset(self) -> None:
        """Drop all context: the next chunk is the first of a new stream."""
        self.slots = [None] * self.num_slots

    def num_elements(self) -> int:
        """Total number of tensor elements held (to check that memory stays constant over a stream)."""
        return sum(slot.numel() for slot in self.slots if isinstance(slot, torch.Tensor))

    def run(self, module: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """One forward pass of ``module`` (``vae.encoder`` or ``vae.decoder``) that reads and updates the cache."""
        # feat_idx restarts at 0 for every chunk, as AutoencoderKLWan resets _conv_idx / _enc_conv_idx per chunk.
        out = module(x, feat_cache=self.slots, feat_idx=[0], **kwargs)
        self.compact()
        return out

    def compact(self) -> None:
        """Copy every slot that is a view into a larger buffer into a buffer of its own.

        Eager diffusers clones each slot, but a compiled module may hand back its last frames as views of a
        whole activation, which keeps that activation alive until the next chunk: on an H200, the compiled
        480x832 decoder's slots viewed 1.76 GiB but held 3.04 GiB (``bench/probe_memory.py``). Slots that own
        their storage (the eager case) are left as they are.
        """
        for i, slot in enumerate(self.slots):
            if isinstance(slot, torch.Tensor) and slot.untyped_storage().nbytes() > slot.nbytes:
                self.slots[i] = slot.clone()


def _check_vae(vae: AutoencoderKLWan) -> None:
    """Check that ``vae``'s configured scale factors match its architecture (they drive the frame arithmetic)."""
    if not isinstance(vae, AutoencoderKLWan):
        raise TypeError(f"`vae` must be a diffusers AutoencoderKLWan; got {type(vae).__name__}")
    config = vae.config
    temporal = 2 ** sum(config.temperal_downsample)
    if config.scale_factor_temporal != temporal:
        raise ValueError(
            f"`vae.config.scale_factor_temporal` must match temperal_downsample={config.temperal_downsample} "
            f"({temporal}); got {config.scale_factor_temporal}"
        )
    spatial = 2 ** (len(config.dim_mult) - 1) * (config.patch_size or 1)
    if config.scale_factor_spatial != spatial:
        raise ValueError(
            f"`vae.config.scale_factor_spatial` must match dim_mult={config.dim_mult} and "
            f"patch_size={config.patch_size} ({spatial}); got {config.scale_factor_spatial}"
        )


def _check_input(name: str, x: torch.Tensor, vae: AutoencoderKLWan, layout: str, channels: int) -> None:
    """Shared checks of a streamed input: a 5-D tensor with ``channels`` channels on the VAE's dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor {layout}; got {type(x).__name__}")
    if x.ndim != 5:
        raise ValueError(f"`{name}` must be a 5-D tensor {layout}; got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"`{name}` must have {channels} channels (dim 1 of {layout}); got shape {tuple(x.shape)}")
    weight = next(vae.parameters())  # diffusers' vae.dtype/.device walk every module: too slow per chunk
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(
            f"`{name}` must have the VAE's dtype and device ({weight.dtype}, {weight.device}); "
            f"got ({x.dtype}, {x.device})"
        )


def _check_stream_shape(name: str, x: torch.Tensor, stream_shape: tuple[int, int, int] | None) -> None:
    """Within a stream the cache holds ``[B, C, t, h, w]`` tensors, so batch and spatial size cannot change."""
    shape = (x.shape[0], x.shape[3], x.shape[4])
    if stream_shape is not None and shape != stream_shape:
        raise ValueError(
            f"`{name}` must keep the stream's (batch, height, width) = {stream_shape} until reset(); got {shape}"
        )


class StreamingVAEDecoder:
    """Decode a stream of normalised Wan latents chunk by chunk, with the causal context kept between calls.

    Decoding F latent frames in chunks of any sizes gives the same frames as one ``vae.decode`` of all F.
    Runs under ``torch.no_grad()``: a cache that kept autograd history would grow with the stream.

    Example::

        decoder = StreamingVAEDecoder(vae)
        first = decoder.decode(latents[:, :, :1])  # [B, 3, 1, H, W]
        later = decoder.decode(latents[:, :, 1:3])  # [B, 3, 8, H, W]
    """

    def __init__(self, vae: AutoencoderKLWan):
        _check_vae(vae)
        self.vae = vae
        self.cache = CausalConvCache(vae.decoder)
        # (batch, h, w) of the current stream; None until the first chunk has been decoded.
        self._stream_shape: tuple[int, int, int] | None = None

    def reset(self) -> None:
        """Start a new stream: the next ``decode`` call is treated as the first one."""
        self.cache.reset()
        self._stream_shape = None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next chunk of a stream.

        latents: ``[B, z_dim, F, h, w]`` (F >= 1) in the normalised space the DiT works in
        (``(z - latents_mean) / latents_std``, diffusers' Wan convention), on the VAE's dtype and device.
        Returns frames in [-1, 1], ``[B, 3, T, H, W]`` with ``H = h * vae.config.scale_factor_spatial`` (same
        for W) and ``T = 1 + 4 * (F - 1)`` on the first call of a stream, ``4 * F`` afterwards.
        """
        config = self.vae.config
        _check_input("latents", latents, self.vae, "[B, z_dim, F, h, w]", config.z_dim)
        if latents.shape[2] < 1:
            raise ValueError(f"`latents` must have at least 1 latent frame (dim 2); got shape {tuple(latents.shape)}")
        _check_stream_shape("latents", latents, self._stream_shape)

        first = self._stream_shape is None
        # post_quant_conv is a 1x1x1 conv without cache, so applying it per chunk equals applying it to the whole.
        x = self.vae.post_quant_conv(denormalize_latents(latents, self.vae))
        try:
            # One latent frame per decoder pass, as in AutoencoderKLWan._decode; first_chunk marks the stream's
            # first frame (Wan2.2's residual upsampler drops the frames before it).
            frames = [
                self.cache.run(self.vae.decoder, x[:, :, i : i + 1], first_chunk=first and i == 0)
                for i in range(x.shape[2])
            ]
        except BaseException:
            self.reset()  # a partly updated cache is no stream state worth keeping
            raise
        self._stream_shape = (latents.shape[0], latents.shape[3], latents.shape[4])

        out = torch.cat(frames, dim=2)
        if config.patch_size is not None:
            out = unpatchify(out, patch_size=config.patch_size)
        return torch.clamp(out, min=PIXEL_MIN, max=PIXEL_MAX)


class StreamingVAEEncoder:
    """Encode a stream of video frames chunk by chunk into normalised Wan latents.

    The first call takes ``1 + 4k`` frames (the first frame is encoded alone), later calls ``4k`` frames; the
    latents equal those of one ``vae.encode`` of the whole video. With ``sample=False`` (default) they are the
    posterior mode, otherwise a sample drawn with ``generator``. Runs under ``torch.no_grad()``.

    Example::

        encoder = StreamingVAEEncoder(vae)
        z0 = encoder.encode(video[:, :, :5])  # [B, z_dim, 2, H/8, W/8]
        z1 = encoder.encode(video[:, :, 5:9])  # [B, z_dim, 1, H/8, W/8]
    """

    def __init__(self, vae: AutoencoderKLWan, sample: bool = False):
        _check_vae(vae)
        self.vae = vae
        self.sample = sample
        self.cache = CausalConvCache(vae.encoder)
        # (batch, H, W) of the current stream; None until the first chunk has been encoded.
        self._stream_shape: tuple[int, int, int] | None = None

    def reset(self) -> None:
        """Start a new stream: the next ``encode`` call is treated as the first one."""
        self.cache.reset()
        self._stream_shape = None

    def _check_frames(self, frames: torch.Tensor, first: bool) -> None:
        config = self.vae.config
        channels = config.in_channels // (config.patch_size or 1) ** 2
        _check_input("frames", frames, self.vae, "[B, 3, T, H, W]", channels)
        num_frames, height, width = frames.shape[2:]
        stride = config.scale_factor_temporal
        if first and (num_frames - FIRST_LATENT_PIXEL_FRAMES) % stride != 0:
            raise ValueError(
                f"`frames` must have 1 + {stride}k frames (k >= 0) on the first call of a stream; got {num_frames}"
            )
        if not first and (num_frames == 0 or num_frames % stride != 0):
            raise ValueError(
                f"`frames` must have {stride}k frames (k >= 1) after the first call of a stream (reset() starts a "
                f"new one); got {num_frames}"
            )
        spatial = config.scale_factor_spatial
        if height % spatial != 0 or width % spatial != 0:
            raise ValueError(
                f"`frames` height and width must be multiples of {spatial} (vae.config.scale_factor_spatial); "
                f"got {height}x{width}"
            )
        _check_stream_shape("frames", frames, self._stream_shape)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Encode the next chunk of a stream.

        frames: ``[B, 3, T, H, W]`` in [-1, 1] on the VAE's dtype and device; ``T = 1 + 4k`` (k >= 0) on the
        first call of a stream, ``T = 4k`` (k >= 1) afterwards; H, W multiples of ``scale_factor_spatial``.
        Returns normalised latents ``[B, z_dim, F, H/s, W/s]`` (s = ``scale_factor_spatial``, 8 for Wan2.1),
        ``F = 1 + k`` on the first call, ``F = k`` later.
        """
        first = self._stream_shape is None
        self._check_frames(frames, first)

        x = frames if self.vae.config.patch_size is None else patchify(frames, patch_size=self.vae.config.patch_size)
        # Same grouping as AutoencoderKLWan._encode: the stream's first frame alone, then groups of `stride`.
        stride = self.vae.config.scale_factor_temporal
        start = FIRST_LATENT_PIXEL_FRAMES if first else 0
        groups = ([x[:, :, :start]] if first else []) + [
            x[:, :, i : i + stride] for i in range(start, x.shape[2], stride)
        ]
        try:
            out = torch.cat([self.cache.run(self.vae.encoder, group) for group in groups], dim=2)
        except BaseException:
            self.reset()  # a partly updated cache is no stream state worth keeping
            raise
        self._stream_shape = (frames.shape[0], frames.shape[3], frames.shape[4])

        # quant_conv is a 1x1x1 conv without cache, so applying it per chunk equals applying it to the whole.
        posterior = DiagonalGaussianDistribution(self.vae.quant_conv(out))
        z = posterior.sample(generator=generator) if self.sample else posterior.mode()
        return normalize_latents(z, self.vae)
