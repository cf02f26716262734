"""What one websocket client may send: message sizes, input frame dimensions, message rate, unread events.

A message over a limit is answered with a non-fatal ``error`` event and not acted on; the connection goes on. Two
cases end the connection instead: a message larger than the transport limit (:meth:`ClientLimits.transport_bytes`:
the websocket layer closes with 1009 without reading it) and a client that lets more than ``max_unsent_events``
events pile up unread (closed with 1008). Each connection has its own :class:`TokenBucket`.

Example::

    limits = ClientLimits(messages_per_second=30.0)
    app = build_app(engine, limits=limits)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from stream_runtime.serving.protocol import HEADER_SIZE

RGBA_BYTES_PER_PIXEL = 4
"""The widest input payload per pixel (``rgba``); a JPEG of the same frame is smaller."""
FRAME_SLACK_BYTES = 64 * 2**10
"""Added to the derived frame limit for JPEG markers, tables and metadata, which a tiny frame may not amortise."""
TRANSPORT_SLACK = 2
"""The websocket layer reads messages up to this multiple of the largest limit, so a message somewhat over a limit
gets an ``error`` event; a larger one closes the connection (1009) without being buffered."""


@dataclass(frozen=True)
class ClientLimits:
    """Per-connection limits of the websocket server (``build_app(engine, limits=...)``)."""

    max_text_bytes: int = 16 * 2**10
    """Largest JSON control message, in UTF-8 bytes. A valid ``open`` fits even with every one of its 2,000 prompt
    characters escaped as ``\\uXXXX`` (12 KB), and every other field."""
    max_frame_bytes: int | None = None
    """Largest binary input frame, header included. None: an RGBA frame of ``max_frame_pixels`` plus
    ``FRAME_SLACK_BYTES``."""
    max_frame_pixels: int | None = None
    """Largest ``width * height`` an input frame's header may declare (checked before any decoding, so a small JPEG
    cannot claim a huge image). None: the engine's ``max_pixels``."""
    messages_per_second: float = 64.0
    """Sustained rate of client messages (text and binary alike): four times a 16 fps webcam, plus control
    messages. A token bucket: beyond it messages are dropped unread, with one ``rate_limited`` error per run."""
    message_burst: int = 128
    """Messages a client may send at once before the rate applies (the bucket's size)."""
    max_unsent_events: int = 256
    """Events (errors included) that may wait for a client that does not read them; one more closes the connection
    with 1008. Chunks never count: a client has at most one unsent chunk."""
    send_buffer_bytes: int | None = None
    """``SO_SNDBUF`` of every connection (set on the listening socket, which accepted sockets inherit): how much of a
    slow client's stream may wait in the kernel before the sender blocks and its single slot starts dropping stale
    chunks. None: the kernel's autotuning (up to ``net.ipv4.tcp_wmem``'s maximum, 4 MiB on Linux by default, seconds
    of a stream). A small value keeps a slow client's latency low; too small a one limits the throughput of a client
    on a long link (it must cover the bandwidth-delay product)."""

    def __post_init__(self) -> None:
        for name in ("max_text_bytes", "message_burst", "max_unsent_events"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_frame_bytes", "max_frame_pixels", "send_buffer_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if not self.messages_per_second > 0:
            raise ValueError(f"messages_per_second must be > 0, got {self.messages_per_second!r}")

    def frame_pixels(self, engine_max_pixels: int) -> int:
        """The pixel limit of input frames on a server whose engine admits ``engine_max_pixels``."""
        return engine_max_pixels if self.max_frame_pixels is None else self.max_frame_pixels

    def frame_bytes(self, engine_max_pixels: int) -> int:
        """The byte limit of input frames (header included) on that server."""
        if self.max_frame_bytes is not None:
            return self.max_frame_bytes
        return HEADER_SIZE + RGBA_BYTES_PER_PIXEL * self.frame_pixels(engine_max_pixels) + FRAME_SLACK_BYTES

    def transport_bytes(self, engine_max_pixels: int) -> int:
        """The websocket layer's message size limit (uvicorn's ``ws_max_size``)."""
        return TRANSPORT_SLACK * max(self.max_text_bytes, self.frame_bytes(engine_max_pixels))


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; a message takes one. Used from one event loop only.

    Example::

        bucket = TokenBucket(rate=2.0, burst=4)
        [bucket.take() for _ in range(5)]      # [True, True, True, True, False]
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        """Take a token if there is one."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_s(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)
