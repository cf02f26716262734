"""Streaming VLM cache policy at the cache level: positions, re-rotation, eviction, bounded memory."""

import pytest
import torch
from conftest import assert_close
from transformers import Qwen2_5_VLModel, Qwen2VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb
from vlm_reference import kept_units as reference_kept_units

from stream_runtime.understanding import (
    StreamingVLMCache,
    StreamingVLMConfig,
    TokenKind,
    TokenLedger,
    rotate_keys,
    vision_unit_extent,
)
from stream_runtime.understanding.tiny import TINY_SPECIAL_IDS, tiny_qwen2_5_vl_config, tiny_qwen2_vl_config

VIDEO = TINY_SPECIAL_IDS["video_token_id"]
START, END = TINY_SPECIAL_IDS["vision_start_token_id"], TINY_SPECIAL_IDS["vision_end_token_id"]
WORD = 7  # any ordinary token id; get_rope_index only looks at the modality of each token
VIDEO_TYPE = 2  # mm_token_type_ids value of video placeholders (text 0, image 1, video 2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "field, value",
    [("sink_tokens", -1), ("vision_window_frames", 0), ("text_window_tokens", 1.5), ("max_new_tokens", -2)],
)
def test_config_rejects_bad_sizes(field, value):
    with pytest.raises(ValueError, match=field):
        StreamingVLMConfig(**{field: value})


def test_rotate_keys_composes_with_the_models_mrope():
    text = tiny_qwen2_vl_config().text_config
    rotary = Qwen2VLRotaryEmbedding(text)
    n, head_dim = 12, text.hidden_size // text.num_attention_heads
    k = torch.randn(1, 2, n, head_dim)
    gen = torch.Generator().manual_seed(0)
    old = torch.randint(20, 200, (3, 1, n), generator=gen)  # t, h, w differ, as for vision tokens
    delta = -torch.randint(0, 20, (n,), generator=gen)
    cos, sin = rotary(k, old)
    _, k_old = apply_rotary_pos_emb(k, k, cos, sin)
    cos, sin = rotary(k, old + delta)
    _, expected = apply_rotary_pos_emb(k, k, cos, sin)
    assert_close(rotate_keys(k_old, delta, rotary.inv_freq), expected)
    assert torch.equal(rotate_keys(k_old, torch.zeros(n, dtype=torch.long), rotary.inv_freq), k_old)


# A scripted stream: ("text", n) text tokens, ("vision", (t, h, w), frames) one frame chunk.
STREAM = [
    ("text", 5),
    ("vision", (1, 2, 2), 2),
    ("text", 3),
    ("vision", (1, 2, 3), 1),
    ("text", 1),
    ("vision", (2, 3, 2), 2),
    ("text", 4),
    ("vision", (1, 2, 2), 2),
    ("text", 2),
]


def unit_tokens(item):
    """(ids, mm_types, grid or None, frames) of one scripted unit per token-level unit."""
    if item[0] == "text":
        return [([WORD], [0], None, 0)] * item[1]
    _, (t, h, w), frames = item
    merged = (t, h * 2, w * 2)  # get_rope_index takes patch grids (before the 2x2 merge)
    return [([START] + [VIDEO] * (t * h * w) + [END], [0] + [VIDEO_TYPE] * (t * h * w) + [0], merged, frames)]


def rope_index(model, units, **kwargs):
    """Positions transformers assigns to the token sequence of ``units``: [3, tokens]."""
    ids = torch.tensor([[i for u in units for i in u[0]]])
    types = torch.tensor([[m for u in units for m in u[1]]])
    grids = [u[2] for u in units if u[2] is not None]
    grid = torch.tensor(grids) if grids else None
    return model.get_rope_index(ids, types, video_grid_thw=grid, **kwargs)[0][:, 0]


def kept_units(history, config):
    return reference_kept_units(history, config, grid_index=2)


def append(ledger, item):
    if item[0] == "text":
        return ledger.append_text(item[1])
    return ledger.append_vision(item[1], frames=item[2])


def tokens(units):
    return sum(len(u[0]) for u in units)


def test_ledger_positions_match_get_rope_index_before_and_after_eviction():
    torch.manual_seed(0)
    model = Qwen2VLModel(tiny_qwen2_vl_config())
    # 6 sinks: the first 5 text tokens and the chunk that starts at stream index 5 (rounded up to the whole unit)
    config = StreamingVLMConfig(sink_tokens=6, vision_window_frames=3, text_window_tokens=5)
    ledger, history = TokenLedger(config), []
    for item in STREAM:
        new = unit_tokens(item)
        before = kept_units(history, config)  # what the ledger holds: it evicted after every item
        positions = append(ledger, item)
        assert torch.equal(positions, rope_index(model, before + new)[:, -positions.shape[1] :])
        history += new
        eviction = ledger.evict()
        kept = kept_units(history, config)
        assert eviction.evicted == tokens(before + new) - tokens(kept)
        assert ledger.num_tokens == tokens(kept)
        assert torch.equal(ledger.positions, rope_index(model, kept))
    assert ledger.count(TokenKind.SINK) == 5 + tokens(unit_tokens(STREAM[1]))
    assert ledger.count(TokenKind.TEXT) == config.text_window_tokens
    assert 0 < ledger.frames() <= config.vision_window_frames
    assert ledger.next_position == int(ledger.positions.max()) + 1


