"""The block table the block-sparse kernel consumes: per query block, the ascending list of key blocks to visit.

Pure PyTorch, no Triton: mask builders (``stream_runtime.kernels.radial``) and the reference import it freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # eq on tensor fields would be ambiguous; compare tables field by field
class BlockTable:
    """Which ``[block_m, block_n]`` tiles of the ``[q_len, k_len]`` score matrix are computed.

    Build one with :func:`dense_block_table`, :meth:`from_block_mask` or
    ``stream_runtime.kernels.radial.radial_block_table``, once per (resolution, cache layout), and reuse it for
    every layer and step: it holds no per-step state.

    Tokens ``[i * block_m, (i + 1) * block_m)`` form query block ``i`` (likewise keys with ``block_n``); the
    last block of each side may be short (``q_len``/``k_len`` need not be multiples of the block sizes).
    """

    block_idx: torch.Tensor
    """``[Bt, Ht, n_q_blocks, max_blocks]`` int32. Row ``[b, h, i]`` lists, in its first ``block_count[b, h, i]``
    entries, the key blocks query block ``i`` attends to, strictly ascending; later entries are padding (-1) and
    never read. ``Bt`` is 1 (shared by the batch) or the batch size, ``Ht`` 1 (shared by heads) or the head count."""
    block_count: torch.Tensor
    """``[Bt, Ht, n_q_blocks]`` int32, how many entries of each ``block_idx`` row are valid. A count of 0 is
    allowed: those queries get ``out = 0`` and ``lse = -inf`` (:func:`merge_attention` treats that as "no keys")."""
    block_m: int
    """Query tokens per block (a power of two >= 16)."""
    block_n: int
    """Key tokens per block (a power of two >= 16)."""
    q_len: int
    """Query tokens the table was built for (the kernel checks ``q.shape[1]`` against it)."""
    k_len: int
    """Key tokens the table was built for (the kernel checks ``k.shape[1]`` against it)."""
    dense: bool = False
    """Every row lists every key block (what :func:`dense_block_table` builds): the kernel then walks the keys in
    order without reading the table, so its loads do not wait on an index load."""

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot needs 16-wide tiles), got {size}")
        if self.q_len < 1 or self.k_len < 1:
            raise ValueError(f"q_len and k_len must be positive, got q_len={self.q_len}, k_len={self.k_len}")
        idx, cnt = self.block_idx, self.block_count
        if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
            raise TypeError(f"block_idx and block_count must be int32, got {idx.dtype} and {cnt.dtype}")
        if idx.dim() != 4 or cnt.dim() != 3 or idx.shape[:3] != cnt.shape:
            raise ValueError(
                "block_idx must be [Bt, Ht, n_q_blocks, max_blocks] and block_count [Bt, Ht, n_q_blocks], "
                f"got {tuple(idx.shape)} and {tuple(cnt.shape)}"
            )
        if idx.shape[2] != self.n_q_blocks:
            raise ValueError(
                f"block_idx has {idx.shape[2]} query blocks, but q_len={self.q_len} with block_m={self.block_m} "
                f"needs {self.n_q_blocks}"
            )
        if idx.device != cnt.device:
            raise ValueError(f"block_idx is on {idx.device} but block_count on {cnt.device}; move both with .to()")

    @property
    def n_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_m)

    @property
    def n_k_blocks(self) -> int:
        return math.ceil(self.k_len / self.block_n)

    @property
    def device(self) -> torch.device:
        return self.block_idx.device

    def to(self, device: torch.device | str) -> BlockTable:
        """The same table with its index tensors on ``device`` (do this once, not per call)."""
        return BlockTable(
            self.block_idx.to(device),
            self.block_count.to(device),
            self.block_m,
            self.block_n,
            self.q_len,
            self.k_len,
            self.dense,
        )

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_m: int, block_n: int, q_len: int, k_len: int):
        """Compact a boolean ``[Bt, Ht, n_q_blocks, n_k_blocks]`` block mask (True = compute the tile).

        Example::

            mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
            table = BlockTable.from_block_mask(mask, 64, 64, q_len=150, k_len=300)
        """
        if block_mask.dim() != 4 or block_mask.dtype != torch.bool:
            raise ValueError(
                f"block_mask must be a bool [Bt, Ht, n_q_blocks, n_k_blocks] tensor, got {block_mask.dtype} "
                f"{tuple(block_mask.shape)}"
            )
        n_k_blocks = math.ceil(k_len / block_n)
        if block_mask.shape[2] != math.ceil(q_len / block_m) or block_mask.shape[3] != n_k_blocks:
            raise ValueError(
                f"block_mask has {tuple(block_mask.shape[2:])} blocks, expected "
                f"({math.ceil(q_len / block_m)}, {n_k_blocks}) for q_len={q_len}, k_len={k_len}, "
                f"block sizes ({block_m}, {block_n})"
            )
        count = block_mask.sum(-1, dtype=torch.int32)
        max_blocks = max(int(count.max()), 1)
        # A stable sort of ~mask puts the listed blocks first, in ascending key order.
        order = torch.sort((~block_mask).to(torch.uint8), dim=-1, stable=True).indices[..., :max_blocks]
        slot = torch.arange(max_blocks, device=block_mask.device)
        idx = torch.where(slot < count[..., None], order, -1).to(torch.int32)
        return cls(idx.contiguous(), count.contiguous(), block_m, block_n, q_len, k_len)

    def to_block_mask(self) -> torch.Tensor:
        """Expand to a bool ``[Bt, Ht, n_q_blocks, n_k_blocks]`` mask (True = tile computed)."""
        slot = torch.arange(self.block_idx.shape[-1], device=self.device)
        valid = slot < self.block_count[..., None]
        mask = torch.zeros(*self.block_count.shape, self.n_k_blocks + 1, dtype=torch.bool, device=self.device)
        # Padding entries scatter into the spare last column, which is then dropped.
        target = torch.where(valid, self.block_idx.long(), self.n_k_blocks)
        mask.scatter_(-1, target, True)
        return mask[..., : self.n_k_blocks]

    def to_mask(self) -> torch.Tensor:
        """Expand to the token-level bool mask ``[Bt, Ht, q_len, k_len]`` that the kernel computes exactly.

        Memory is ``q_len * k_len`` bytes per (Bt, Ht): meant for references and tests on small shapes.
        """
        mask = self.to_block_mask()
        mask = mask.repeat_interleave(self.block_m, dim=2)[:, :, : self.q_len]
        return mask.repeat_interleave(self.block_n, dim=3)[..., : self.k_len]

    def density(self) -> float:
        """Fraction of the ``q_len * k_len`` (query, key) pairs the kernel computes, averaged over ``Bt, Ht``."""
        mask = self.to_block_mask().double()
        q_sizes = (self.q_len - torch.arange(self.n_q_blocks, device=self.device) * self.block_m).clamp(
            max=self.block_m
        )
        k_sizes = (self.k_len - torch.arange(self.n_k_blocks, device=self.device) * self.block_n).clamp(
            max=self.block_n
        )
        pairs = (mask * q_sizes.double()[:, None] * k_sizes.double()[None, :]).sum((-1, -2))
        return float(pairs.mean()) / (self.q_len * self.k_len)

    def validate(self) -> None:
        """Check the contents (indices in range, strictly ascending, counts in range). Syncs with the device, so
        builders call it once on construction, never the kernel on each call."""
        idx, cnt = self.block_idx.long(), self.block_count.long()
        if bool((cnt < 0).any()) or bool((cnt > idx.shape[-1]).any()):
            raise ValueError(f"block_count must lie in [0, {idx.shape[-1]}] (max_blocks)")
        valid = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]
        if bool(((idx < 0) | (idx >= self.n_k_blocks))[valid].any()):
            raise ValueError(f"listed key blocks must lie in [0, {self.n_k_blocks}) for k_len={self.k_len}")
        ascending = idx[..., 1:] > idx[..., :-1]
        if bool((~ascending & valid[..., 1:]).any()):
            raise ValueError("each block_idx row must list its key blocks strictly ascending (the kernel relies on it)")
        if self.dense and not bool((self.block_count == self.n_k_blocks).all()):
            raise ValueError("a table marked dense must list every key block in every row (or set dense=False)")


def dense_block_table(
    q_len: int, k_len: int, block_m: int = 128, block_n: int = 128, device: torch.device | str | None = None
) -> BlockTable:
    """The table listing every key block for every query block: plain (dense) attention.

    Example::

        table = dense_block_table(q.shape[1], k.shape[1], device=q.device)
        out, lse = block_sparse_attention(q, k, v, table)
    """
    n_q_blocks, n_k_blocks = math.ceil(q_len / block_m), math.ceil(k_len / block_n)
    idx = torch.arange(n_k_blocks, dtype=torch.int32, device=device).expand(1, 1, n_q_blocks, n_k_blocks)
    cnt = torch.full((1, 1, n_q_blocks), n_k_blocks, dtype=torch.int32, device=device)
    return BlockTable(idx.contiguous(), cnt, block_m, block_n, q_len, k_len, dense=True)
