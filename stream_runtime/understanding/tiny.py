"""Tiny random Qwen2-VL / Qwen2.5-VL configurations for tests and examples (built offline, no download).

Geometry: 16 x 16 frames, 4-pixel patches, 2 x 2 merge, 2 frames per temporal patch -> one chunk of 1-2
frames is ``(1, 4, 4)`` patches, ``(1, 2, 2)`` = 4 LLM tokens (+2 vision markers). Text: 2 layers, hidden 64,
4 heads of 16 (2 KV heads), M-RoPE sections ``[2, 3, 3]`` over the 8 frequency pairs, vocabulary of 64 with the
special ids at the top.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

TINY_VOCAB = 64
TINY_FRAME_SIDE = 16
"""Frame height and width in pixels (a multiple of patch_size * spatial_merge_size)."""
TINY_SPECIAL_IDS = dict(
    bos_token_id=TINY_VOCAB - 6,
    eos_token_id=TINY_VOCAB - 5,
    vision_start_token_id=TINY_VOCAB - 4,
    vision_end_token_id=TINY_VOCAB - 3,
    image_token_id=TINY_VOCAB - 2,
    video_token_id=TINY_VOCAB - 1,
)
TINY_WORDS = TINY_VOCAB - len(TINY_SPECIAL_IDS)
"""Ids below this are ordinary words."""


def _text(**overrides: Any) -> dict[str, Any]:
    text = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        max_position_embeddings=4096,
        bos_token_id=TINY_SPECIAL_IDS["bos_token_id"],
        eos_token_id=TINY_SPECIAL_IDS["eos_token_id"],
    )
    text.update(overrides)
    return text


def _vision(**overrides: Any) -> dict[str, Any]:
    vision = dict(
        depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2
    )
    vision.update(overrides)
    return vision


def _ids() -> dict[str, int]:
    return {k: v for k, v in TINY_SPECIAL_IDS.items() if k not in ("bos_token_id", "eos_token_id")}


def tiny_qwen2_vl_config(attn_implementation: str = "eager", **text_overrides: Any) -> Qwen2VLConfig:
    """A Qwen2-VL config whose model runs in milliseconds on a CPU; ``text_overrides`` go to ``text_config``."""
    vision = _vision(mlp_ratio=2)
    config = Qwen2VLConfig(text_config=_text(**text_overrides), vision_config=vision, **_ids())
    config._attn_implementation = attn_implementation
    return config


def tiny_qwen2_5_vl_config(attn_implementation: str = "eager", **text_overrides: Any) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL counterpart (window-attention vision tower, ``tokens_per_second`` temporal spacing)."""
    vision = _vision(intermediate_size=64, out_hidden_size=64, window_size=8, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=_text(**text_overrides), vision_config=vision, **_ids())
    config._attn_implementation = attn_implementation
    return config
