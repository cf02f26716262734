"""The embedded tiny-world captioner: files, the sliding-window stream, a training smoke run, and the shipped
weights on held-out clips."""

import json

import numpy as np
import pytest
import torch

from stream_runtime.pipelines.captioner import train
from stream_runtime.pipelines.captioner.data import IGNORE, degrade, render_batch, targets
from stream_runtime.pipelines.captioner.evaluate import evaluate, same_scene
from stream_runtime.pipelines.captioner.model import (
    CaptionerConfig,
    TinyWorldCaptioner,
    background_classes,
    default_captioner_path,
    load_captioner,
)
from stream_runtime.pipelines.captioner.stream import CaptionStream
from stream_runtime.pipelines.tinyworld.captions import parse_caption
from stream_runtime.pipelines.tinyworld.world import held_out_seeds, render_frames, sample_spec, split_of

SHIPPED_CHECK_SEEDS = held_out_seeds()[:8]
"""Held-out scenes the shipped captioner must caption exactly in the test (one window each, from frame 0)."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped():
    return load_captioner()


def test_background_classes_cover_every_background_once():
    classes = background_classes()
    assert len(classes) == len(set(classes)) == 3 + 6 + 6
    for seed in range(20):
        assert sample_spec(seed).background in classes


def test_config_round_trip_and_world_check(tmp_path):
    model = TinyWorldCaptioner(CaptionerConfig(track_channels=8, shape_channels=(4, 4, 4, 4), background_hidden=4))
    model.save_pretrained(tmp_path, extra={"note": "test"})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["training"] == {"note": "test"} and saved["config"]["window_frames"] == 24
    loaded = TinyWorldCaptioner.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    saved["config"]["shape_colours"] = ["red", "green"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="shape_colours: expected the tiny world's"):
        TinyWorldCaptioner.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        TinyWorldCaptioner.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="window_frames: expected >= 2"):
        CaptionerConfig(window_frames=1)
    with pytest.raises(ValueError, match="frames: expected uint8"):
        model.predict(np.zeros((4, 32, 32, 3), np.uint8))


def test_training_batches_use_training_seeds_and_have_targets():
    config = CaptionerConfig()
    batch = render_batch(np.random.default_rng(0), 3, config)
    assert batch.frames.shape == (3, config.window_frames, 64, 64, 3) and batch.frames.dtype == torch.uint8
    for spec, present, shape in zip(batch.specs, batch.present, batch.shape, strict=True):
        assert int(present.sum()) == len(spec.shapes)
        assert ((shape != IGNORE) == present.bool()).all()
    again = render_batch(np.random.default_rng(0), 3, config)
    assert torch.equal(again.frames, batch.frames)  # deterministic in the generator
    clip = render_frames(sample_spec(5), 0, 4)
    assert degrade(clip, np.random.default_rng(1)).shape == clip.shape
    t = targets([sample_spec(5)], config)
    assert t["background"].shape == (1,) and t["present"].shape == (1, 7)
    assert all(split_of(seed) == "train" for seed in batch.seeds)


def test_train_smoke_run_writes_a_loadable_model(tmp_path):
    summary = train.train(str(tmp_path / "run"), steps=2, batch=2, shape_frames=1, check_windows=2)
    assert summary["planned_steps"] == 2 and summary["seed"] == 0
    model = TinyWorldCaptioner.from_pretrained(tmp_path / "run")
    prediction = model.predict(render_frames(sample_spec(3), 0, 8))
    parse_caption(prediction.caption)  # whatever it says is inside the world's grammar


def test_stream_captions_every_stride_after_a_full_window_and_flushes_the_rest(shipped):
    spec = sample_spec(held_out_seeds()[0])
    frames = render_frames(spec, 0, 45)
    stream = CaptionStream(shipped, stride_frames=8)
    windows = []
    for frame in frames:
        windows += stream.push(frame[None])
    assert [(w.first_frame, w.last_frame) for w in windows] == [(0, 23), (8, 31), (16, 39)]
    tail = stream.flush()
    assert (tail.first_frame, tail.last_frame) == (21, 44)
    assert stream.flush() is None  # nothing new since
    # Pushing all frames at once gives the same captions as one by one.
    batch = CaptionStream(shipped, stride_frames=8).push(frames)
    assert [w.caption for w in batch] == [w.caption for w in windows]
    short = CaptionStream(shipped)
    assert short.push(frames[:1]) == [] and short.flush().last_frame == 0  # a one-frame stream still gets one
    with pytest.raises(ValueError, match="stride_frames: expected an int in"):
        CaptionStream(shipped, stride_frames=0)


def test_shipped_captioner_is_small_and_reads_held_out_clips(shipped):
    folder = default_captioner_path()
    megabytes = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    assert megabytes <= 20
    right = [
        same_scene(shipped.predict(render_frames(sample_spec(seed), 0, 24)).description, sample_spec(seed))
        for seed in SHIPPED_CHECK_SEEDS
    ]
    assert sum(right) >= len(right) - 1, right
    result = evaluate(shipped, seeds=SHIPPED_CHECK_SEEDS[:2], windows_per_seed=1)
    assert result["windows"] == 2 and set(result["attribute_accuracy"]) == {
        "background",
        "object_count",
        "presence",
        "shape",
        "size",
        "motion",
    }
