"""``StreamSession``: one live stream (text-to-video or video-to-video) over a :class:`StreamPipeline`.

Per chunk of ``F`` latent frames::

    noise (t2v) | VAE-encoded input + noise (v2v)
      -> for each step: flow = DiT(x, t) over [sinks | window | chunk]; x0 = x - sigma*flow; re-noise to next step
      -> clean context pass at t=0 writes the chunk's K/V into the cache (or the last step's K/V are kept)
      -> streaming VAE (or TAEHV) decode -> uint8 frames [T, H, W, 3]

The hot path has no host synchronisation: step sizes are Python floats known in advance (or device tensors in
motion-aware video-to-video) and the cache's bookkeeping is host integers. The only sync is the copy of finished
frames to the host, which is what the caller asked for.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from stream_runtime.attention import get_backend
from stream_runtime.cache import CacheLayout, RollingKVCache
from stream_runtime.config import StreamConfig
from stream_runtime.reuse import CrossStepReuse

from . import sampling
from .graphs import ChunkGraphs
from .stream_batch import StreamBatchRunner, passes_of
from .vae_stream import StreamingVAEEncoder

MOTION_FULL_SCALE = 0.2
"""Mean absolute frame difference (pixels in [-1, 1]) at which motion-aware strength reaches its upper bound."""
MOTION_EMA = 0.5
"""Weight of the newest chunk in the smoothed motion estimate."""


@dataclass
class ChunkInfo:
    """What the last chunk cost and where it sits in the stream."""

    index: int
    first_frame: int
    """Index of the chunk's first output (pixel) frame in the stream."""
    num_frames: int
    latency_s: float
    """Wall time from the start of the chunk's denoising to its frames on the host."""


