"""One dispatch point for self-attention, with backends registered by name.

Every backend takes ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` (tokens before heads, the cache's layout) and
returns ``[B, Lq, H, D]`` in ``q``'s dtype. A backend may accept extra keyword arguments (a block table, a
reuse state); :func:`attention` passes through the ones given.

Example::

    out = attention(q, k, v, backend="sdpa")
    register_backend("mine", my_fn)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]
_BACKENDS: dict[str, AttentionFn] = {}


def register_backend(name: str, fn: AttentionFn) -> None:
    """Make ``fn`` selectable as ``StreamConfig.attention_backend = name``."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> AttentionFn:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"attention backend must be one of {available_backends()}, got {name!r}") from None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "sdpa",
    mask: torch.Tensor | None = None,
    reuse=None,
    **kwargs,
) -> torch.Tensor:
    """Softmax attention through the backend named ``backend``.

    ``mask`` (optional, bool ``[Lq, Lk]``, True = attend) is for full-sequence reference and training passes;
    streaming chunks need none, since a chunk sees every kept frame and all of its own tokens.
    ``reuse`` (a :class:`stream_runtime.reuse.CrossStepReuse`) splits a streaming chunk's attention into the
    cached part and the chunk's own part and may reuse the cached part across denoising steps.
    """
    if reuse is not None and mask is None:
        return reuse.attend(q, k, v, backend=backend, **kwargs)
    return get_backend(backend)(q, k, v, mask=mask, **kwargs)


