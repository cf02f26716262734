"""Frame sampling (every n-th frame or a target rate) and resizing (fit keeping aspect, or exact).

Both are plain values so the sequential decoder, the parallel decoder's workers and live sources
apply the very same rule: the parallel decoder computes which frames to keep from the packet
timestamps before decoding, with the same ``FrameSelector`` the sequential path runs frame by frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from numbers import Real

import av
import numpy as np

RGB_CHANNELS = 3
IMAGE_NDIM = 3  # [H, W, C]


@dataclass(frozen=True)
class Sampling:
    """Which frames to keep.

    Example::

        Sampling(every=2)    # frames 0, 2, 4, ...
        Sampling(fps=8)      # at most one frame per 1/8 s slot of stream time
    """

    every: int = 1
    """Keep every n-th frame (1 keeps all). Counted over the frames in presentation order."""
    fps: float | None = None
    """Target rate: time is cut into slots of ``1 / fps`` seconds from the first frame's time and the
    first frame of each slot is kept. A source slower than ``fps`` keeps every frame (no duplication)."""

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Sampling.every: expected an int >= 1, got {self.every!r}")
        if self.fps is not None:
            if not isinstance(self.fps, Real) or not self.fps > 0 or math.isinf(self.fps):
                raise ValueError(f"Sampling.fps: expected a finite number > 0 or None, got {self.fps!r}")
            if self.every != 1:
                raise ValueError(f"Sampling: give either every or fps, got every={self.every} and fps={self.fps}")

    @property
    def keeps_all(self) -> bool:
        return self.every == 1 and self.fps is None

    def selector(self) -> FrameSelector:
        return FrameSelector(self)

    def select(self, times: Iterable[Real]) -> list[bool]:
        """Keep/drop decision for each time of a whole stream (presentation order)."""
        selector = self.selector()
        return [selector.keep(t) for t in times]


class FrameSelector:
    """Stateful form of ``Sampling`` for frames that arrive one by one.

    Times may be ``float`` or ``Fraction`` (decoders pass exact ``pts * time_base`` fractions so the
    decision never depends on rounding).
    """

    def __init__(self, sampling: Sampling) -> None:
        self._sampling = sampling
        self._rate = None if sampling.fps is None else Fraction(sampling.fps)
        self._index = 0
        self._origin: Real | None = None
        self._last_slot: int | None = None

    def keep(self, time: Real) -> bool:
        index = self._index
        self._index += 1
        if self._rate is None:
            return index % self._sampling.every == 0
        if self._origin is None:
            self._origin = time
        slot = math.floor((time - self._origin) * self._rate)
        # ">" rather than "!=": a clock that steps back (webcams) must not re-open an older slot.
        if self._last_slot is not None and slot <= self._last_slot:
            return False
        self._last_slot = slot
        return True


@dataclass(frozen=True)
class Resize:
    """Output size of frames.

    With ``keep_aspect=True`` (default) the frame is scaled to fit inside ``width x height`` keeping
    its aspect ratio (one side may come out smaller; no padding, no crop). Give only ``width`` or
    only ``height`` to fix that side and derive the other from the aspect ratio. With
    ``keep_aspect=False`` the frame is stretched to exactly ``width x height``.
    Scaling is FFmpeg's swscale (through PyAV): area interpolation when shrinking, bilinear when enlarging.

    Example::

        Resize(width=640, height=360)(np.zeros((720, 1440, 3), np.uint8)).shape  # (320, 640, 3)
    """

    width: int | None = None
    height: int | None = None
    keep_aspect: bool = True

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Resize.{name}: expected an int >= 1 or None, got {value!r}")
        if self.width is None and self.height is None:
            raise ValueError("Resize: expected width and/or height, got neither")
        if not self.keep_aspect and (self.width is None or self.height is None):
            raise ValueError(
                f"Resize: keep_aspect=False needs both width and height, got width={self.width}, height={self.height}"
            )

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of a resized ``width x height`` frame."""
        if not self.keep_aspect:
            return self.width, self.height
        scales = []
        if self.width is not None:
            scales.append(self.width / width)
        if self.height is not None:
            scales.append(self.height / height)
        scale = min(scales)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def interpolation(self, width: int, height: int) -> str:
        """swscale interpolation for a ``width x height`` input: area when shrinking, else bilinear."""
        out_width, out_height = self.output_size(width, height)
        return "AREA" if out_width * out_height < width * height else "BILINEAR"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Resize ``uint8 [H, W, 3]`` RGB ``image``; returns it unchanged when the size already matches."""
        height, width = image.shape[:2]
        out_width, out_height = self.output_size(width, height)
        if (out_width, out_height) == (width, height):
            return image
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        return frame.to_ndarray(
            format="rgb24", width=out_width, height=out_height, interpolation=self.interpolation(width, height)
        )


def check_rgb_frame(frame: object, name: str = "frame") -> np.ndarray:
    """Validate a frame handed in by code: ``uint8 [H, W, 3]`` numpy array (RGB)."""
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array uint8 [H, W, 3], got {type(frame).__name__}")
    if frame.dtype != np.uint8 or frame.ndim != IMAGE_NDIM or frame.shape[-1] != RGB_CHANNELS:
        raise ValueError(f"{name}: expected uint8 [H, W, 3] RGB, got {frame.dtype} {list(frame.shape)}")
    return frame
