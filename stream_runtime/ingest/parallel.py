"""Exact keyframe-parallel decoding (after QuickVideo): split at keyframes, decode intervals in workers.

The file is indexed once by demuxing its packets (``scan_stream``), cut into keyframe-aligned
intervals (``plan_intervals``), and each interval is decoded by a worker that seeks to its keyframe
(``decode_interval``). Results stream back in order with at most ``max_in_flight`` intervals held,
and their concatenation equals ``decode_sequential``: same frames, same pts, byte-identical RGB.

Threads are the default backend: PyAV releases the GIL while decoding and converting, and threads
hand frames back without copying them between processes (``bench/bench_decode.py`` measures both).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Literal

from .container import DecodedFrame
from .decode import IntervalResult, decode_interval, decode_sequential
from .errors import IngestError
from .index import Interval, StreamIndex, plan_intervals, scan_stream
from .ordered import ordered_map
from .sampling import Resize, Sampling

Backend = Literal["thread", "process"]
BACKENDS: tuple[Backend, ...] = ("thread", "process")
# Intervals decoded ahead of the consumer per worker: one being decoded, one waiting to be consumed.
IN_FLIGHT_PER_WORKER = 2


def default_workers() -> int:
    """One worker per CPU core available to this process."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def decode_parallel(
    path: str | os.PathLike,
    *,
    workers: int | None = None,
    backend: Backend = "thread",
    sampling: Sampling | None = None,
    resize: Resize | None = None,
    max_in_flight: int | None = None,
    min_interval_frames: int = 1,
    options: dict[str, str] | None = None,
    decoder_threads: int | None = None,
) -> Iterator[DecodedFrame]:
    """Decode ``path`` with ``workers`` threads or processes; frames come in presentation order.

    Args:
        workers: decode workers (default: one per core). ``1`` decodes the intervals in the calling thread.
        backend: ``"thread"`` (default, measured faster) or ``"process"``.
        sampling: frames to keep, resolved over the whole stream exactly as ``decode_sequential`` does.
        resize: output size, applied in the workers.
        max_in_flight: intervals decoded ahead of the consumer (default ``2 * workers``); memory holds
            at most this many intervals of frames.
        min_interval_frames: merge GOPs until an interval has this many frames (1: one GOP each).
        options: FFmpeg options for opening the input.
        decoder_threads: FFmpeg threads per worker's decoder (``None``: PyAV's default).

    The file is indexed when this is called (missing or unreadable files raise ``IngestError`` here);
    decoding happens as the iterator is consumed. A file with one keyframe decodes as one interval; a
    stream whose packets lack timestamps (raw ``.h264``) is decoded sequentially. The process backend
    starts workers with a fork server: a script using it needs the ``if __name__ == "__main__":`` guard.

    Example::

        for frame in decode_parallel("clip.mp4", workers=4, sampling=Sampling(every=2)):
            model(frame.image)  # uint8 [H, W, 3] RGB, frame.pts, frame.time
    """
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    max_in_flight = IN_FLIGHT_PER_WORKER * workers if max_in_flight is None else max_in_flight
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight: expected an int >= 1, got {max_in_flight!r}")
    index = scan_stream(path, options=options)
    if not index.splittable:
        # No pts on some packets (raw elementary streams): pts ranges are undefined, decode in one pass.
        return decode_sequential(
            index.path, sampling=sampling, resize=resize, options=options, decoder_threads=decoder_threads
        )
    intervals = plan_intervals(index, sampling, min_interval_frames)
    task = functools.partial(
        decode_interval, index.path, resize=resize, options=options, decoder_threads=decoder_threads
    )
    return _stream(index, intervals, task, workers, backend, max_in_flight)


def _stream(
    index: StreamIndex,
    intervals: list[Interval],
    task: functools.partial[IntervalResult],
    workers: int,
    backend: Backend,
    max_in_flight: int,
) -> Iterator[DecodedFrame]:
    if workers == 1 or len(intervals) == 1:
        for interval in intervals:
            yield from _checked(index, interval, task(interval))
        return
    executor = _executor(backend, min(workers, len(intervals)))
    try:
        for result in ordered_map(task, intervals, executor, max_in_flight):
            yield from _checked(index, intervals[result.index], result)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _checked(index: StreamIndex, interval: Interval, result: IntervalResult) -> list[DecodedFrame]:
    """Sampling was decided from the packet scan: the decoded frames must be the scanned ones."""
    if interval.keep_pts is not None and tuple(result.decoded_pts) != interval.expected_pts:
        raise IngestError(
            index.path,
            f"interval {interval.index} decoded {len(result.decoded_pts)} frames where the packet scan "
            f"found {len(interval.expected_pts)}; sampling cannot be split here, decode with workers=1",
        )
    return result.frames


def _executor(backend: Backend, workers: int) -> Executor:
    if backend == "thread":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    # fork() of a process that already runs threads (prefetch, torch) can deadlock: use a fork server.
    method = "forkserver" if sys.platform.startswith("linux") else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
