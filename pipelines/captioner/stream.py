"""Sliding-window captions of an endless frame stream, in constant memory.

Each pushed frame goes through the captioner's per-frame layers once (front end, shape encoder, background head);
its features are kept in a ring of ``window_frames`` frames. Once the ring is full, every ``stride_frames`` new
frames give one caption of the last ``window_frames`` frames (windows overlap when the stride is shorter).
:meth:`CaptionStream.flush` captions the frames since the last caption at the end of a stream, so a stream shorter
than a window still gets one caption.

Example::

    stream = CaptionStream(TinyWorldCaptioner.from_pretrained(path), stride_frames=8)
    for frame in frames:                       # uint8 [64, 64, 3] RGB at the world's 16 fps
        for window in stream.push(frame[None]):
            print(window.first_frame, window.last_frame, window.caption)
    tail = stream.flush()
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields

import numpy as np
import torch

from .model import FrameFeatures, Prediction, TinyWorldCaptioner

_NAMES = tuple(f.name for f in fields(FrameFeatures))
DEFAULT_STRIDE_FRAMES = 8
"""New frames between two captions by default: half a second at the world's 16 fps."""


@dataclass(frozen=True)
class WindowCaption:
    """The caption of one window of the stream."""

    first_frame: int
    """Index (from 0, in pushed frames) of the window's first frame."""
    last_frame: int
    """Index of its last frame (inclusive)."""
    prediction: Prediction

    @property
    def caption(self) -> str:
        return self.prediction.caption


class CaptionStream:
    """Push frames, get :class:`WindowCaption`s (see the module docstring). Not thread-safe: one producer."""

    def __init__(self, model: TinyWorldCaptioner, stride_frames: int = DEFAULT_STRIDE_FRAMES) -> None:
        window = model.config.window_frames
        if not isinstance(stride_frames, int) or isinstance(stride_frames, bool) or not 1 <= stride_frames <= window:
            raise ValueError(f"stride_frames: expected an int in [1, window_frames = {window}], got {stride_frames!r}")
        self.model = model
        self.stride_frames = stride_frames
        self.frames_seen = 0
        self._ring: deque[FrameFeatures] = deque(maxlen=window)
        self._since_caption = 0

    @property
    def window_frames(self) -> int:
        return self.model.config.window_frames

    @torch.no_grad()
    def push(self, frames: np.ndarray) -> list[WindowCaption]:
        """Add uint8 ``[N, size, size, 3]`` RGB frames; return the captions they complete (often none)."""
        features = self.model.frame_features(frames)
        out = []
        for i in range(len(frames)):
            self._ring.append(_select(features, i))
            self.frames_seen += 1
            self._since_caption += 1
            if len(self._ring) == self.window_frames and self._since_caption >= self.stride_frames:
                out.append(self._caption())
        return out

    @torch.no_grad()
    def flush(self) -> WindowCaption | None:
        """Caption the last ``min(window, frames seen)`` frames if any frame came since the last caption. A
        one-frame stream is read as a still scene (its frame counts twice)."""
        if self._since_caption == 0 or not self._ring:
            return None
        return self._caption()

    def _caption(self) -> WindowCaption:
        ring = list(self._ring)
        if len(ring) == 1:
            ring = ring * 2
        window = FrameFeatures(*(torch.cat([getattr(f, name) for f in ring]) for name in _NAMES))
        prediction = self.model.decide(self.model.window_logits(window))
        self._since_caption = 0
        first = self.frames_seen - len(self._ring)
        return WindowCaption(first, self.frames_seen - 1, prediction)


def _select(features: FrameFeatures, index: int) -> FrameFeatures:
    """Frame ``index`` of a batch of features, as a batch of one."""
    return FrameFeatures(
        *(getattr(features, name)[index : index + 1] for name in _NAMES)  # [1, ...]
    )
