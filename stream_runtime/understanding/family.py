"""What the streaming cache and runner need from a Qwen2-VL-family model, read once and checked.

Supported: ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration`` (transformers 5.23),
full attention in every text layer, default (unscaled) RoPE. They differ here only in temporal M-RoPE spacing:
Qwen2-VL steps temporal positions by 1 per temporal patch, Qwen2.5-VL by ``tokens_per_second *
temporal_patch_size / fps``. With one temporal patch per chunk (``temporal_patch_size`` frames per step) the two
give the same positions. Qwen3-VL (interleaved M-RoPE, timestamp text) is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
FULL_ATTENTION = "full_attention"
DEFAULT_ROPE = "default"


@dataclass(frozen=True)
class VLMSpec:
    """Token ids, vision geometry and text RoPE of a Qwen2-VL-family model."""

    model_type: str
    """``qwen2_vl`` or ``qwen2_5_vl``."""
    vision_start_token_id: int
    vision_end_token_id: int
    video_token_id: int
    image_token_id: int
    stop_token_ids: tuple[int, ...]
    """The text config's ``eos_token_id`` (empty when it has none)."""
    patch_size: int
    """Pixels per patch side."""
    spatial_merge_size: int
    """Patches per LLM token side (2: a 2x2 block of patches becomes one LLM token)."""
    temporal_patch_size: int
    """Frames per temporal patch."""
    in_channels: int
    tokens_per_second: float | None
    """Qwen2.5-VL temporal position spacing per second of video; ``None`` for Qwen2-VL."""
    inv_freq: torch.Tensor
    """``[head_dim // 2]`` inverse frequencies of the text rotary embedding."""

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> VLMSpec:
        """Read and check ``model`` (a ``Qwen2VLForConditionalGeneration`` or the Qwen2.5-VL one)."""
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model: expected a transformers model of type {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
                f"({type(model).__name__})"
            )
        text, vision = config.text_config, config.vision_config
        rope_type = text.rope_parameters.get("rope_type", DEFAULT_ROPE)
        if rope_type != DEFAULT_ROPE:
            raise ValueError(
                f"model.config.text_config.rope_parameters: expected rope_type {DEFAULT_ROPE!r} (re-rotating cached "
                f"keys assumes fixed, unscaled frequencies), got {rope_type!r}"
            )
        layer_types = set(text.layer_types)
        if layer_types != {FULL_ATTENTION}:
            raise ValueError(
                f"model.config.text_config.layer_types: expected only {FULL_ATTENTION!r} layers (the streaming cache "
                f"evicts by its own windows), got {sorted(layer_types)}; set use_sliding_window=False"
            )
        rotary = model.model.language_model.rotary_emb
        if rotary.attention_scaling != 1.0:
            raise ValueError(f"model: expected RoPE attention_scaling 1.0, got {rotary.attention_scaling}")
        eos = text.eos_token_id
        stop = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(
            model_type=model_type,
            vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id,
            video_token_id=config.video_token_id,
            image_token_id=config.image_token_id,
            stop_token_ids=stop,
            patch_size=vision.patch_size,
            spatial_merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
            in_channels=vision.in_channels,
            tokens_per_second=getattr(vision, "tokens_per_second", None) if model_type == "qwen2_5_vl" else None,
            inv_freq=rotary.inv_freq.detach().clone(),
        )

    @property
    def vision_token_ids(self) -> tuple[int, int, int, int]:
        """Ids that only the input side may place (markers and placeholders); never generated."""
        return (self.vision_start_token_id, self.vision_end_token_id, self.video_token_id, self.image_token_id)

    def time_interval(self, frames_per_second: float) -> float:
        """Temporal M-RoPE spacing between temporal patches of one chunk (what ``get_rope_index`` uses)."""
        if self.tokens_per_second is None:
            return 1.0
        return self.tokens_per_second * self.temporal_patch_size / frames_per_second

    def llm_grid(self, grid_thw: tuple[int, int, int]) -> tuple[int, int, int]:
        """LLM token grid ``(t, h / merge, w / merge)`` of a patch grid ``(t, h, w)``."""
        t, h, w = grid_thw
        return t, h // self.spatial_merge_size, w // self.spatial_merge_size