def sdpa_attention(q, k, v, mask=None, scale=None, **_):
    """PyTorch scaled_dot_product_attention (flash / cuDNN / memory-efficient kernels on GPU)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def sdpa_cudnn_attention(q, k, v, mask=None, scale=None, **_):
    """SDPA restricted to its cuDNN backend (faster than flash on H100 at the chunk-vs-cache shape); falls back
    to the default SDPA choice off CUDA or with a mask."""
    if not q.is_cuda or mask is not None:
        return sdpa_attention(q, k, v, mask=mask, scale=scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return sdpa_attention(q, k, v, scale=scale)


def naive_attention(q, k, v, mask=None, scale=None, **_):
    """fp32 softmax(q k^T) v, the obviously-correct reference for every other backend."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Lq, H, D], lse [B, H, Lq] fp32)``: the Triton kernel on CUDA, the fp32 reference elsewhere."""
    if q.is_cuda:
        bsa = _kernels()
        return bsa.block_sparse_attention(q, k, v, bsa.dense_block_table(q.shape[1], k.shape[1], device=q.device))
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    lse = scores.logsumexp(dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", (scores - lse[..., None]).exp(), v.float())
    return out.to(q.dtype), lse


def blocksparse_dense_attention(q, k, v, mask=None, **_):
    """The Triton block-sparse kernel with every block listed (dense); full-sequence passes use SDPA."""
    if mask is not None:
        return sdpa_attention(q, k, v, mask=mask)
    bsa = _kernels()
    key = ("dense", q.shape[1], k.shape[1], q.device)
    table = _memo(key, lambda: bsa.dense_block_table(q.shape[1], k.shape[1], device=q.device))
    return bsa.block_sparse_attention(q, k, v, table)[0]


RADIAL_MAX_BLOCK = 128
"""Table block of the radial backend at real resolutions (the kernel's fastest tile on an H100)."""
RADIAL_MIN_BLOCK = 16
"""Smallest table block (``tl.dot`` needs 16 on each side)."""


def radial_block_size(tokens_per_frame: int) -> int:
    """Table block size of the radial backend for frames of ``tokens_per_frame`` tokens: the largest power of two
    in [16, 128] that is at most a quarter of a frame. At 480x832 (1,560 tokens) that is 128; a 64-token frame (the
    tiny-world model) gets 16-token blocks, so its bands can drop blocks at all (with 128-token blocks a whole
    frame is one block and the radial table is dense)."""
    block = RADIAL_MAX_BLOCK
    while block > RADIAL_MIN_BLOCK and block > tokens_per_frame // 4:
        block //= 2
    return block


def radial_table(q: torch.Tensor, cache, frame_grid, cached_keys: int | None = None):
    """The radial :class:`BlockTable` of a chunk's queries ``q [B, Lq, H, D]`` against ``cache`` and itself.

    The table depends on the temporal distance of each cached frame to the chunk, so it is built once per ring
    phase of the cache (a handful per stream) and per resolution, then reused by every layer and step. Its block
    size follows the frame size (:func:`radial_block_size`). ``cached_keys``: the table's key blocks that cover
    the first ``cached_keys`` keys (the cache's frames), as a table over those keys alone (see
    :func:`radial_cached_part`).
    """
    from stream_runtime.kernels.radial import StreamFrameLayout, radial_block_table

    frame_tokens = frame_grid[0] * frame_grid[1]
    kept = cache.slot_frames[: cache.valid_frames]
    n_chunk = q.shape[1] // frame_tokens
    last = max(kept, default=-1)
    # Times relative to the chunk: the table depends only on distances, so steady-state chunks share tables.
    chunk_times = tuple(range(1, n_chunk + 1))
    sinks = cache.layout.sink_frames
    # Sinks are dense at any distance: give them one fixed time so the table does not change as they recede.
    far = -(cache.layout.cache_frames + 1)
    key_times = tuple(far if s < sinks else f - last for s, f in enumerate(kept)) + chunk_times
    key_is_sink = tuple(s < sinks for s in range(len(kept))) + (False,) * n_chunk
    key = ("radial", tuple(frame_grid), key_times, key_is_sink, q.device)

    def build():
        layout = StreamFrameLayout(key_times=key_times, key_is_sink=key_is_sink, query_times=chunk_times)
        block = radial_block_size(frame_tokens)
        return radial_block_table(frame_grid, layout, block, block, device=q.device)

    full = _memo(key, build)
    if cached_keys is None:
        return full
    from stream_runtime.kernels.block_sparse_attn import BlockTable

    n_blocks = -(-cached_keys // full.block_n)
    return _memo(
        (*key, "cached", cached_keys),
        lambda: BlockTable.from_block_mask(
            full.to_block_mask()[..., :n_blocks], full.block_m, full.block_n, full.q_len, cached_keys
        ),
    )


def radial_cached_part(q, k, v, n_cached: int, cache, frame_grid) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the radial backend's attention restricted to the first ``n_cached`` keys (the cache's
    frames), for cross-step reuse (:class:`stream_runtime.reuse.CrossStepReuse`).

    The key blocks of :func:`radial_table` that cover cached tokens, as a table over those keys alone: a block
    that straddles the cache/chunk boundary holds chunk tokens, which the radial rule keeps dense, so it is listed
    in both. Merged with dense attention to the chunk's own keys, this equals :func:`radial_attention` exactly.
    """
    table = radial_table(q, cache, frame_grid, cached_keys=n_cached)
    return _kernels().block_sparse_attention(q, k[:, :n_cached], v[:, :n_cached], table)


def radial_attention(q, k, v, mask=None, cache=None, frame_grid=None, **_):
    """Radial block-sparse attention against the sink + window cache (Triton kernel over :func:`radial_table`).
    Without a cache (full-sequence passes) this is plain SDPA."""
    if mask is not None or cache is None:
        return sdpa_attention(q, k, v, mask=mask)
    bsa = _kernels()
    return bsa.block_sparse_attention(q, k, v, radial_table(q, cache, frame_grid))[0]


_TABLES: dict = {}


def _kernels():
    """The Triton kernel package, or a ValueError that says how to get it (triton ships with CUDA builds of torch;
    on a CPU-only install it is in the ``test`` extra and runs in Triton's slow interpreter)."""
    try:
        from stream_runtime.kernels import block_sparse_attn
    except ImportError as exc:
        raise ValueError(
            f"the blocksparse and radial attention backends need triton ({exc}); install a CUDA build of torch, "
            "or `pip install triton` to run them (slowly) in Triton's interpreter, or use attention 'sdpa'"
        ) from exc
    return block_sparse_attn


def _memo(key, build):
    if key not in _TABLES:
        if len(_TABLES) >= 64:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = build()
    return _TABLES[key]


register_backend("sdpa", sdpa_attention)
register_backend("sdpa_cudnn", sdpa_cudnn_attention)
register_backend("naive", naive_attention)
register_backend("blocksparse", blocksparse_dense_attention)
register_backend("radial", radial_attention)
