"""Cross-step reuse of attention to the cached frames (after FlashBlock).

Within a chunk the cached frames' K/V do not change across denoising steps; only the chunk's own tokens do.
Attention therefore splits exactly into a part over the cached keys and a part over the chunk's own keys, merged
with their log-sum-exps. With ``refresh_every = 1`` every step recomputes both parts (exact: equals plain
attention). With ``refresh_every = N > 1`` the cached part computed at step 0 (and every N steps) is reused at the
steps in between: the queries of later steps differ, so this is an approximation that trades quality for the
largest share of the chunk's attention cost (chunk-vs-cache). The clean context pass is always exact, so what goes
into the cache is unaffected.
"""

from __future__ import annotations

import torch

from stream_runtime.attention import attention_with_lse, radial_cached_part
from stream_runtime.kernels.merge import merge_partials


class CrossStepReuse:
    """Per-session state: the session calls :meth:`begin_step` before each pass (``step=None`` for exact passes).

    Example::

        reuse = CrossStepReuse(refresh_every=2)
        reuse.begin_step(0)   # computes and keeps the cached part
        reuse.begin_step(1)   # reuses it
    """

    def __init__(self, refresh_every: int = 1) -> None:
        if not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be an integer >= 1, got {refresh_every!r}")
        self.refresh_every = refresh_every
        self.step: int | None = None
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reused = 0  # count of cached-part computations skipped (for tests and metrics)

    def begin_step(self, step: int | None) -> None:
        """``step``: index of the denoising step within the chunk; None for a pass that must be exact."""
        self.step = step
        if step == 0:
            self._saved.clear()

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int = 0,
        backend: str = "sdpa",
        cache=None,
        frame_grid=None,
        **_,
    ) -> torch.Tensor:
        """The chunk's attention, split into the cached part and its own part (see the module docstring).

        With ``backend="radial"`` (and the stream's ``cache`` and ``frame_grid``) the cached part is the radial
        kernel's over the radial table's cached key blocks (:func:`stream_runtime.attention.radial_cached_part`),
        so radial + reuse composes both savings; every other backend's cached part is dense."""
        n_cached = k.shape[1] - q.shape[1]
        if n_cached <= 0:
            return attention_with_lse(q, k, v)[0]
        refresh = self.step is None or self.step % self.refresh_every == 0 or layer not in self._saved
        if refresh:
            if backend == "radial" and cache is not None:
                cached = radial_cached_part(q, k, v, n_cached, cache, frame_grid)
            else:
                cached = attention_with_lse(q, k[:, :n_cached], v[:, :n_cached])
            if self.step is not None:
                self._saved[layer] = cached
        else:
            cached = self._saved[layer]
            self.reused += 1
        own = attention_with_lse(q, k[:, n_cached:], v[:, n_cached:])
        return merge(cached, own).to(q.dtype)


def merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets from each part's ``(out, lse)`` (fp32)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    return merge_partials(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))[0]
