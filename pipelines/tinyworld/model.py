"""The embedded tiny-world model: shapes of its three components, its tokenizer and the stream it was trained for.

The components are the real path's classes (diffusers' ``AutoencoderKLWan`` and ``WanTransformer3DModel``,
transformers' ``UMT5EncoderModel``) at a tiny size, so the exported folder loads with
``StreamPipeline.from_pretrained`` like Wan2.1 does. Training (``train_vae``, ``train_dit``), ``export`` and
``eval_model`` all read their shapes and the stream layout from here.

Example::

    vae = AutoencoderKLWan(**vae_config())
    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(**text_encoder_config(len(tokenizer))))
    transformer = WanTransformer3DModel(**transformer_config(vae.config.z_dim, text_encoder.config.d_model))
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from stream_runtime.config import StreamConfig
from stream_runtime.pipelines.wan.text import build_word_tokenizer

from .captions import format_description, vocabulary
from .spec import LINEAR_MOTIONS, SHAPE_COLOURS, WORLD_FPS, BackgroundSpec, ObjectDescription, SceneDescription
from .world import DEFAULT_SIZE, MAX_SHAPES

NATIVE_SIZE = DEFAULT_SIZE
"""Square resolution (pixels) the model is trained and evaluated at."""
FPS = WORLD_FPS
"""Frame rate of the world and of the stream."""

STREAM = StreamConfig(
    chunk_frames=1,
    sink_frames=1,
    window_frames=4,
    timesteps=(1000.0, 875.0, 750.0, 625.0, 500.0, 375.0, 250.0, 125.0),
    shift=1.0,
    context_pass=True,
    position_mode="bounded",
    sampler="euler",
)
"""The stream the transformer is trained for. One latent frame (4 video frames) per chunk; the sink is the
stream's first latent frame (what the objects look like) and the window the 3 latent frames before the chunk
(12 video frames: enough to read every velocity and the phase of a bounce). ``bounded`` positions keep the
RoPE frame indices below ``sink + window`` forever, which is what lets the stream run indefinitely; training
shows the model exactly those positions (see ``train_dit``). The model is trained by plain flow matching, not
distilled, so it samples with the flow ODE (``euler``) over 8 evenly spaced levels: with the distilled models'
re-noising sampler its clean estimates stay blurred averages (measured on a 3,600-step checkpoint, 12 held-out
prompts: colour 0.19 with 4 re-noised steps, 0.42 with 8 Euler steps)."""

TRAINED_FIELDS = (
    "chunk_frames",
    "sink_frames",
    "window_frames",
    "timesteps",
    "shift",
    "context_pass",
    "position_mode",
    "sampler",
)
"""The stream settings the weights were trained and evaluated with: the exported folder fixes these and leaves the
others (attention backend, prompt switching, ...) to the runtime's defaults. A folder saved before ``sampler``
existed samples with the runtime's default (``renoise``)."""
LAYOUT_FIELDS = ("chunk_frames", "sink_frames", "window_frames", "context_pass", "position_mode")
"""Of those, the ones the weights cannot change between chained training runs (the step list, shift and
sampler only decide which noise levels training favours and how a stream samples)."""

ASSET_NAME = "tinyworld"
"""Folder name of the embedded generator under ``assets/`` (``export --out assets/tinyworld``)."""

EXAMPLE_PROMPT = "a medium red circle moving right and a small yellow square bouncing on a grey background"
"""The prompt the app starts with for this model (a sentence of the world's grammar)."""
UNKNOWN_WORDS = "error"
"""The model knows only the caption grammar's words: any other word is an error that lists the known ones."""


VAE_SPATIAL_FACTORS = (8, 4)


def vae_config(base_dim: int = 12, z_dim: int = 16, spatial: int = 8, **overrides) -> dict[str, Any]:
    """Keyword arguments of the tiny ``AutoencoderKLWan``: Wan2.1's 4x temporal / 8x spatial factors (three
    spatial downsamples, the last two also temporal) with few channels, or with ``spatial=4`` two downsamples,
    both also temporal (a 64x64 frame becomes 16x16 latents: a small shape spans latent pixels instead of
    hiding its outline inside one). ``latents_mean/std`` are placeholders until ``train_vae`` measures them on
    encoded training clips."""
    if spatial not in VAE_SPATIAL_FACTORS:
        raise ValueError(f"spatial: expected one of {VAE_SPATIAL_FACTORS}, got {spatial}")
    config = dict(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2] if spatial == 8 else [1, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True] if spatial == 8 else [True, True],
        scale_factor_spatial=spatial,
        dropout=0.0,
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    config.update(overrides)
    return config


def transformer_config(
    in_channels: int, text_dim: int, layers: int = 6, heads: int = 4, head_dim: int = 32, **overrides
) -> dict[str, Any]:
    """Keyword arguments of the tiny ``WanTransformer3DModel`` (Wan2.1's block, patch (1, 2, 2), no image
    conditioning). ``in_channels`` is the VAE's ``z_dim``, ``text_dim`` the text encoder's ``d_model``."""
    dim = heads * head_dim
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=text_dim,
        freq_dim=64,
        ffn_dim=4 * dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    config.update(overrides)
    return config


