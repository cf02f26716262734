"""The tiny world: sample a scene from a seed, render it as an endless stream, caption it, split seeds.

Motion rules (chosen so the evaluator can always see the direction):

- straight motions (left, right, up, down and the four diagonals) wrap around: the frame is a torus. A
  shape crossing an edge is drawn in two (or four) pieces; the evaluator joins pieces across edges and
  tracks centroids with circular means, so direction is never ambiguous and never reverses;
- ``bounce`` moves vertically and reflects off the top and bottom edges, staying whole; its speed is
  sampled so that it reverses every :data:`BOUNCE_HALF_PERIOD_FRAMES` frames, i.e. any clip of
  :data:`MIN_FRAMES_TO_JUDGE_BOUNCE` frames shows a reversal;
- ``still`` shapes never move and are placed wholly inside the frame.

Within a clip, all straight movers share one speed, so shapes heading the same way never run into each other.
Shapes are drawn largest first; a smaller shape is always on top and none can be fully hidden.

Example:
    >>> spec = sample_spec(7)
    >>> clip = render(spec, num_frames=32, height=64, width=64)  # uint8 [32, 64, 64, 3], RGB
    >>> text = caption(spec)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import cv2
import numpy as np

from .captions import caption, format_description, parse_caption, vocabulary
from .spec import (
    BACKGROUND_COLOURS,
    BOUNCE,
    LAYOUTS,
    LINEAR_MOTIONS,
    MOTIONS,
    SHAPE_COLOURS,
    SHAPES,
    SIZES,
    STILL,
    BackgroundSpec,
    SceneSpec,
    ShapeSpec,
    half_extent,
    outline,
)

__all__ = [
    "caption",
    "format_description",
    "parse_caption",
    "vocabulary",
    "render",
    "render_frames",
    "background_frame",
    "sample_spec",
    "held_out_seeds",
    "held_out_captions",
    "train_seeds",
    "split_of",
]

DEFAULT_SIZE = 64
"""Native square resolution of the embedded tiny model; any size >= MIN_SIDE renders."""
MIN_SIDE = 16
MAX_SHAPES = 3
LINEAR_SPEED_RANGE = (0.02, 0.04)
"""Straight-motion speed, fraction of the short side per frame (1.3 to 2.6 px/frame at 64x64, 16 fps)."""
BOUNCE_HALF_PERIOD_FRAMES = (10.0, 16.0)
"""Frames between two reversals of a bouncing shape (sampled per shape)."""
BOUNCE_VISIBLE_MARGIN_FRAMES = 3
"""Frames a bounce needs on each side of a reversal for the turn to be measurable."""
MIN_FRAMES_TO_JUDGE_BOUNCE = int(math.ceil(BOUNCE_HALF_PERIOD_FRAMES[1])) + 2 * BOUNCE_VISIBLE_MARGIN_FRAMES
"""Shortest clip that always shows a bounce turning (22 frames): shorter clips may see it go one way only."""
MIN_GAP = 0.03
"""Clearance between shapes' bounding boxes at frame 0, fraction of the short side."""
PLACEMENT_ATTEMPTS = 64
"""Position draws per layout before the sampler redraws the objects (e.g. three large still triangles)."""
_SUBPIXEL_BITS = 4
"""OpenCV fixed-point fraction bits: positions move smoothly by 1/16 px instead of jumping whole pixels."""

HELD_OUT_COUNT = 128
"""Seeds ``0 .. HELD_OUT_COUNT - 1`` are the held-out prompts; training seeds start after them and skip any
seed whose caption equals a held-out caption."""


# ----------------------------------------------------------------------------------------------- motion


