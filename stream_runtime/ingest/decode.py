"""Decoding with PyAV: the sequential reference and the per-interval worker of the parallel decoder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import av

from .container import DecodedFrame, decode_errors, frame_time, open_video, to_rgb
from .errors import IngestError
from .index import Interval
from .sampling import Resize, Sampling

# FFmpeg's own threading ("AUTO" = frame and slice threads) when a thread count is asked for.
_FFMPEG_THREAD_TYPE = "AUTO"


def configure_decoder(stream: av.video.stream.VideoStream, threads: int | None) -> None:
    """``threads=None`` keeps PyAV's defaults; ``n >= 1`` gives FFmpeg ``n`` frame/slice threads (0: auto)."""
    if threads is None:
        return
    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"decoder_threads: expected None or an int >= 0, got {threads!r}")
    stream.codec_context.thread_type = _FFMPEG_THREAD_TYPE
    stream.codec_context.thread_count = threads


def decode_sequential(
    path: str | os.PathLike,
    *,
    sampling: Sampling | None = None,
    resize: Resize | None = None,
    options: dict[str, str] | None = None,
    decoder_threads: int | None = None,
) -> Iterator[DecodedFrame]:
    """Decode the first video stream front to back: the reference the parallel decoder must equal.

    Frames come in presentation order as ``DecodedFrame(pts, time, image uint8 [H, W, 3] RGB)``.
    On a decode error part-way the frames before it are yielded, then ``IngestError`` is raised.

    Example::

        for frame in decode_sequential("clip.mp4", sampling=Sampling(fps=8)):
            model(frame.image)
    """
    name = os.fspath(path)
    container, stream = open_video(name, options=options)
    configure_decoder(stream, decoder_threads)
    selector = (sampling or Sampling()).selector()
    time_base = stream.time_base
    delivered = 0

    def progress() -> str:
        return f"after {delivered} frames"

    with container:
        frames = container.decode(stream)
        position = 0
        while True:
            with decode_errors(name, progress):
                frame = next(frames, None)
            if frame is None:
                return
            time = frame_time(frame.pts, time_base, position, stream.average_rate)
            position += 1
            if selector.keep(time):
                yield DecodedFrame(frame.pts, float(time), to_rgb(frame, resize))
                delivered += 1


@dataclass
class IntervalResult:
    """What a worker hands back for one interval."""

    index: int
    frames: list[DecodedFrame]
    """Kept frames of the interval, presentation order."""
    decoded_pts: list[int]
    """Pts of every frame decoded in the interval (kept or not), to check against the packet scan."""


def decode_interval(
    path: str,
    interval: Interval,
    resize: Resize | None = None,
    options: dict[str, str] | None = None,
    decoder_threads: int | None = None,
) -> IntervalResult:
    """Decode the frames with ``interval.start_pts <= pts < interval.end_pts`` (a worker's task).

    Seeks to the interval's keyframe; if the demuxer lands past it (the keyframe is then not the
    first frame out), decodes again from the stream start so the result stays exact.
    """
    result = _decode_range(path, interval, interval.seek_ts, resize, options, decoder_threads)
    if interval.start_pts is not None and result.decoded_pts[:1] != [interval.start_pts]:
        result = _decode_range(path, interval, None, resize, options, decoder_threads)
    return result


def _decode_range(
    path: str,
    interval: Interval,
    seek_ts: int | None,
    resize: Resize | None,
    options: dict[str, str] | None,
    decoder_threads: int | None,
) -> IntervalResult:
    start, end, keep = interval.start_pts, interval.end_pts, interval.keep_pts
    result = IntervalResult(interval.index, [], [])
    container, stream = open_video(path, options=options)
    configure_decoder(stream, decoder_threads)
    time_base = stream.time_base
    with container, decode_errors(path, lambda: _where(interval, time_base)):
        if seek_ts is not None:
            container.seek(seek_ts, stream=stream, backward=True)
        for frame in _frames_up_to(container, stream, end, interval.early_flush):
            pts = frame.pts
            if pts is None:
                raise IngestError(path, "a frame without timestamp in a split stream; decode with workers=1")
            if start is not None and pts < start:
                continue
            if end is not None and pts >= end:
                break
            result.decoded_pts.append(pts)
            if keep is None or pts in keep:
                result.frames.append(DecodedFrame(pts, float(pts * time_base), to_rgb(frame, resize)))
    return result


def _frames_up_to(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, end: int | None, early_flush: bool
) -> Iterator[av.VideoFrame]:
    """Frames in presentation order from the current position.

    With ``early_flush`` (closed GOPs) no frame shown before ``end`` is decoded after the keyframe at
    ``end``, so packets stop there and the decoder is drained instead of decoding into the next GOP.
    """
    codec = stream.codec_context
    for packet in container.demux(stream):
        if early_flush and end is not None and packet.is_keyframe and packet.pts == end:
            yield from codec.decode(None)
            return
        yield from codec.decode(packet)


def _where(interval: Interval, time_base) -> str:
    if interval.start_pts is None:
        return f"in interval {interval.index} (from the start)"
    return f"in interval {interval.index} (from {float(interval.start_pts * time_base):.3f} s)"
