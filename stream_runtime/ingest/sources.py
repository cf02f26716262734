"""Frame sources with one interface: iterate ``(timestamp_seconds, frame uint8 [H, W, 3] RGB)``.

- ``FileSource``: a local file or anything PyAV opens (RTSP/HTTP/HLS URLs); local files can be
  decoded by the exact keyframe-parallel decoder (``workers > 1``).
- ``WebcamSource``: a capture device index (or a path/URL) through OpenCV's ``VideoCapture``.
- ``PushSource``: frames pushed by code (e.g. a websocket handler) into a bounded queue.

Every source takes ``sampling`` (``Sampling(fps=...)`` or ``Sampling(every=n)``) and ``resize``
(``Resize(width, height, keep_aspect=True)``); see ``sampling.py`` for the exact rules.

Example::

    with open_source("clip.mp4", sampling=Sampling(fps=8), resize=Resize(width=832)) as source:
        for timestamp, frame in source:
            model(frame)
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from typing import Literal

import numpy as np

from .container import is_url, open_video
from .decode import decode_sequential
from .errors import IngestError
from .parallel import BACKENDS, Backend, decode_parallel
from .sampling import Resize, Sampling, check_rgb_frame

TimedFrame = tuple[float, np.ndarray]
MILLISECONDS_PER_SECOND = 1000.0


class FrameSource(ABC):
    """Base of all sources: an iterable of ``(seconds, uint8 [H, W, 3] RGB)`` and a context manager."""

    def __init__(self, *, sampling: Sampling | None = None, resize: Resize | None = None) -> None:
        self.sampling = sampling or Sampling()
        self.resize = resize
        self.closed = False

    @abstractmethod
    def __iter__(self) -> Iterator[TimedFrame]:
        """Frames after ``sampling`` and ``resize``."""

    def _sampled(self, frames: Iterator[TimedFrame]) -> Iterator[TimedFrame]:
        """Apply ``sampling`` then ``resize`` to raw ``frames``."""
        selector = self.sampling.selector()
        for timestamp, frame in frames:
            if selector.keep(timestamp):
                yield timestamp, frame if self.resize is None else self.resize(frame)

    def close(self) -> None:
        """Release the device or connection (subclasses extend this)."""
        self.closed = True

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class FileSource(FrameSource):
    """A video file or network stream decoded with PyAV; timestamps are the frames' pts in seconds.

    ``workers > 1`` decodes a local file with ``decode_parallel`` (same frames as ``workers=1``);
    URLs are always decoded sequentially (a live stream cannot be indexed up front). The input is
    opened once here to fail early (``IngestError``) and to fill ``width``, ``height``, ``fps``.
    Each iteration decodes from the start. ``options`` go to FFmpeg when opening, e.g.
    ``{"rw_timeout": "5000000"}`` (microseconds) so a dead network source fails instead of hanging.

    Example::

        source = FileSource("long.mp4", workers=4, sampling=Sampling(fps=8), resize=Resize(width=832))
        for timestamp, frame in prefetch(source, maxsize=16):
            ...
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        sampling: Sampling | None = None,
        resize: Resize | None = None,
        workers: int = 1,
        backend: Backend = "thread",
        options: dict[str, str] | None = None,
    ) -> None:
        super().__init__(sampling=sampling, resize=resize)
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.path = os.fspath(path)
        self.workers = workers
        self.backend = backend
        self.options = options
        container, stream = open_video(self.path, options=options)
        with container:
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            self.fps = float(stream.average_rate) if stream.average_rate else None

    def __iter__(self) -> Iterator[TimedFrame]:
        # Sampling and resizing run inside the decoders (in the workers when parallel).
        common = {"sampling": self.sampling, "resize": self.resize, "options": self.options}
        if self.workers > 1 and not is_url(self.path):
            frames = decode_parallel(self.path, workers=self.workers, backend=self.backend, **common)
        else:
            frames = decode_sequential(self.path, **common)
        for frame in frames:
            yield frame.time, frame.image


