"""Per-frame image analysis for the tiny-world evaluator: palette labelling, torus components, shape geometry.

Everything here looks at single frames; tracking over time lives in ``evaluate.py``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from .spec import BACKGROUND_COLOURS, SHAPE_COLOURS, SIZES

COLOUR_NAMES: tuple[str, ...] = tuple(SHAPE_COLOURS)
"""Label ``i >= 0`` means ``COLOUR_NAMES[i]``."""
BACKGROUND = -1
"""Label of pixels nearest to a background colour."""
UNKNOWN = -2
"""Label of pixels nearest to a shape colour but too far from it (antialiased edges, blends, noise)."""
COLOUR_MATCH_MAX_DISTANCE = 100.0
"""RGB distance under which a pixel counts as a shape colour; shape colours are >= 155 apart (spec.py)."""
_PALETTE = np.array([*SHAPE_COLOURS.values(), *BACKGROUND_COLOURS.values()], np.float32)  # [P, 3]
_LUT_BITS = 6
"""Bits per channel of the colour lookup table: 64**3 entries, labels exact to 4 RGB levels."""

SHAPE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "circle": (0.79, 0.60, 0.92),
    "square": (1.00, 0.50, 0.64),
    "triangle": (0.50, 0.95, 0.42),
}
"""Shape -> (area / min-area rectangle, area / min enclosing triangle, area / min enclosing circle), as
measured on clean renders at 64x64 (ideal values: circle .785/.605/1, square 1/.5/.637, triangle .5/1/.413).
These fills are rotation invariant, so a slightly rotated model output still classifies."""
MIN_CONTOUR_POINTS = 3

_SIZE_NAMES = tuple(SIZES)
# Boundaries between size classes: geometric means of neighbouring radii, lifted by the area that
# rasterisation adds to a drawn shape (measured: +4 % to +30 % at 64x64, the most for small shapes).
_RASTER_AREA_GAIN = 1.1
SIZE_BOUNDARIES: tuple[float, ...] = tuple(
    math.sqrt(SIZES[a] * SIZES[b] * _RASTER_AREA_GAIN) for a, b in zip(_SIZE_NAMES[:-1], _SIZE_NAMES[1:], strict=True)
)
"""Equal-area radius (fraction of the short side) separating small/medium and medium/large."""


@functools.cache
def _label_table() -> np.ndarray:
    """int8 [2**(3*_LUT_BITS)]: the label of every quantised RGB colour (bin centres), built once."""
    levels = (np.arange(1 << _LUT_BITS, dtype=np.float32) + 0.5) * (1 << (8 - _LUT_BITS))
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    colours = np.stack([r.ravel(), g.ravel(), b.ravel()], 1)  # [N, 3]
    dist = ((colours[:, None, :] - _PALETTE[None]) ** 2).sum(-1)  # [N, P]
    nearest = dist.argmin(-1)
    is_shape = nearest < len(COLOUR_NAMES)
    table = np.where(is_shape, nearest, BACKGROUND).astype(np.int8)
    table[is_shape & (dist.min(-1) > COLOUR_MATCH_MAX_DISTANCE**2)] = UNKNOWN
    return table


def label_pixels(frames: np.ndarray) -> np.ndarray:
    """Nearest-palette labels: uint8 [T, H, W, 3] RGB -> int8 [T, H, W].

    ``i >= 0``: shape colour ``COLOUR_NAMES[i]``; ``BACKGROUND``: nearest to a background colour;
    ``UNKNOWN``: nearest to a shape colour but further than ``COLOUR_MATCH_MAX_DISTANCE``.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 [T, H, W, 3] (RGB), got {frames.dtype} {list(frames.shape)}")
    drop = 8 - _LUT_BITS
    q = frames >> drop
    index = (q[..., 0].astype(np.int32) << (2 * _LUT_BITS)) | (q[..., 1].astype(np.int32) << _LUT_BITS) | q[..., 2]
    return _label_table()[index]


