"""Model shapes: Wan2.1 1.3B and 14B, and a tiny configuration for tests and the random-weights default."""

from __future__ import annotations

from typing import Any

WAN_1_3B: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)

WAN_14B: dict[str, Any] = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}


def tiny_transformer_config(in_channels: int = 4, text_dim: int = 32, **overrides) -> dict[str, Any]:
    """A two-block Wan transformer that runs in milliseconds on a CPU."""
    cfg = dict(
        WAN_1_3B,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
    )
    cfg.update(overrides)
    return cfg


def tiny_text_encoder_config(vocab_size: int, d_model: int = 32) -> dict[str, Any]:
    """kwargs of ``transformers.UMT5Config`` for a two-layer encoder."""
    return dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
