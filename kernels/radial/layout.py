"""Which latent frames the keys and the queries of one streaming attention call hold, and the radial band rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StreamFrameLayout:
    """Frame-level layout of ``[sink | window | current chunk]`` keys against the current chunk's queries.

    Tokens are frame-major (frame, row, col): key frame ``i`` holds key tokens ``[i * hw, (i + 1) * hw)`` and query
    frame ``j`` query tokens ``[j * hw, (j + 1) * hw)``, with ``hw`` patches per frame. Times are latent frame
    numbers on one timeline; only their differences matter.

    Example (1 sink frame, a window of 4 frames, a 3-frame chunk starting at frame 20)::

        StreamFrameLayout(key_times=(0, 16, 17, 18, 19, 20, 21, 22),
                          key_is_sink=(True,) + (False,) * 7,
                          query_times=(20, 21, 22))
        # == rolling_cache_layout(sink_frames=1, window_frames=4, chunk_frames=3, chunk_start=20)
    """

    key_times: tuple[int, ...]
    """Time of each key frame, in key order (sink frames, then the window, then the chunk's own frames)."""
    key_is_sink: tuple[bool, ...]
    """Per key frame, whether it is a sink frame (always attended densely)."""
    query_times: tuple[int, ...]
    """Time of each query frame of the current chunk, in query order. A key frame with one of these times is one of
    the chunk's own frames (attended densely by every query of the chunk)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_times", tuple(int(t) for t in self.key_times))
        object.__setattr__(self, "key_is_sink", tuple(bool(s) for s in self.key_is_sink))
        object.__setattr__(self, "query_times", tuple(int(t) for t in self.query_times))
        if len(self.key_times) != len(self.key_is_sink):
            raise ValueError(
                f"key_times and key_is_sink need one entry per key frame, got {len(self.key_times)} and "
                f"{len(self.key_is_sink)}"
            )
        if not self.key_times or not self.query_times:
            raise ValueError("a layout needs at least one key frame and one query frame")

    @property
    def n_key_frames(self) -> int:
        return len(self.key_times)

    @property
    def n_query_frames(self) -> int:
        return len(self.query_times)


def rolling_cache_layout(
    sink_frames: int, window_frames: int, chunk_frames: int, chunk_start: int | None = None
) -> StreamFrameLayout:
    """The layout of a sink + rolling-window cache followed by the current chunk's own keys.

    Sink frames are frames ``0 .. sink_frames - 1``; the window holds the ``window_frames`` frames right before
    ``chunk_start`` (fewer while the stream is younger than the window: frames before ``sink_frames`` are never in
    the window); the chunk is ``chunk_start .. chunk_start + chunk_frames - 1``. ``chunk_start`` defaults to the
    steady state, ``sink_frames + window_frames``.
    """
    if sink_frames < 0 or window_frames < 0 or chunk_frames < 1:
        raise ValueError(
            f"need sink_frames >= 0, window_frames >= 0, chunk_frames >= 1, got {sink_frames}, {window_frames}, "
            f"{chunk_frames}"
        )
    chunk_start = sink_frames + window_frames if chunk_start is None else chunk_start
    if chunk_start < sink_frames:
        raise ValueError(f"chunk_start ({chunk_start}) must not precede the end of the sink ({sink_frames})")
    sink = list(range(sink_frames))
    window = list(range(max(sink_frames, chunk_start - window_frames), chunk_start))
    chunk = list(range(chunk_start, chunk_start + chunk_frames))
    return StreamFrameLayout(
        key_times=tuple(sink + window + chunk),
        key_is_sink=(True,) * len(sink) + (False,) * (len(window) + len(chunk)),
        query_times=tuple(chunk),
    )


def radial_bands(layout: StreamFrameLayout, tokens_per_frame: int, base_band: int, min_band: int) -> torch.Tensor:
    """Spatial half-band per (query frame, key frame): ``[n_query_frames, n_key_frames]`` int64.

    A query token at in-frame index ``s`` attends to key tokens at in-frame index ``s'`` with
    ``|s - s'| <= band``. A band of ``tokens_per_frame`` or more means the whole frame (dense). Rules:

    * sink frames, the chunk's own frames, and frames at temporal distance ``d = |t_q - t_k| <= 1`` are dense;
    * beyond, ``band = max(min_band, base_band // 2 ** (floor(log2 d) - 1))``: ``base_band`` for ``d`` in 2..3,
      half that for 4..7, a quarter for 8..15, ... (it halves with each doubling of the distance).
    """
    if base_band < 0 or min_band < 0:
        raise ValueError(f"base_band and min_band must be >= 0, got {base_band} and {min_band}")
    q_times = torch.tensor(layout.query_times)
    k_times = torch.tensor(layout.key_times)
    dist = (q_times[:, None] - k_times[None, :]).abs()
    # floor(log2 d) - 1 for d >= 2; clamp keeps the shift defined where d < 2 (overwritten as dense below).
    halvings = (torch.floor(torch.log2(dist.clamp(min=2).double())).long() - 1).clamp(min=0)
    bands = torch.clamp(torch.div(base_band, 2**halvings, rounding_mode="floor"), min=min_band)
    own = torch.isin(k_times, q_times)
    sink = torch.tensor(layout.key_is_sink)
    dense = (dist <= 1) | own[None, :] | sink[None, :]
    return torch.where(dense, tokens_per_frame, bands.clamp(max=tokens_per_frame))


def resolve_bands(frame_grid: Sequence[int], base_band: int | None, min_band: int | None) -> tuple[int, int, int]:
    """``(tokens_per_frame, base_band, min_band)`` with the defaults filled in from the frame grid.

    Defaults: ``base_band = tokens_per_frame // 4`` (a band about half a frame wide at distance 2-3, near Radial
    Attention's Wan setting), ``min_band = cols`` (one patch row: the tokens straight above and below stay visible
    however far the frame).
    """
    if len(frame_grid) != 2 or min(frame_grid) < 1:
        raise ValueError(f"frame_grid must be (rows, cols) of latent patches per frame, got {tuple(frame_grid)}")
    rows, cols = int(frame_grid[0]), int(frame_grid[1])
    tokens_per_frame = rows * cols
    base_band = tokens_per_frame // 4 if base_band is None else int(base_band)
    min_band = cols if min_band is None else int(min_band)
    return tokens_per_frame, base_band, min_band
