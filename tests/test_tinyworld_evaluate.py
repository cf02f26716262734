import dataclasses

import numpy as np
import pytest

from stream_runtime.pipelines.tinyworld.evaluate import (
    analyse_frames,
    count_reversals,
    evaluate,
    score_clip,
    stability,
)
from stream_runtime.pipelines.tinyworld.spec import WORLD_FPS, BackgroundSpec, SceneSpec, ShapeSpec
from stream_runtime.pipelines.tinyworld.world import caption, held_out_seeds, render, render_frames, sample_spec

FRAMES = 32
"""Two seconds: long enough to see every bounce turn (world.MIN_FRAMES_TO_JUDGE_BOUNCE)."""
SAMPLE = 30


def _clean_scores():
    specs = [sample_spec(seed) for seed in held_out_seeds()[:SAMPLE]]
    return evaluate([render(s, FRAMES) for s in specs], specs)


def test_near_perfect_on_clean_held_out_renders():
    result = _clean_scores()
    assert result["clips"] == SAMPLE and result["objects"] >= SAMPLE
    assert result["colour_accuracy"] >= 0.99
    assert result["shape_accuracy"] >= 0.97
    assert result["motion_accuracy"] >= 0.97
    assert result["count_accuracy"] >= 0.97
    assert result["collapsed_clips"] == 0


@pytest.mark.slow
def test_near_perfect_on_all_held_out_renders():
    specs = [sample_spec(seed) for seed in held_out_seeds()]
    result = evaluate([render(s, FRAMES) for s in specs], specs)
    assert result["clips"] >= 100
    assert result["colour_accuracy"] >= 0.99 and result["shape_accuracy"] >= 0.97
    assert result["motion_accuracy"] >= 0.97


def _one(shape="circle", colour="red", size="medium", motion="right", x=0.3, y=0.4, speed=0.03):
    return ShapeSpec(shape, colour, size, motion, x, y, speed)


def test_every_motion_is_recognised():
    motions = ["left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right", "still", "bounce"]
    for motion in motions:
        speed = 0.0 if motion == "still" else 0.06 if motion == "bounce" else 0.025
        spec = SceneSpec((_one(shape="triangle", size="small", motion=motion, x=0.5, y=0.5, speed=speed),))
        [found] = analyse_frames(render(spec, FRAMES))
        assert (found.motion, found.shape, found.size, found.colour) == (motion, "triangle", "small", "red")


def test_wrapped_shape_is_one_object():
    """Straddling the corner, a square is drawn in four pieces; it is still one square."""
    spec = SceneSpec((_one(shape="square", size="large", motion="down-right", x=0.99, y=0.98, speed=0.02),))
    [found] = analyse_frames(render(spec, 8))
    assert (found.shape, found.size, found.motion) == ("square", "large", "down-right")


@pytest.mark.parametrize("attribute", ["colour", "shape", "motion"])
def test_mismatched_spec_fails_the_differing_attribute(attribute):
    truth = SceneSpec(
        (_one(), _one(shape="square", colour="cyan", size="small", motion="bounce", x=0.75, y=0.5, speed=0.06)),
        BackgroundSpec(("navy",)),
    )
    other = {"colour": "yellow", "shape": "triangle", "motion": "up"}[attribute]
    wrong = SceneSpec((dataclasses.replace(truth.shapes[0], **{attribute: other}), truth.shapes[1]), truth.background)
    clip = render(truth, FRAMES)
    good, bad = score_clip(clip, truth), score_clip(clip, caption(wrong))
    keys = ("colour_ok", "shape_ok", "motion_ok", "size_ok")
    assert all(o[k] for o in good["objects"] for k in keys)
    first = bad["objects"][0]
    assert not first[f"{attribute}_ok"]
    assert all(first[k] for k in keys if k != f"{attribute}_ok"), first
    assert all(bad["objects"][1][k] for k in keys)


def test_missing_and_extra_objects_are_counted():
    spec = sample_spec(4, num_shapes=3)
    clip = render(spec, FRAMES)
    fewer = SceneSpec(spec.shapes[:1], spec.background)
    score = score_clip(render(fewer, FRAMES), spec)
    assert score["detected_count"] == 1 and not score["count_ok"]
    assert sum(o["colour_ok"] for o in score["objects"]) == 1
    assert score_clip(clip, fewer)["detected_count"] == 3


def test_noise_collapses_and_clean_does_not():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (FRAMES, 64, 64, 3), dtype=np.uint8)
    score = score_clip(noise, sample_spec(1))
    assert score["collapsed"] and score["collapsed_fraction"] == 1.0
    assert not any(o["colour_ok"] and o["shape_ok"] for o in score["objects"])
    assert not score_clip(render(sample_spec(1), FRAMES), sample_spec(1))["collapsed"]


def test_long_stream_is_stable():
    seconds = 12
    for seed in (2, 3):
        report = stability(render(sample_spec(seed, num_shapes=3), seconds * WORLD_FPS))
        assert report["seconds"] == seconds and report["stable"], report
        assert report["frames_collapsed"] == 0


def test_stability_flags_noise_and_vanishing_objects():
    rng = np.random.default_rng(1)
    noisy = stability(rng.integers(0, 256, (3 * WORLD_FPS, 64, 64, 3), dtype=np.uint8))
    assert not noisy["stable"] and noisy["collapsed_fraction"] == 1.0
    spec = sample_spec(6, num_shapes=2)
    half = 2 * WORLD_FPS
    clip = np.concatenate([render(spec, half), render_frames(SceneSpec(spec.shapes[:1], spec.background), half, half)])
    vanishing = stability(clip)
    assert not vanishing["stable"]
    assert all(w["count_ok"] for w in vanishing["windows"][:2])
    assert not any(w["count_ok"] for w in vanishing["windows"][2:])


def test_count_reversals_ignores_wiggles():
    assert count_reversals(np.array([0, 1, 2, 3, 2, 1, 0, 1, 2]), 1.5) == 2
    assert count_reversals(np.array([0, 1, 0.5, 2, 1.8, 3]), 1.0) == 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="frames"):
        analyse_frames(np.zeros((4, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="expected"):
        evaluate([render(sample_spec(0), 4)], [])
    with pytest.raises(ValueError, match="fps"):
        stability(render(sample_spec(0), 4))
