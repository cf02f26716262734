"""A :class:`StreamSession` on the stream-batch schedule (``StreamConfig.stream_batch=True``).

One forward advances every chunk in flight by one pass (see :mod:`stream_runtime.stream_batch` for the schedule and
what each chunk attends to)::

    forward f:  x = [chunk f at pass 0 (new noise) | chunk f-S at pass 1 | ... | chunk f-(P-1)S at pass P-1]
                flow = DiT(x, per-chunk t) over [kept frames | own chunk]   (one shared cache view)
                per chunk: x0 = x - sigma*flow, re-noise to its next pass (or x0 into the context pass at t=0)
                commit the chunk whose last pass this was -> its clean latents go out
"""

from __future__ import annotations

import torch

from stream_runtime.stream_batch import StreamBatchSchedule, pass_noise

from . import sampling


def passes_of(config) -> int:
    """Passes per chunk: the denoising steps plus the clean context pass when the config has one."""
    return len(config.timesteps) + int(config.context_pass)


class StreamBatchRunner:
    """Runs the forwards of one session on the stream-batch schedule.

    Holds the latents of every chunk in flight between forwards; the session's cache, prompt (text K/V) and
    blend are used as they stand at each forward, so live controls act between two forwards.

    A runner may start at a later chunk (``first_chunk``: the session ran its earlier chunks sequentially, and the
    cache holds them) and may be drained (:meth:`drain`: no new chunk enters; the chunks in flight leave one per
    forward), which is how a session switches between the two schedules between chunks.

    Video-to-video: a chunk enters with its encoded input frames noised to its first level (its own step list
    after its strength, motion-aware or not), so a forward runs only once the session has buffered the input of
    the chunk that enters in it (:attr:`entering`); until then :meth:`next_latents` returns None.

    Example::

        runner = StreamBatchRunner(session)
        chunk, x0 = runner.next_latents()      # runs forwards until a chunk leaves: [1, C, F, h, w]
    """

    def __init__(self, session, first_chunk: int = 0) -> None:
        self.session = session
        config = session.config
        self.schedule = StreamBatchSchedule(passes_of(config), config.stream_batch_stride)
        self.first_chunk = first_chunk
        """Stream index of the runner's chunk 0 (the schedule counts chunks from the runner's start)."""
        self.forward_index = 0
        """Forwards run so far."""
        self.inputs: dict[int, torch.Tensor] = {}
        """Chunk (stream index) -> latents ``[1, C, F, h, w]`` for its next pass."""
        self.admitted: int | None = None
        """None: new chunks enter every forward. Else draining: only the runner's first ``admitted`` chunks run."""
        self.sigmas: dict[int, list] = {}
        """Video-to-video: chunk -> its noise levels (set as it enters; text-to-video reads the session's)."""

    @property
    def entering(self) -> int | None:
        """Stream index of the chunk that enters in the next forward (None while draining)."""
        return None if self.draining else self.first_chunk + self.forward_index

    @property
    def in_flight(self) -> int:
        """Chunks that entered and have not left (their latents wait for their next pass)."""
        return len(self.inputs)

    @property
    def draining(self) -> bool:
        return self.admitted is not None

    @property
    def finished(self) -> bool:
        """Drained: every admitted chunk has left."""
        return self.draining and not self.inputs

    def drain(self) -> None:
        """Let no new chunk enter from the next forward on; the chunks in flight leave one per forward."""
        if self.admitted is None:
            self.admitted = self.forward_index  # chunk f enters at forward f: forwards so far = chunks admitted

    def _start(self, chunk: int) -> torch.Tensor:
        s = self.session
        if s.mode == "v2v":
            z, sigmas = s._v2v_encode()  # next_latents checked that the input is there
            self.sigmas[chunk] = sigmas
            return sampling.add_noise(z, pass_noise(s.seed, chunk, 0, z.shape, s.pipe.device), sigmas[0])
        shape = (1, s.latent_shape[0], s.config.chunk_frames, *s.latent_shape[1:])
        return pass_noise(s.seed, chunk, 0, shape, s.pipe.device)

    def _ready(self) -> bool:
        """Whether the next forward can run: always, but in video-to-video while the entering chunk's input frames
        are not buffered yet."""
        s = self.session
        return s.mode != "v2v" or self.entering is None or len(s._inputs) >= s.frames_needed()

    def step(self) -> tuple[int, torch.Tensor] | None:
        """Run one forward; return ``(chunk, clean latents)`` of the chunk that left in it, or None (warm-up)."""
        s, config = self.session, self.session.config
        if self.finished:
            raise ValueError("this stream batch is drained; the session continues sequentially")
        s._advance_blend()
        f = self.forward_index
        base = self.first_chunk
        items = [(base + c, p) for c, p in self.schedule.items(f, self.admitted)]
        local_leaving = self.schedule.leaving(f, self.admitted)
        leaving = None if local_leaving is None else base + local_leaving
        steps = len(config.timesteps)
        xs, ts, levels = [], [], []
        for chunk, p in items:
            x = self.inputs.pop(chunk) if p > 0 else self._start(chunk)
            sigmas = self.sigmas.get(chunk, s._sigmas)
            xs.append(x)
            levels.append(sigmas)
            ts.append(sigmas[p] * 1000.0 if p < steps else 0.0)
        x = torch.cat(xs)
        first_frames = [chunk * config.chunk_frames for chunk, _ in items]
        commit_item = len(items) - 1 if leaving is not None else None  # the leaving chunk is the last item
        if any(isinstance(t, torch.Tensor) for t in ts):  # motion-aware video-to-video: levels on the device
            timesteps = torch.stack([torch.as_tensor(t, dtype=torch.float32, device=s.pipe.device) for t in ts])
        else:
            timesteps = torch.tensor(ts, dtype=torch.float32, device=s.pipe.device)
        flow = s.net.forward_batch(
            x,
            timesteps,
            first_frames,
            s._text,
            s.cache,
            commit_item=commit_item,
            position_mode=config.position_mode,
            backend=config.attention_backend,
        ).float()
        out = None
        for b, (chunk, p) in enumerate(items):
            sigmas = levels[b]
            if p == steps:  # the context pass: its input was the clean latents
                x0 = xs[b]
            else:
                x0 = sampling.to_x0(xs[b], flow[b : b + 1], sigmas[p])
            if p + 1 < steps:
                noise = pass_noise(s.seed, chunk, p + 1, x0.shape, s.pipe.device)
                self.inputs[chunk] = sampling.next_sample(
                    x0, xs[b], flow[b : b + 1], sigmas[p], sigmas[p + 1], noise, config.sampler
                )
            elif p + 1 == steps and config.context_pass:
                self.inputs[chunk] = x0
            if chunk == leaving:
                out = (chunk, x0)
        if out is not None:
            chunk, x0 = out
            s.cache.commit(chunk * config.chunk_frames, config.chunk_frames, latents=x0)
            self.sigmas.pop(chunk, None)
        self.forward_index += 1
        return out

    def next_latents(self) -> tuple[int, torch.Tensor] | None:
        """Run forwards until a chunk leaves; return ``(chunk, clean latents [1, C, F, h, w])``, or None when a
        video-to-video forward waits for input frames (the forwards run so far stay done)."""
        while True:
            if not self._ready():
                return None
            out = self.step()
            if out is not None:
                return out