def _centres(s: ShapeSpec, t: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centre (x, y) of ``s`` at absolute frame indices ``t`` [N] -> two arrays [N].

    Closed form in ``t`` (no integration), so a frame is the same whether rendered alone or in a batch.
    """
    side = min(height, width)
    x0, y0 = s.x * width, s.y * height
    step = s.speed * side
    if s.motion == STILL:
        return np.full(t.shape, x0), np.full(t.shape, y0)
    if s.motion == BOUNCE:
        _, half_h = half_extent(s.shape, SIZES[s.size] * side)
        low, high = half_h, height - half_h
        span = max(high - low, 0.0)
        if span == 0.0:  # frame too flat to bounce in: hold the shape at mid height
            return np.full(t.shape, x0), np.full(t.shape, height / 2)
        # Unfold the reflection into a coordinate u on a circle of length 2*span: u in [0, span] moves down.
        offset = min(max(y0, low), high) - low
        u0 = offset if s.starts_downward else 2 * span - offset
        u = np.mod(u0 + step * t, 2 * span)
        return np.full(t.shape, x0), low + np.where(u <= span, u, 2 * span - u)
    dx, dy = LINEAR_MOTIONS[s.motion]
    return np.mod(x0 + dx * step * t, width), np.mod(y0 + dy * step * t, height)


# -------------------------------------------------------------------------------------------- rendering


def _background(background: BackgroundSpec, height: int, width: int) -> np.ndarray:
    frame = np.empty((height, width, 3), np.uint8)
    colours = [BACKGROUND_COLOURS[name] for name in background.colours]
    frame[:] = colours[0]
    if background.layout == "top-bottom":
        frame[height // 2 :] = colours[1]
    elif background.layout == "left-right":
        frame[:, width // 2 :] = colours[1]
    return frame


def background_frame(spec: SceneSpec, height: int = DEFAULT_SIZE, width: int = DEFAULT_SIZE) -> np.ndarray:
    """``spec``'s background alone, uint8 [height, width, 3] (RGB): every frame of its stream minus the shapes."""
    return _background(spec.background, height, width)


def _draw(frame: np.ndarray, s: ShapeSpec, cx: float, cy: float, radius: float, line_type: int) -> None:
    """Draw ``s`` centred at (cx, cy) plus, for wrapping movers, its copies that reach into the frame."""
    height, width = frame.shape[:2]
    scale = 1 << _SUBPIXEL_BITS
    colour = SHAPE_COLOURS[s.colour]
    half_w, half_h = half_extent(s.shape, radius)
    wraps = s.motion in LINEAR_MOTIONS
    for ox in (-width, 0, width) if wraps else (0,):
        for oy in (-height, 0, height) if wraps else (0,):
            x, y = cx + ox, cy + oy
            if x + half_w < -1 or x - half_w > width or y + half_h < -1 or y - half_h > height:
                continue
            if s.shape == "circle":
                centre = (round(x * scale), round(y * scale))
                cv2.circle(frame, centre, round(radius * scale), colour, -1, line_type, _SUBPIXEL_BITS)
            else:
                points = np.round(np.array(outline(s.shape, x, y, radius)) * scale).astype(np.int32)
                cv2.fillPoly(frame, [points], colour, line_type, _SUBPIXEL_BITS)


def _check_frame_args(height: int, width: int, start: int, count: int) -> None:
    for name, value, low in (
        ("height", height, MIN_SIDE),
        ("width", width, MIN_SIDE),
        ("start", start, 0),
        ("count", count, 0),
    ):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def render_frames(
    spec: SceneSpec,
    start: int,
    count: int,
    height: int = DEFAULT_SIZE,
    width: int = DEFAULT_SIZE,
    antialias: bool = True,
) -> np.ndarray:
    """Frames ``start .. start + count - 1`` of the endless stream of ``spec``.

    Returns uint8 [count, height, width, 3] (RGB). Frame ``t`` depends only on ``(spec, t, height, width,
    antialias)``, so ``render_frames(s, 0, 8)`` equals the concatenation of ``render_frames(s, 0, 3)`` and
    ``render_frames(s, 3, 5)``.
    """
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"spec: expected a SceneSpec, got {type(spec).__name__}")
    _check_frame_args(height, width, start, count)
    side = min(height, width)
    line_type = cv2.LINE_AA if antialias else cv2.LINE_8
    t = np.arange(start, start + count, dtype=np.float64)
    base = _background(spec.background, height, width)
    # Largest first; the sort is stable, so equal sizes keep spec order.
    order = sorted(spec.shapes, key=lambda s: -SIZES[s.size])
    tracks = [(s, *_centres(s, t, height, width)) for s in order]
    frames = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        frame = base.copy()
        for s, xs, ys in tracks:
            _draw(frame, s, float(xs[i]), float(ys[i]), SIZES[s.size] * side, line_type)
        frames[i] = frame
    return frames


def render(
    spec: SceneSpec, num_frames: int, height: int = DEFAULT_SIZE, width: int = DEFAULT_SIZE, antialias: bool = True
) -> np.ndarray:
    """The first ``num_frames`` frames of ``spec``: uint8 [num_frames, height, width, 3] (RGB)."""
    return render_frames(spec, 0, num_frames, height, width, antialias)


# --------------------------------------------------------------------------------------------- sampling


