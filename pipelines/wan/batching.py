"""Sessions sharing a forward: the next chunk of several streams, denoised together.

A serving engine with several open streams runs one chunk of each in turn; on a GPU a small chunk (one latent frame
of video-to-video, a low resolution) leaves most of the device idle, and every pass pays the launch overhead of
each block. :func:`next_chunks` instead stacks the chunks of compatible sessions on the batch axis: each denoising
step (and the context passes of their previous chunks) is one forward of
:meth:`~stream_runtime.pipelines.wan.transformer.StreamingWanTransformer.forward_streams`, where the linear layers
see every row and self-attention runs per stream against that stream's own cache. Each session keeps its own
noise generator, prompt, guidance, cache and decoder, so its frames are what :meth:`StreamSession.next_chunk` gives
it alone (``tests/test_batching.py`` holds the two together).

Sessions can share when :func:`share_key` gives them the same key: the same pipeline, mode, resolution, chunk
size, step list (the same noise levels at each step), position mode, attention backend and context pass, all
sequential (no stream batch) and without cross-step reuse (per-session attention state).

Example::

    frames = next_chunks([a, b, c])       # a list of uint8 [T, H, W, 3] (None: a v2v session lacked input)
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .session import StreamSession


def share_key(session: StreamSession) -> tuple | None:
    """What a session's next forwards depend on besides its own state, or None if it cannot share them."""
    config = session.config
    if session.closed or session._stream_batch is not None or config.attention_reuse:
        return None
    if config.early_first_frame and (session.output_frames == 0 or session._rest_of_first is not None):
        return None  # its first chunk comes out in two parts: next_chunk does that alone
    if session.mode == "v2v" and config.motion_aware:
        return None  # its noise levels follow its own input's motion (device tensors): not shared
    sigmas = session._sigmas
    if session.mode == "v2v":
        from . import sampling

        sigmas = sampling.sigmas_for(config.timesteps, config.shift, config.strength)
    return (
        id(session.pipe),
        session.mode,
        session.latent_shape,
        config.chunk_frames,
        tuple(float(s) for s in sigmas),
        config.position_mode,
        config.attention_backend,
        config.context_pass,
    )


def groups(sessions: list[StreamSession], limit: int | None = None) -> list[list[StreamSession]]:
    """``sessions`` split into groups that can share forwards (in first-seen order, at most ``limit`` each);
    a session that cannot share is a group of its own."""
    out: list[list[StreamSession]] = []
    by_key: dict[tuple, list[StreamSession]] = {}
    for s in sessions:
        key = share_key(s)
        group = by_key.get(key) if key is not None else None
        if group is None or (limit is not None and len(group) >= limit):
            group = [s]
            out.append(group)
            if key is not None:
                by_key[key] = group
        else:
            group.append(s)
    return out


def _forward(sessions: list[StreamSession], xs: list[torch.Tensor], t: float, frames: list[int]) -> list[torch.Tensor]:
    """One pass of every session's chunk ``xs[i]`` (one row per guidance branch) at timestep ``t``; the flows, split
    back per session."""
    first = sessions[0]
    flow = first.net.forward_streams(
        torch.cat(xs),
        t,
        [s._text for s in sessions],
        [s.cache for s in sessions],
        frames,
        position_mode=first.config.position_mode,
        backend=first.config.attention_backend,
    )
    return list(flow.split([x.shape[0] for x in xs]))


def _flush_contexts(sessions: list[StreamSession]) -> None:
    """The pending context passes of ``sessions`` in one forward, then their commits (each session's
    :meth:`StreamSession._flush_context`, shared)."""
    pending = [s for s in sessions if s._pending_context is not None]
    if not pending:
        return
    contexts = [s._pending_context for s in pending]
    for s in pending:
        s._pending_context = None
    if pending[0].config.context_pass:
        rows = [s._rows(x0) for s, (x0, _) in zip(pending, contexts, strict=True)]
        _forward(pending, rows, 0.0, [frame for _, frame in contexts])
    for s, (x0, frame) in zip(pending, contexts, strict=True):
        s.cache.commit(frame, x0.shape[2], latents=s._rows(x0))


@torch.no_grad()
def next_chunks(sessions: list[StreamSession]) -> list[np.ndarray | None]:
    """The next chunk of every session, generated in shared forwards; see the module docstring. ``sessions`` must
    share a :func:`share_key` (one session is fine: it runs as :meth:`StreamSession.next_chunk` does)."""
    if not sessions:
        return []
    if len(sessions) == 1:
        return [sessions[0].next_chunk()]
    keys = {share_key(s) for s in sessions}
    if None in keys or len(keys) > 1 or len({id(s) for s in sessions}) < len(sessions):
        raise ValueError(
            "next_chunks: these sessions cannot share forwards (different settings, a stream batch, cross-step "
            "reuse, motion-aware strength, an early_first_frame first chunk, or one session twice); group them "
            "with batching.groups()"
        )
    start = time.perf_counter()
    _flush_contexts(sessions)
    starts = [s._start_chunk() for s in sessions]  # context passes are done: this only blends and draws noise
    live = [i for i, st in enumerate(starts) if st is not None]
    out: list[np.ndarray | None] = [None] * len(sessions)
    if not live:
        return out
    active = [sessions[i] for i in live]
    xs = [starts[i][0] for i in live]
    sigmas = starts[live[0]][1]
    x0s = list(xs)
    for step, sigma in enumerate(sigmas):
        rows = [s._rows(x) for s, x in zip(active, xs, strict=True)]
        flows = _forward(active, rows, sigma * 1000.0, [s.frame for s in active])
        for j, (s, flow) in enumerate(zip(active, flows, strict=True)):
            x0s[j], xs[j] = s._advance(xs[j], flow, sigmas, step)
    denoised = time.perf_counter()
    for s, x0 in zip(active, x0s, strict=True):
        s._end_chunk(x0)
    for i, s, x0 in zip(live, active, x0s, strict=True):
        out[i] = s._emit(x0, start)
        if s.profile:
            s.timings["denoise_s"] = denoised - start  # the shared forwards (context passes included)
    return out
