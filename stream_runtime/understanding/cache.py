"""A transformers ``DynamicCache`` with StreamingVLM eviction: sinks, a vision window, a text window.

Layout: every layer holds ``keys``/``values`` ``[batch, kv_heads, tokens, head_dim]`` exactly as
``DynamicCache`` does (the model's attention layers append to it unchanged); ``cache.ledger`` (a
:class:`~.ledger.TokenLedger`) records the kind and current M-RoPE position of each of those ``tokens``.

**Re-indexing by re-rotating kept keys.** transformers caches keys *after* RoPE, at the positions they were
computed with. When older tokens are evicted, the kept ones are packed from position 0 again, so each kept key
must move from position ``p`` to ``p + delta``. We rotate the stored keys by ``delta``
(``R(p + delta) k = R(delta) R(p) k``, :func:`~.rope.rotate_keys`) once per step, at eviction, rather than
storing un-rotated keys:

* the model's own attention modules stay untouched; storing un-rotated keys would mean patching every
  attention forward to rotate the whole cache on every decoded token;
* the cost is one elementwise rotation of the moved keys per step (values never move), amortised over the
  step's decode, instead of one per forward pass;
* the floating-point error stays bounded: sinks are never rotated (their shift is always 0), and a windowed
  token is rotated at most once per step it survives, i.e. a bounded number of times before it is evicted.
  Each rotation differs from a direct rotation at the new position by about ``ulp(position * inv_freq)``,
  the order of the model's own rounding of RoPE angles.

It needs RoPE with fixed frequencies (``rope_type`` ``default``); :class:`~.family.VLMSpec` checks it.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .config import StreamingVLMConfig
from .ledger import Eviction, TokenLedger
from .rope import apply_rotation, rotation


class StreamingVLMCache(DynamicCache):
    """``DynamicCache`` whose :meth:`evict` keeps sinks + recent vision + recent text and re-indexes positions.

    Use: for each unit entering the model, ask ``cache.ledger.append_text`` / ``append_vision`` for its
    positions, run the model with ``position_ids`` built from them and ``past_key_values=cache``, and call
    :meth:`evict` once the step is over. :class:`~.runner.StreamingVLMRunner` does all of this.

    Example::

        spec = VLMSpec.from_model(model)
        cache = StreamingVLMCache(StreamingVLMConfig(sink_tokens=64), spec.inv_freq)
        pos = cache.ledger.append_text(len(ids))                    # [3, L]
        model(input_ids=ids[None], position_ids=pos[:, None], past_key_values=cache, use_cache=True)
        cache.evict()
    """

    def __init__(self, config: StreamingVLMConfig, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.ledger = TokenLedger(config)
        self.inv_freq = inv_freq.detach().float()
        """``[head_dim // 2]`` inverse frequencies of the text RoPE, used to re-rotate kept keys."""

    def evict(self) -> Eviction:
        """Apply the policy to every layer: drop evicted tokens, rotate moved keys by their position shift."""
        cached = self.get_seq_length()
        if cached != self.ledger.num_tokens:
            raise ValueError(
                f"StreamingVLMCache.evict: the ledger records {self.ledger.num_tokens} tokens but the layers hold "
                f"{cached}; append every token to cache.ledger before running it through the model"
            )
        eviction = self.ledger.evict()
        if eviction.evicted == 0:
            return eviction
        moved = eviction.first_moved
        cos = sin = None
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            keep = eviction.keep.to(layer.keys.device)
            keys = layer.keys.index_select(-2, keep)
            if moved < keep.numel():
                if cos is None:  # one rotation for all layers: same shifts, same frequencies
                    cos, sin = rotation(eviction.delta[moved:], self.inv_freq, keys[..., moved:, :].shape)
                keys[..., moved:, :] = apply_rotation(keys[..., moved:, :], cos, sin)
            layer.keys = keys
            layer.values = layer.values.index_select(-2, keep)
        return eviction

    def num_bytes(self) -> int:
        """Bytes of cached keys and values over all layers."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in self.layers
            if layer.is_initialized
        )
