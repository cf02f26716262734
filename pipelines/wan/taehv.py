"""TAEHV, the tiny video autoencoder for Wan2.1 latents (``taew2_1.pth``), with a streaming decoder.

TAEHV (Ollin Boer Bohan, https://github.com/madebyollin/taehv) replaces the Wan VAE's causal 3D convolutions
with 2D convolutions per frame plus three kinds of temporal layer:

- ``MemBlock``: a residual block whose first conv sees the frame's features concatenated with the *previous*
  frame's input features at the same layer (zeros for the stream's first frame). It is the only layer with
  memory, and that memory is one frame deep.
- ``TGrow`` (decoder): a 1x1 conv to ``stride * C`` channels, read as ``stride`` consecutive frames of ``C``
  channels (channel block k is output frame k), so the frame rate grows by ``stride``.
- ``TPool`` (encoder): the inverse; ``stride`` consecutive frames are stacked on the channel axis (frame k is
  channel block k) and a 1x1 conv maps them to one frame.

The decoder maps F latent frames to ``4F`` frames and drops the first ``4 - 1`` of the stream, so it gives Wan's
``1 + 4 (F - 1)`` frames. It takes latents in the normalised space the DiT works in (TAEHV has no
``latents_mean`` / ``latents_std``; it decodes what the diffusion model produces) and makes RGB in [0, 1], which
this module maps to the [-1, 1] that :class:`~stream_runtime.pipelines.wan.vae_stream.StreamingVAEDecoder`
returns. Its input passes a soft clamp ``3 tanh(z / 3)`` first.

Public layout matched (read, not copied): ``madebyollin/taehv`` ``taehv.py`` at commit
``115aaa7ef7a36a51d90cfeddc71b34874b618cba`` (also checked against the older
``a8dcca8e7292cd8b425fa52615ec5681bf2b41e6``: same layers and names). The parameter names are those of its
``TAEHV`` module (``encoder.<i>...`` and ``decoder.<i>...`` over two ``nn.Sequential``), so a ``taew2_1.pth``
state dict loads with ``strict=True`` into ``TAEHV(TAEHVConfig())``. Not supported: the public loader's trimming
of ``TGrow`` weights for decoders built with less temporal upscaling than their checkpoint (cheaper previews).

Data layout inside the module: ``[B, T, C, H, W]`` (time before channels, so a frame-wise 2D layer runs on a
``[B * T, C, H, W]`` view); the public methods take and return diffusers' ``[B, C, T, H, W]``.

Example::

    taehv = load_taehv("taew2_1.pth").to("cuda", torch.bfloat16)
    decoder = StreamingTAEHVDecoder(taehv)
    for chunk in latents.split(3, dim=2):  # [1, 16, 3, 60, 104] each
        frames = decoder.decode(chunk)  # [1, 3, 9, 480, 832] first, [1, 3, 12, 480, 832] later
    decoder.reset()  # next stream
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RGB_CHANNELS = 3
STAGES = 3
"""Encoder and decoder stages; each changes the spatial size by ``SPACE_STRIDE`` and may change the frame rate."""
MEMBLOCKS_PER_STAGE = 3
SPACE_STRIDE = 2
"""Spatial factor of one stage: the encoder's stride-2 conv, the decoder's nearest-neighbour 2x upsample."""
TIME_STRIDE = 2
"""Temporal factor of a stage with time up/downscaling (``TGrow`` / ``TPool`` stride)."""
CONV_KERNEL = 3
LATENT_SOFT_CLAMP = 3.0
"""The decoder's input passes ``c * tanh(z / c)`` with this ``c``."""
PIXEL_MIN, PIXEL_MAX = 0.0, 1.0
"""TAEHV's own pixel range; the public methods here convert to and from [-1, 1]."""


