"""A background producer thread that hands items to one consumer over a bounded queue.

Used where generation should run ahead of its consumer by a bounded amount (:mod:`stream_runtime.pacing`, the
decode-ahead runner): the producer's ``put`` waits while the queue is full and gives up once the consumer has
closed it, and an exception in the producer reaches the consumer after the items produced before it.

Example::

    def work(producer):
        for item in source:
            if not producer.put(item):  # the consumer closed it
                return

    producer = Producer(work, maxsize=2, name="ahead")
    while (item := producer.get()) is not END:
        use(item)
    producer.raise_error()
    producer.close()
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

END = object()
"""What :meth:`Producer.get` returns once the producer has finished (normally or by an exception)."""

_POLL_S = 0.05  # how often a blocked put looks whether the consumer has closed the producer


class Producer:
    """Run ``work(producer)`` in a daemon thread; its :meth:`put` items come out of :meth:`get` in order."""

    def __init__(self, work: Callable[[Producer], None], maxsize: int, name: str) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        """The exception that ended ``work``, if any."""
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True, name=name)
        self._thread.start()

    def _run(self, work: Callable[[Producer], None]) -> None:
        try:
            work(self)
        except BaseException as exc:  # handed to the consumer by raise_error
            self.error = exc
        finally:
            self.put(END)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def queued(self) -> int:
        """Items waiting for the consumer (approximate while the producer runs)."""
        return self._queue.qsize()

    def put(self, item) -> bool:
        """Hand ``item`` over, waiting while the queue is full; False (item dropped) once the consumer closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self, block: bool = True):
        """The next item, or :data:`END`; with ``block=False`` raises ``queue.Empty`` when none is ready."""
        return self._queue.get(block=block)

    def raise_error(self) -> None:
        """Raise the producer's exception, if it ended with one (call after :data:`END`)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the producer (it finishes what it is doing, its pending put gives up) and wait for it."""
        self._stop.set()
        self._thread.join()
