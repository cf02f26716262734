"""StreamPipeline / StreamSession on the tiny random model: API, prompt switching, memory, loading, bad input."""

import numpy as np
import pytest
import torch
from conftest import assert_close

from stream_runtime import StreamConfig, StreamPipeline
from stream_runtime.pipelines.wan import sampling


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(seed=0, height=32, width=48)


def test_t2v_frame_counts_and_determinism(pipe):
    def run(seed):
        with pipe.session("a red fox", seed=seed, chunk_frames=2, window_frames=3, sink_frames=1) as s:
            return [next(s) for _ in range(2)]

    a, b, c = run(0), run(0), run(1)
    assert [f.shape for f in a] == [(5, 32, 48, 3), (8, 32, 48, 3)]
    assert all(f.dtype == np.uint8 for f in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_recache_equals_fresh_pass_over_kept_frames(pipe):
    """After a switch with recache, the next chunk sees exactly what a fresh block-causal pass over the kept
    frames (at their positions, t=0, new prompt) gives."""
    chunk = 2
    s = pipe.session("a red fox", seed=3, chunk_frames=chunk, sink_frames=2, window_frames=6, prompt_switch="recache")
    for _ in range(5):  # 10 frames: sinks 0-1 kept, 2-5 evicted, window keeps 6-9
        s.generate_latents()
    s.set_prompt("a blue cat")
    kept, kept_latents = s.cache.kept_latents()
    assert kept == [0, 1, 6, 7, 8, 9]

    probe = torch.randn(1, *s.latent_shape[:1], chunk, *s.latent_shape[1:], generator=torch.Generator().manual_seed(9))
    t = 700.0
    got = s.net.forward_chunk(probe, t, s._text, s.cache, s.frame)

    ids = torch.tensor([f // chunk for f in kept] + [s.frame // chunk] * chunk)
    mask = ids[None, :] <= ids[:, None]
    seq = torch.cat([kept_latents, probe], dim=2)
    steps = torch.tensor([[0.0] * len(kept) + [t] * chunk])
    text = s.net.text_kv(pipe.encode_prompt("a blue cat"))
    ref = s.net.forward_full(seq, steps, text, frame_mask=mask, frame_positions=kept + [10, 11])
    assert_close(got, ref[:, :, -chunk:])


@pytest.mark.parametrize("policy", ["keep", "recache"])
def test_deferred_context_pass_changes_nothing(pipe, policy):
    """next_chunk decodes a chunk before its context pass (run at the start of the next call); the frames equal
    running the context pass at once (generate_latents) and decoding after, across a switch, a blend and a
    config change."""

    def script(session, produce):
        out = [produce() for _ in range(3)]
        session.set_prompt("a blue cat")
        out += [produce() for _ in range(2)]
        session.set_prompt("a green owl", blend_chunks=2)
        out += [produce() for _ in range(3)]
        session.set_config(session.config.replace(timesteps=(1000.0, 500.0)))
        out += [produce() for _ in range(2)]
        return out

    kwargs = dict(seed=4, chunk_frames=1, sink_frames=1, window_frames=3, prompt_switch=policy)
    deferred = pipe.session("a red fox", **kwargs)
    eager = pipe.session("a red fox", **kwargs)

    def eager_chunk():
        pixels = eager.decoder.decode(eager.generate_latents())
        return ((pixels[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

    got, want = script(deferred, deferred.next_chunk), script(eager, eager_chunk)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_prompt_switch_policies(pipe):
    for policy in ("keep", "reset", "recache"):
        s = pipe.session("a red fox", seed=0, chunk_frames=1, sink_frames=1, window_frames=3, prompt_switch=policy)
        for _ in range(4):
            s.generate_latents()
        s.set_prompt("a blue cat")
        assert s.cache.valid_frames == (0 if policy == "reset" else 3)
        assert s.frame == (0 if policy == "reset" else 4)
        s.generate_latents()
        assert s.cache.valid_frames == (1 if policy == "reset" else 3)


def test_blend_ends_on_the_new_prompt(pipe):
    s = pipe.session("a red fox", seed=0, chunk_frames=1, blend_mode="slerp")
    s.set_prompt("a blue cat", blend_chunks=3)
    target = pipe.encode_prompt("a blue cat")
    for i in range(3):
        s.generate_latents()
        done = torch.equal(s._embeds, target)
        assert done == (i == 2)


def test_slerp_endpoints_and_zero_padding():
    a, b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    a[:, -1] = 0  # zero padding of prompt embeddings falls back to linear
    assert_close(sampling.slerp(a, b, 0.0), a)
    assert_close(sampling.slerp(a, b, 1.0), b)
    assert torch.isfinite(sampling.slerp(a, b, 0.5)).all()


def test_two_thousand_chunks_in_constant_memory():
    pipe = StreamPipeline.tiny_random(seed=1, height=16, width=16)
    cfg = StreamConfig(
        chunk_frames=1, sink_frames=1, window_frames=3, timesteps=(1000.0,), context_pass=False, position_mode="bounded"
    )
    s = pipe.session("a fox", seed=0, config=cfg)
    buffers = [t.data_ptr() for t in (*s.cache.k.values(), *s.cache.v.values(), s.cache.latents)]
    memory = s.cache.memory_bytes()
    for _ in range(2000):
        x0 = s.generate_latents()
    assert torch.isfinite(x0).all()
    assert s.frame == 2000
    assert s.cache.memory_bytes() == memory
    assert [t.data_ptr() for t in (*s.cache.k.values(), *s.cache.v.values(), s.cache.latents)] == buffers
    assert s.cache.kept_frames() == [0, 1998, 1999]
    assert max(s.cache.slot_positions("bounded")) < cfg.sink_frames + cfg.window_frames


def test_v2v_consumes_input_and_is_deterministic(pipe):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (13, 32, 48, 3), dtype=np.uint8)

    def run():
        s = pipe.session("a red fox", mode="v2v", seed=2, motion_aware=True)
        assert s.frames_needed() == 1
        s.push_frames(video)
        return list(s)

    a, b = run(), run()
    assert [f.shape[0] for f in a] == [1, 4, 4, 4]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_folder_plus_original_checkpoint(pipe, tmp_path):
    """The usual user setup: a diffusers folder for VAE/text encoder/tokenizer and one original-format causal
    checkpoint for the transformer, in a training wrapper."""
    from test_convert import to_original

    pipe.save_pretrained(tmp_path / "model")
    sd = {"model." + to_original(k): v for k, v in pipe.transformer.state_dict().items()}
    torch.save({"generator_ema": sd, "generator": {k: torch.zeros_like(v) for k, v in sd.items()}}, tmp_path / "c.pt")
    loaded = StreamPipeline.from_pretrained(tmp_path / "model", transformer_checkpoint=tmp_path / "c.pt")
    with pipe.session("a red fox", seed=0) as s1, loaded.session("a red fox", seed=0) as s2:
        assert np.array_equal(next(s1), next(s2))


def test_save_and_load_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    loaded = StreamPipeline.from_pretrained(tmp_path / "model")
    with pipe.session("a red fox", seed=0) as s1, loaded.session("a red fox", seed=0) as s2:
        assert np.array_equal(next(s1), next(s2))
        assert np.array_equal(next(s1), next(s2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=33), "height must be a positive multiple of 16"),
        (dict(width=40), "width must be a positive multiple of 16"),
        (dict(mode="i2v"), "mode must be one of"),
        (dict(chunk_frames=0), "chunk_frames must be an integer >= 1"),
        (dict(window_frames=1, chunk_frames=2), "window_frames counts the chunk"),
        (dict(timesteps=(500.0, 750.0)), "decreasing"),
        (dict(position_mode="relative"), "position_mode must be one of"),
        (dict(attention_backend="flash3"), "attention backend must be one of"),
    ],
)
def test_session_bad_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.session("a red fox", **kwargs)


def test_bad_prompt_and_inputs(pipe, tmp_path):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        pipe.session("   ")
    s = pipe.session("a red fox")
    with pytest.raises(ValueError, match="push_frames is for video-to-video"):
        s.push_frames(np.zeros((4, 32, 48, 3), np.uint8))
    v = pipe.session("a red fox", mode="v2v")
    with pytest.raises(ValueError, match=r"frames must be uint8 \[T, 32, 48, 3\]"):
        v.push_frames(np.zeros((4, 30, 48, 3), np.uint8))
    assert v.next_chunk() is None  # no input yet: nothing to generate
    s.close()
    with pytest.raises(ValueError, match="session is closed"):
        s.next_chunk()
    with pytest.raises(ValueError, match="model folder"):
        StreamPipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="transformer_checkpoint"):
        StreamPipeline.from_pretrained(tmp_path / "ckpt.pt")
    (tmp_path / "partial").mkdir()
    with pytest.raises(ValueError, match=r"lacks the component folders \['transformer', 'vae'"):
        StreamPipeline.from_pretrained(tmp_path / "partial")


def test_unknown_words_policy(tmp_path):
    from stream_runtime.pipelines.wan.text import PromptEncoder, build_word_tokenizer

    tok = build_word_tokenizer(["a", "red", "circle"])
    enc = PromptEncoder(tok, text_encoder=None, unknown_words="error")
    with pytest.raises(ValueError, match=r"does not know: \['fox'\].*Known words: a, circle, red"):
        enc("a red fox")


def test_set_config_changes_steps_but_not_the_cache_layout(pipe):
    s = pipe.session("a red fox", seed=0, chunk_frames=1)
    s.set_config(s.config.replace(timesteps=(1000.0, 500.0)))
    s.generate_latents()
    with pytest.raises(ValueError, match=r"cannot change \['window_frames'\]"):
        s.set_config(s.config.replace(window_frames=5))