def _boxes_clear(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Whether two (x, y, half_w, half_h) boxes, in short-side units on the unit torus, keep MIN_GAP apart."""
    dx = abs(a[0] - b[0]) % 1.0
    dy = abs(a[1] - b[1]) % 1.0
    dx, dy = min(dx, 1.0 - dx), min(dy, 1.0 - dy)
    return dx > a[2] + b[2] + MIN_GAP or dy > a[3] + b[3] + MIN_GAP


def _place(rng: np.random.Generator, kinds: list[tuple[str, str, str]]) -> list[tuple[float, float]] | None:
    """Frame-0 positions for (shape, size, motion) triples without overlaps, or None if none was found.

    Positions are drawn on the unit square (exact for square frames, a conservative margin otherwise).
    """
    for _ in range(PLACEMENT_ATTEMPTS):
        boxes: list[tuple[float, float, float, float]] = []
        for shape, size, motion in kinds:
            half_w, half_h = half_extent(shape, SIZES[size])
            # Wrapping movers may start anywhere; still and bouncing shapes must start whole.
            wraps = motion in LINEAR_MOTIONS
            x = rng.uniform(0.0, 1.0) if wraps else rng.uniform(half_w, 1.0 - half_w)
            y = rng.uniform(0.0, 1.0) if wraps else rng.uniform(half_h, 1.0 - half_h)
            boxes.append((x, y, half_w, half_h))
        if all(_boxes_clear(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            return [(b[0], b[1]) for b in boxes]
    return None


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_spec(seed: int | np.random.Generator, num_shapes: int | None = None) -> SceneSpec:
    """A random scene, deterministic in ``seed`` (an int, or a Generator that is advanced).

    ``num_shapes`` (1 .. MAX_SHAPES) fixes the object count; by default it is uniform in that range.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if num_shapes is not None and not 1 <= num_shapes <= MAX_SHAPES:
        raise ValueError(f"num_shapes: expected 1 .. {MAX_SHAPES} or None, got {num_shapes}")
    count = num_shapes if num_shapes is not None else int(rng.integers(1, MAX_SHAPES + 1))
    while True:
        colours = [str(c) for c in rng.choice(list(SHAPE_COLOURS), size=count, replace=False)]
        kinds = [(_pick(rng, SHAPES), _pick(rng, list(SIZES)), _pick(rng, MOTIONS)) for _ in range(count)]
        positions = _place(rng, kinds)
        if positions is not None:
            break
    linear_speed = float(rng.uniform(*LINEAR_SPEED_RANGE))
    shapes = []
    for colour, (shape, size, motion), (x, y) in zip(colours, kinds, positions, strict=True):
        if motion == STILL:
            speed = 0.0
        elif motion == BOUNCE:
            _, half_h = half_extent(shape, SIZES[size])
            speed = (1.0 - 2 * half_h) / float(rng.uniform(*BOUNCE_HALF_PERIOD_FRAMES))
        else:
            speed = linear_speed
        down = bool(rng.integers(2))
        shapes.append(ShapeSpec(shape, colour, size, motion, x, y, speed, down))
    layout = _pick(rng, LAYOUTS)
    bg = [str(c) for c in rng.choice(list(BACKGROUND_COLOURS), size=1 if layout == "plain" else 2, replace=False)]
    return SceneSpec(tuple(shapes), BackgroundSpec(tuple(bg), layout))


# ------------------------------------------------------------------------------------------------ split


def held_out_seeds() -> list[int]:
    """The fixed held-out prompts: seeds ``0 .. HELD_OUT_COUNT - 1`` (never used for training)."""
    return list(range(HELD_OUT_COUNT))


@functools.cache
def held_out_captions() -> frozenset[str]:
    """Captions of the held-out seeds; training skips any seed that would repeat one."""
    return frozenset(caption(sample_spec(seed)) for seed in held_out_seeds())


def split_of(seed: int) -> str:
    """``"held_out"`` for held-out seeds, ``"excluded"`` for a training-range seed whose caption repeats a
    held-out caption, ``"train"`` otherwise."""
    if seed < 0:
        raise ValueError(f"seed: expected >= 0, got {seed}")
    if seed < HELD_OUT_COUNT:
        return "held_out"
    return "excluded" if caption(sample_spec(seed)) in held_out_captions() else "train"


def train_seeds(start: int = 0) -> Iterator[int]:
    """Endless training seeds (deterministic), skipping ``start`` of them; no held-out caption is repeated.

    Example: ``list(itertools.islice(train_seeds(), 1000))``.
    """
    seed, skipped = HELD_OUT_COUNT, 0
    while True:
        if split_of(seed) == "train":
            if skipped >= start:
                yield seed
            skipped += 1
        seed += 1
