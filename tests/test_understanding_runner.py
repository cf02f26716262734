"""StreamingVLMRunner on tiny random Qwen2-VL / Qwen2.5-VL models against independent references."""

import numpy as np
import pytest
import torch
from conftest import assert_close
from transformers import DynamicCache, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half
from vlm_reference import kept_units as reference_kept_units

from stream_runtime.understanding import StreamingVLMConfig, StreamingVLMRunner, frames_to_patches
from stream_runtime.understanding.tiny import (
    TINY_FRAME_SIDE,
    TINY_SPECIAL_IDS,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_vl_config,
)

VIDEO = TINY_SPECIAL_IDS["video_token_id"]
VIDEO_TYPE = 2  # mm_token_type_ids value of video placeholders (text 0, image 1, video 2)
FAMILIES = {
    "qwen2_vl": (Qwen2VLForConditionalGeneration, tiny_qwen2_vl_config),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, tiny_qwen2_5_vl_config),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(family="qwen2_vl", seed=0, **text_overrides):
    model_cls, config_fn = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_fn(**text_overrides)).eval()


def random_frames(gen, count=1):
    return torch.randint(0, 256, (count, TINY_FRAME_SIDE, TINY_FRAME_SIDE, 3), dtype=torch.uint8, generator=gen)


class WordCodec:
    """Word-level codec over the tiny vocabulary: id ``i`` is the word ``w{i}``."""

    def encode(self, text):
        return [int(word[1:]) for word in text.split()]

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


# ---- the stream as units, for references built apart from the cache's bookkeeping ----
# A unit is (ids, mm_token_type_ids, pixel rows or None, patch grid or None, frames).


def run_stream(runner, schedule, gen):
    """Run ``schedule`` (list of (frame count, prompt ids)) and return (outputs, units fed per step)."""
    outputs, step_units = [], []
    for frames_count, prompt in schedule:
        pending = list(runner.pending)
        frames = random_frames(gen, frames_count) if frames_count else None
        out = runner.step_ids(frames, prompt)
        units = [([t], [0], None, None, 0) for t in pending]
        if frames is not None:
            spec = runner.spec
            pixels, grid = frames_to_patches(frames, spec.patch_size, spec.spatial_merge_size, spec.temporal_patch_size)
            ids = out.input_ids[len(pending) : len(out.input_ids) - len(prompt)]
            units.append((ids, [VIDEO_TYPE if i == VIDEO else 0 for i in ids], pixels, grid, frames_count))
        units += [([t], [0], None, None, 0) for t in list(prompt) + out.token_ids[:-1]]
        outputs.append(out)
        step_units.append(units)
    return outputs, step_units


def kept_units(history, config):
    return reference_kept_units(history, config, grid_index=3)


def model_inputs(units):
    ids = torch.tensor([[i for u in units for i in u[0]]])
    types = torch.tensor([[m for u in units for m in u[1]]])
    vision = [u for u in units if u[3] is not None]
    kwargs = dict(input_ids=ids, mm_token_type_ids=types)
    if vision:
        kwargs["pixel_values_videos"] = torch.cat([u[2] for u in vision])
        kwargs["video_grid_thw"] = torch.tensor([u[3] for u in vision])
    return kwargs


def full_forward_logits(model, units):
    """A plain forward of the model over ``units``, positions from its own get_rope_index: [tokens, vocab]."""
    with torch.no_grad():
        return model(**model_inputs(units)).logits[0].float()


def step_logit_rows(before_tokens, out):
    """Rows of a full forward over (context + this step) that produced the step's generated tokens."""
    first = before_tokens + len(out.input_ids) - 1
    return slice(first, first + len(out.token_ids))


def tokens(units):
    return sum(len(u[0]) for u in units)


# ---- tests ----