@dataclass(frozen=True)
class TAEHVConfig:
    """Shape of a TAEHV model. The defaults are ``taew2_1.pth`` (Wan2.1, also Wan2.2 14B).

    Example::

        TAEHVConfig()  # taew2_1
        TAEHVConfig(latent_channels=4, encoder_features=8, decoder_features=(16, 8, 8, 8))  # a CPU test model
    """

    latent_channels: int = 16
    """Channels of a latent frame (the DiT's ``out_channels``): 16 for Wan2.1."""
    patch_size: int = 1
    """Pixel (un)shuffle factor around the RGB frames: 1 for Wan2.1 (2 for the Wan2.2 5B ``taew2_2``)."""
    encoder_features: int = 64
    """Channels of every encoder layer between the input and output convs."""
    decoder_features: tuple[int, int, int, int] = (256, 128, 64, 64)
    """Channels of decoder stage 0, 1, 2 and of the last conv before the RGB output."""
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    """Per encoder stage: does its ``TPool`` halve the frame rate (stride 2) or keep it (stride 1)."""
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
    """Per decoder stage: does its ``TGrow`` double the frame rate."""
    decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True)
    """Per decoder stage: does it upsample 2x in space (no parameters, so a state dict cannot tell)."""

    def __post_init__(self) -> None:
        for name in ("latent_channels", "patch_size", "encoder_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int; got {value!r}")
        if len(self.decoder_features) != STAGES + 1 or any(int(n) < 1 for n in self.decoder_features):
            raise ValueError(
                f"`decoder_features` must be {STAGES + 1} positive ints (stages 0..{STAGES - 1} and the last conv); "
                f"got {self.decoder_features!r}"
            )
        for name in ("encoder_time_downscale", "decoder_time_upscale", "decoder_space_upscale"):
            if len(getattr(self, name)) != STAGES:
                raise ValueError(f"`{name}` must hold {STAGES} booleans (one per stage); got {getattr(self, name)!r}")

    @property
    def temporal_factor(self) -> int:
        """Output frames per latent frame of the decoder (4 for taew2_1)."""
        return TIME_STRIDE ** sum(self.decoder_time_upscale)

    @property
    def encoder_temporal_factor(self) -> int:
        """Input frames per latent frame of the encoder (4 for taew2_1)."""
        return TIME_STRIDE ** sum(self.encoder_time_downscale)

    @property
    def spatial_factor(self) -> int:
        """Output pixels per latent pixel side of the decoder (8 for taew2_1)."""
        return SPACE_STRIDE ** sum(self.decoder_space_upscale) * self.patch_size

    @property
    def frames_to_trim(self) -> int:
        """Decoder output frames dropped at the start of a stream, so F latents give ``1 + s (F - 1)`` frames."""
        return self.temporal_factor - 1


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, CONV_KERNEL, stride=stride, padding=CONV_KERNEL // 2, bias=bias)


