"""Sink + rolling KV cache for block-causal streaming attention.

Layout of one layer's buffer (``k[layer]`` and ``v[layer]``), ``[batch, tokens, heads, head_dim]``, in frame-sized
slots of ``frame_tokens`` tokens::

    | sink slots (S) | ring slots (R = window - chunk) | scratch (chunk) |
      frames 0..S-1    the R most recent frames,          K/V of the chunk being denoised
                       written round-robin (no shifting)

While the cache fills, the kept frames occupy a prefix of the slots and the chunk's K/V are written right after
them, so attention always reads one contiguous prefix ``[:, :valid + chunk]`` without a concatenation. Once full,
that prefix is the whole buffer: every steady-state chunk has the same shapes.

Slots hold frames in ring order, not time order; that is harmless because a chunk attends to all kept frames
alike. Where order matters (bounded RoPE positions, recache) :meth:`slot_positions` and :attr:`slot_frames` give it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheLayout:
    """Sizes of a :class:`RollingKVCache`, in latent frames and tokens."""

    frame_tokens: int
    """Tokens per latent frame (patches per frame: (H/16) * (W/16) for Wan2.1)."""
    sink_frames: int
    window_frames: int
    """Most recent frames attended to, including the chunk being generated."""
    chunk_frames: int

    @property
    def ring_frames(self) -> int:
        return self.window_frames - self.chunk_frames

    @property
    def cache_frames(self) -> int:
        return self.sink_frames + self.ring_frames

    @property
    def capacity_tokens(self) -> int:
        """Tokens of the buffer, the scratch region for the current chunk included."""
        return (self.cache_frames + self.chunk_frames) * self.frame_tokens


class RollingKVCache:
    """Preallocated per-layer K/V for S sink frames plus a ring of the most recent frames.

    Memory is fixed at construction and does not depend on how long the stream runs.

    Per chunk: each forward pass calls :meth:`store_current` once per layer (the chunk's K/V go to the scratch
    region, the returned views include every kept frame); after the chunk's last pass :meth:`commit` moves the
    scratch into permanent slots (sinks first, then the ring) and records the chunk's clean latents, which
    recache needs.

    Example::

        cache = RollingKVCache(layout, num_layers=30, batch=1, heads=12, head_dim=128, latent_shape=(16, 60, 104),
                               dtype=torch.bfloat16, device="cuda")
        k_all, v_all = cache.store_current(layer, k, v)    # k: [B, chunk_tokens, H, D]
        cache.commit(first_frame=n, num_frames=3, latents=x0)
    """

    def __init__(
        self,
        layout: CacheLayout,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        latent_shape: tuple[int, int, int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layers: range | None = None,
    ) -> None:
        if layout.ring_frames < 0:
            raise ValueError(f"window_frames ({layout.window_frames}) must be >= chunk_frames ({layout.chunk_frames})")
        self.layout = layout
        self.batch = batch
        self.layers = layers if layers is not None else range(num_layers)
        shape = (batch, layout.capacity_tokens, heads, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in self.layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in self.layers}
        self.latents = None
        if latent_shape is not None:
            channels, height, width = latent_shape
            self.latents = torch.zeros(
                (batch, channels, layout.cache_frames, height, width), dtype=dtype, device=device
            )
        self.reset()

    # -- bookkeeping (host integers only: the schedule is known in advance, so nothing waits on the device)

    def reset(self) -> None:
        """Forget every kept frame (the buffers are reused, not freed). The next frames written are sinks."""
        self.slot_frames: list[int] = [-1] * self.layout.cache_frames
        self._sinks_written = 0
        self._ring_next = 0
        self._last_frame = -1
        self._pending = 0

    @property
    def valid_frames(self) -> int:
        """Kept frames. Slots fill in order (sinks, then the ring) and the ring wraps only once full, so the kept
        frames always occupy a prefix of the slots."""
        return sum(f >= 0 for f in self.slot_frames)

    @property
    def valid_tokens(self) -> int:
        return self.valid_frames * self.layout.frame_tokens

    def _next_slots(self, count: int) -> tuple[list[int | None], int, int]:
        """Slots the next ``count`` committed frames go to (None: not kept), and the sink count and ring pointer
        after them; changes no state."""
        sink, ring = self.layout.sink_frames, self.layout.ring_frames
        sinks_written, ring_next, slots = self._sinks_written, self._ring_next, []
        for _ in range(count):
            if sinks_written < sink:
                slots.append(sinks_written)
                sinks_written += 1
            elif ring == 0:
                slots.append(None)
            else:
                slots.append(sink + ring_next)
                ring_next = (ring_next + 1) % ring
        return slots, sinks_written, ring_next

    def kept_frames(self) -> list[int]:
        """Frame numbers of the kept frames in time order."""
        return sorted(f for f in self.slot_frames if f >= 0)

    def slot_positions(self, mode: str) -> list[int]:
        """RoPE frame position of each valid slot, in slot order.

        ``absolute``: the frame number. ``bounded``: the rank of the frame among the kept frames (sinks get
        0..S-1, the window continues from there), so positions stay below ``sink + window`` forever.
        """
        valid = self.slot_frames[: self.valid_frames]
        if mode == "absolute":
            return list(valid)
        rank = {frame: i for i, frame in enumerate(sorted(valid))}
        return [rank[f] for f in valid]

    def chunk_positions(self, first_frame: int, num_frames: int, mode: str) -> list[int]:
        """RoPE frame positions of a chunk that starts at stream frame ``first_frame``."""
        start = first_frame if mode == "absolute" else self.valid_frames
        return list(range(start, start + num_frames))

    def kept(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[B, valid_tokens, H, D]`` of the kept frames' K/V of ``layer`` (in slot order), without the
        scratch region: what every chunk of a stream batch attends to besides itself."""
        end = self.valid_tokens
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def set_layers(self, layers: range, k: dict[int, torch.Tensor], v: dict[int, torch.Tensor]) -> None:
        """Own ``layers`` from now on, with their K/V buffers ``k[layer], v[layer]`` (a pipeline stage's blocks
        after a rebalance: kept buffers plus those received from other stages, whose caches have the same
        bookkeeping since every stage commits the same chunks)."""
        shape = next(iter(self.k.values())).shape
        for layer in layers:
            if layer not in k or layer not in v:
                raise ValueError(f"set_layers needs K and V for every layer of {layers}; layer {layer} is missing")
            if k[layer].shape != shape or v[layer].shape != shape:
                raise ValueError(f"layer buffers must be {list(shape)}, got {list(k[layer].shape)} for {layer}")
        self.layers = layers
        self.k = {i: k[i] for i in layers}
        self.v = {i: v[i] for i in layers}

    # -- the two writes

    def store_current(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the current chunk's K/V ``[B, n, H, D]`` into the scratch region of ``layer``; return views
        ``[B, valid + n, H, D]`` over every kept frame followed by the chunk."""
        ft, n = self.layout.frame_tokens, k.shape[1]
        if n % ft or n > self.layout.chunk_frames * ft:
            raise ValueError(
                f"chunk K/V must cover whole frames, at most chunk_frames={self.layout.chunk_frames} frames of {ft} "
                f"tokens; got {n} tokens (does not fit the scratch region)"
            )
        start = self.valid_tokens
        end = start + n
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        self.note_stored(n // ft)
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def note_stored(self, frames: int) -> None:
        """Record that a chunk of ``frames`` frames now sits in the scratch region, written without
        :meth:`store_current` (a CUDA graph replaying it writes the device buffers but runs no host code), so that
        :meth:`commit` accepts it."""
        self._pending = frames

    def commit(self, first_frame: int, num_frames: int, latents: torch.Tensor | None = None) -> None:
        """Keep the chunk whose K/V were last stored (stream frames ``first_frame .. first_frame+num_frames-1``).

        ``latents`` ``[B, C, num_frames, h, w]`` are the chunk's clean latents, kept for recache. The first
        ``sink_frames`` frames committed after a reset become sinks; later ones go round the ring, evicting the
        oldest. Frames that the ring cannot hold (ring smaller than the chunk) are dropped.
        """
        if num_frames != self._pending:
            raise ValueError(f"commit of {num_frames} frames, but the last stored chunk had {self._pending}")
        if first_frame <= self._last_frame:
            raise ValueError(f"frames must be committed in stream order: got {first_frame} after {self._last_frame}")
        ft = self.layout.frame_tokens
        scratch = self.valid_tokens
        # When two frames of the chunk map to one ring slot the later one wins.
        targets: dict[int, int] = {}
        slots, sinks_written, ring_next = self._next_slots(num_frames)
        for i, slot in enumerate(slots):
            if slot is not None:
                targets[slot] = i
        moves = sorted(targets.items())
        # Copy runs of consecutive frames as slices: no index tensors, so nothing crosses from host to device.
        # Destinations are free slots (identical to the source: skipped) or evicted ring slots, which all lie
        # before the scratch region, so no copy overwrites a source that is still to be read.
        for slot, i, n in _runs(moves):
            if slot == self.valid_frames + i:
                continue
            dst, src = slice(slot * ft, (slot + n) * ft), slice(scratch + i * ft, scratch + (i + n) * ft)
            for layer in self.layers:
                self.k[layer][:, dst] = self.k[layer][:, src]
                self.v[layer][:, dst] = self.v[layer][:, src]
        if self.latents is not None and latents is not None:
            for slot, i, n in _runs(moves):
                self.latents[:, :, slot : slot + n] = latents[:, :, i : i + n]
        self._sinks_written, self._ring_next = sinks_written, ring_next
        for slot, i in moves:
            self.slot_frames[slot] = first_frame + i
        self._last_frame = first_frame + num_frames - 1
        self._pending = 0

    def kept_latents(self) -> tuple[list[int], torch.Tensor]:
        """Clean latents of the kept frames in time order: (frame numbers, ``[B, C, n, h, w]``)."""
        if self.latents is None:
            raise ValueError("this cache was built without latent_shape, so it keeps no latents to recache from")
        order = sorted(range(self.valid_frames), key=lambda s: self.slot_frames[s])
        index = torch.tensor(order, device=self.latents.device)
        return [self.slot_frames[s] for s in order], self.latents.index_select(2, index)

    def memory_bytes(self) -> int:
        """Bytes held by the buffers (constant for the life of the cache)."""
        tensors = [*self.k.values(), *self.v.values()] + ([self.latents] if self.latents is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def _runs(moves: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Group (slot, frame) pairs into runs (first slot, first frame, length) where both advance by one."""
    runs: list[list[int]] = []
    for slot, i in moves:
        if runs and runs[-1][0] + runs[-1][2] == slot and runs[-1][1] + runs[-1][2] == i:
            runs[-1][2] += 1
        else:
            runs.append([slot, i, 1])
    return [tuple(r) for r in runs]
