"""Play a stream of chunks at a fixed frame rate: generation runs ahead in a thread, frames come out on a clock.

A session hands out chunks of frames whenever they are ready (a burst of 12 frames every ~0.5 s for Wan2.1
text-to-video). A display, a virtual camera or an encoder that streams live wants one frame every ``1 / fps``
seconds instead. :class:`Paced` does that conversion:

- a producer thread iterates the chunks into a bounded queue, so generation keeps going while the consumer
  waits for the next frame time (torch releases the GIL in its kernels);
- the consumer starts its clock once ``buffer_s`` seconds of frames are queued (or the source ended), then hands
  out frame ``i`` at ``t0 + i / fps``;
- when the queue runs dry at a frame's time (the generator is slower than ``fps`` for a while), it waits for the
  next chunk and restarts the clock from there, counting an underrun, rather than rushing late frames out.

The queue holds at most ``max_chunks`` chunks, so a consumer that stops reading stops the producer too:
memory stays bounded.

Example::

    from stream_runtime.pacing import Paced

    with pipe.session("a fox running in snow", seed=0) as s, Paced(s, fps=16) as frames:
        for frame in frames:        # uint8 [H, W, 3], one every 1/16 s
            show(frame)
    print(frames.stats())           # intervals, jitter percentiles, underruns

The source is iterated in the producer thread, so do not call the session from another thread while it runs
(prompt switches included); close the :class:`Paced` first, or switch prompts from inside the source iterable.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from stream_runtime.producer import END, Producer


@dataclass(frozen=True)
class PacingStats:
    """What a paced run delivered (seconds)."""

    frames: int
    """Frames handed out."""
    underruns: int
    """Times the queue was empty at a frame's time (the clock restarted after each)."""
    interval_target_s: float
    """``1 / fps``."""
    interval_p50_s: float
    """Median interval between consecutive frames handed out (0 with fewer than two frames)."""
    jitter_p50_s: float
    """Median of ``|interval - 1 / fps|`` over the intervals that no underrun broke."""
    jitter_p99_s: float
    """99th percentile of the same."""
    jitter_max_s: float


class Paced:
    """Iterate over single frames of ``chunks`` (each ``[T, H, W, C]``, e.g. a session) at ``fps`` frames per second.

    Args:
        chunks: an iterable of frame arrays ``[T, ...]``; ``None`` items (a video-to-video session waiting for
            input) are skipped.
        fps: output frame rate, > 0.
        buffer_s: seconds of frames to queue before the clock starts (and after an underrun); more absorbs slower
            chunks, at the price of latency.
        max_chunks: most chunks the queue holds (>= 1), so memory stays bounded when the consumer is slow.
        on_underrun: called with the number of underruns so far when the queue runs dry at a frame's time, before
            the wait (to show "buffering", or to log it).
        clock, sleep: time source and sleep function (tests pass fakes).
    """

    def __init__(
        self,
        chunks: Iterable,
        fps: float,
        buffer_s: float = 0.5,
        max_chunks: int = 8,
        on_underrun: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if buffer_s < 0:
            raise ValueError(f"buffer_s must be >= 0, got {buffer_s}")
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        self.fps, self.buffer_s = float(fps), float(buffer_s)
        self._clock, self._sleep, self._on_underrun = clock, sleep, on_underrun
        self._times: list[float] = []
        self._breaks: set[int] = set()  # indices i where the interval times[i] - times[i-1] spans an underrun
        self._underruns = 0
        source = iter(chunks)
        self._producer = Producer(lambda producer: self._produce(source, producer), max_chunks, name="paced")

    def _produce(self, chunks: Iterator, producer: Producer) -> None:
        for chunk in chunks:
            if chunk is None or len(chunk) == 0:
                continue
            if not producer.put(chunk):
                return

    def __enter__(self) -> Paced:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the producer (it finishes the chunk it is generating) and wait for it."""
        self._producer.close()

    def _buffer(self, pending: list) -> bool:
        """Fill ``pending`` (frames) up to ``buffer_s`` worth or the end; False once the source has ended."""
        want = max(1, round(self.buffer_s * self.fps))
        while len(pending) < want:
            item = self._producer.get()
            if item is END:
                return False
            pending.extend(item)
        return True

    def __iter__(self) -> Iterator[np.ndarray]:
        try:
            yield from self._frames()
        finally:  # the consumer is done (or left the loop): the producer stops after its current chunk
            self._producer.close()

    def _frames(self) -> Iterator[np.ndarray]:
        pending: list = []
        more = self._buffer(pending)
        period = 1.0 / self.fps
        t0, i = self._clock(), 0
        while pending or more:
            if not pending:
                try:
                    item = self._producer.get(block=False)
                except queue.Empty:  # underrun: wait for a buffer's worth, restart the clock there
                    self._underruns += 1
                    if self._on_underrun is not None:
                        self._on_underrun(self._underruns)
                    more = self._buffer(pending)
                    if not pending:
                        break
                    self._breaks.add(len(self._times))
                    t0, i = self._clock(), 0
                    continue
                if item is END:
                    more = False
                    continue
                pending.extend(item)
                continue
            delay = t0 + i * period - self._clock()
            if delay > 0:
                self._sleep(delay)
            self._times.append(self._clock())
            i += 1
            yield pending.pop(0)
        self._producer.raise_error()

    def stats(self) -> PacingStats:
        """Intervals and jitter of the frames handed out so far."""
        period = 1.0 / self.fps
        times = np.asarray(self._times)
        intervals = np.diff(times)
        kept = np.asarray([d for j, d in enumerate(intervals, start=1) if j not in self._breaks])
        jitter = np.abs(kept - period) if kept.size else np.zeros(1)
        return PacingStats(
            frames=len(times),
            underruns=self._underruns,
            interval_target_s=period,
            interval_p50_s=float(np.median(intervals)) if intervals.size else 0.0,
            jitter_p50_s=float(np.percentile(jitter, 50)),
            jitter_p99_s=float(np.percentile(jitter, 99)),
            jitter_max_s=float(jitter.max()),
        )
