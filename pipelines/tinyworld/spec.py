"""The tiny world's vocabulary of things: palette, shapes, sizes, motions and the scene dataclasses.

Units are resolution independent. Positions are fractions of the frame (``x`` of the width, ``y`` of the
height); lengths and speeds are fractions of the frame's short side ``S = min(height, width)``; speeds are
per frame at :data:`WORLD_FPS`. A medium shape is therefore the same share of a 64x64 and a 128x128 frame,
and crosses it in the same number of frames.

Palette choice: the seven shape colours are primaries, secondaries and white (each channel 0 or 255), so
they are at least 155 apart in RGB from each other and from the three dark background colours. Blue is pure
blue on purpose: a lighter blue lies close to the antialiased blends of cyan with magenta or navy, and
those seams would be mistaken for blue pixels. With this palette no blend of two palette colours has a third
shape colour as its nearest palette entry closer than 180, so a nearest-palette classifier never invents a
colour at an edge. HSV hue alone also separates the six chromatic ones (60 degrees apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WORLD_FPS = 16
"""Frame rate the world is defined at: speeds are fractions of the short side per frame at this rate."""

SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
"""Shape colours (RGB). Within one scene every shape has a different colour, so colour identifies an object."""

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "grey": (64, 64, 64),
    "navy": (0, 0, 100),
}
"""Background colours (RGB): dark, so no shape colour is ever near them."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape names. Squares are axis aligned; triangles are equilateral and point up."""

SIZES: dict[str, float] = {"small": 0.10, "medium": 0.14, "large": 0.19}
"""Size name -> equal-area radius as a fraction of the short side: every shape of one size covers
``pi * r**2`` pixels, so the evaluator reads size from area alone, whatever the shape."""

LINEAR_MOTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up-right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down-left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down-right": (math.sqrt(0.5), math.sqrt(0.5)),
}
"""Straight motions -> unit direction (x right, y down, image convention). These wrap around the frame edges
(the frame is a torus), so a mover never reverses and its direction stays measurable forever."""

STILL = "still"
BOUNCE = "bounce"
MOTIONS: tuple[str, ...] = (*LINEAR_MOTIONS, STILL, BOUNCE)
"""All motions. ``bounce`` moves vertically and reflects off the top and bottom edges (never wraps)."""

LAYOUTS: tuple[str, ...] = ("plain", "top-bottom", "left-right")
"""Background layouts: one colour, or two colours split into top/bottom or left/right halves."""

# Outline geometry for the equal-area radius r (see SIZES): a square of side sqrt(pi) r and an equilateral
# triangle of side sqrt(4 pi / sqrt(3)) r both cover pi r^2.
SQUARE_HALF_SIDE = math.sqrt(math.pi) / 2
TRIANGLE_SIDE = math.sqrt(4 * math.pi / math.sqrt(3))
TRIANGLE_HEIGHT = TRIANGLE_SIDE * math.sqrt(3) / 2


@dataclass(frozen=True)
class ShapeSpec:
    """One object of a scene and its motion."""

    shape: str
    """One of :data:`SHAPES`."""
    colour: str
    """One of :data:`SHAPE_COLOURS`; unique within a scene."""
    size: str
    """One of :data:`SIZES`."""
    motion: str
    """One of :data:`MOTIONS`."""
    x: float
    """Centre at frame 0, fraction of the width in [0, 1)."""
    y: float
    """Centre at frame 0, fraction of the height in [0, 1)."""
    speed: float = 0.0
    """Fraction of the short side travelled per frame at WORLD_FPS (0 for ``still``)."""
    starts_downward: bool = True
    """Only for ``bounce``: whether the first vertical step goes down."""

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(SHAPE_COLOURS)),
            ("size", self.size, tuple(SIZES)),
            ("motion", self.motion, MOTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"ShapeSpec.{name}: expected one of {list(allowed)}, got {value!r}")
        if self.speed < 0:
            raise ValueError(f"ShapeSpec.speed: expected >= 0 (direction comes from motion), got {self.speed}")


@dataclass(frozen=True)
class BackgroundSpec:
    """A plain or two-tone background. For two-tone layouts ``colours[0]`` is the top (or left) half."""

    colours: tuple[str, ...] = ("black",)
    """One colour for ``plain``, two different colours otherwise; names from :data:`BACKGROUND_COLOURS`."""
    layout: str = "plain"
    """One of :data:`LAYOUTS`."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"BackgroundSpec.layout: expected one of {list(LAYOUTS)}, got {self.layout!r}")
        expected = 1 if self.layout == "plain" else 2
        if len(self.colours) != expected or len(set(self.colours)) != expected:
            raise ValueError(
                f"BackgroundSpec.colours: expected {expected} different colour(s) for layout {self.layout!r}, "
                f"got {self.colours!r}"
            )
        for name in self.colours:
            if name not in BACKGROUND_COLOURS:
                raise ValueError(
                    f"BackgroundSpec.colours: expected names from {list(BACKGROUND_COLOURS)}, got {name!r}"
                )


@dataclass(frozen=True)
class SceneSpec:
    """A whole clip: objects drawn largest first (smaller ones on top, so none is ever fully hidden)."""

    shapes: tuple[ShapeSpec, ...]
    background: BackgroundSpec = field(default_factory=BackgroundSpec)

    def __post_init__(self) -> None:
        if not self.shapes:
            raise ValueError("SceneSpec.shapes: expected at least one shape, got none")
        colours = [s.colour for s in self.shapes]
        if len(set(colours)) != len(colours):
            raise ValueError(f"SceneSpec.shapes: expected a different colour per shape, got {colours}")


@dataclass(frozen=True)
class ObjectDescription:
    """What a caption says about one object (no positions or speeds)."""

    colour: str
    shape: str
    size: str
    motion: str


@dataclass(frozen=True)
class SceneDescription:
    """What a caption says about a scene: the inverse of the caption grammar."""

    objects: tuple[ObjectDescription, ...]
    background: BackgroundSpec


def describe(spec: SceneSpec) -> SceneDescription:
    """Drop positions and speeds: the part of ``spec`` a caption (and the evaluator) can see."""
    objects = tuple(ObjectDescription(s.colour, s.shape, s.size, s.motion) for s in spec.shapes)
    return SceneDescription(objects, spec.background)


def half_extent(shape: str, radius: float) -> tuple[float, float]:
    """Half width and half height of ``shape`` with equal-area ``radius`` (same unit as ``radius``)."""
    if shape == "circle":
        return radius, radius
    if shape == "square":
        return SQUARE_HALF_SIDE * radius, SQUARE_HALF_SIDE * radius
    if shape == "triangle":
        return TRIANGLE_SIDE * radius / 2, TRIANGLE_HEIGHT * radius / 2
    raise ValueError(f"shape: expected one of {list(SHAPES)}, got {shape!r}")


def outline(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Polygon vertices (x, y) of a square or triangle centred (bounding box centre) at ``(cx, cy)``."""
    hw, hh = half_extent(shape, radius)
    if shape == "square":
        return [(cx - hw, cy - hh), (cx + hw, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh)]
    if shape == "triangle":
        return [(cx, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh)]
    raise ValueError(f"shape: expected 'square' or 'triangle' for a polygon outline, got {shape!r}")