class WebcamSource(FrameSource):
    """A capture device (``int`` index) or a path/URL read through OpenCV's ``cv2.VideoCapture``.

    For a device, timestamps are seconds since the first frame on the monotonic clock, and a device
    that stops delivering frames raises ``IngestError`` (after the frames already delivered). For a
    path, timestamps are OpenCV's position and the end of the file ends the iteration.
    ``capture_size`` asks the device for a resolution (it may pick another).
    """

    def __init__(
        self,
        device: int | str = 0,
        *,
        sampling: Sampling | None = None,
        resize: Resize | None = None,
        capture_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(sampling=sampling, resize=resize)
        try:
            import cv2
        except ImportError as err:
            raise ImportError("WebcamSource needs OpenCV: pip install opencv-python-headless") from err
        self._cv2 = cv2
        self.device = device
        self._name = f"camera {device}" if isinstance(device, int) else str(device)
        self._capture = cv2.VideoCapture(device)
        if not self._capture.isOpened():
            raise IngestError(self._name, "cv2.VideoCapture could not open it (no such device or unreadable)")
        if capture_size is not None:
            self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, capture_size[0])
            self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, capture_size[1])

    def __iter__(self) -> Iterator[TimedFrame]:
        return self._sampled(self._read())

    def _read(self) -> Iterator[TimedFrame]:
        cv2 = self._cv2
        live = isinstance(self.device, int)
        origin = None
        delivered = 0
        while not self.closed:
            ok, bgr = self._capture.read()
            if not ok:
                if live and not self.closed:
                    raise IngestError(self._name, f"the device stopped delivering frames after {delivered}")
                return
            if live:
                now = time.monotonic()
                origin = now if origin is None else origin
                timestamp = now - origin
            else:
                timestamp = self._capture.get(cv2.CAP_PROP_POS_MSEC) / MILLISECONDS_PER_SECOND
            delivered += 1
            yield timestamp, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        super().close()
        self._capture.release()


DropPolicy = Literal["block", "drop_oldest"]
DROP_POLICIES: tuple[DropPolicy, ...] = ("block", "drop_oldest")


class PushSource(FrameSource):
    """Frames handed in by code (a websocket handler, a test) through a bounded queue.

    ``push`` adds a frame; when ``maxsize`` frames wait, ``policy="block"`` makes ``push`` wait for
    the consumer and ``policy="drop_oldest"`` discards the oldest waiting frame (live input where
    a slow consumer must not fall behind). ``close()`` ends the stream once the queued frames are
    consumed; ``close(error)`` raises ``error`` to the consumer after them. One consumer at a time.

    Example::

        source = PushSource(maxsize=4, policy="drop_oldest")
        source.push(frame)            # from the producer side (any thread)
        for timestamp, frame in source:  # consumer side
            ...
    """

    def __init__(
        self,
        maxsize: int,
        *,
        policy: DropPolicy = "block",
        sampling: Sampling | None = None,
        resize: Resize | None = None,
    ) -> None:
        super().__init__(sampling=sampling, resize=resize)
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize: expected an int >= 1, got {maxsize!r}")
        if policy not in DROP_POLICIES:
            raise ValueError(f"policy: expected one of {DROP_POLICIES}, got {policy!r}")
        self.maxsize = maxsize
        self.policy = policy
        self.dropped = 0
        """Frames discarded by ``drop_oldest`` so far."""
        self._frames_waiting: deque[TimedFrame] = deque()
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._origin: float | None = None

    def push(self, frame: np.ndarray, timestamp: float | None = None, timeout: float | None = None) -> bool:
        """Queue ``frame`` (``uint8 [H, W, 3]`` RGB) shown at ``timestamp`` seconds (default: monotonic
        seconds since the first push). Returns ``False`` if ``policy="block"`` and ``timeout`` ran out."""
        check_rgb_frame(frame)
        with self._changed:
            if self.closed:
                raise ValueError("PushSource.push: expected an open source, got one already closed")
            if timestamp is None:
                now = time.monotonic()
                self._origin = now if self._origin is None else self._origin
                timestamp = now - self._origin
            if len(self._frames_waiting) >= self.maxsize:
                if self.policy == "drop_oldest":
                    self._frames_waiting.popleft()
                    self.dropped += 1
                elif not self._changed.wait_for(self._has_room, timeout):
                    return False
                if self.closed:
                    raise ValueError("PushSource.push: expected an open source, got one closed while waiting")
            self._frames_waiting.append((float(timestamp), frame))
            self._changed.notify_all()
        return True

    def close(self, error: BaseException | None = None) -> None:
        """End the stream after the queued frames; with ``error``, the consumer raises it after them."""
        with self._changed:
            if not self.closed:
                super().close()
                self._error = error
            self._changed.notify_all()

    def qsize(self) -> int:
        """Frames waiting for the consumer."""
        with self._changed:
            return len(self._frames_waiting)

    def _has_room(self) -> bool:
        return self.closed or len(self._frames_waiting) < self.maxsize

    def __iter__(self) -> Iterator[TimedFrame]:
        return self._sampled(self._take())

    def _take(self) -> Iterator[TimedFrame]:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._frames_waiting or self.closed)
                if not self._frames_waiting:
                    if self._error is not None:
                        raise self._error
                    return
                item = self._frames_waiting.popleft()
                self._changed.notify_all()
            yield item


def open_source(source: str | os.PathLike | int, **kwargs) -> FrameSource:
    """``int`` -> ``WebcamSource`` (device index); anything else -> ``FileSource`` (file or URL)."""
    if isinstance(source, bool) or not isinstance(source, (int, str, os.PathLike)):
        raise TypeError(f"source: expected a path, URL or device index, got {type(source).__name__}")
    if isinstance(source, int):
        return WebcamSource(source, **kwargs)
    return FileSource(source, **kwargs)
