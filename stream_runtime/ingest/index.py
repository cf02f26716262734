"""Keyframe index of a video file and its split into keyframe-aligned intervals (no decoding).

An interval is a range of presentation timestamps ``[start_pts, end_pts)`` that starts at a
keyframe. Frames belong to the interval their pts falls in, whatever order they are decoded in
(B-frames are decoded after the frames they reference but shown before them), so decoding every
interval on its own and concatenating gives exactly the frames of one sequential decode.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from dataclasses import dataclass
from fractions import Fraction

import av.error

from .container import open_video
from .errors import IngestError
from .sampling import Sampling


@dataclass(frozen=True)
class Keyframe:
    pts: int
    """Presentation timestamp (stream time_base): where the keyframe's interval starts."""
    seek_ts: int
    """Timestamp to seek to: the packet's dts when known. MP4 seeks on decode timestamps, which come
    before the pts with B-frames; seeking to the pts could land on the *next* keyframe."""


@dataclass(frozen=True)
class StreamIndex:
    """What one pass over the packets (``container.demux``) tells about a video stream."""

    path: str
    time_base: Fraction
    keyframes: tuple[Keyframe, ...]
    """Keyframe packets in decode order, pts strictly increasing."""
    frame_pts: tuple[int, ...]
    """Presentation timestamps of all frames (one per non-empty, non-discarded packet), sorted."""
    splittable: bool
    """Every packet has a pts and keyframe pts increase: pts ranges may be decoded independently."""
    open_gop: bool
    """Some packet decoded after a keyframe is shown before it (leading pictures of an open GOP): an
    interval must then decode past the next keyframe until its frames are out."""


@dataclass(frozen=True)
class Interval:
    """One unit of work for a decode worker: the frames with ``start_pts <= pts < end_pts``."""

    index: int
    start_pts: int | None
    """First pts (a keyframe's); ``None`` for the first interval, which decodes from the stream start."""
    end_pts: int | None
    """The next interval's ``start_pts``; ``None`` for the last interval (decode to the end)."""
    seek_ts: int | None
    """Where to seek before decoding; ``None`` to decode from the start without seeking."""
    early_flush: bool
    """Stop feeding packets at the next interval's keyframe and drain the decoder (closed GOPs)."""
    expected_pts: tuple[int, ...]
    """The pts the packet scan saw in this range; decoding must reproduce them when sampling."""
    keep_pts: frozenset[int] | None
    """Frames to convert to RGB; ``None`` keeps all."""


def scan_stream(path: str | os.PathLike, options: dict[str, str] | None = None) -> StreamIndex:
    """Read all packets of the first video stream (demux only, no decoding) and index its keyframes.

    A demux error part-way keeps what was read: the last interval then runs into the same error
    while decoding, after the frames before it were delivered (as a sequential decode would).
    """
    name = os.fspath(path)
    container, stream = open_video(name, options=options)
    keyframes: list[Keyframe] = []
    frame_pts: list[int] = []
    splittable = True
    open_gop = False
    with container:
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue
                if packet.pts is None:
                    splittable = False
                    continue
                frame_pts.append(packet.pts)
                if keyframes and packet.pts < keyframes[-1].pts:
                    open_gop = True
                if packet.is_keyframe:
                    if keyframes and packet.pts <= keyframes[-1].pts:
                        splittable = False
                    seek_ts = packet.pts if packet.dts is None else min(packet.dts, packet.pts)
                    keyframes.append(Keyframe(pts=packet.pts, seek_ts=seek_ts))
        except av.error.FFmpegError:
            pass
        time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1)
    return StreamIndex(
        path=name,
        time_base=time_base,
        keyframes=tuple(keyframes),
        frame_pts=tuple(sorted(frame_pts)),
        splittable=splittable and bool(keyframes),
        open_gop=open_gop,
    )


def plan_intervals(
    index: StreamIndex, sampling: Sampling | None = None, min_interval_frames: int = 1
) -> list[Interval]:
    """Split ``index`` into keyframe-aligned intervals of at least ``min_interval_frames`` frames.

    Consecutive GOPs are merged until an interval holds ``min_interval_frames`` frames (1: one GOP
    per interval). A stream that cannot be split (one keyframe, missing pts) gives one interval.
    ``sampling`` is resolved here over all frame timestamps, so every worker keeps exactly the frames
    a sequential pass with the same ``Sampling`` keeps.
    """
    if not isinstance(min_interval_frames, int) or min_interval_frames < 1:
        raise ValueError(f"min_interval_frames: expected an int >= 1, got {min_interval_frames!r}")
    starts = _interval_starts(index, min_interval_frames) if index.splittable else []
    keep = None
    if sampling is not None and not sampling.keeps_all:
        if not index.splittable:
            raise IngestError(index.path, "sampling in parallel needs a pts on every packet; use workers=1")
        chosen = sampling.select(pts * index.time_base for pts in index.frame_pts)
        keep = frozenset(pts for pts, kept in zip(index.frame_pts, chosen, strict=True) if kept)
    bounds = [None, *[kf.pts for kf in starts], None]
    intervals = []
    for position in range(len(bounds) - 1):
        start, end = bounds[position], bounds[position + 1]
        lo = 0 if start is None else bisect_left(index.frame_pts, start)
        hi = len(index.frame_pts) if end is None else bisect_left(index.frame_pts, end)
        expected = index.frame_pts[lo:hi]
        intervals.append(
            Interval(
                index=position,
                start_pts=start,
                end_pts=end,
                seek_ts=None if position == 0 else starts[position - 1].seek_ts,
                early_flush=not index.open_gop,
                expected_pts=expected,
                keep_pts=None if keep is None else keep.intersection(expected),
            )
        )
    return intervals


def _interval_starts(index: StreamIndex, min_interval_frames: int) -> list[Keyframe]:
    """Keyframes that open intervals 1..n-1 (interval 0 always starts at the stream start)."""
    starts: list[Keyframe] = []
    previous_start = None
    for keyframe in index.keyframes[1:]:
        lo = 0 if previous_start is None else bisect_left(index.frame_pts, previous_start)
        if bisect_left(index.frame_pts, keyframe.pts) - lo >= min_interval_frames:
            starts.append(keyframe)
            previous_start = keyframe.pts
    return starts