def test_frames_to_patches_matches_the_hf_image_processor():
    gen = torch.Generator().manual_seed(0)
    model = tiny_model()
    vision = model.config.vision_config
    frame = random_frames(gen, 1)
    processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        do_resize=False,
    )
    expected = processor(frame[0].numpy(), return_tensors="pt")
    pixels, grid = frames_to_patches(frame, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    assert grid == tuple(expected["image_grid_thw"][0].tolist())
    assert_close(pixels, expected["pixel_values"])
    # two distinct frames: each temporal slot holds its own frame, in the processor's (C, t, p, p) patch layout
    pair = random_frames(gen, 2)
    both, _ = frames_to_patches(pair, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    shape = (-1, vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
    for slot in range(vision.temporal_patch_size):
        alone, _ = frames_to_patches(
            pair[slot : slot + 1], vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        )
        assert torch.equal(both.view(shape)[:, :, slot], alone.view(shape)[:, :, 0])
    with pytest.raises(ValueError, match="multiples"):
        frames_to_patches(np.zeros((1, 10, 16, 3), np.uint8), 4, 2, 2)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_without_eviction_step_logits_equal_a_full_forward(family):
    model = tiny_model(family)
    big = 10_000
    config = StreamingVLMConfig(
        sink_tokens=4, vision_window_frames=big, text_window_tokens=big, max_new_tokens=3, stop_token_ids=()
    )
    runner = StreamingVLMRunner(model, config)
    gen = torch.Generator().manual_seed(1)
    schedule = [(0, [1, 2, 3, 4, 5]), (2, []), (1, [6, 7]), (2, [])]
    outputs, step_units = run_stream(runner, schedule, gen)
    history = [u for units in step_units for u in units]
    reference = full_forward_logits(model, history)
    before = 0
    for out, units in zip(outputs, step_units, strict=True):
        assert out.evicted == 0 and len(out.token_ids) == config.max_new_tokens
        assert_close(out.logits, reference[step_logit_rows(before, out)])
        before += tokens(units)
    assert runner.cache.get_seq_length() == tokens(history)


EVICTING = StreamingVLMConfig(
    sink_tokens=6, vision_window_frames=2, text_window_tokens=5, max_new_tokens=3, stop_token_ids=()
)
SCHEDULE = [(0, [1, 2, 3, 4, 5]), (2, []), (1, [8]), (2, []), (1, [9, 10]), (2, []), (2, [11])]


def test_with_eviction_one_layer_logits_equal_a_fresh_forward_over_the_kept_tokens():
    """With one text layer a cached K/V depends only on its token and position, so a fresh forward over exactly
    the kept tokens (positions from transformers' get_rope_index) must reproduce the streaming logits."""
    model = tiny_model(num_hidden_layers=1)
    runner = StreamingVLMRunner(model, EVICTING)
    outputs, step_units = run_stream(runner, SCHEDULE, torch.Generator().manual_seed(2))
    history, evictions = [], 0
    for out, units in zip(outputs, step_units, strict=True):
        kept = kept_units(history, EVICTING)
        reference = full_forward_logits(model, kept + units)
        assert_close(out.logits, reference[step_logit_rows(tokens(kept), out)])
        history += units
        evictions += out.evicted > 0
    assert runner.cache.get_seq_length() == tokens(kept_units(history, EVICTING))
    assert evictions >= 3


def reference_replay(model, step_units, outputs, config):
    """Streaming with stock parts: a plain DynamicCache, positions from get_rope_index, eviction by
    :func:`kept_units`, kept keys un-rotated and re-rotated with the model's own M-RoPE module."""
    rotary = model.model.language_model.rotary_emb
    cache, cached, history, all_logits = DynamicCache(), [], [], []
    for units, out in zip(step_units, outputs, strict=True):
        full = cached + units
        inputs = model_inputs(full)
        positions = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs.get("video_grid_thw")
        )[0]
        start, prefill = tokens(cached), len(out.input_ids)
        new_vision = [u for u in units if u[3] is not None]
        kwargs = (
            dict(pixel_values_videos=new_vision[0][2], video_grid_thw=torch.tensor([new_vision[0][3]]))
            if new_vision
            else {}
        )
        feeds = [(out.input_ids, start, kwargs)] + [
            ([t], start + prefill + j, {}) for j, t in enumerate(out.token_ids[:-1])
        ]
        logits = []
        with torch.no_grad():
            for ids, at, extra in feeds:
                result = model(
                    input_ids=torch.tensor([ids]),
                    position_ids=positions[:, :, at : at + len(ids)],
                    past_key_values=cache,
                    use_cache=True,
                    **extra,
                )
                logits.append(result.logits[0, -1].float())
        all_logits.append(torch.stack(logits))

        history += units
        kept = kept_units(history, config)
        ids_of = {id(u): i for i, u in enumerate(full)}
        offsets = np.cumsum([0] + [len(u[0]) for u in full])
        keep = torch.tensor([j for u in kept for j in range(offsets[ids_of[id(u)]], offsets[ids_of[id(u)] + 1])])
        kept_inputs = model_inputs(kept)
        new_positions = model.model.get_rope_index(
            kept_inputs["input_ids"], kept_inputs["mm_token_type_ids"], video_grid_thw=kept_inputs.get("video_grid_thw")
        )[0]
        for layer in cache.layers:
            keys = layer.keys[:, :, keep]
            cos, sin = rotary(keys, positions[:, :, keep])
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            unrotated = keys * cos - rotate_half(keys) * sin  # R(-p): the inverse rotation
            cos, sin = rotary(keys, new_positions)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            layer.keys = unrotated * cos + rotate_half(unrotated) * sin
            layer.values = layer.values[:, :, keep]
        cached = kept
    return all_logits


def test_with_eviction_two_layers_logits_equal_a_replay_with_stock_transformers_parts():
    """Deeper layers' cached K/V keep what they saw before eviction (as in StreamingLLM/StreamingVLM), so the
    reference replays the stream with a stock DynamicCache, the model's get_rope_index and RoPE module."""
    model = tiny_model()
    runner = StreamingVLMRunner(model, EVICTING)
    outputs, step_units = run_stream(runner, SCHEDULE, torch.Generator().manual_seed(3))
    replayed = reference_replay(model, step_units, outputs, EVICTING)
    for out, reference in zip(outputs, replayed, strict=True):
        assert_close(out.logits, reference)
    assert sum(out.evicted > 0 for out in outputs) >= 3


def run_real_stream(steps):
    config = StreamingVLMConfig(
        sink_tokens=8, vision_window_frames=4, text_window_tokens=16, max_new_tokens=2, stop_token_ids=()
    )
    runner = StreamingVLMRunner(tiny_model(), config, codec=WordCodec())
    runner.step(None, " ".join(f"w{i}" for i in range(config.sink_tokens)))
    gen = torch.Generator().manual_seed(4)
    sizes, max_positions = [], []
    for _ in range(steps):
        text = runner.step(random_frames(gen, 1))  # one frame per step: 1 fps
        assert len(text.split()) == config.max_new_tokens
        sizes.append(runner.cache.num_bytes())
        max_positions.append(int(runner.cache.ledger.positions.max()))
    # warm-up: the text window fills after 16 / 2 steps, the vision window after 4
    warm = config.text_window_tokens // config.max_new_tokens + 1
    assert len(set(sizes[warm:])) == 1 and max(sizes) == sizes[-1]
    assert len(set(max_positions[warm:])) == 1
    assert runner.cache.ledger.stream_tokens > 10 * runner.cache.get_seq_length()
    return sizes[-1], max_positions[-1]


def test_real_model_stream_of_four_minutes_keeps_memory_and_positions_constant():
    run_real_stream(240)


@pytest.mark.slow
def test_real_model_stream_of_one_hour_keeps_memory_and_positions_constant():
    assert run_real_stream(3600) == run_real_stream(240)


def test_step_returns_words_and_needs_a_codec_for_text_prompts():
    runner = StreamingVLMRunner(tiny_model(), StreamingVLMConfig(max_new_tokens=2, stop_token_ids=()))
    with pytest.raises(ValueError, match="codec"):
        runner.step(None, "w1 w2")
    with pytest.raises(ValueError, match="nothing to feed"):
        runner.step(None)
    with pytest.raises(ValueError, match="prompt_ids"):
        runner.step_ids(None, [VIDEO])
    words = runner.step(random_frames(torch.Generator().manual_seed(5)))
    assert len(words.split()) == 2 and not {int(w) for w in words.split()} & set(runner.spec.vision_token_ids)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), "full_attention"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "mrope_section": [2, 3, 3]}), "rope_type"),
    ],
)
def test_runner_rejects_models_whose_cache_it_cannot_re_index(overrides, match):
    with pytest.raises(ValueError, match=match):
        StreamingVLMRunner(tiny_model(**overrides), StreamingVLMConfig())
