"""Bookkeeping of a streaming VLM cache: the kind and 3-D position of every cached token, and eviction.

The ledger holds no K/V; it mirrors the token axis of the cache (index ``i`` here is index ``i`` of every layer's
``[batch, kv_heads, tokens, head_dim]`` keys) as a sequence of *units*, the smallest pieces that are evicted:

* a text token (kind ``TEXT``), one position;
* a frame chunk (kind ``VISION``): ``<|vision_start|>``, its ``t*h*w`` vision tokens, ``<|vision_end|>``;
  ``2 + max(h, w)`` positions (see :mod:`.rope`);
* any unit that starts within the first ``sink_tokens`` tokens of the stream is a ``SINK`` and is never evicted.

:meth:`TokenLedger.evict` keeps the sinks, the newest frame chunks holding at most ``vision_window_frames``
frames and the newest ``text_window_tokens`` text tokens, then packs the kept units from position 0 in stream
order, so positions are exactly what ``get_rope_index`` would assign to the kept token sequence and stay below
a bound that does not depend on the stream's length.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .config import StreamingVLMConfig
from .rope import text_positions, vision_unit_extent, vision_unit_positions


class TokenKind(enum.IntEnum):
    """What a cached token is, for the eviction policy."""

    SINK = 0
    VISION = 1
    TEXT = 2


@dataclass
class _Unit:
    kind: TokenKind
    start: int
    """Running position of the unit's first token."""
    extent: int
    """Positions the unit advances the running position by."""
    tokens: int
    frames: int
    """Frames of a frame chunk (0 for text); vision sinks keep their count but never count against the window."""


@dataclass(frozen=True)
class Eviction:
    """What :meth:`TokenLedger.evict` decided, for the cache to apply to every layer."""

    keep: torch.Tensor
    """``[kept]`` long indices of the kept tokens on the cache's token axis, ascending."""
    delta: torch.Tensor
    """``[kept]`` long shift of each kept token's position (``<= 0``, equal on the t/h/w axes)."""
    first_moved: int
    """Index into ``keep`` of the first token with a nonzero shift (``len(keep)`` when none moved)."""
    evicted: int
    """Tokens dropped."""


class TokenLedger:
    """Kinds and M-RoPE positions of the tokens of a :class:`~.cache.StreamingVLMCache`, in cache order.

    Append units in the order their tokens enter the cache (each ``append_*`` returns the positions to run
    the model with), then call :meth:`evict` once the step is over.

    Example::

        ledger = TokenLedger(StreamingVLMConfig(sink_tokens=4, vision_window_frames=2, text_window_tokens=8))
        ledger.append_text(4)                       # system prompt -> sinks, positions 0..3
        ledger.append_vision((1, 2, 2), frames=2)   # [3, 6] positions from 4
        ledger.evict()
    """

    def __init__(self, config: StreamingVLMConfig) -> None:
        self.config = config
        self.positions = torch.zeros(3, 0, dtype=torch.long)
        """``[3, tokens]`` current (re-indexed) position of every cached token."""
        self.kinds = torch.zeros(0, dtype=torch.uint8)
        """``[tokens]`` :class:`TokenKind` of every cached token."""
        self.stream_tokens = 0
        """Tokens appended since the stream began (evicted ones included)."""
        self._units: list[_Unit] = []

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[1]

    @property
    def next_position(self) -> int:
        """Running position of the next token: the kept units packed from 0."""
        if not self._units:
            return 0
        last = self._units[-1]
        return last.start + last.extent

    def count(self, kind: TokenKind) -> int:
        """Cached tokens of ``kind``."""
        return int((self.kinds == kind).sum())

    def frames(self) -> int:
        """Frames of the non-sink frame chunks in the cache."""
        return sum(u.frames for u in self._units if u.kind is TokenKind.VISION)

    def _kind(self, natural: TokenKind, stream_index: int) -> TokenKind:
        return TokenKind.SINK if stream_index < self.config.sink_tokens else natural

    def _extend(self, kinds: list[TokenKind], positions: torch.Tensor) -> None:
        self.positions = torch.cat([self.positions, positions], dim=1)
        self.kinds = torch.cat([self.kinds, torch.tensor([int(k) for k in kinds], dtype=torch.uint8)])
        self.stream_tokens += positions.shape[1]

    def append_text(self, count: int) -> torch.Tensor:
        """Add ``count`` text tokens (one unit each); returns their ``[3, count]`` positions."""
        if count < 0:
            raise ValueError(f"append_text: expected count >= 0, got {count}")
        start = self.next_position
        kinds = [self._kind(TokenKind.TEXT, self.stream_tokens + i) for i in range(count)]
        self._units.extend(_Unit(kind, start + i, 1, 1, 0) for i, kind in enumerate(kinds))
        positions = text_positions(start, count)
        self._extend(kinds, positions)
        return positions

    def append_vision(self, grid: tuple[int, int, int], frames: int, time_interval: float = 1.0) -> torch.Tensor:
        """Add one frame chunk unit (markers included); returns its ``[3, 2 + t*h*w]`` positions.

        Args:
            grid: LLM grid ``(t, h, w)`` after the spatial merge.
            frames: frames the chunk holds (counted against ``vision_window_frames``).
            time_interval: temporal position spacing (see :func:`.rope.vision_unit_positions`).
        """
        window = self.config.vision_window_frames
        if not 1 <= frames <= window:
            raise ValueError(
                f"append_vision: expected 1 <= frames <= vision_window_frames ({window}), got {frames}; "
                "a chunk longer than the window would be evicted as soon as its step ends"
            )
        start = self.next_position
        positions = vision_unit_positions(start, grid, time_interval)
        kind = self._kind(TokenKind.VISION, self.stream_tokens)
        self._units.append(_Unit(kind, start, vision_unit_extent(grid), positions.shape[1], frames))
        self._extend([kind] * positions.shape[1], positions)
        return positions

    def evict(self) -> Eviction:
        """Drop units beyond the windows, re-index the kept ones contiguously; returns what to apply to K/V."""
        vision_budget = self.config.vision_window_frames
        text_budget = self.config.text_window_tokens
        keep_unit = [False] * len(self._units)
        for i in range(len(self._units) - 1, -1, -1):
            unit = self._units[i]
            if unit.kind is TokenKind.SINK:
                keep_unit[i] = True
            elif unit.kind is TokenKind.VISION:
                if unit.frames <= vision_budget:
                    keep_unit[i] = True
                    vision_budget -= unit.frames
                else:
                    vision_budget = 0  # keep a contiguous run of the newest chunks, never an older one past a gap
            elif text_budget > 0:
                keep_unit[i] = True
                text_budget -= 1

        kept_units: list[_Unit] = []
        keep_list: list[int] = []
        delta_list: list[int] = []
        start = offset = 0
        for unit, keep in zip(self._units, keep_unit, strict=True):
            if keep:
                keep_list.extend(range(offset, offset + unit.tokens))
                delta_list.extend([start - unit.start] * unit.tokens)
                kept_units.append(_Unit(unit.kind, start, unit.extent, unit.tokens, unit.frames))
                start += unit.extent
            offset += unit.tokens
        keep = torch.tensor(keep_list, dtype=torch.long)
        delta = torch.tensor(delta_list, dtype=torch.long)
        first_moved = next((i for i, d in enumerate(delta_list) if d), len(delta_list))

        evicted = self.num_tokens - keep.numel()
        self._units = kept_units
        self.positions = self.positions[:, keep] + delta
        self.kinds = self.kinds[keep]
        return Eviction(keep=keep, delta=delta, first_moved=first_moved, evicted=evicted)