class StreamSession:
    """A live stream. Iterate it for chunks of frames; change the prompt or feed input frames at any time.

    Text-to-video iterates forever (stop with ``break`` or :meth:`close`). Video-to-video yields a chunk whenever
    :meth:`push_frames` has buffered enough input frames and stops iterating when the buffer runs dry; push more
    and iterate again to continue the same stream.

    Example::

        with pipe.session(prompt="a fox running in snow", seed=0) as s:
            for i, frames in enumerate(s):     # uint8 [T, H, W, 3]
                if i == 10:
                    s.set_prompt("a fox running in a desert")
    """

    def __init__(self, pipe, prompt: str, seed: int, mode: str, height: int, width: int, config: StreamConfig):
        if mode not in ("t2v", "v2v"):
            raise ValueError(f"mode must be 't2v' or 'v2v', got {mode!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        pipe.check_resolution(height, width)
        get_backend(config.attention_backend)  # an unknown name fails here, not at the first chunk
        self.pipe, self.net, self.config, self.mode = pipe, pipe.net, config, mode
        self.height, self.width = height, width
        device, dtype = pipe.device, pipe.dtype
        vae_factor = pipe.vae.config.scale_factor_spatial
        self.latent_shape = (pipe.vae.config.z_dim, height // vae_factor, width // vae_factor)
        grid = self.net.grid(*self.latent_shape[1:])
        layout = CacheLayout(grid[0] * grid[1], config.sink_frames, config.window_frames, config.chunk_frames)
        self._branches = 2 if config.guided else 1  # guidance: row 0 follows the prompt, row 1 the negative prompt
        self.cache = RollingKVCache(
            layout,
            num_layers=self.net.num_layers,
            batch=self._branches,
            heads=self.net.heads,
            head_dim=self.net.head_dim,
            latent_shape=self.latent_shape,
            dtype=dtype,
            device=device,
        )
        self._vae_dtype = next(pipe.vae.parameters()).dtype  # diffusers' .dtype walks every module
        self.decoder = pipe.streaming_decoder()  # the full VAE, or TAEHV (pipe.set_decoder)
        self._decode_dtype = pipe.decoder_dtype
        self.encoder = StreamingVAEEncoder(pipe.vae) if mode == "v2v" else None
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seed = seed
        self._negative = pipe.encode_negative_prompt(config.negative_prompt) if config.guided else None
        self._embeds = pipe.encode_prompt(prompt)
        self._text = self._text_kv(self._embeds)
        self.prompt = prompt
        self._blend: dict | None = None
        self._sigmas = sampling.sigmas_for(config.timesteps, config.shift)
        self._inputs: list[np.ndarray] = []
        self._last_input: torch.Tensor | None = None
        self._motion: torch.Tensor | None = None
        self._reuse = CrossStepReuse(config.attention_reuse) if config.attention_reuse else None
        self.frame = 0  # latent frames generated since the last reset (RoPE frame numbers)
        self._pending_context: tuple[torch.Tensor, int] | None = None  # see _flush_context
        self._rest_of_first: tuple[torch.Tensor, float] | None = None  # config.early_first_frame: not yet decoded
        self.chunk_index = 0
        self.output_frames = 0
        self.last_chunk: ChunkInfo | None = None
        self.closed = False
        self.profile = False
        """Set True to record per-phase wall times in :attr:`timings` (synchronises the device: benchmarks only)."""
        self.timings: dict[str, float] = {}
        self._stream_batch = StreamBatchRunner(self) if config.stream_batch else None
        self.graphs: ChunkGraphs | None = None
        """CUDA graphs of the steady-state passes (:meth:`StreamPipeline.enable_cuda_graphs`), else None."""
        if pipe.cuda_graphs:
            if device.type != "cuda":
                raise ValueError(f"CUDA graphs need the pipeline on a CUDA device, it is on {device}")
            self.graphs = ChunkGraphs(self.net, self.cache)

    # -- context manager and iteration

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> StreamSession:
        return self

    def __next__(self) -> np.ndarray:
        frames = self.next_chunk()
        if frames is None:
            raise StopIteration
        return frames

    def close(self) -> None:
        """Release the cache and VAE state (the pipeline's weights stay loaded)."""
        self.closed = True
        self.cache = None
        if self.graphs is not None:
            self.graphs.clear()
        self._rest_of_first = None
        self.decoder.reset()
        if self.encoder is not None:
            self.encoder.reset()
        self._inputs.clear()

    # -- live controls

    def set_prompt(self, prompt: str, blend_chunks: int | None = None) -> None:
        """Switch to ``prompt`` from the next chunk on, at once or blended over ``blend_chunks`` chunks
        (default: the config's ``blend_chunks``). An immediate switch applies ``config.prompt_switch`` to the
        cache (keep / reset / recache); a blend keeps the cache."""
        self._check_open()
        self._flush_context()
        blend = self.config.blend_chunks if blend_chunks is None else blend_chunks
        if not isinstance(blend, int) or blend < 0:
            raise ValueError(f"blend_chunks must be an integer >= 0, got {blend!r}")
        new = self.pipe.encode_prompt(prompt)
        self.prompt = prompt
        if blend > 0:
            self._blend = {"old": self._embeds, "new": new, "total": blend, "done": 0}
            return
        self._blend = None
        self._embeds, self._text = new, self._text_kv(new)
        policy = self.config.prompt_switch
        if policy == "reset":
            self.cache.reset()
            self.frame = 0
        elif policy == "recache":
            self.recache()

    # Fields that shape the cache or the stream's geometry cannot change on a live session.
    _FIXED_FIELDS = (
        "chunk_frames",
        "sink_frames",
        "window_frames",
        "position_mode",
        "attention_reuse",
        "stream_batch",
        "stream_batch_stride",
    )

    def set_config(self, config: StreamConfig) -> None:
        """Change per-chunk settings (step list, shift, strength, motion control, blending, switch policy,
        attention backend) from the next chunk on. Fields that fix the cache layout must stay as they are."""
        self._check_open()
        self._flush_context()
        changed = [f for f in self._FIXED_FIELDS if getattr(config, f) != getattr(self.config, f)]
        if changed:
            raise ValueError(f"cannot change {changed} on a live session; open a new session instead")
        if config.guided != self.config.guided:
            raise ValueError(
                "guidance cannot be turned on or off on a live session (it sets the cache's batch); keep "
                f"guidance_scale {'> 1' if self.config.guided else '= 1'} or open a new session"
            )
        if self._stream_batch is not None and passes_of(config) != passes_of(self.config):
            raise ValueError(
                "a stream-batch session cannot change its number of passes (len(timesteps) + context_pass) while "
                "chunks are in flight; keep the step count and context_pass, or open a new session"
            )
        if config.guided and config.negative_prompt != self.config.negative_prompt:
            self._negative = self.pipe.encode_negative_prompt(config.negative_prompt)
            self._text = self._text_kv(self._embeds)
        self.config = config
        self._sigmas = sampling.sigmas_for(config.timesteps, config.shift)

    @property
    def stream_batching(self) -> bool:
        """True while new chunks enter a stream batch (False when sequential or draining)."""
        return self._stream_batch is not None and not self._stream_batch.draining

    @property
    def chunks_in_flight(self) -> int:
        """Chunks denoised or entered but not handed out yet: inside the stream batch, or the rest of an
        ``early_first_frame`` first chunk; 0 when sequential and nothing is pending."""
        batch = 0 if self._stream_batch is None else self._stream_batch.in_flight
        return batch + (self._rest_of_first is not None)

    def set_stream_batch(self, enabled: bool) -> None:
        """Switch between sequential and stream-batch denoising from the next chunk on (a scheduler's choice).

        On: a stream batch starts at the next chunk (its first output comes after a warm-up of ``passes``
        forwards). Off: no new chunk enters the batch; the next calls drain the chunks in flight, one per forward,
        and the session then goes on sequentially. Turning it on again while a drain is under way is refused (the
        schedule admits chunks by forward index).
        """
        self._check_open()
        runner = self._stream_batch
        if not enabled:
            if runner is not None:
                runner.drain()
                self._end_drained_batch()
            return
        if runner is not None:
            if runner.draining:
                raise ValueError(
                    f"a drain of the stream batch is under way ({runner.in_flight} chunks in flight); "
                    "let those chunks come out before turning stream_batch on again"
                )
            return
        config = self.config.replace(stream_batch=True, stream_batch_stride=1)  # validates reuse / reset
        if self.frame != self.chunk_index * config.chunk_frames:
            raise ValueError(
                f"stream_batch numbers frames by chunk; this stream's frame count ({self.frame}) was reset, "
                f"which only prompt_switch='reset' does (and stream_batch does not support it)"
            )
        self._flush_context()  # the last sequential chunk's context pass goes into the cache the batch reads
        self.config = config
        self._stream_batch = StreamBatchRunner(self, first_chunk=self.chunk_index)

    def _end_drained_batch(self) -> None:
        if self._stream_batch is not None and self._stream_batch.finished:  # later chunks run sequentially
            self._stream_batch = None
            self.config = self.config.replace(stream_batch=False, stream_batch_stride=1)

    def push_frames(self, frames: np.ndarray | torch.Tensor) -> None:
        """Buffer input frames for video-to-video: uint8 ``[T, H, W, 3]`` (RGB) at the session's resolution."""
        self._check_open()
        if self.mode != "v2v":
            raise ValueError("push_frames is for video-to-video sessions (mode='v2v')")
        arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"frames must be uint8 [T, {self.height}, {self.width}, 3] (the session's resolution), "
                f"got {arr.dtype} {list(arr.shape)}"
            )
        self._inputs.extend(arr)

    def frames_needed(self) -> int:
        """Input frames the next video-to-video chunk consumes (on the stream batch: the next chunk to enter it,
        0 while it drains)."""
        f, t = self.config.chunk_frames, self.pipe.temporal_factor
        chunk = self.chunk_index
        if self._stream_batch is not None:
            chunk = self._stream_batch.entering
            if chunk is None:
                return 0
        return 1 + t * (f - 1) if chunk == 0 else t * f

    @torch.no_grad()
    def recache(self) -> None:
        """Rebuild the cache under the current prompt: re-run the kept frames at t=0, chunk by chunk in stream
        order (LongLive's recache). Positions of kept frames are unchanged."""
        self._check_open()
        self._flush_context()
        frames, latents = self.cache.kept_latents()
        self.cache.reset()
        chunk = self.config.chunk_frames
        start = 0
        while start < len(frames):
            end = start + 1
            while end < len(frames) and frames[end] // chunk == frames[start] // chunk:
                end += 1
            x = latents[:, :, start:end]
            if self._stream_batch is not None:  # the pass a pipeline stage runs, so stages match this bit for bit
                zero = torch.zeros(1, dtype=torch.float32, device=self.pipe.device)
                self.net.forward_batch(
                    x,
                    zero,
                    [frames[start]],
                    self._text,
                    self.cache,
                    commit_item=0,
                    position_mode=self.config.position_mode,
                    backend=self.config.attention_backend,
                )
            else:
                self._forward(x, 0.0, frames[start])
            self.cache.commit(frames[start], end - start, latents=x)
            start = end

    # -- generation

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this session is closed; open a new one with pipe.session(...)")

    def _text_kv(self, embeds: torch.Tensor):
        """Cross-attention K/V of the prompt ``embeds``; with guidance, of the batch [prompt, negative prompt]."""
        if self._negative is not None:
            embeds = torch.cat([embeds, self._negative.to(embeds.dtype)])
        return self.net.text_kv(embeds)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x [1, ...]`` as the cache's batch: one row per guidance branch (a broadcast view, no copy)."""
        return x.expand(self._branches, *x.shape[1:])

    def _forward(self, x: torch.Tensor, t, first_frame: int, step: int | None = None) -> torch.Tensor:
        """One pass over a chunk; ``step`` is the denoising step (None: a context or recache pass, always exact)."""
        extra = {}
        if self._reuse is not None:
            self._reuse.begin_step(step)
            extra["reuse"] = self._reuse
        elif self.graphs is not None:
            config = self.config
            flow = self.graphs.forward(x, t, self._text, first_frame, config.position_mode, config.attention_backend)
            if flow is not None:
                return flow
        return self.net.forward_chunk(
            x,
            t,
            self._text,
            self.cache,
            first_frame,
            position_mode=self.config.position_mode,
            backend=self.config.attention_backend,
            **extra,
        )

    def _advance_blend(self) -> None:
        if self._blend is None:
            return
        b = self._blend
        b["done"] += 1
        w = b["done"] / b["total"]
        if w >= 1.0:
            embeds = b["new"]
        elif self.config.blend_mode == "slerp":
            embeds = sampling.slerp(b["old"], b["new"], w)
        else:
            embeds = torch.lerp(b["old"].float(), b["new"].float(), w).to(b["new"].dtype)
        self._embeds, self._text = embeds, self._text_kv(embeds)
        if b["done"] >= b["total"]:
            self._blend = None

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.pipe.device, dtype=torch.float32)

    def _v2v_start(self) -> tuple[torch.Tensor, list] | None:
        """Encode the next input frames; return (noisy latents at the first step, sigmas) or None."""
        encoded = self._v2v_encode()
        if encoded is None:
            return None
        z, sigmas = encoded
        return sampling.add_noise(z, self._randn(z.shape), sigmas[0]), sigmas

    def _v2v_encode(self) -> tuple[torch.Tensor, list] | None:
        """Encode the next chunk's input frames: (clean latents, the chunk's sigmas after its strength), or None
        while too few frames are buffered."""
        need = self.frames_needed()
        if len(self._inputs) < need:
            return None
        batch, self._inputs = self._inputs[:need], self._inputs[need:]
        pixels = torch.from_numpy(np.stack(batch)).to(self.pipe.device)
        pixels = pixels.permute(3, 0, 1, 2)[None].to(self._vae_dtype) / 127.5 - 1.0  # [1, 3, T, H, W]
        with self._phase("encode_s"):
            z = self.encoder.encode(pixels).float()
        strength = self.config.strength
        if self.config.motion_aware:
            prev = pixels[:, :, :1] if self._last_input is None else self._last_input
            motion = (torch.cat([prev, pixels], 2).diff(dim=2).abs().mean()).float()
            self._motion = motion if self._motion is None else torch.lerp(self._motion, motion, MOTION_EMA)
            lo, hi = self.config.motion_strength_range
            strength = lo + (hi - lo) * (self._motion / MOTION_FULL_SCALE).clamp(0.0, 1.0)
            strength = strength * self.config.strength
        self._last_input = pixels[:, :, -1:]
        return z, sampling.sigmas_for(self.config.timesteps, self.config.shift, strength)

    @torch.no_grad()
    def generate_latents(self) -> torch.Tensor | None:
        """Denoise the next chunk and keep it in the cache; return its clean latents ``[1, C, F, h, w]`` (on the
        device, nothing decoded), or None when a video-to-video session lacks input frames. With ``stream_batch``
        this runs forwards until the next chunk leaves the batch (the first call warms the pipeline up)."""
        x0 = self._generate_latents()
        self._flush_context()
        return x0

    def _generate_latents(self) -> torch.Tensor | None:
        """:meth:`generate_latents` with the chunk's context pass left pending (see :meth:`_flush_context`)."""
        self._check_open()
        if self._stream_batch is not None:
            f = self.config.chunk_frames
            with self._phase("denoise_s"):
                left = self._stream_batch.next_latents()
            if left is None:  # video-to-video: the next chunk to enter lacks input frames
                return None
            chunk, x0 = left
            self.frame = (chunk + 1) * f
            self.chunk_index = chunk + 1
            self._end_drained_batch()
            return x0
        start = self._start_chunk()
        if start is None:
            return None
        x, sigmas = start
        with self._phase("denoise_s"):
            for i, sigma in enumerate(sigmas):
                flow = self._forward(self._rows(x), sigma * 1000.0, self.frame, step=i)
                x0, x = self._advance(x, flow, sigmas, i)
        self._end_chunk(x0)
        return x0

    # The pieces of a sequential chunk, also run by ``batching.next_chunks`` for sessions that share forwards.

    def _start_chunk(self) -> tuple[torch.Tensor, list] | None:
        """Run the last chunk's context pass, advance a blend, and return the chunk's start: (latents ``[1, C, F,
        h, w]`` at the first step, sigmas), or None for video-to-video without enough input."""
        self._flush_context()
        self._advance_blend()
        if self.mode == "v2v":
            return self._v2v_start()
        f = self.config.chunk_frames
        return self._randn((1, self.latent_shape[0], f, *self.latent_shape[1:])), self._sigmas

    def _advance(self, x: torch.Tensor, flow: torch.Tensor, sigmas: list, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``i``: from the pass's ``flow`` (one row per guidance branch) to (clean estimate, next sample)."""
        flow = flow.float()
        if self.config.guided:
            cond, uncond = flow[:1], flow[1:]
            flow = uncond + self.config.guidance_scale * (cond - uncond)
        x0 = sampling.to_x0(x, flow, sigmas[i])
        if i + 1 < len(sigmas):
            noise = self._randn(x0.shape)
            x = sampling.next_sample(x0, x, flow, sigmas[i], sigmas[i + 1], noise, self.config.sampler)
        return x0, x

    def _end_chunk(self, x0: torch.Tensor) -> None:
        """The chunk is denoised: its context pass is pending (:meth:`_flush_context`), the stream moves on."""
        self._pending_context = (x0, self.frame)
        self.frame += self.config.chunk_frames
        self.chunk_index += 1

    @torch.no_grad()
    def _flush_context(self) -> None:
        """Run the last chunk's clean context pass (when the config has one) and commit it to the cache.

        :meth:`next_chunk` defers it from the chunk's own call to the start of whatever touches the cache or the
        prompt next (the next chunk, a prompt switch, a config change, a recache), so a chunk's frames are
        decoded and handed out one pass earlier: the first frame comes sooner and each chunk's latency drops by
        one pass. :meth:`generate_latents` runs it before returning, so the cache holds the chunk.
        The passes and their order relative to the cache are the same as running it at once, so the output is
        identical (``tests/test_pipeline.py`` checks it). With ``profile``, ``timings['context_s']`` is the
        deferred pass that ran at the start of the chunk's call (the previous chunk's).
        """
        if self._pending_context is None:
            return
        x0, first_frame = self._pending_context
        self._pending_context = None
        with self._phase("context_s"):
            if self.config.context_pass:
                self._forward(self._rows(x0), 0.0, first_frame)
        self.cache.commit(first_frame, x0.shape[2], latents=self._rows(x0))

    @contextlib.contextmanager
    def _phase(self, name: str):
        if not self.profile:
            yield
            return
        sync = torch.cuda.synchronize if self.pipe.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.timings[name] = time.perf_counter() - start

    @torch.no_grad()
    def next_chunk(self) -> np.ndarray | None:
        """Generate and decode the next chunk: uint8 ``[T, H, W, 3]``, or None (video-to-video without input)."""
        if self._rest_of_first is not None:  # early_first_frame: the rest of the first chunk, decode only
            x0, start = self._rest_of_first
            self._rest_of_first = None
            return self._emit(x0, start)
        start = time.perf_counter()
        x0 = self._generate_latents()  # the context pass runs at the start of the next call, after this decode
        if x0 is None:
            return None
        if self.config.early_first_frame and self.output_frames == 0 and x0.shape[2] > 1:
            # The decoder runs latent frame by latent frame, so decoding the chunk in two calls gives its frames.
            self._rest_of_first = (x0[:, :, 1:], start)
            return self._emit(x0[:, :, :1], start)
        return self._emit(x0, start)

    def _emit(self, x0: torch.Tensor, start: float, index: int | None = None) -> np.ndarray:
        """Decode the chunk ``x0`` to uint8 frames and record :attr:`last_chunk` (``start``: its perf_counter;
        ``index``: its chunk number, default the chunk just denoised)."""
        with self._phase("decode_s"):
            pixels = self.decoder.decode(x0.to(self._decode_dtype))  # [1, 3, T, H, W] in [-1, 1]
        frames = ((pixels[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        out = frames.permute(1, 2, 3, 0).cpu().numpy()
        index = self.chunk_index - 1 if index is None else index
        self.last_chunk = ChunkInfo(index, self.output_frames, len(out), time.perf_counter() - start)
        self.output_frames += len(out)
        return out