def _framewise(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a per-frame 2D layer to ``x: [B, T, C, H, W]``; returns ``[B, T, C', H', W']``."""
    b, t = x.shape[:2]
    y = layer(x.flatten(0, 1))
    return y.view(b, t, *y.shape[1:])


class SoftClamp(nn.Module):
    """``c * tanh(x / c)``: the decoder's input squashed into (-c, c) with slope 1 near zero."""

    def __init__(self, limit: float = LATENT_SOFT_CLAMP):
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / self.limit) * self.limit


class MemBlock(nn.Module):
    """Residual block over a frame and the previous frame's input: ``relu(conv([x, past]) + skip(x))``.

    Parameter names (``conv.0/2/4``, ``skip``) are the public layout's.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        # No in-place ReLUs: a streaming caller keeps this block's input as the next frame's past.
        self.conv = nn.Sequential(
            _conv(2 * n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past: ``[B, T, C, H, W]``, ``past[:, t]`` the input at frame t - 1. Returns ``[B, T, C_out, H, W]``."""
        b, t = x.shape[:2]
        frames, previous = x.flatten(0, 1), past.flatten(0, 1)
        y = torch.relu(self.conv(torch.cat([frames, previous], dim=1)) + self.skip(frames))
        return y.view(b, t, *y.shape[1:])


class TGrow(nn.Module):
    """``[B, T, C, H, W] -> [B, T * stride, C, H, W]``: a 1x1 conv to ``stride * C`` channels, split into frames."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        # [B*T, stride*C, H, W] -> [B, T, stride, C, H, W]: channel block k becomes frame k of the group.
        return self.conv(x.flatten(0, 1)).view(b, t * self.stride, c, h, w)


class TPool(nn.Module):
    """``[B, T, C, H, W] -> [B, T / stride, C, H, W]``: ``stride`` consecutive frames stacked on channels, 1x1 conv."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        assert t % self.stride == 0, f"TPool needs whole groups of {self.stride} frames, got {t}"
        y = self.conv(x.reshape(b * t // self.stride, self.stride * c, h, w))
        return y.view(b, t // self.stride, c, h, w)


def _build_encoder(config: TAEHVConfig) -> nn.Sequential:
    n = config.encoder_features
    layers: list[nn.Module] = [_conv(RGB_CHANNELS * config.patch_size**2, n), nn.ReLU()]
    for downscale in config.encoder_time_downscale:
        layers += [TPool(n, TIME_STRIDE if downscale else 1), _conv(n, n, stride=SPACE_STRIDE, bias=False)]
        layers += [MemBlock(n, n) for _ in range(MEMBLOCKS_PER_STAGE)]
    layers.append(_conv(n, config.latent_channels))
    return nn.Sequential(*layers)


def _build_decoder(config: TAEHVConfig) -> nn.Sequential:
    n = config.decoder_features
    layers: list[nn.Module] = [SoftClamp(), _conv(config.latent_channels, n[0]), nn.ReLU()]
    for stage in range(STAGES):
        layers += [MemBlock(n[stage], n[stage]) for _ in range(MEMBLOCKS_PER_STAGE)]
        layers.append(nn.Upsample(scale_factor=SPACE_STRIDE if config.decoder_space_upscale[stage] else 1))
        layers.append(TGrow(n[stage], TIME_STRIDE if config.decoder_time_upscale[stage] else 1))
        layers.append(_conv(n[stage], n[stage + 1], bias=False))
    layers += [nn.ReLU(), _conv(n[STAGES], RGB_CHANNELS * config.patch_size**2)]
    return nn.Sequential(*layers)


def _run_sequence(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The reference: a whole sequence ``[B, T, C, H, W]`` through ``blocks``, time-parallel.

    Every MemBlock sees its input shifted one frame later in time (zeros before the first frame).
    """
    for layer in blocks:
        if isinstance(layer, MemBlock):
            past = F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))[:, : x.shape[1]]
            x = layer(x, past)
        elif isinstance(layer, (TGrow, TPool)):
            x = layer(x)
        else:
            x = _framewise(layer, x)
    return x


class TemporalMemory:
    """What a causal run of a TAEHV encoder or decoder carries from one call to the next.

    ``frames[i]``, keyed by the layer's index in the ``nn.Sequential``:

    - for a ``MemBlock``: its input at the latest frame, ``[B, 1, C, H, W]`` (the next frame's past);
    - for a ``TPool``: input frames waiting for a whole group, ``[B, t, C, H, W]`` with ``0 < t < stride``.

    A layer without an entry has seen no frame yet (a MemBlock then reads zeros). One frame per MemBlock at its
    own resolution: the memory does not grow with the stream.
    """

    def __init__(self) -> None:
        self.frames: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget everything: the next call starts a new stream."""
        self.frames = {}

    def num_elements(self) -> int:
        """Total number of tensor elements held (to check that memory stays constant over a stream)."""
        return sum(t.numel() for t in self.frames.values())

    def run(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor | None:
        """The next frames ``[B, T, C, H, W]`` through ``blocks``; returns the output frames, or None when a
        ``TPool`` is still waiting for frames to fill a group (nothing came out)."""
        for i, layer in enumerate(blocks):
            if isinstance(layer, MemBlock):
                last = self.frames.get(i)
                last = torch.zeros_like(x[:, :1]) if last is None else last
                past = torch.cat([last, x[:, :-1]], dim=1)
                self.frames[i] = x[:, -1:].clone()  # a copy: a view would keep the whole chunk alive
                x = layer(x, past)
            elif isinstance(layer, TPool):
                pending = self.frames.pop(i, None)
                if pending is not None:
                    x = torch.cat([pending, x], dim=1)
                whole = x.shape[1] - x.shape[1] % layer.stride
                if whole < x.shape[1]:
                    self.frames[i] = x[:, whole:].clone()
                if whole == 0:
                    return None
                x = layer(x[:, :whole])
            elif isinstance(layer, TGrow):
                x = layer(x)
            else:
                x = _framewise(layer, x)
        return x


class TAEHV(nn.Module):
    """TAEHV encoder and decoder with the public parameter names (``encoder.<i>.*``, ``decoder.<i>.*``).

    ``decode_video`` / ``encode_video`` are the full-sequence references; :class:`StreamingTAEHVDecoder` and
    :class:`StreamingTAEHVEncoder` stream.

    Example::

        taehv = TAEHV(TAEHVConfig())
        taehv.load_state_dict(torch.load("taew2_1.pth", weights_only=True), strict=True)  # or load_taehv(path)
        video = taehv.decode_video(latents)  # [B, 16, F, h, w] -> [B, 3, 1 + 4 (F - 1), 8h, 8w] in [-1, 1]
    """

    def __init__(self, config: TAEHVConfig | None = None):
        super().__init__()
        self.config = config or TAEHVConfig()
        self.encoder = _build_encoder(self.config)
        self.decoder = _build_decoder(self.config)

    # -- conversions between diffusers' [B, C, T, H, W] in [-1, 1] and TAEHV's [B, T, C, H, W] in [0, 1]

    def latents_in(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, h, w]`` -> the decoder's ``[B, F, C, h, w]``."""
        return latents.transpose(1, 2)

    def frames_out(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output ``[B, T, 3 p^2, h', w']`` -> frames ``[B, 3, T, H, W]`` in [-1, 1]."""
        if self.config.patch_size > 1:
            x = _framewise(functools.partial(F.pixel_shuffle, upscale_factor=self.config.patch_size), x)
        return x.clamp(PIXEL_MIN, PIXEL_MAX).mul(2).sub(1).transpose(1, 2)

    def frames_in(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, 3, T, H, W]`` in [-1, 1] -> the encoder's ``[B, T, 3 p^2, H / p, W / p]`` in [0, 1]."""
        x = frames.transpose(1, 2).add(1).div(2)
        if self.config.patch_size > 1:
            x = _framewise(functools.partial(F.pixel_unshuffle, downscale_factor=self.config.patch_size), x)
        return x

    # -- full-sequence references

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole sequence at once (the reference for :class:`StreamingTAEHVDecoder`).

        latents: ``[B, latent_channels, F, h, w]`` in the DiT's normalised space. Returns ``[B, 3, T, H, W]`` in
        [-1, 1] with ``T = 1 + s (F - 1)`` (s = ``config.temporal_factor``) and ``H = h * config.spatial_factor``.
        """
        _check_tensor("latents", latents, self, "[B, C, F, h, w]", self.config.latent_channels)
        out = _run_sequence(self.decoder, self.latents_in(latents))
        return self.frames_out(out[:, self.config.frames_to_trim :])

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode a whole sequence at once (the reference for :class:`StreamingTAEHVEncoder`).

        frames: ``[B, 3, T, H, W]`` in [-1, 1]; the end is padded with copies of the last frame to a multiple of
        ``config.encoder_temporal_factor`` (as the public ``encode_video`` does). Returns latents
        ``[B, latent_channels, ceil(T / 4), H / 8, W / 8]`` (taew2_1's factors).
        """
        _check_tensor("frames", frames, self, "[B, 3, T, H, W]", RGB_CHANNELS)
        x = self.frames_in(frames)
        stride = self.config.encoder_temporal_factor
        pad = -x.shape[1] % stride
        if pad:
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        return _run_sequence(self.encoder, x).transpose(1, 2)


def _check_tensor(name: str, x: torch.Tensor, model: nn.Module, layout: str, channels: int) -> None:
    """A 5-D tensor with ``channels`` channels (dim 1) and at least one frame, on the model's dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor {layout}; got {type(x).__name__}")
    if x.ndim != 5 or x.shape[1] != channels or x.shape[2] < 1:
        raise ValueError(
            f"`{name}` must be a 5-D tensor {layout} with {channels} channels and at least 1 frame; "
            f"got shape {tuple(x.shape)}"
        )
    weight = next(model.parameters())
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(
            f"`{name}` must have the TAEHV weights' dtype and device ({weight.dtype}, {weight.device}); "
            f"got ({x.dtype}, {x.device})"
        )


class _Stream:
    """Shared bookkeeping of the streaming encoder and decoder: the memory and the stream's (batch, h, w)."""

    def __init__(self, taehv: TAEHV):
        if not isinstance(taehv, TAEHV):
            raise TypeError(f"`taehv` must be a TAEHV module; got {type(taehv).__name__}")
        self.taehv = taehv
        self.memory = TemporalMemory()
        self._stream_shape: tuple[int, int, int] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: inputs must have it."""
        return next(self.taehv.parameters()).dtype

    def reset(self) -> None:
        """Start a new stream: the next call is treated as the first one."""
        self.memory.reset()
        self._stream_shape = None

    def _check_stream_shape(self, name: str, x: torch.Tensor) -> None:
        shape = (x.shape[0], x.shape[3], x.shape[4])
        if self._stream_shape is not None and shape != self._stream_shape:
            raise ValueError(
                f"`{name}` must keep the stream's (batch, height, width) = {self._stream_shape} until reset(); "
                f"got {shape}"
            )

    def _run(self, blocks: nn.Sequential, x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor | None:
        try:
            out = self.memory.run(blocks, x)
        except BaseException:
            self.reset()  # a partly updated memory is no stream state worth keeping
            raise
        self._stream_shape = shape
        return out


class StreamingTAEHVDecoder(_Stream):
    """Decode a stream of normalised latents chunk by chunk; same interface as ``StreamingVAEDecoder``.

    Chunks of any sizes give the frames of one :meth:`TAEHV.decode_video` of the whole sequence. Each chunk runs
    time-parallel through the decoder; the only state is one frame per MemBlock (:class:`TemporalMemory`).

    Example::

        decoder = StreamingTAEHVDecoder(taehv)
        first = decoder.decode(latents[:, :, :1])  # [B, 3, 1, H, W]
        later = decoder.decode(latents[:, :, 1:3])  # [B, 3, 8, H, W]
    """

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next chunk of a stream.

        latents: ``[B, latent_channels, F, h, w]`` (F >= 1) in the DiT's normalised space, on the weights' dtype
        and device. Returns frames in [-1, 1], ``[B, 3, T, H, W]`` with ``H = h * config.spatial_factor`` (same
        for W) and ``T = 1 + s (F - 1)`` on the first call of a stream, ``s F`` afterwards
        (s = ``config.temporal_factor``, 4 for taew2_1).
        """
        config = self.taehv.config
        _check_tensor("latents", latents, self.taehv, "[B, C, F, h, w]", config.latent_channels)
        self._check_stream_shape("latents", latents)
        first = self._stream_shape is None
        shape = (latents.shape[0], latents.shape[3], latents.shape[4])
        out = self._run(self.taehv.decoder, self.taehv.latents_in(latents), shape)
        assert out is not None, "the decoder has no TPool, so every latent frame gives frames"
        if first:
            out = out[:, config.frames_to_trim :]
        return self.taehv.frames_out(out)


class StreamingTAEHVEncoder(_Stream):
    """Encode a stream of frames chunk by chunk into normalised latents, any number of frames per call.

    A latent frame comes out once its ``config.encoder_temporal_factor`` input frames have arrived; leftover
    frames wait in the ``TPool`` memory. For a stream of ``4k`` frames the latents equal one
    :meth:`TAEHV.encode_video`. (TAEHV groups frames ``4i .. 4i + 3``, unlike the Wan VAE, whose first latent
    sees the first frame alone, so it does not fit ``StreamingVAEEncoder``'s ``1 + 4k`` first call.)

    Example::

        encoder = StreamingTAEHVEncoder(taehv)
        z = encoder.encode(video[:, :, :6])  # [B, 16, 1, H/8, W/8]; frames 4, 5 wait
        z = encoder.encode(video[:, :, 6:8])  # [B, 16, 1, H/8, W/8]
    """

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode the next frames ``[B, 3, T, H, W]`` (T >= 1) in [-1, 1], on the weights' dtype and device.

        Returns the latents completed by them, ``[B, latent_channels, F, H / 8, W / 8]`` (F may be 0).
        """
        config = self.taehv.config
        _check_tensor("frames", frames, self.taehv, "[B, 3, T, H, W]", RGB_CHANNELS)
        height, width = frames.shape[3:]
        factor = config.spatial_factor
        if height % factor or width % factor:
            raise ValueError(
                f"`frames` height and width must be multiples of {factor} (config.spatial_factor); got {height}x{width}"
            )
        self._check_stream_shape("frames", frames)
        shape = (frames.shape[0], height, width)
        out = self._run(self.taehv.encoder, self.taehv.frames_in(frames), shape)
        if out is None:
            return frames.new_zeros(frames.shape[0], config.latent_channels, 0, height // factor, width // factor)
        return out.transpose(1, 2)


# -- loading


def _tensors(state_dict: dict, prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    """``{"decoder.7.conv.weight": t}`` -> ``{7: {"conv.weight": t}}`` for the keys under ``prefix``."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if head == prefix and index.isdigit():
            layers.setdefault(int(index), {})[name] = value
    return layers


def _shape_weights(state_dict: dict, part: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Weights that fix the shapes of ``part`` ("encoder" / "decoder"): its first conv, its last conv and its
    TGrow / TPool convs in order."""
    # The layer kinds sit at the same indices whatever the widths: find them on a 1-channel skeleton.
    skeleton = TAEHV(TAEHVConfig(latent_channels=1, encoder_features=1, decoder_features=(1, 1, 1, 1)))
    blocks, layers = getattr(skeleton, part), _tensors(state_dict, part)
    convs = [i for i, layer in enumerate(blocks) if isinstance(layer, nn.Conv2d)]
    temporal = [i for i, layer in enumerate(blocks) if isinstance(layer, (TGrow, TPool))]
    needed = [(convs[0], "weight"), (convs[-1], "weight")] + [(i, "conv.weight") for i in temporal]
    for i, name in needed:
        if name not in layers.get(i, {}):
            raise ValueError(
                f"`state_dict` lacks {part}.{i}.{name}, which a TAEHV state dict (public layout, e.g. taew2_1.pth) "
                f"has; got {len(state_dict)} keys starting {sorted(state_dict)[:3]}"
            )
    return layers[convs[0]]["weight"], layers[convs[-1]]["weight"], [layers[i]["conv.weight"] for i in temporal]


def config_from_state_dict(state_dict: dict[str, torch.Tensor], **overrides) -> TAEHVConfig:
    """The :class:`TAEHVConfig` whose shapes a public-layout state dict has (``overrides`` win).

    Latent channels, patch size, feature counts and the TGrow / TPool strides are read off the weight shapes;
    ``decoder_space_upscale`` has no parameters and keeps its default (all True) unless overridden.

    Example::

        config_from_state_dict(torch.load("taew2_1.pth", weights_only=True)) == TAEHVConfig()
    """
    enc_in, _, pools = _shape_weights(state_dict, "encoder")
    dec_in, dec_out, grows = _shape_weights(state_dict, "decoder")
    patch = round((dec_out.shape[0] / RGB_CHANNELS) ** 0.5)
    if RGB_CHANNELS * patch**2 != dec_out.shape[0]:
        raise ValueError(
            f"the decoder's output conv in `state_dict` must have {RGB_CHANNELS} * patch_size**2 output channels; "
            f"got weight shape {tuple(dec_out.shape)}"
        )
    found = {
        "latent_channels": dec_in.shape[1],
        "patch_size": patch,
        "encoder_features": enc_in.shape[0],
        # TGrow: [stride * C, C, 1, 1]; TPool: [C, stride * C, 1, 1].
        "decoder_features": tuple(w.shape[1] for w in grows) + (dec_out.shape[1],),
        "decoder_time_upscale": tuple(w.shape[0] == TIME_STRIDE * w.shape[1] for w in grows),
        "encoder_time_downscale": tuple(w.shape[1] == TIME_STRIDE * w.shape[0] for w in pools),
    }
    found.update(overrides)
    return TAEHVConfig(**found)


def load_taehv_state_dict(model: TAEHV, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a public-layout state dict into ``model`` strictly, with an error naming the first bad keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"TAEHV `state_dict` does not match the public layout for {model.config}: "
            f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"TAEHV `state_dict[{key!r}]` must have shape {tuple(tensor.shape)} for {model.config}; "
                f"got {tuple(state_dict[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=True)


def read_state_dict(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` / ``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file, on the CPU."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(
            f"TAEHV weights file {str(file)!r} does not exist; expected a file such as taew2_1.pth "
            "(https://github.com/madebyollin/taehv)"
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(file))
    else:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{str(file)!r} must hold a flat state dict {{name: tensor}}; got {type(state_dict).__name__}")
    return state_dict


def load_taehv(path: str | pathlib.Path, config: TAEHVConfig | None = None) -> TAEHV:
    """A :class:`TAEHV` with the weights of ``path`` (``taew2_1.pth`` or a same-layout file), in eval mode.

    ``config`` defaults to the one the file's shapes imply (:func:`config_from_state_dict`).
    """
    state_dict = read_state_dict(path)
    model = TAEHV(config or config_from_state_dict(state_dict))
    load_taehv_state_dict(model, state_dict)
    return model.eval().requires_grad_(False)