def text_encoder_config(vocab_size: int, d_model: int = 64, layers: int = 2, **overrides) -> dict[str, Any]:
    """kwargs of ``transformers.UMT5Config`` for the tiny prompt encoder (relative positions span a caption)."""
    config = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    config.update(overrides)
    return config


def tokenizer_words() -> list[str]:
    """The caption grammar's words as the word-level tokenizer splits them.

    The tokenizer's pre-tokenizer splits at punctuation, so ``up-left`` arrives as ``up``, ``-``, ``left``: the
    vocabulary must hold those pieces (with only ``vocabulary()`` the ``-`` would be an unknown word, which
    ``unknown_words="error"`` rejects).
    """
    splitter = build_word_tokenizer([]).backend_tokenizer.pre_tokenizer
    pieces = {piece for word in vocabulary() for piece, _ in splitter.pre_tokenize_str(word)}
    return sorted(set(vocabulary()) | pieces)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :func:`tokenizer_words` (pad 0, eos 1, unk 2, as UMT5)."""
    return build_word_tokenizer(tokenizer_words())


@functools.cache
def max_text_tokens() -> int:
    """Tokens of the longest caption the grammar can produce (three diagonal movers on a two-tone background),
    end-of-sequence token included: the prompt length the model is trained and run with."""
    colours = list(SHAPE_COLOURS)[:MAX_SHAPES]
    diagonal = max(LINEAR_MOTIONS, key=len)
    longest = SceneDescription(
        tuple(ObjectDescription(c, "triangle", "medium", diagonal) for c in colours),
        BackgroundSpec(("black", "navy"), "left-right"),
    )
    return len(build_tokenizer()(format_description(longest))["input_ids"])


def tokenize(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``[N, max_text_tokens()]`` of ``captions``, padded as ``PromptEncoder`` pads."""
    enc = tokenizer(
        captions,
        padding="max_length",
        max_length=max_text_tokens(),
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    if (enc.input_ids == tokenizer.unk_token_id).any():
        raise ValueError("captions: a caption has a word outside the tokenizer's vocabulary")
    return enc.input_ids, enc.attention_mask


def encode_tokens(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings ``[N, L, d_model]`` exactly as ``PromptEncoder`` builds them (the real tokens' states,
    zeros after them), but batched and differentiable, for training."""
    states = text_encoder(ids, attention_mask=mask).last_hidden_state
    return states * mask[..., None].to(states.dtype)


V2V_STRENGTH = 0.6
"""Video-to-video noise strength of the exported folder: the input keeps its layout and motion, the prompt redraws
it. A choice, not tuned on a measurement."""


def runtime_defaults(stream: StreamConfig = STREAM, size: int = NATIVE_SIZE) -> dict[str, Any]:
    """Contents of the exported folder's ``stream_runtime.json`` for a model trained on ``stream`` at
    ``size x size``. Video-to-video uses the trained cache layout and sampler too (the runtime's generic v2v
    defaults are StreamDiffusionV2's layout, which this model never saw), at :data:`V2V_STRENGTH`."""
    return {
        "height": size,
        "width": size,
        "fps": FPS,
        "max_text_tokens": max_text_tokens(),
        "unknown_words": UNKNOWN_WORDS,
        "example_prompt": EXAMPLE_PROMPT,
        "stream_t2v": stream_fields(stream),
        "stream_v2v": {**stream_fields(stream), "strength": V2V_STRENGTH},
    }


def stream_fields(stream: StreamConfig) -> dict[str, Any]:
    """The :data:`TRAINED_FIELDS` of ``stream`` as JSON values."""
    from stream_runtime.pipelines.wan.pipeline import config_to_json

    saved = config_to_json(stream)
    return {name: saved[name] for name in TRAINED_FIELDS}


def stream_from_fields(fields: dict[str, Any]) -> StreamConfig:
    """Inverse of :func:`stream_fields` (other fields keep the runtime's defaults)."""
    known = {name: fields[name] for name in TRAINED_FIELDS if name in fields}
    if "timesteps" in known:
        known["timesteps"] = tuple(known["timesteps"])
    return StreamConfig(**known)


def frames_to_pixels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., T, H, W, 3]`` (RGB, numpy or a tensor on any device) -> float ``[..., 3, T, H, W]`` in
    [-1, 1] (the VAE's input)."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    x = frames.float() / 127.5 - 1.0
    return x.movedim(-1, -4)


def stream_sequence_frames(stream: StreamConfig = STREAM) -> int:
    """Latent frames of one training sequence: the sinks plus a full window (the chunk included)."""
    return stream.sink_frames + stream.window_frames


def check_stream_layout(stream: StreamConfig) -> None:
    """Training lays sinks and window out in whole chunks; raise a ValueError when they are not."""
    for name in ("sink_frames", "window_frames"):
        if getattr(stream, name) % stream.chunk_frames:
            raise ValueError(
                f"stream.{name} ({getattr(stream, name)}) must be a multiple of chunk_frames ({stream.chunk_frames})"
            )


def shipped_model_path():
    """The embedded tiny-world generator's folder (``assets/tinyworld`` of a checkout or of the installed
    package), or None while none ships (the commands then fall back to the tiny random-weights model)."""
    from stream_runtime.assets import find_asset

    return find_asset(ASSET_NAME, "model_index.json")
