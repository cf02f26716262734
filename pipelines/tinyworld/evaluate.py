"""OpenCV evaluator of tiny-world clips: what objects are there, what they look like, where they go.

No learned judge: pixels are labelled with the nearest palette colour (``segment.py``), joined into
components on the torus (shapes that wrapped around an edge count once), classified by rotation-invariant
fills of their contour, and tracked per colour (colours are unique within a scene). Frames in which an
object is partly hidden (its area drops) are left out of its shape, size and motion estimates.

Example:
    >>> spec = sample_spec(3)
    >>> clip = render(spec, 32)
    >>> score_clip(clip, spec)["objects"][0]["motion_ok"]
    True
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .captions import parse_caption
from .segment import (
    COLOUR_NAMES,
    UNKNOWN,
    Blob,
    classify_shape,
    classify_size,
    frame_blobs,
    label_pixels,
)
from .spec import (
    BOUNCE,
    LINEAR_MOTIONS,
    SIZES,
    STILL,
    WORLD_FPS,
    ObjectDescription,
    SceneDescription,
    SceneSpec,
    describe,
)
from .world import DEFAULT_SIZE

MIN_BLOB_FRACTION = 0.25
"""A component counts as an object when it covers this share of the smallest shape's area (else: speck)."""
MIN_PRESENCE = 0.5
"""Share of frames a colour must appear in to be reported as an object."""
MIN_MOTION_STEPS = 2
"""Frame-to-frame steps needed to judge motion."""
MAX_BRIDGE_FRAMES = 4
"""Longest gap (frames) a motion step may span over occluded frames: short enough that even a bounce
(<= 0.1 short sides per frame) cannot move half a frame and fool the wrap-around unwrapping."""
INTACT_AREA_TOLERANCE = 0.15
"""A blob is intact (not partly hidden) when its area is within this share of its usual area; subpixel
placement alone moves a small square's area by up to ~10 % at 64x64."""
STILL_MAX_SPEED = 0.006
"""Speeds (short side per frame) below this are ``still``; the slowest mover goes 0.02 (0.014 per axis)."""
BOUNCE_MIN_RETURN = 0.06
"""Vertical distance (short side) a track must come back from an extreme for the turn to count as a bounce
(a bounce travels >= 0.035 per frame, so three frames after a turn already clear it)."""
COLLAPSE_MAX_UNEXPLAINED = 0.25
"""Share of a frame in unknown colours or specks above which the frame counts as collapsed (noise).
Measured: <= 0.013 on clean renders, <= 0.033 blurred (sigma 1 px), 0.64 on uniform noise."""
COLLAPSE_MAX_HIGH_FREQUENCY = 0.12
"""Mean |Laplacian| of the grey frame / 255 above which a DEFAULT_SIZE frame counts as collapsed. Measured at
64x64: <= 0.073 on clean renders, 0.10 with Gaussian noise of sd 10 added, 0.14 on dark noise (sd 15), 0.71 on
uniform noise. Edges are denser in smaller frames, so the limit grows as DEFAULT_SIZE / short side below it."""
COLLAPSED_CLIP_FRACTION = 0.5
"""A clip is collapsed when more than this share of its frames is."""
STABILITY_TOLERANCE = 0.2
"""Stability: per-second object count and size may differ from the first second's by this share."""
MATCH_WEIGHTS = {"colour_ok": 4, "shape_ok": 2, "motion_ok": 2, "size_ok": 1}
"""Expected-to-detected matching maximises this weighted agreement; colour dominates."""


@dataclass(frozen=True)
class DetectedObject:
    """One tracked object (one shape colour) of a clip."""

    colour: str
    shape: str | None
    """Majority vote over intact (not partly hidden) frames; None when never measurable."""
    size: str
    motion: str | None
    """One of spec.MOTIONS; None when the track is too short."""
    presence: float
    """Share of frames the object is seen in."""
    mean_area: float
    """Mean area when seen, as a share of the frame."""
    velocity: tuple[float, float]
    """Median step (x, y) in short sides per frame (y grows downward)."""
    track: np.ndarray
    """float [T, 2] centroid (x, y) in pixels per frame, NaN where absent."""


