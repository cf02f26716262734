"""The ``understand`` session type of the websocket protocol: captions of a video, as timestamped text events.

A client opens one with ``{"type": "open", "mode": "understand"}`` and then either names a file or URL for the
server to read (``"source"``) or pushes frames as binary input messages (kind 2, any size up to ``max_pixels``;
the server resizes them). A worker thread per session runs :func:`~stream_runtime.understanding.understand` with
the embedded captioner and puts each event in the connection's outbox as a ``caption`` event; control events are
never dropped, and captions are few (one per stride of frames). Pushed frames wait in a bounded queue that drops
the oldest, so a camera that outruns the captioner stays live. See docs/protocol.md ("Understanding").
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stream_runtime.serving.outbox import Event, Outbox
from stream_runtime.serving.protocol import ProtocolError

logger = logging.getLogger(__name__)

UNDERSTAND_MODE = "understand"
UNDERSTAND_FIELDS = frozenset(("type", "protocol", "mode", "source", "fps", "stride_frames"))
"""The fields an ``open`` of an understand session may have."""
MAX_SOURCE_CHARS = 4096
PUSH_QUEUE_WINDOWS = 2
"""Pushed frames waiting for the captioner, in windows: beyond this the oldest are dropped."""

_session_ids = itertools.count(1)
"""Understand sessions are numbered apart from generation sessions (they never appear in binary headers)."""


@dataclass(frozen=True)
class UnderstandRequest:
    source: str | None
    """A file path or URL for the server to read; None: the client pushes frames."""
    fps: float | None
    """Frames per second: the sampling rate of a named source, the clock of pushed frames (their time is the
    header's frame number / fps). Default the captioner's (16)."""
    stride_frames: int | None
    """Frames between captions (default 8)."""


def parse_understand_open(msg: dict) -> UnderstandRequest:
    """The request of an ``open`` with ``mode: "understand"``; a ProtocolError (``bad_params``) otherwise."""
    unknown = sorted(set(msg) - UNDERSTAND_FIELDS)
    if unknown:
        raise ProtocolError(
            "bad_params",
            f"unknown field(s) {unknown} in an understand 'open'; it takes {sorted(UNDERSTAND_FIELDS - {'type'})}",
        )
    source = msg.get("source")
    if source is not None and (not isinstance(source, str) or not 0 < len(source) <= MAX_SOURCE_CHARS):
        raise ProtocolError("bad_params", f"source must be a path or URL of 1..{MAX_SOURCE_CHARS} characters")
    fps = msg.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000):
        raise ProtocolError("bad_params", f"fps must be a number in (0, 1000], got {fps!r}")
    stride = msg.get("stride_frames")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
        raise ProtocolError("bad_params", f"stride_frames must be an integer >= 1, got {stride!r}")
    return UnderstandRequest(source, None if fps is None else float(fps), stride)


@functools.cache
def shared_captioner():
    """The embedded captioner, loaded once per process (inference only: sessions share it across threads)."""
    from stream_runtime.pipelines.captioner.model import load_captioner

    return load_captioner()


class UnderstandSession:
    """One understand session: a worker thread from the source (or the pushed frames) to ``caption`` events."""

    def __init__(
        self, request: UnderstandRequest, outbox: Outbox, captioner=None, on_end: Callable[[], None] | None = None
    ) -> None:
        from stream_runtime.ingest import PushSource
        from stream_runtime.understanding.embedded import captioner_events

        self.captioner = captioner or shared_captioner()
        config = self.captioner.config
        self.id = next(_session_ids)
        self.outbox = outbox
        self.fps = request.fps or config.fps
        self.push_source = None
        if request.source is None:
            self.push_source = PushSource(PUSH_QUEUE_WINDOWS * config.window_frames, policy="drop_oldest")
        source = request.source if request.source is not None else self.push_source
        # Opening the source here raises for an unreadable file or a dead URL, before "opened" is sent.
        self._events = captioner_events(source, self.captioner, fps=self.fps, stride_frames=request.stride_frames)
        self.stride_frames = request.stride_frames
        self.captions = 0
        self._on_end = on_end
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"understand-{self.id}", daemon=True)
        self.opened = {
            "mode": UNDERSTAND_MODE,
            "source": request.source,
            "fps": self.fps,
            "window_frames": config.window_frames,
            "stride_frames": request.stride_frames or _default_stride(),
            "width": config.size,
            "height": config.size,
        }

    def start(self) -> None:
        self.outbox.put_event(Event("opened", self.id, self.opened))
        self._thread.start()

    def push(self, frame: np.ndarray, frame_number: int) -> None:
        """A pushed frame (uint8 ``[H, W, 3]`` RGB), shown at ``frame_number / fps`` seconds."""
        if self.push_source is None:
            raise ProtocolError("bad_frame", "this understand session reads its own source; it takes no frames")
        self.push_source.push(frame, timestamp=frame_number / self.fps)

    def close(self) -> None:
        """End the session: pushed frames are captioned to the end; a named source stops at the next event."""
        if self.push_source is not None:
            self.push_source.close()
        else:
            self._stop.set()

    def abandon(self) -> None:
        """The client is gone: stop without sending anything more."""
        self._stop.set()
        if self.push_source is not None:
            self.push_source.close()

    def _run(self) -> None:
        reason = "end"
        try:
            for event in self._events:
                if self._stop.is_set():
                    reason = "closed"
                    break
                self.captions += 1
                self.outbox.put_event(
                    Event(
                        "caption",
                        self.id,
                        {"index": event.step, "start_s": event.start_s, "end_s": event.end_s, "text": event.text},
                    )
                )
            else:
                reason = "closed" if self.push_source is not None else "end"
        except ValueError as exc:  # IngestError: unreadable, unsupported, dead, empty; after what was captioned
            reason = "error"
            self._error("source_failed", str(exc))
        except Exception as exc:  # a bug: logged here, reported to the client
            logger.exception("understand session %s failed", self.id)
            reason = "error"
            self._error("session_failed", f"the captioner failed: {exc}")
        finally:
            self._events.close()
        dropped = self.push_source.dropped if self.push_source is not None else 0
        data = {"reason": reason, "captions": self.captions, "dropped_frames": dropped}
        if self._on_end is not None:  # before "closed": a client that opens again at once finds the slot free
            self._on_end()
        self.outbox.put_event(Event("closed", self.id, data))

    def _error(self, code: str, message: str) -> None:
        self.outbox.put_event(Event("error", self.id, {"code": code, "message": message, "fatal": True}))


def _default_stride() -> int:
    from stream_runtime.pipelines.captioner.stream import DEFAULT_STRIDE_FRAMES

    return DEFAULT_STRIDE_FRAMES


class UnderstandSlots:
    """How many understand sessions a server runs at once (each holds a thread and a decoder); thread-safe."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit: expected >= 1, got {limit}")
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    def take(self) -> None:
        if not self._free.acquire(blocking=False):
            raise ProtocolError("busy", f"all {self.limit} understand session slots are in use; try again later")

    def give(self) -> None:
        self._free.release()


def open_understand(
    msg: dict, outbox: Outbox, allow_sources: bool, slots: UnderstandSlots | None = None
) -> UnderstandSession:
    """Parse an understand ``open`` and start its session (``opened`` is queued); ProtocolError on bad input or
    when every slot is taken."""
    from stream_runtime.ingest import IngestError

    request = parse_understand_open(msg)
    if request.source is not None and not allow_sources:
        raise ProtocolError(
            "bad_params",
            "this server does not open sources named by clients (it listens beyond loopback); push frames instead",
        )
    if slots is not None:
        slots.take()
    try:
        session = UnderstandSession(request, outbox, on_end=None if slots is None else slots.give)
    except IngestError as exc:  # an unreadable file, a dead URL
        if slots is not None:
            slots.give()
        raise ProtocolError("source_failed", str(exc)) from exc
    except ValueError as exc:  # a bad stride or fps
        if slots is not None:
            slots.give()
        raise ProtocolError("bad_params", str(exc)) from exc
    session.start()
    return session
