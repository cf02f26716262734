"""The embedded tiny-world generator that ships in ``assets/tinyworld``: it loads like any model folder, streams
its example prompt, refuses words outside its vocabulary, and its frames follow the prompt's background (a check
the random-weights model fails; the accuracy figures come from ``eval_model``, see the README)."""

import numpy as np
import pytest
import torch

from stream_runtime import StreamPipeline
from stream_runtime.pipelines.tinyworld import export, model
from stream_runtime.pipelines.tinyworld.spec import BACKGROUND_COLOURS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    path = model.shipped_model_path()
    assert path is not None, "assets/tinyworld is missing from the checkout"
    assert export.folder_mb(path) <= export.MAX_MB
    return StreamPipeline.from_pretrained(path, device="cpu", dtype=torch.float32)


def frames_of(pipe, prompt: str, count: int, seed: int = 0) -> np.ndarray:
    chunks = []
    with pipe.session(prompt, seed=seed) as session:
        while sum(len(c) for c in chunks) < count:
            chunks.append(next(session))
    return np.concatenate(chunks)[:count]


def test_the_shipped_model_streams_its_example_prompt(pipe):
    assert pipe.default_resolution == (model.NATIVE_SIZE, model.NATIVE_SIZE)
    stream = pipe.stream_config()
    assert stream.guided  # fine-tuned with caption dropout: it streams with classifier-free guidance
    assert stream.replace(guidance_scale=1.0) == model.STREAM  # in the layout and with the sampler it was trained for
    assert pipe.example_prompt == model.EXAMPLE_PROMPT
    frames = frames_of(pipe, pipe.example_prompt, 9)
    assert frames.shape == (9, model.NATIVE_SIZE, model.NATIVE_SIZE, 3) and frames.dtype == np.uint8


def test_words_outside_the_world_are_refused_with_the_vocabulary(pipe):
    with pytest.raises(ValueError, match="fox") as err:
        pipe.session("a red fox running in snow")
    assert "circle" in str(err.value)  # the message lists the words the model knows


@pytest.mark.parametrize("background", ["grey", "navy", "black"])
def test_frames_take_the_prompts_background(pipe, background):
    frames = frames_of(pipe, f"a small red circle moving right on a {background} background", 9, seed=3)
    median = np.median(frames[1:].reshape(-1, 3).astype(float), axis=0)  # the background's tone
    nearest = min(BACKGROUND_COLOURS, key=lambda name: np.abs(median - BACKGROUND_COLOURS[name]).sum())
    assert nearest == background, f"median colour {median} is nearest to {nearest}"


def test_generate_uses_it_without_a_model(tmp_path, capsys):
    from stream_runtime.apps import cli
    from stream_runtime.video_io import read_video

    out = tmp_path / "clip.mp4"
    assert cli.main(["generate", "--prompt", model.EXAMPLE_PROMPT, "--seconds", "1", "--out", str(out)]) == 0
    assert "embedded tiny-world model" in capsys.readouterr().out
    assert read_video(out).shape == (model.FPS, model.NATIVE_SIZE, model.NATIVE_SIZE, 3)


def test_selfcheck_scores_the_shipped_vae_reconstructions():
    """The VAE's ceiling for a transformer: colours survive its reconstructions, and the errors are counted by
    kind (the shipped decoder's known weakness: small squares read as circles)."""
    from stream_runtime.pipelines.tinyworld import selfcheck

    vae = str(model.shipped_model_path() / "vae")
    summary = selfcheck.main(["--frames", "9", "--vae", vae])
    assert summary["clips"] == 128 and summary["colour_accuracy"] >= 0.95
    wrong_shapes = sum(n for kind, n in summary["errors"].items() if ":" not in kind)
    assert wrong_shapes == round((1 - summary["shape_accuracy"]) * summary["objects"])
    with pytest.raises(SystemExit):
        selfcheck.main(["--frames", "8", "--vae", vae])