@dataclass
class ClipAnalysis:
    """Per-frame measurements of a clip, the input of every score."""

    height: int
    width: int
    blobs: list[list[Blob]]
    """Per frame, the blobs found."""
    unexplained: np.ndarray
    """float [T]: share of each frame in unknown colours or specks."""
    high_frequency: np.ndarray
    """float [T]: mean |Laplacian| of each grey frame / 255."""

    @property
    def collapsed(self) -> np.ndarray:
        """bool [T]: frames that look like noise or hold no clean shape at all."""
        empty = np.array([not found for found in self.blobs], bool)
        high_frequency_limit = COLLAPSE_MAX_HIGH_FREQUENCY * max(1.0, DEFAULT_SIZE / min(self.height, self.width))
        return empty | (self.unexplained > COLLAPSE_MAX_UNEXPLAINED) | (self.high_frequency > high_frequency_limit)


def _min_area(height: int, width: int) -> int:
    smallest = math.pi * (min(SIZES.values()) * min(height, width)) ** 2
    return max(1, round(MIN_BLOB_FRACTION * smallest))


def analyse_clip(frames: np.ndarray) -> ClipAnalysis:
    """Label, segment and measure every frame of uint8 [T, H, W, 3] (RGB) ``frames``."""
    labels = label_pixels(frames)  # validates frames
    num_frames, height, width = labels.shape
    min_area = _min_area(height, width)
    blobs, unexplained, high_frequency = [], np.empty(num_frames), np.empty(num_frames)
    for t in range(num_frames):
        found, speck_pixels = frame_blobs(labels[t], min_area)
        blobs.append(found)
        unexplained[t] = (speck_pixels + np.count_nonzero(labels[t] == UNKNOWN)) / (height * width)
        grey = cv2.cvtColor(frames[t], cv2.COLOR_RGB2GRAY).astype(np.float32)
        high_frequency[t] = np.abs(cv2.Laplacian(grey, cv2.CV_32F)).mean() / 255.0
    return ClipAnalysis(height, width, blobs, unexplained, high_frequency)


def _wrapped(delta: np.ndarray, period: int) -> np.ndarray:
    """Shortest signed displacement on a circle of length ``period``."""
    return (delta + period / 2) % period - period / 2


def count_reversals(path: np.ndarray, threshold: float) -> int:
    """Direction changes of a 1-D ``path`` [N], ignoring wiggles smaller than ``threshold`` (a zigzag filter:
    a leg starts once the path has moved ``threshold`` from its start, and turns when the path has come back
    ``threshold`` from the leg's extreme)."""
    direction, extreme, reversals = 0.0, float(path[0]), 0
    for point in path[1:]:
        if direction == 0.0:
            if abs(point - extreme) >= threshold:
                direction, extreme = math.copysign(1.0, point - extreme), float(point)
        elif direction * (point - extreme) > 0:
            extreme = float(point)
        elif direction * (extreme - point) >= threshold:
            direction, extreme, reversals = -direction, float(point), reversals + 1
    return reversals


def classify_motion(
    track: np.ndarray, usable: np.ndarray, height: int, width: int
) -> tuple[str | None, tuple[float, float]]:
    """Motion name and median velocity of a centroid track.

    ``track`` float [T, 2] pixels (NaN: absent); ``usable`` bool [T]: frames whose centroid is trustworthy
    (seen and intact). Steps join consecutive usable frames up to MAX_BRIDGE_FRAMES apart; if there are too
    few, any seen frames. Returns (motion or None, (vx, vy) in short sides per frame).
    """
    seen = ~np.isnan(track[:, 0])
    frames = np.flatnonzero(usable & seen)
    if np.count_nonzero(np.diff(frames) <= MAX_BRIDGE_FRAMES) < MIN_MOTION_STEPS:
        frames = np.flatnonzero(seen)
    gaps = np.diff(frames)
    bridged = gaps <= MAX_BRIDGE_FRAMES
    if np.count_nonzero(bridged) < MIN_MOTION_STEPS:
        return None, (math.nan, math.nan)
    side = min(height, width)
    moves = np.diff(track[frames], axis=0)[bridged]  # [steps, 2]
    dx = _wrapped(moves[:, 0], width) / side
    dy = _wrapped(moves[:, 1], height) / side
    gaps = gaps[bridged]
    vx, vy = float(np.median(dx / gaps)), float(np.median(dy / gaps))
    vertical_path = np.concatenate([[0.0], np.cumsum(dy)])
    bounces = count_reversals(vertical_path, BOUNCE_MIN_RETURN) > 0
    if bounces and abs(vx) < STILL_MAX_SPEED and np.median(np.abs(dy / gaps)) >= STILL_MAX_SPEED:
        return BOUNCE, (vx, vy)
    if math.hypot(vx, vy) < STILL_MAX_SPEED:
        return STILL, (vx, vy)
    name = max(LINEAR_MOTIONS, key=lambda m: LINEAR_MOTIONS[m][0] * vx + LINEAR_MOTIONS[m][1] * vy)
    return name, (vx, vy)


