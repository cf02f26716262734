"""Run tasks on an executor and hand back their results in submission order, a bounded number ahead."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(
    fn: Callable[[Item], Result], items: Iterable[Item], executor: Executor, max_in_flight: int
) -> Iterator[Result]:
    """Like ``executor.map`` but lazy: at most ``max_in_flight`` tasks submitted and not yet consumed.

    Result ``i`` is yielded as soon as tasks ``0..i`` are done, so memory holds at most
    ``max_in_flight`` results. A task's exception is raised at its position, after the results
    before it were yielded. Closing the iterator early cancels the tasks not yet started.

    Example::

        with ThreadPoolExecutor(4) as pool:
            for result in ordered_map(work, tasks, pool, max_in_flight=8):
                ...
    """
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight: expected an int >= 1, got {max_in_flight!r}")
    pending: deque[Future[Result]] = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
