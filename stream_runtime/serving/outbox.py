"""What the engine hands to one client: control events in order, and at most one unsent chunk.

The engine never waits for a client. When a client is slower than generation, a new chunk replaces the unsent
older one (a *drop*, counted per session) instead of queueing behind it, so a slow client sees the newest frames,
delays no other session and holds at most one chunk of memory. Control events (``opened``, ``error``, ``closed``,
...) are few and are never dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from stream_runtime.serving.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """A control event for a client (``opened``, ``updated``, ``paused``, ``resumed``, ``error``, ``closed``)."""

    type: str
    session: int | None
    """The session it is about; None for connection-level events (``hello``, an error before ``open``)."""
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        head = {"type": self.type} if self.session is None else {"type": self.type, "session": self.session}
        return {**head, **self.data}


@dataclass(frozen=True)
class ChunkOutput:
    """One generated chunk on its way to a client."""

    session: int
    index: int
    """Chunk index within the session (0, 1, ...; an index missing at the client was dropped)."""
    first_frame: int
    """Stream frame number of the chunk's first frame."""
    frames: np.ndarray = field(repr=False)
    """uint8 ``[T, H, W, 3]`` RGB."""
    latency_s: float
    """Generation time: denoise, decode and copy to the host."""
    step: int
    """Engine-wide chunk counter: the order in which the engine generated chunks of all sessions."""
    started_at: float
    """``time.monotonic()`` when generation started."""
    finished_at: float
    wall_time: float
    """``time.time()`` when generation finished (for clients on other machines)."""
    input_latency_s: float | None = None
    """Video-to-video: age of the oldest input frame of the chunk when the output was ready."""
    drops: int = 0
    """Chunks of this session dropped before this one (set by the outbox)."""
    dropped_frames: int = 0
    queue_wait_s: float | None = None
    """Time between the chunk entering the outbox and a consumer taking it (set on take)."""


class Outbox:
    """Single-slot handoff from the engine thread to one consumer (a websocket sender, a test, a script).

    ``notify`` is called (from the engine thread, outside the lock) after every put; an asyncio consumer passes
    ``lambda: loop.call_soon_threadsafe(event.set)`` and calls :meth:`take` when woken. Thread consumers call
    :meth:`get`, which blocks.

    Example::

        outbox = engine.new_outbox()
        sid = engine.open(SessionRequest(prompt="a fox"), outbox)
        for item in outbox.get(timeout=10):      # Event or ChunkOutput, in order
            ...
    """

    def __init__(
        self,
        notify: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cond = threading.Condition()
        self._items: deque[Event | ChunkOutput] = deque()
        self._put_at: dict[int, float] = {}  # id(chunk) -> when it entered the outbox
        self._drops: dict[int, tuple[int, int]] = {}  # session -> (chunks, frames) dropped
        self._notify = notify
        self._metrics = metrics
        self._clock = clock

    def put_event(self, event: Event) -> None:
        with self._cond:
            self._items.append(event)
            self._cond.notify_all()
        self._wake()

    def put_chunk(self, chunk: ChunkOutput) -> ChunkOutput | None:
        """Hand over ``chunk``; return the unsent chunk it replaced (a drop), if any."""
        with self._cond:
            replaced = None
            for i, item in enumerate(self._items):
                if isinstance(item, ChunkOutput):
                    replaced = item
                    del self._items[i]
                    self._put_at.pop(id(item), None)
                    break
            chunks, frames = self._drops.get(chunk.session, (0, 0))
            if replaced is not None:
                chunks, frames = chunks + 1, frames + len(replaced.frames)
                self._drops[chunk.session] = (chunks, frames)
            chunk = replace(chunk, drops=chunks, dropped_frames=frames)
            # The newest chunk goes last: it was made after every event already queued, so order is kept.
            self._items.append(chunk)
            self._put_at[id(chunk)] = self._clock()
            self._cond.notify_all()
        if replaced is not None and self._metrics is not None:
            self._metrics.chunk_dropped(replaced.session, len(replaced.frames))
        self._wake()
        return replaced

    def discard(self, chunk: ChunkOutput) -> None:
        """Count ``chunk`` as dropped without handing it over (its session was closed while it was generated), so
        that a session's chunks are always delivered + dropped."""
        with self._cond:
            chunks, frames = self._drops.get(chunk.session, (0, 0))
            self._drops[chunk.session] = (chunks + 1, frames + len(chunk.frames))
        if self._metrics is not None:
            self._metrics.chunk_dropped(chunk.session, len(chunk.frames))

    def take(self) -> list[Event | ChunkOutput]:
        """Everything waiting, in order (at most one chunk); never blocks."""
        with self._cond:
            return self._take_locked()

    def get(self, timeout: float | None = None) -> list[Event | ChunkOutput]:
        """Block until something is waiting (or ``timeout`` seconds pass: then an empty list) and take it."""
        with self._cond:
            self._cond.wait_for(lambda: self._items, timeout)
            return self._take_locked()

    def unsent_chunks(self) -> int:
        """Chunks waiting (0 or 1: the single-slot invariant)."""
        with self._cond:
            return sum(isinstance(item, ChunkOutput) for item in self._items)

    def pending_events(self) -> int:
        """Events waiting (they are never dropped; a consumer that never takes them lets them pile up)."""
        with self._cond:
            return sum(isinstance(item, Event) for item in self._items)

    def drops(self, session: int) -> tuple[int, int]:
        """(chunks, frames) of ``session`` dropped in this outbox."""
        with self._cond:
            return self._drops.get(session, (0, 0))

    def _take_locked(self) -> list[Event | ChunkOutput]:
        now = self._clock()
        out: list[Event | ChunkOutput] = []
        for item in self._items:
            if isinstance(item, ChunkOutput):
                wait = now - self._put_at.pop(id(item), now)
                item = replace(item, queue_wait_s=wait)
                if self._metrics is not None:
                    self._metrics.chunk_delivered(item.session, len(item.frames), wait, now - item.started_at)
            out.append(item)
        self._items.clear()
        return out

    def _wake(self) -> None:
        if self._notify is None:
            return
        try:
            self._notify()
        except RuntimeError:
            # The consumer's event loop is closed (the client went away); nothing is listening any more.
            logger.debug("outbox consumer is gone", exc_info=True)


def outbox_stats(outboxes: list[Outbox]) -> dict[str, int]:
    """What waits in ``outboxes``: at most one chunk each (the single slot), and the unsent events."""
    unsent = [outbox.unsent_chunks() for outbox in outboxes]
    events = [outbox.pending_events() for outbox in outboxes]
    return {
        "count": len(outboxes),
        "unsent_chunks": sum(unsent),
        "max_unsent_chunks": max(unsent, default=0),
        "pending_events": sum(events),
        "max_pending_events": max(events, default=0),
    }