def _track_colour(analysis: ClipAnalysis, colour: str) -> DetectedObject | None:
    num_frames = len(analysis.blobs)
    track = np.full((num_frames, 2), np.nan)
    chosen: dict[int, Blob] = {}
    for t, found in enumerate(analysis.blobs):
        mine = [b for b in found if b.colour == colour]
        if mine:
            chosen[t] = max(mine, key=lambda b: b.area)  # the object itself, not a split-off sliver
            track[t] = chosen[t].x, chosen[t].y
    if not chosen or len(chosen) < MIN_PRESENCE * num_frames:
        return None
    # Intact frames: the object has its usual area. A shape lying on top of another is intact (geometry and
    # centroid are right) even though it touches; one partly covered is not.
    clear_areas = [b.area for b in chosen.values() if not b.touching]
    reference = float(np.median(clear_areas)) if clear_areas else max(b.area for b in chosen.values())
    intact = {t: b for t, b in chosen.items() if abs(b.area / reference - 1.0) <= INTACT_AREA_TOLERANCE}
    usable = np.zeros(num_frames, bool)
    usable[list(intact)] = True
    measured = list((intact or chosen).values())
    votes = Counter(classify_shape(b.fills) for b in measured if b.fills is not None)
    shape = votes.most_common(1)[0][0] if votes else None
    size = classify_size(float(np.median([b.area for b in measured])), analysis.height, analysis.width)
    motion, velocity = classify_motion(track, usable, analysis.height, analysis.width)
    return DetectedObject(
        colour=colour,
        shape=shape,
        size=size,
        motion=motion,
        presence=len(chosen) / num_frames,
        mean_area=float(np.mean([b.area for b in chosen.values()])) / (analysis.height * analysis.width),
        velocity=velocity,
        track=track,
    )


def detect_objects(analysis: ClipAnalysis) -> list[DetectedObject]:
    """Objects of an analysed clip, one per shape colour seen in at least MIN_PRESENCE of the frames."""
    objects = (_track_colour(analysis, colour) for colour in COLOUR_NAMES)
    return [o for o in objects if o is not None]


def analyse_frames(frames: np.ndarray) -> list[DetectedObject]:
    """Objects of uint8 [T, H, W, 3] (RGB) ``frames`` with colour, shape, size, motion and track."""
    return detect_objects(analyse_clip(frames))


# ------------------------------------------------------------------------------------------------ scoring


def _expected(expected: SceneSpec | SceneDescription | str) -> SceneDescription:
    if isinstance(expected, SceneSpec):
        return describe(expected)
    if isinstance(expected, SceneDescription):
        return expected
    if isinstance(expected, str):
        return parse_caption(expected)
    raise TypeError(f"expected: expected a SceneSpec, SceneDescription or caption str, got {type(expected).__name__}")


def _agreement(want: ObjectDescription, got: DetectedObject | None) -> dict[str, bool]:
    if got is None:
        return dict.fromkeys(MATCH_WEIGHTS, False)
    return {
        "colour_ok": got.colour == want.colour,
        "shape_ok": got.shape == want.shape,
        "motion_ok": got.motion == want.motion,
        "size_ok": got.size == want.size,
    }