def torus_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of bool [H, W] ``mask`` with left/right and top/bottom edges glued.

    A shape that wrapped around an edge comes back as one component. Returns (int32 [H, W] labels with 0 as
    background and 1..n the components, n).
    """
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return labels, count - 1
    edges_meet = (labels[:, 0].any() and labels[:, -1].any()) or (labels[0, :].any() and labels[-1, :].any())
    if not edges_meet:
        return labels, count - 1
    parent = np.arange(count)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    pairs = []
    for first, last in ((labels[:, 0], labels[:, -1]), (labels[0, :], labels[-1, :])):
        for shift in (-1, 0, 1):  # 8-connectivity across the seam
            other = np.roll(last, shift)
            both = (first > 0) & (other > 0)
            pairs.append(np.stack([first[both], other[both]], 1))
    for a, b in np.unique(np.concatenate(pairs), axis=0):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(count)])
    _, relabel = np.unique(roots, return_inverse=True)  # root 0 (background) stays 0
    return relabel[labels].astype(np.int32), int(relabel.max())


def circular_centroid(ys: np.ndarray, xs: np.ndarray, height: int, width: int) -> tuple[float, float]:
    """Centroid (x, y) in pixels of pixel coordinates on the torus (exact for a shape split by an edge)."""
    out = []
    for coords, period in ((xs, width), (ys, height)):
        angle = coords * (2 * math.pi / period)
        mean = math.atan2(np.sin(angle).mean(), np.cos(angle).mean())
        out.append((mean * period / (2 * math.pi)) % period)
    return out[0], out[1]


def shape_fills(mask: np.ndarray, cx: float, cy: float) -> tuple[float, float, float] | None:
    """The three rotation-invariant fills of SHAPE_PROTOTYPES for the component in bool [H, W] ``mask``.

    The mask is first rolled so the centroid ``(cx, cy)`` sits mid-frame, which makes a wrapped shape whole.
    Returns None for a component too small to have a contour.
    """
    height, width = mask.shape
    rolled = np.roll(mask, (height // 2 - round(cy), width // 2 - round(cx)), axis=(0, 1))
    contours, _ = cv2.findContours(rolled.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    area = cv2.contourArea(contour)
    if len(contour) < MIN_CONTOUR_POINTS or area <= 0:
        return None
    _, (rect_w, rect_h), _ = cv2.minAreaRect(contour)
    triangle_area, _ = cv2.minEnclosingTriangle(contour.astype(np.float32))
    _, circle_radius = cv2.minEnclosingCircle(contour)
    if rect_w * rect_h <= 0 or triangle_area <= 0 or circle_radius <= 0:
        return None
    return area / (rect_w * rect_h), area / triangle_area, area / (math.pi * circle_radius**2)


def classify_shape(fills: tuple[float, float, float]) -> str:
    """Nearest shape prototype to ``fills`` (see SHAPE_PROTOTYPES)."""
    return min(SHAPE_PROTOTYPES, key=lambda name: math.dist(fills, SHAPE_PROTOTYPES[name]))


def classify_size(area: float, height: int, width: int) -> str:
    """Size class from a pixel area: shapes of one size have equal areas whatever their kind."""
    radius = math.sqrt(area / math.pi) / min(height, width)
    for name, boundary in zip(_SIZE_NAMES[:-1], SIZE_BOUNDARIES, strict=True):
        if radius < boundary:
            return name
    return _SIZE_NAMES[-1]


@dataclass(frozen=True)
class Blob:
    """One torus component of one shape colour in one frame."""

    colour: str
    area: int
    """Pixels."""
    x: float
    """Circular centroid, pixels."""
    y: float
    touching: bool
    """Whether another shape colour is within CONTACT_RADIUS px (occlusion: geometry is unreliable)."""
    fills: tuple[float, float, float] | None
    """Shape fills (see shape_fills), None when not measurable."""


CONTACT_RADIUS = 2
"""Pixels between two colours' masks below which they count as touching (antialiased seams are ~1 px)."""
_CONTACT_KERNEL = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * CONTACT_RADIUS + 1, 2 * CONTACT_RADIUS + 1))


def frame_blobs(labels: np.ndarray, min_area: int) -> tuple[list[Blob], int]:
    """Blobs of one frame's int8 [H, W] ``labels`` with at least ``min_area`` pixels.

    Returns (blobs, pixels of shape colours in smaller specks): the speck count feeds the collapse test.
    """
    height, width = labels.shape
    blobs: list[Blob] = []
    speck_pixels = 0
    shape_pixels = labels >= 0
    for index, name in enumerate(COLOUR_NAMES):
        mask = labels == index
        if not mask.any():
            continue
        # Contact with a different shape colour, wrapped like the frame.
        others = np.pad(shape_pixels & ~mask, CONTACT_RADIUS, mode="wrap").astype(np.uint8)
        near_other = cv2.dilate(others, _CONTACT_KERNEL)[CONTACT_RADIUS:-CONTACT_RADIUS, CONTACT_RADIUS:-CONTACT_RADIUS]
        components, count = torus_components(mask)
        areas = np.bincount(components.ravel(), minlength=count + 1)
        large = np.flatnonzero(areas[1:] >= min_area) + 1
        speck_pixels += int(areas[1:].sum() - areas[large].sum())
        for k in large:
            part = components == k
            ys, xs = np.nonzero(part)
            cx, cy = circular_centroid(ys, xs, height, width)
            touching = bool(near_other[ys, xs].any())
            blobs.append(Blob(name, len(ys), cx, cy, touching, shape_fills(part, cx, cy)))
    return blobs, speck_pixels
