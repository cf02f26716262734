"""``understand(source)`` without a model: the embedded tiny-world captioner over a sliding window of frames.

The source is sampled at the world's frame rate (16 fps) and resized to the captioner's 64x64 (stretched if its
aspect differs); decoding runs ahead in the prefetch thread through a bounded buffer, exactly as for a VLM. Every
``stride_frames`` frames, once a whole window (24 frames, 1.5 s) has arrived, one :class:`~.api.UnderstandEvent`
carries the caption of the last window: events overlap in time when the stride is shorter than the window. At the
end of the stream the frames since the last caption get one more (so a stream shorter than a window is captioned
too). Memory is constant: the captioner keeps one window of per-frame features.

Example::

    for event in understand("tinyworld.mp4"):
        print(f"[{event.start_s:.2f}-{event.end_s:.2f}] {event.text}")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from stream_runtime.ingest import FrameSource, IngestError, Resize, Sampling, open_source, prefetch
from stream_runtime.ingest.sampling import check_rgb_frame

PREFETCH_WINDOWS = 2
"""Windows of frames the decoder may run ahead of the captioner."""


def captioner_events(
    source: str | os.PathLike | int | Iterable[tuple[float, np.ndarray]],
    captioner,
    *,
    fps: float | None = None,
    stride_frames: int | None = None,
    workers: int = 1,
) -> Iterator:
    """Events of the embedded captioner over ``source`` (what :func:`~.api.understand` returns without a model).

    Args:
        source: a file path or URL, a webcam index, or an iterable of ``(seconds, uint8 [H, W, 3] RGB)``.
        captioner: a :class:`~stream_runtime.pipelines.captioner.model.TinyWorldCaptioner`.
        fps: frames kept per second; default the captioner's (the world's 16). Other rates change the speeds the
            window shows, which the captioner reads.
        stride_frames: frames between captions (default ``DEFAULT_STRIDE_FRAMES``, half a second).
        workers: decode threads for a local file.

    Raises:
        IngestError: as :func:`~.api.understand` (before iterating for an unopenable source; after the events of
            the frames delivered for a failure mid-stream; for a stream without frames).
        ValueError: an invalid argument (before iterating).
    """
    from stream_runtime.pipelines.captioner.stream import DEFAULT_STRIDE_FRAMES, CaptionStream

    config = captioner.config
    fps = config.fps if fps is None else fps
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps < float("inf"):
        raise ValueError(f"fps: expected a finite number > 0, got {fps!r}")
    stream = CaptionStream(captioner, DEFAULT_STRIDE_FRAMES if stride_frames is None else stride_frames)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    sampling = Sampling(fps=float(fps))
    resize = Resize(config.size, config.size, keep_aspect=False)
    if isinstance(source, (str, os.PathLike, int)) and not isinstance(source, bool):
        extra = {} if isinstance(source, int) else {"workers": workers}
        opened: FrameSource | None = open_source(source, sampling=sampling, **extra)
        frames: Iterable[tuple[float, np.ndarray]] = opened
        name = str(source)
    elif isinstance(source, Iterable):
        opened, name = None, "<frames>"
        frames = _sampled(source, sampling)
    else:
        raise TypeError(
            f"source: expected a path, URL, device index or iterable of (seconds, frame), got {type(source).__name__}"
        )
    resized = ((t, resize(frame)) for t, frame in frames)
    return _events(stream, resized, opened, name, float(fps))


def _sampled(frames: Iterable[tuple[float, np.ndarray]], sampling: Sampling) -> Iterator[tuple[float, np.ndarray]]:
    selector = sampling.selector()
    for timestamp, frame in frames:
        if selector.keep(timestamp):
            yield float(timestamp), check_rgb_frame(frame)


def _events(stream, frames: Iterator, opened: FrameSource | None, name: str, fps: float) -> Iterator:
    from .api import UnderstandEvent

    buffer = prefetch(frames, maxsize=PREFETCH_WINDOWS * stream.window_frames)
    times: list[float] = []  # timestamps of the frames pushed so far, trimmed to one window
    count = 0

    def event(window) -> UnderstandEvent:
        first = times[window.first_frame - (count - len(times))]
        last = times[window.last_frame - (count - len(times))]
        return UnderstandEvent(start_s=first, end_s=last + 1.0 / fps, text=window.caption, step=index)

    index = 0
    try:
        while True:
            try:
                timestamp, frame = next(buffer)
            except StopIteration:
                break
            except Exception:
                tail = stream.flush()  # caption what was delivered before the failure, then raise it
                if tail is not None:
                    yield event(tail)
                raise
            times.append(timestamp)
            count += 1
            del times[: max(0, len(times) - stream.window_frames)]
            for window in stream.push(frame[None]):
                yield event(window)
                index += 1
        tail = stream.flush()
        if tail is not None:
            yield event(tail)
        if count == 0:
            raise IngestError(name, "the stream has no frames (nothing to understand)")
    finally:
        buffer.close()
        if opened is not None:
            opened.close()