def _match(wanted: Sequence[ObjectDescription], found: Sequence[DetectedObject]) -> list[int | None]:
    """Injective assignment expected -> detected index (or None) maximising the weighted agreement."""
    candidates: list[int | None] = [*range(len(found)), *([None] * len(wanted))]
    best, best_score = [None] * len(wanted), -1
    # dict.fromkeys drops the repeats the padding Nones create and keeps a deterministic order.
    for choice in dict.fromkeys(itertools.permutations(candidates, len(wanted))):
        score = 0
        for want, index in zip(wanted, choice, strict=True):
            agreement = _agreement(want, None if index is None else found[index])
            score += sum(MATCH_WEIGHTS[k] for k, ok in agreement.items() if ok)
        if score > best_score:
            best, best_score = list(choice), score
    return best


def _summary(o: DetectedObject) -> dict:
    return {"colour": o.colour, "shape": o.shape, "size": o.size, "motion": o.motion, "presence": o.presence}


def score_analysis(analysis: ClipAnalysis, expected: SceneSpec | SceneDescription | str) -> dict:
    """:func:`score_clip` on an already analysed clip."""
    want = _expected(expected)
    found = detect_objects(analysis)
    assignment = _match(want.objects, found)
    objects = []
    for w, index in zip(want.objects, assignment, strict=True):
        got = None if index is None else found[index]
        entry = {"expected": vars(w).copy(), "detected": None if got is None else _summary(got)}
        entry.update(_agreement(w, got))
        objects.append(entry)
    collapsed = analysis.collapsed
    return {
        "objects": objects,
        "expected_count": len(want.objects),
        "detected_count": len(found),
        "count_ok": len(found) == len(want.objects),
        "mean_object_area": float(np.mean([o.mean_area for o in found])) if found else 0.0,
        "collapsed_fraction": float(collapsed.mean()),
        "collapsed": bool(collapsed.mean() > COLLAPSED_CLIP_FRACTION),
    }


def score_clip(frames: np.ndarray, expected: SceneSpec | SceneDescription | str) -> dict:
    """Score uint8 [T, H, W, 3] (RGB) ``frames`` against a spec, description or caption.

    Returns ``objects`` (per expected object, in caption order: ``expected``, matched ``detected`` or None,
    ``colour_ok``, ``shape_ok``, ``motion_ok``, ``size_ok``), ``expected_count``, ``detected_count``,
    ``count_ok``, ``mean_object_area`` (share of the frame), ``collapsed_fraction`` and ``collapsed``.
    Judging ``bounce`` needs a clip long enough to contain a reversal (see world.MIN_FRAMES_TO_JUDGE_BOUNCE).
    """
    return score_analysis(analyse_clip(frames), expected)


def evaluate(clips: Sequence[np.ndarray], expected: Sequence[SceneSpec | SceneDescription | str]) -> dict:
    """Accuracies over many clips: ``clips[i]`` uint8 [T, H, W, 3] judged against ``expected[i]``.

    Accuracies are over expected objects (a missing object fails every attribute). Returns ``clips``,
    ``objects``, ``colour_accuracy``, ``shape_accuracy``, ``motion_accuracy``, ``size_accuracy``,
    ``count_accuracy``, ``collapsed_clips`` and the per-clip ``scores``.
    """
    if len(clips) != len(expected):
        raise ValueError(f"expected: expected one entry per clip ({len(clips)}), got {len(expected)}")
    scores = [score_clip(clip, want) for clip, want in zip(clips, expected, strict=True)]
    objects = [o for s in scores for o in s["objects"]]

    def accuracy(key: str) -> float:
        return float(np.mean([o[key] for o in objects])) if objects else math.nan

    return {
        "clips": len(scores),
        "objects": len(objects),
        "colour_accuracy": accuracy("colour_ok"),
        "shape_accuracy": accuracy("shape_ok"),
        "motion_accuracy": accuracy("motion_ok"),
        "size_accuracy": accuracy("size_ok"),
        "count_accuracy": float(np.mean([s["count_ok"] for s in scores])) if scores else math.nan,
        "collapsed_clips": sum(s["collapsed"] for s in scores),
        "scores": scores,
    }


