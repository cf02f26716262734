"""TAEHV: public state-dict layout, streamed decode/encode equal to the full-sequence references, pipeline and CLI."""

import pytest
import torch
from conftest import assert_close
from safetensors.torch import save_file
from torch import nn

from stream_runtime.apps import cli
from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.pipelines.wan.taehv import (
    TAEHV,
    StreamingTAEHVDecoder,
    StreamingTAEHVEncoder,
    TAEHVConfig,
    config_from_state_dict,
    load_taehv,
    load_taehv_state_dict,
)
from stream_runtime.video_io import read_video

# Tiny widths; latent channels 4 match StreamPipeline.tiny_random's transformer. Factors stay taew2_1's (4x, 8x).
TINY = TAEHVConfig(latent_channels=4, encoder_features=8, decoder_features=(16, 8, 8, 8))
TINY_PATCH2 = TAEHVConfig(latent_channels=4, patch_size=2, encoder_features=8, decoder_features=(8, 8, 8, 8))
LATENT_FRAMES = 6
LATENT_HW = (3, 2)  # small and non-square, so a height/width swap would show
BATCH = 2
OUTPUT_BIAS = 0.5  # centres the random decoder's output in TAEHV's [0, 1] so few pixels sit on the clamp


def _model(config: TAEHVConfig = TINY, seed: int = 0) -> TAEHV:
    """Random weights with unit-gain convs, so every layer (memory included) moves the output visibly."""
    torch.manual_seed(seed)
    model = TAEHV(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
        model.decoder[-1].bias.add_(OUTPUT_BIAS)
    return model


@pytest.fixture(scope="module", params=[TINY, TINY_PATCH2], ids=["patch1", "patch2"])
def taehv(request) -> TAEHV:
    return _model(request.param)


def _latents(config: TAEHVConfig, frames: int = LATENT_FRAMES, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, config.latent_channels, frames, *LATENT_HW, generator=generator)


def _video(config: TAEHVConfig, frames: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    height, width = (n * config.spatial_factor for n in LATENT_HW)
    return torch.rand(BATCH, 3, frames, height, width, generator=generator) * 2 - 1


# -- the public layout


def test_taew2_1_layout_matches_the_public_file():
    """Names and shapes of taew2_1.pth (madebyollin/taehv): 64 encoder and 64 decoder tensors."""
    state = TAEHV(TAEHVConfig()).state_dict()
    assert sum(k.startswith("encoder.") for k in state) == 64
    assert sum(k.startswith("decoder.") for k in state) == 64
    shapes = {
        "encoder.0.weight": (64, 3, 3, 3),
        "encoder.2.conv.weight": (64, 128, 1, 1),  # TPool, stride 2
        "encoder.3.weight": (64, 64, 3, 3),  # strided conv, no bias
        "encoder.4.conv.0.weight": (64, 128, 3, 3),  # MemBlock: [frame, past] -> 64
        "encoder.12.conv.weight": (64, 64, 1, 1),  # TPool, stride 1
        "encoder.17.weight": (16, 64, 3, 3),
        "decoder.1.weight": (256, 16, 3, 3),
        "decoder.3.conv.0.weight": (256, 512, 3, 3),
        "decoder.5.conv.4.bias": (256,),
        "decoder.7.conv.weight": (256, 256, 1, 1),  # TGrow, stride 1
        "decoder.8.weight": (128, 256, 3, 3),
        "decoder.13.conv.weight": (256, 128, 1, 1),  # TGrow, stride 2
        "decoder.14.weight": (64, 128, 3, 3),
        "decoder.19.conv.weight": (128, 64, 1, 1),
        "decoder.20.weight": (64, 64, 3, 3),
        "decoder.22.weight": (3, 64, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert not any("skip" in k for k in state)  # every MemBlock keeps its width: identity skips
    assert config_from_state_dict(state) == TAEHVConfig()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_round_trips_through_a_file(taehv, tmp_path, suffix):
    path = tmp_path / f"taehv{suffix}"
    state = taehv.state_dict()
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = load_taehv(path)
    assert loaded.config == taehv.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    latents = _latents(taehv.config)
    assert torch.equal(loaded.decode_video(latents), taehv.decode_video(latents))


def test_missing_extra_and_misshapen_keys_are_named():
    model, state = TAEHV(TINY), TAEHV(TINY).state_dict()
    missing = {k: v for k, v in state.items() if k != "decoder.4.conv.2.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['decoder.4.conv.2.weight'\]"):
        load_taehv_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['decoder.23.weight'\]"):
        load_taehv_state_dict(model, {**state, "decoder.23.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"state_dict\['decoder.8.weight'\]` must have shape \(8, 16, 3, 3\)"):
        load_taehv_state_dict(model, {**state, "decoder.8.weight": torch.zeros(8, 16, 1, 1)})


def test_loading_a_file_without_a_shape_key_names_it(tmp_path):
    state = TAEHV(TINY).state_dict()
    del state["decoder.13.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"lacks decoder.13.conv.weight"):
        load_taehv(tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"does not exist; expected a file such as taew2_1.pth"):
        load_taehv(tmp_path / "absent.pth")


# -- streaming decode


def test_decode_frame_counts_and_range(taehv):
    config = taehv.config
    out = taehv.decode_video(_latents(config, frames=3))
    height, width = (n * config.spatial_factor for n in LATENT_HW)
    assert out.shape == (BATCH, 3, 1 + 4 * 2, height, width)
    assert -1.0 <= out.min() and out.max() <= 1.0
    assert 0.5 < (out.abs() < 1.0).float().mean()  # most pixels off the clamp: the comparisons below mean something
    decoder = StreamingTAEHVDecoder(taehv)
    assert decoder.decode(_latents(config, frames=2)).shape[2] == 1 + 4
    assert decoder.decode(_latents(config, frames=2)).shape[2] == 4 * 2


@pytest.mark.parametrize("sizes", [[1] * LATENT_FRAMES, [2, 2, 2], [3, 3], [1, 2, 3], [LATENT_FRAMES]])
def test_streamed_decode_equals_full_decode(taehv, sizes):
    latents = _latents(taehv.config)
    expected = taehv.decode_video(latents)
    decoder = StreamingTAEHVDecoder(taehv)
    actual = torch.cat([decoder.decode(chunk) for chunk in latents.split(sizes, dim=2)], dim=2)
    assert actual.shape == expected.shape
    assert_close(actual, expected)


def test_decoder_memory_carries_the_past_and_stays_bounded(taehv):
    latents = _latents(taehv.config, frames=8)
    decoder = StreamingTAEHVDecoder(taehv)
    decoder.decode(latents[:, :, :2])
    held = decoder.memory.num_elements()
    continued = decoder.decode(latents[:, :, 2:4])
    assert decoder.memory.num_elements() == held  # one frame per MemBlock, whatever the stream length
    decoder.decode(latents[:, :, 4:8])
    assert decoder.memory.num_elements() == held

    fresh = StreamingTAEHVDecoder(taehv)
    fresh.decode(latents[:, :, :1] * 0)  # same shapes, a different past
    assert (fresh.decode(latents[:, :, 2:4]) - continued).abs().max() > 1e-2
    decoder.reset()
    restarted = decoder.decode(latents[:, :, :2])
    assert_close(restarted, taehv.decode_video(latents[:, :, :2]))


def test_decoder_rejects_bad_inputs(taehv):
    decoder = StreamingTAEHVDecoder(taehv)
    latents = _latents(taehv.config, frames=1)
    with pytest.raises(ValueError, match=r"`latents` must be a 5-D tensor \[B, C, F, h, w\] with 4 channels"):
        decoder.decode(latents[:, :3])
    with pytest.raises(ValueError, match="weights' dtype and device"):
        decoder.decode(latents.double())
    decoder.decode(latents)
    with pytest.raises(ValueError, match=r"keep the stream's \(batch, height, width\)"):
        decoder.decode(latents[:1])
    with pytest.raises(TypeError, match="`taehv` must be a TAEHV module"):
        StreamingTAEHVDecoder(nn.Identity())


# -- streaming encode


@pytest.mark.parametrize("sizes", [[4, 4, 4], [1, 3, 5, 3], [12], [2, 1, 1, 7, 1]])
def test_streamed_encode_equals_full_encode(taehv, sizes):
    video = _video(taehv.config, frames=12)
    expected = taehv.encode_video(video)
    assert expected.shape[2] == 3
    encoder = StreamingTAEHVEncoder(taehv)
    parts = [encoder.encode(chunk) for chunk in video.split(sizes, dim=2)]
    assert_close(torch.cat(parts, dim=2), expected)


def test_full_encode_pads_the_end_with_the_last_frame(taehv):
    video = _video(taehv.config, frames=5)
    padded = torch.cat([video, video[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)
    assert torch.equal(taehv.encode_video(video), taehv.encode_video(padded))


# -- pipeline and command line


def test_pipeline_sessions_decode_with_taehv():
    pipe = StreamPipeline.tiny_random(height=32, width=32)
    with pipe.session("a red fox", seed=0) as s:
        vae_frames = [s.next_chunk() for _ in range(2)]
    pipe.set_decoder(_model())
    with pipe.session("a red fox", seed=0) as s:
        assert isinstance(s.decoder, StreamingTAEHVDecoder)
        taehv_frames = [s.next_chunk() for _ in range(2)]
    assert [f.shape for f in taehv_frames] == [f.shape for f in vae_frames] == [(9, 32, 32, 3), (12, 32, 32, 3)]
    assert any((a != b).any() for a, b in zip(taehv_frames, vae_frames, strict=True))
    pipe.set_decoder("vae")
    assert pipe.taehv is None


def test_pipeline_loads_taehv_from_a_path(tmp_path):
    pipe = StreamPipeline.tiny_random(height=32, width=32)
    pipe.save_pretrained(tmp_path / "model")
    torch.save(_model().state_dict(), tmp_path / "taew_tiny.pth")
    loaded = StreamPipeline.from_pretrained(tmp_path / "model", decoder=f"taehv:{tmp_path / 'taew_tiny.pth'}")
    assert loaded.taehv is not None and loaded.taehv.config == TINY
    with loaded.session("a red fox", seed=0) as s:
        assert s.next_chunk().shape == (9, 32, 32, 3)


def test_pipeline_decoder_errors(tmp_path):
    pipe = StreamPipeline.tiny_random()
    with pytest.raises(ValueError, match="does not exist"):
        pipe.set_decoder(f"taehv:{tmp_path / 'taew2_1.pth'}")
    with pytest.raises(ValueError, match=r"`decoder` must be 'vae', 'taehv:PATH' or a TAEHV module; got 'taehv:'"):
        pipe.set_decoder("taehv:")
    with pytest.raises(ValueError, match="must take the transformer's 4 latent channels; got a TAEHV with "):
        pipe.set_decoder(TAEHV(TAEHVConfig(encoder_features=8, decoder_features=(8, 8, 8, 8))))
    with pytest.raises(ValueError, match=r"factors must equal the VAE's \(4, 8\); got \(2, 8\)"):
        pipe.set_decoder(TAEHV(TAEHVConfig(latent_channels=4, decoder_time_upscale=(False, False, True))))
    assert pipe.taehv is None


def test_cli_generate_with_taehv(tmp_path, capsys):
    torch.save(_model().state_dict(), tmp_path / "taew_tiny.pth")
    out = tmp_path / "clip.mp4"
    argv = ["generate", "--tiny-random", "--prompt", "a fox", "--seconds", "1", "--out", str(out)]
    argv += ["--height", "32", "--width", "32"]
    assert cli.main([*argv, "--decoder", f"taehv:{tmp_path / 'taew_tiny.pth'}"]) == 0
    assert read_video(out).shape == (16, 32, 32, 3)
    assert cli.main([*argv, "--decoder", f"taehv:{tmp_path / 'missing.pth'}"]) == 2
    assert "missing.pth' does not exist" in capsys.readouterr().err
