import dataclasses
import itertools

import numpy as np
import pytest

from stream_runtime.pipelines.tinyworld.spec import (
    BACKGROUND_COLOURS,
    MOTIONS,
    SHAPE_COLOURS,
    SHAPES,
    BackgroundSpec,
    SceneSpec,
    ShapeSpec,
    describe,
)
from stream_runtime.pipelines.tinyworld.world import (
    HELD_OUT_COUNT,
    MAX_SHAPES,
    caption,
    held_out_captions,
    held_out_seeds,
    parse_caption,
    render,
    render_frames,
    sample_spec,
    split_of,
    train_seeds,
    vocabulary,
)

MANY = 400


def test_same_seed_same_spec_and_clip():
    assert sample_spec(11) == sample_spec(11)
    np.testing.assert_array_equal(render(sample_spec(11), 6), render(sample_spec(11), 6))
    assert sample_spec(11) != sample_spec(12)


def test_generator_seed_is_advanced():
    rng = np.random.default_rng(3)
    assert sample_spec(rng) != sample_spec(rng)


@pytest.mark.parametrize("seed", [0, 5, 17, 42])
def test_rendering_in_pieces_equals_one_go(seed):
    spec = sample_spec(seed)
    whole = render_frames(spec, 0, 40)
    pieces = np.concatenate([render_frames(spec, a, b - a) for a, b in [(0, 7), (7, 8), (8, 29), (29, 40)]])
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_array_equal(render_frames(spec, 998, 5)[2:], render_frames(spec, 1000, 3))


@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 96), (128, 128), (48, 80)])
def test_render_shape_dtype_and_palette(height, width):
    spec = sample_spec(9)
    clip = render(spec, 3, height, width, antialias=False)
    assert clip.shape == (3, height, width, 3) and clip.dtype == np.uint8
    # Without antialiasing every pixel is a palette colour of this scene.
    allowed = {SHAPE_COLOURS[s.colour] for s in spec.shapes} | {BACKGROUND_COLOURS[c] for c in spec.background.colours}
    assert {tuple(p) for p in clip.reshape(-1, 3)} <= allowed


def test_motion_is_resolution_independent():
    """Same spec at 64 and 128: positions scale with the frame (compare the first object's colour mask)."""
    spec = SceneSpec((ShapeSpec("square", "red", "medium", "right", 0.3, 0.5, 0.02),))
    small, large = render(spec, 20, 64, 64, False), render(spec, 20, 128, 128, False)

    def centre_x(clip):
        return np.array([np.nonzero((f == SHAPE_COLOURS["red"]).all(-1))[1].mean() for f in clip]) / clip.shape[2]

    np.testing.assert_allclose(centre_x(small), centre_x(large), atol=0.02)


def test_bounce_stays_inside_and_wrap_shows_split():
    bounce = SceneSpec((ShapeSpec("circle", "green", "large", "bounce", 0.5, 0.5, 0.05),))
    clip = render(bounce, 60, antialias=False)
    rows = (clip == SHAPE_COLOURS["green"]).all(-1).any(-1)  # [T, H]
    assert not (rows[:, 0] & rows[:, -1]).any(), "a bouncing shape never wraps"
    mover = SceneSpec((ShapeSpec("circle", "green", "large", "left", 0.02, 0.5, 0.03),))
    cols = (render(mover, 1, antialias=False)[0] == SHAPE_COLOURS["green"]).all(-1).any(0)  # [W]
    assert cols[0] and cols[-1], "a mover at the left edge reappears on the right"


def test_sampled_specs_cover_the_world():
    specs = [sample_spec(s) for s in range(MANY)]
    assert all(1 <= len(s.shapes) <= MAX_SHAPES for s in specs)
    shapes = [o for s in specs for o in s.shapes]
    assert {o.shape for o in shapes} == set(SHAPES)
    assert {o.motion for o in shapes} == set(MOTIONS)
    assert {o.colour for o in shapes} == set(SHAPE_COLOURS)
    assert {s.background.layout for s in specs} == {"plain", "top-bottom", "left-right"}
    assert len({caption(s) for s in specs}) > 0.95 * MANY


def test_caption_round_trip():
    for seed in range(MANY):
        spec = sample_spec(seed)
        assert parse_caption(caption(spec)) == describe(spec)
    text = (
        "a small red circle moving up-left and a large blue square bouncing on a navy top and black bottom background"
    )
    parsed = parse_caption(text)
    assert parsed.background == BackgroundSpec(("navy", "black"), "top-bottom")
    assert [o.motion for o in parsed.objects] == ["up-left", "bounce"]
    assert parse_caption("  A small red circle staying   still on a grey background ").objects[0].motion == "still"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a small red circle moving left",
        "a huge red circle moving left on a black background",
        "a small red circle moving sideways on a black background",
        "a small red circle moving left on a pink background",
        "a small red circle moving left and a large red square bouncing on a black background",
        "a small red circle moving left on a black top and grey right background",
    ],
)
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(text)


def test_vocabulary_covers_every_caption_word():
    words = set(vocabulary())
    used = {w for seed in range(MANY) for w in caption(sample_spec(seed)).split(" ")}
    assert used <= words
    assert vocabulary() == sorted(words)


def test_held_out_split_is_explicit_and_disjoint():
    held = held_out_seeds()
    assert len(held) == HELD_OUT_COUNT >= 50 and held == held_out_seeds()
    assert all(split_of(s) == "held_out" for s in held)
    train = list(itertools.islice(train_seeds(), 200))
    assert train == list(itertools.islice(train_seeds(), 200))
    assert not set(train) & set(held)
    assert not {caption(sample_spec(s)) for s in train} & held_out_captions()
    assert list(itertools.islice(train_seeds(start=5), 3)) == train[5:8]


def test_spec_validation_names_the_argument():
    good = ShapeSpec("circle", "red", "small", "left", 0.5, 0.5, 0.02)
    with pytest.raises(ValueError, match="ShapeSpec.colour"):
        dataclasses.replace(good, colour="pink")
    with pytest.raises(ValueError, match="SceneSpec.shapes"):
        SceneSpec((good, dataclasses.replace(good, shape="square")))
    with pytest.raises(ValueError, match="BackgroundSpec.colours"):
        BackgroundSpec(("navy", "navy"), "top-bottom")
    with pytest.raises(ValueError, match="height"):
        render(SceneSpec((good,)), 2, height=8)
