"""Opening a video with PyAV and turning its frames into RGB arrays, with errors mapped to ``IngestError``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import NamedTuple
from urllib.parse import urlparse

import av
import av.error
import numpy as np

from .errors import IngestError
from .sampling import Resize

# A URL scheme is at least two letters; one letter before ":" is a Windows drive ("C:\clip.mp4").
_MIN_SCHEME_LENGTH = 2


class DecodedFrame(NamedTuple):
    """One decoded video frame in presentation order.

    ``pts`` is in the stream's ``time_base`` (``None`` when the container gives none), ``time`` is
    ``pts * time_base`` in seconds, ``image`` is ``uint8 [H, W, 3]`` RGB (after any resize).
    """

    pts: int | None
    time: float
    image: np.ndarray


def is_url(path: str) -> bool:
    """True for ``scheme://...`` inputs (``rtsp``, ``http``, ...) that are not local files."""
    scheme = urlparse(path).scheme
    return len(scheme) >= _MIN_SCHEME_LENGTH and scheme != "file"


def open_video(
    path: str | os.PathLike, *, options: dict[str, str] | None = None
) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open ``path`` (a file or anything PyAV opens, such as an RTSP/HTTP URL) and its first video stream.

    ``options`` are passed to FFmpeg (e.g. ``{"rw_timeout": "5000000"}`` for network inputs).
    Raises ``IngestError`` for a missing file, unreadable data, no video stream or a codec without a
    decoder. The caller closes the container.
    """
    name = os.fspath(path)
    if not is_url(name) and not os.path.exists(name):
        raise IngestError(name, "file not found")
    try:
        container = av.open(name, options=options or {})
    except av.error.FFmpegError as err:
        raise IngestError(name, f"not a readable media file ({err.strerror or err})") from err
    if not container.streams.video:
        found = ", ".join(f"{s.type}" for s in container.streams) or "none"
        container.close()
        raise IngestError(name, f"no video stream (streams found: {found})")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise IngestError(name, f"unsupported video codec: no decoder in this FFmpeg build ({container.format.name})")
    return container, stream


@contextmanager
def decode_errors(path: str, progress: Callable[[], str]) -> Iterator[None]:
    """Turn FFmpeg errors raised while demuxing/decoding into ``IngestError`` saying how far decoding got.

    ``progress()`` describes the position when the error happens (e.g. "after 45 frames").
    """
    try:
        yield
    except av.error.DecoderNotFoundError as err:
        raise IngestError(path, "unsupported video codec: no decoder in this FFmpeg build") from err
    except av.error.FFmpegError as err:
        raise IngestError(path, f"decoding failed {progress()} ({err.strerror or err})") from err


def frame_time(pts: int | None, time_base: Fraction, fallback_index: int, rate: Fraction | None) -> Fraction:
    """Exact presentation time in seconds; frames without a pts are placed at ``index / rate``."""
    if pts is not None:
        return pts * time_base
    if not rate:
        return Fraction(fallback_index)
    return fallback_index / Fraction(rate)


def to_rgb(frame: av.VideoFrame, resize: Resize | None) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB of ``frame``; with ``resize``, scaled in the same swscale pass."""
    if resize is None:
        return frame.to_ndarray(format="rgb24")
    width, height = resize.output_size(frame.width, frame.height)
    interpolation = resize.interpolation(frame.width, frame.height)
    return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation=interpolation)