# ---------------------------------------------------------------------------------------------- stability


def _window_sizes(analysis: ClipAnalysis, frames: range) -> dict[str, float]:
    """Per colour, the median area of its largest blob over the window's unoccluded frames (NaN: always
    occluded there; absent colours are left out)."""
    areas: dict[str, list[float]] = {}
    for t in frames:
        largest: dict[str, Blob] = {}
        for b in analysis.blobs[t]:
            if b.colour not in largest or b.area > largest[b.colour].area:
                largest[b.colour] = b
        for colour, b in largest.items():
            areas.setdefault(colour, [])
            if not b.touching:
                areas[colour].append(b.area)
    return {c: float(np.median(a)) if a else math.nan for c, a in areas.items()}


def _size_ratio(reference: dict[str, float], window: dict[str, float]) -> float:
    """Total object area of a window over the reference's, on colours measurable in both; a colour that
    vanished counts as 0 and a new colour adds its full area."""
    before = after = 0.0
    for colour, area in reference.items():
        now = window.get(colour, 0.0)
        if math.isnan(area) or math.isnan(now):
            continue  # occluded throughout one of the windows: no unbiased size
        before, after = before + area, after + now
    after += sum(a for c, a in window.items() if c not in reference and not math.isnan(a))
    return after / before if before > 0 else (math.inf if after > 0 else 1.0)


def stability(frames: np.ndarray, fps: int = WORLD_FPS) -> dict:
    """How a long stream holds up: each second against the first one.

    ``frames`` uint8 [T, H, W, 3] (RGB), at least one second long. Per whole second: the median object
    count (blobs per frame) and the total unoccluded object area, compared with the first second within
    STABILITY_TOLERANCE, and the collapsed (noise-like) frames. Returns ``fps``, ``seconds``,
    ``reference_count``, ``windows`` (per second: ``second``, ``count``, ``size_ratio``, ``count_ok``,
    ``size_ok``, ``collapsed_frames``), ``count_stable_fraction``, ``size_stable_fraction``,
    ``frames_collapsed``, ``collapsed_fraction`` and ``stable`` (every second ok and no frame collapsed).

    Example:
        >>> stability(render(sample_spec(5), 20 * WORLD_FPS))["stable"]
        True
    """
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps: expected a positive int, got {fps!r}")
    if frames.ndim != 4 or frames.shape[0] < fps:
        raise ValueError(f"frames: expected [T, H, W, 3] with T >= fps ({fps}), got {list(frames.shape)}")
    analysis = analyse_clip(frames)
    counts = np.array([len(found) for found in analysis.blobs])
    collapsed = analysis.collapsed
    seconds = len(counts) // fps
    reference_count = float(np.median(counts[:fps]))
    reference_sizes = _window_sizes(analysis, range(fps))
    windows = []
    for second in range(seconds):
        span = range(second * fps, (second + 1) * fps)
        count = float(np.median(counts[span.start : span.stop]))
        ratio = _size_ratio(reference_sizes, _window_sizes(analysis, span))
        windows.append(
            {
                "second": second,
                "count": count,
                "size_ratio": ratio,
                "count_ok": abs(count - reference_count) <= STABILITY_TOLERANCE * reference_count,
                "size_ok": abs(ratio - 1.0) <= STABILITY_TOLERANCE,
                "collapsed_frames": int(collapsed[span.start : span.stop].sum()),
            }
        )
    frames_collapsed = int(collapsed.sum())
    count_stable = float(np.mean([w["count_ok"] for w in windows]))
    size_stable = float(np.mean([w["size_ok"] for w in windows]))
    return {
        "fps": fps,
        "seconds": seconds,
        "reference_count": reference_count,
        "windows": windows,
        "count_stable_fraction": count_stable,
        "size_stable_fraction": size_stable,
        "frames_collapsed": frames_collapsed,
        "collapsed_fraction": frames_collapsed / len(counts),
        "stable": count_stable == 1.0 and size_stable == 1.0 and frames_collapsed == 0 and reference_count > 0,
    }
