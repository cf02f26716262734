"""The stream-batch schedule: which chunk is at which pass in each forward, and each pass's noise.

A chunk needs ``P`` passes: its ``n`` denoising steps, plus the clean context pass at t=0 when the config has one
(``P = n + 1``), whose K/V are what the cache keeps. In the sequential schedule a chunk makes all ``P`` passes
before the next one starts. In the stream batch the passes of several chunks share one forward:

    forward ``f`` holds chunk ``f - p * S`` at pass ``p``, for every ``p`` in ``0 .. P-1`` with a chunk >= 0

where ``S`` is the stride (1 on one device; the number of pipeline stages when the batch circulates through a ring
of stages, so that ``S`` batches are in flight and every stage is busy). Chunk ``c`` enters at forward ``c``, makes
pass ``p`` at forward ``c + p*S`` and leaves after forward ``c + (P-1)*S``: one chunk leaves per forward once
``(P-1)*S + 1`` forwards have warmed the pipeline up.

What a chunk attends to (the semantics the batched forward and its sequential reference share):

- In forward ``f`` every chunk of the batch attends to the *same* cache: the kept (sink + rolling window) frames of
  the chunks that left in forwards before ``f``, each with the K/V of its last pass; and to all of its own tokens.
  Chunks of the same batch never see one another.
- The cache changes only between forwards: after forward ``f`` the chunk that left in it is committed.
- Hence chunk ``c`` at pass ``p`` sees the chunks up to ``c + p*S - (P-1)*S - 1``; at its last pass it sees every
  earlier chunk, exactly as in the sequential schedule (so the cached K/V of chunk ``c`` are computed with the same
  view as there), while its earlier passes see a cache that lags by the chunks still in flight.
- Live controls (a prompt switch, recache, a blend step) act between two forwards and apply to every chunk of the
  next forward, whichever pass it is at.

Noise is drawn per (seed, chunk, pass) rather than from one running generator, so that whichever process runs a
pass (the last pipeline stage re-noises, the first draws a new chunk's noise) draws the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class StreamBatchSchedule:
    """Bookkeeping of the stream batch (host integers only).

    Example::

        sched = StreamBatchSchedule(passes=5, stride=1)   # 4 steps + context pass
        sched.items(6)        # [(6, 0), (5, 1), (4, 2), (3, 3), (2, 4)]: (chunk, pass), chunk 2 leaves
        sched.leaving(6)      # 2
    """

    passes: int
    """Passes per chunk: denoising steps, plus one when the context pass is on."""
    stride: int = 1
    """Forwards between two passes of one chunk."""

    def __post_init__(self) -> None:
        for name, value in (("passes", self.passes), ("stride", self.stride)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def lag(self) -> int:
        """Forwards from a chunk's entry to the forward it leaves in."""
        return (self.passes - 1) * self.stride

    @property
    def warmup_forwards(self) -> int:
        """Forwards run before the first chunk leaves (including the one it leaves in)."""
        return self.lag + 1

    def total_forwards(self, num_chunks: int) -> int:
        """Forwards that generate ``num_chunks`` chunks, the last few draining the pipeline."""
        return num_chunks + self.lag

    def items(self, forward: int, num_chunks: int | None = None) -> list[tuple[int, int]]:
        """``(chunk, pass)`` of every chunk in ``forward``, in increasing pass order (the leaving chunk last).
        ``num_chunks`` (None: an endless stream) stops new chunks from entering."""
        out = []
        for p in range(self.passes):
            chunk = forward - p * self.stride
            if chunk >= 0 and (num_chunks is None or chunk < num_chunks):
                out.append((chunk, p))
        return out

    def leaving(self, forward: int, num_chunks: int | None = None) -> int | None:
        """The chunk that makes its last pass in ``forward`` (committed after it), or None."""
        chunk = forward - self.lag
        return chunk if chunk >= 0 and (num_chunks is None or chunk < num_chunks) else None

    def leave_forward(self, chunk: int) -> int:
        """The forward in which ``chunk`` makes its last pass."""
        return chunk + self.lag


def pass_noise(seed: int, chunk: int, pass_index: int, shape, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise ``shape`` (float32) for ``chunk`` entering pass ``pass_index`` (0: the chunk's start
    noise; p > 0: the re-noising before step p). The same on any process for the same arguments."""
    for name, value in (("seed", seed), ("chunk", chunk), ("pass_index", pass_index)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    # SeedSequence mixes the three integers into a well-spread 64-bit seed (no hand-made hash constants).
    mixed = int(np.random.SeedSequence([seed, chunk, pass_index]).generate_state(1, dtype=np.uint64)[0] >> 1)
    generator = torch.Generator(device=device).manual_seed(mixed)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