def test_qwen2_5_vl_temporal_spacing_matches_get_rope_index():
    torch.manual_seed(0)
    model = Qwen2_5_VLModel(tiny_qwen2_5_vl_config())
    fps, tp = 2.0, model.config.vision_config.temporal_patch_size
    interval = model.config.vision_config.tokens_per_second * tp / fps
    ledger = TokenLedger(StreamingVLMConfig(sink_tokens=0, vision_window_frames=4))
    ledger.append_text(2)
    ledger.append_vision((2, 2, 2), frames=4, time_interval=interval)
    ledger.append_text(1)
    units = unit_tokens(("text", 2)) + unit_tokens(("vision", (2, 2, 2), 4)) + unit_tokens(("text", 1))
    expected = rope_index(model, units, second_per_grid_ts=torch.tensor([tp / fps]))
    assert interval != 1.0
    assert torch.equal(ledger.positions, expected)


def test_append_vision_rejects_a_chunk_longer_than_the_window():
    ledger = TokenLedger(StreamingVLMConfig(vision_window_frames=2))
    with pytest.raises(ValueError, match="vision_window_frames"):
        ledger.append_vision((1, 2, 2), frames=3)


def fake_update(cache, positions, base, inv_freq, num_layers):
    """Stand-in for a model forward: per layer, K = R(position) k0 and V = k0 for fresh random k0 [1, 2, n, D]."""
    n = positions.shape[1]
    k0 = torch.randn(1, 2, n, 2 * inv_freq.numel())
    keys = rotate_keys(k0, positions[0], inv_freq)  # text-style positions: equal on t/h/w in this check
    for layer in range(num_layers):
        cache.update(keys * (layer + 1), k0 * (layer + 1), layer)
    base.append(k0)


def test_cache_evict_moves_keys_to_their_new_positions_in_every_layer():
    inv_freq = Qwen2VLRotaryEmbedding(tiny_qwen2_vl_config().text_config).inv_freq
    config = StreamingVLMConfig(sink_tokens=3, vision_window_frames=1, text_window_tokens=4)
    cache, base, layers = StreamingVLMCache(config, inv_freq), [], 3
    for _ in range(5):
        fake_update(cache, cache.ledger.append_text(3), base, inv_freq, layers)
        all_k0 = torch.cat(base, dim=2)
        eviction = cache.evict()
        base = [all_k0.index_select(2, eviction.keep)]
        expected_keys = rotate_keys(base[0], cache.ledger.positions[0], inv_freq)
        for layer in range(layers):
            assert_close(cache.layers[layer].keys, expected_keys * (layer + 1))
            assert torch.equal(cache.layers[layer].values, base[0] * (layer + 1))
    assert cache.get_seq_length() == config.sink_tokens + config.text_window_tokens
    assert cache.ledger.positions.max() == cache.get_seq_length() - 1


def test_evict_refuses_tokens_the_ledger_did_not_record():
    inv_freq = torch.ones(4)
    cache = StreamingVLMCache(StreamingVLMConfig(), inv_freq)
    cache.update(torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8), 0)
    with pytest.raises(ValueError, match="ledger"):
        cache.evict()


def test_an_hour_at_one_frame_per_second_keeps_cache_size_and_positions_bounded():
    """3600 steps of (pending token, one frame chunk, 3 generated tokens) with a stand-in for the model."""
    config = StreamingVLMConfig(sink_tokens=8, vision_window_frames=16, text_window_tokens=32)
    inv_freq = torch.ones(4)
    cache = StreamingVLMCache(config, inv_freq)
    grid, generated, layers, head_dim = (1, 2, 2), 3, 2, 8
    kv = lambda n: torch.zeros(1, 1, n, head_dim)  # values do not matter here, only sizes
    add = lambda positions: [cache.update(kv(positions.shape[1]), kv(positions.shape[1]), i) for i in range(layers)]
    add(cache.ledger.append_text(config.sink_tokens))  # system prompt
    sizes, peaks, max_positions = [], [], []
    for _ in range(3600):
        add(cache.ledger.append_text(1))  # last step's pending token
        add(cache.ledger.append_vision(grid, frames=1))
        for _ in range(generated - 1):
            add(cache.ledger.append_text(1))
        peaks.append(cache.get_seq_length())
        cache.evict()
        sizes.append(cache.num_bytes())
        max_positions.append(int(cache.ledger.positions.max()))

    frame_tokens = 2 + grid[0] * grid[1] * grid[2]  # markers + placeholders
    bound = config.sink_tokens + config.vision_window_frames * frame_tokens + config.text_window_tokens
    position_range = (
        config.sink_tokens + config.vision_window_frames * vision_unit_extent(grid) + config.text_window_tokens
    )
    warm = config.vision_window_frames + config.text_window_tokens  # more steps than either window takes to fill
    assert cache.get_seq_length() == bound
    assert len(set(sizes[warm:])) == 1 and max(sizes) == sizes[-1]
    assert len(set(peaks[warm:])) == 1 and max(peaks) == bound + frame_tokens + generated
    assert set(max_positions[warm:]) == {position_range - 1} and max(max_positions) == position_range - 1
    assert cache.ledger.stream_tokens > 30 * bound  # the stream did run far past the cache size
