"""CUDA graphs of a session's steady-state chunk pass: one replay instead of thousands of kernel launches.

Once a session's cache is full, every pass over a chunk (each denoising step and the clean context pass) has the
same shapes and reads and writes the same buffers: the cache's layer buffers, with the chunk's K/V in the same
scratch slots. Only values change between passes: the latents, the timestep, the chunk's RoPE table (its frame
positions) and, after a prompt switch, the prompt's cross-attention K/V. :class:`ChunkGraphs` captures the pass
once per shape over static copies of those inputs and replays it, copying the new values in first. The host then
launches one graph per pass instead of about a hundred kernels per block, which is what bounds a pass whose chunk
is too small to keep the GPU busy (video-to-video's single latent frame).

Passes that do not match a graph run as before: while the cache fills, recache, attention reuse (its per-step
state lives on the host) and the backends whose block tables the host picks per chunk (``radial``). Stream-batch
forwards and sessions sharing forwards (``batching.next_chunks``) do not use graphs. The first pass of each shape
runs eagerly (lazy initialisation, cuDNN plans, compiled graphs), the second is captured.

The output equals the eager pass's: the replay runs the same kernels on the same values (the GPU test checks it).

Example::

    pipe.enable_cuda_graphs()        # sessions opened from now on replay their steady-state passes
    with pipe.session("a fox running in snow") as s:
        for frames in s: ...
        print(s.graphs.replays)      # passes that ran as a graph replay
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GRAPH_BACKENDS = frozenset({"sdpa", "sdpa_cudnn", "blocksparse"})
"""Attention backends whose pass is the same kernels every time (no host decisions per chunk)."""
MAX_GRAPHS = 4
"""Graphs kept per session (one per chunk shape and backend; a session normally needs one)."""

Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]
"""``capture(fn) -> (replay, out)``: record ``fn`` once; ``replay()`` reruns its device work, leaving the result
in ``out``."""


def cuda_capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture ``fn`` into a ``torch.cuda.CUDAGraph`` (its own memory pool).

    ``thread_local``: only this thread's CUDA calls are restricted while it captures, so a decode running in
    another thread (:class:`~stream_runtime.pipelines.wan.decode_ahead.DecodeAhead`) may go on meanwhile."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph.replay, out


@dataclass
class _Graph:
    replay: Callable[[], None]
    out: torch.Tensor
    x: torch.Tensor
    timestep: torch.Tensor
    ropes: list[torch.Tensor]
    text: list[tuple[torch.Tensor, torch.Tensor]]
    text_source: object
    """The session's text K/V the static copies hold (compared by identity: a new prompt is a new list)."""


def _flat_ropes(rope) -> list[torch.Tensor]:
    (q_cos, q_sin), k_rope = rope
    return [q_cos, q_sin] + ([] if k_rope is None else list(k_rope))


def _nested_ropes(flat: list[torch.Tensor]):
    return [((flat[0], flat[1]), None if len(flat) == 2 else (flat[2], flat[3]))]


class ChunkGraphs:
    """The CUDA graphs of one session's chunk passes (see the module docs); ``capture`` records a pass
    (:func:`cuda_capture` on a GPU; tests give a stand-in that reruns the pass on the host).

    :attr:`replays` and :attr:`captures` count what ran, for tests and benchmarks."""

    def __init__(self, net, cache, capture: Capture = cuda_capture, eager_passes: int = 1) -> None:
        self.net, self.cache = net, cache
        self._capture = capture
        self._eager_passes = eager_passes
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: dict[tuple, int] = {}
        self.replays = 0
        self.captures = 0

    def clear(self) -> None:
        """Drop every graph (and its memory pool)."""
        self._graphs.clear()
        self._seen.clear()

    def forward(
        self, x: torch.Tensor, timestep, text, first_frame: int, position_mode: str, backend: str
    ) -> torch.Tensor | None:
        """The pass ``net.forward_chunk(x, timestep, text, cache, first_frame, position_mode, backend)`` as a
        graph replay, or None where this pass cannot replay (the caller runs it eagerly)."""
        cache = self.cache
        if backend not in GRAPH_BACKENDS or cache.valid_frames < cache.layout.cache_frames:
            return None
        t_shape = tuple(timestep.shape) if isinstance(timestep, torch.Tensor) else ()
        # The cache's first buffer address: a cache whose buffers were replaced needs a new graph.
        key = (tuple(x.shape), x.dtype, t_shape, position_mode, backend, next(iter(cache.k.values())).data_ptr())
        grid = self.net.grid(*x.shape[3:])
        frames = x.shape[2] // self.net.patch_size[0]
        ropes = _flat_ropes(self.net.stream_ropes([cache], [first_frame], frames, grid, position_mode)[0])
        graph = self._graphs.get(key)
        if graph is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] <= self._eager_passes:
                return None
            graph = self._record(key, x, timestep, text, ropes, backend)
        self._load(graph, x, timestep, text, ropes)
        graph.replay()
        cache.note_stored(frames)  # the replay wrote the chunk's K/V to the scratch slots; no host code ran
        self.replays += 1
        return graph.out.clone()  # the next replay overwrites graph.out

    def _record(self, key, x, timestep, text, ropes, backend) -> _Graph:
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.pop(next(iter(self._graphs)))
        static_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        static_t = torch.zeros(
            timestep.shape if isinstance(timestep, torch.Tensor) else (), dtype=torch.float32, device=x.device
        )
        static_ropes = [r.clone() for r in ropes]
        static_text = [(k.clone(), v.clone()) for k, v in text]
        cache = self.cache

        def run() -> torch.Tensor:
            return self.net.forward_prepared(
                static_x, static_t, [static_text], [cache], _nested_ropes(static_ropes), backend
            )

        replay, out = self._capture(run)
        self.captures += 1
        graph = _Graph(replay, out, static_x, static_t, static_ropes, static_text, text)
        self._graphs[key] = graph
        return graph

    @staticmethod
    def _load(graph: _Graph, x, timestep, text, ropes) -> None:
        graph.x.copy_(x)
        if isinstance(timestep, torch.Tensor):
            graph.timestep.copy_(timestep)
        else:
            graph.timestep.fill_(float(timestep))  # a kernel fill: no host-to-device copy, no sync
        for static, value in zip(graph.ropes, ropes, strict=True):
            static.copy_(value)
        if graph.text_source is not text:
            for (k, v), (new_k, new_v) in zip(graph.text, text, strict=True):
                k.copy_(new_k)
                v.copy_(new_v)
            graph.text_source = text
