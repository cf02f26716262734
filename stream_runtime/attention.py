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
    **kwargs,
) -> torch.Tensor:
    """Softmax attention through the backend named ``backend``.

    ``mask`` (optional, bool ``[Lq, Lk]``, True = attend) is for full-sequence reference and training passes;
    streaming chunks need none, since a chunk sees every kept frame and all of its own tokens.
    """
    return get_backend(backend)(q, k, v, mask=mask, **kwargs)


def sdpa_attention(q, k, v, mask=None, scale=None, **_):
    """PyTorch scaled_dot_product_attention (flash / cuDNN / memory-efficient kernels on GPU)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def naive_attention(q, k, v, mask=None, scale=None, **_):
    """fp32 softmax(q k^T) v, the obviously-correct reference for every other backend."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


register_backend("sdpa", sdpa_attention)
register_backend("naive", naive_attention)
