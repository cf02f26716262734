"""Run a producer (a decoder, a source) in a thread ahead of a slow consumer, with a bounded buffer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

Item = TypeVar("Item")


class _End:
    """Queue marker: the producer finished, with ``error`` if it raised."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Prefetcher(Generic[Item]):
    """Iterator over ``iterable`` whose items are produced by a background thread.

    At most ``maxsize`` items wait in the buffer; the producer then blocks (it may hold one more item
    it is trying to hand over), so decoding overlaps the consumer without unbounded buffering.
    An exception in the producer is raised to the consumer after the items produced before it.
    ``close()`` (also on ``with`` exit, on garbage collection, or when a ``for`` loop over
    ``prefetch(...)`` is left) stops the producer after its current item and closes ``iterable``'s
    iterator in the producer thread.
    """

    def __init__(self, iterable: Iterable[Item], maxsize: int) -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize: expected an int >= 1, got {maxsize!r}")
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._done = False
        # The thread gets the queue and the event, not self: an abandoned Prefetcher can be collected.
        self._thread = threading.Thread(
            target=_produce, args=(iter(iterable), self._queue, self._stop), name="prefetch", daemon=True
        )
        self._thread.start()

    def __iter__(self) -> Prefetcher[Item]:
        return self

    def __next__(self) -> Item:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._done = True
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer: it exits after handing over (and dropping) at most one more item."""
        self._done = True
        self._stop.set()
        # Emptying the buffer unblocks a producer waiting in put(); it then sees the stop flag.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the producer thread to end; returns whether it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> Prefetcher[Item]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_stop"):  # __init__ may have failed before the thread existed
            self.close()


def prefetch(iterable: Iterable[Item], maxsize: int) -> Prefetcher[Item]:
    """Produce ``iterable``'s items in a background thread, at most ``maxsize`` ahead of the consumer.

    Example::

        for frame in prefetch(decode_parallel("clip.mp4", workers=4), maxsize=16):
            model(frame.image)  # decoding continues while the model runs
    """
    return Prefetcher(iterable, maxsize)


def _produce(iterator: Iterator, buffer: queue.Queue, stop: threading.Event) -> None:
    end = _End()
    try:
        for item in iterator:
            buffer.put(item)
            if stop.is_set():
                return
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
        end = _End(error)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    if not stop.is_set():
        buffer.put(end)
