"""Configuration of a stream: chunking, cache layout, denoising schedule, positions, attention backend."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

POSITION_MODES = ("absolute", "bounded")
PROMPT_SWITCH_MODES = ("keep", "reset", "recache")
BLEND_MODES = ("linear", "slerp")
SAMPLERS = ("renoise", "euler")


@dataclass(frozen=True)
class StreamConfig:
    """How one stream is generated. Sizes are in *latent* frames unless a name says otherwise.

    The self-attention of a chunk sees ``[sink frames | rolling window | the chunk itself]``; the window
    counts the chunk's own frames, as ``local_attn_size`` does in Self-Forcing and LongLive, so a chunk
    attends to at most ``sink_frames + window_frames`` latent frames and the cache stores
    ``sink_frames + window_frames - chunk_frames`` of them.

    Example::

        StreamConfig(chunk_frames=3, sink_frames=3, window_frames=9, timesteps=(1000, 750, 500, 250), shift=5.0)
    """

    chunk_frames: int = 3
    """Latent frames generated per chunk (3 for text-to-video, 1 for video-to-video in the reference systems)."""
    sink_frames: int = 3
    """Latent frames of the stream's start that stay in the cache forever (attention sinks). 0 disables them."""
    window_frames: int = 9
    """Most recent latent frames attended to, including the current chunk's own frames."""
    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    """Denoising steps on the 0..1000 scale, before the shift is applied; decreasing."""
    shift: float = 5.0
    """Flow-matching time shift of the distilled models: sigma' = shift*sigma / (1 + (shift-1)*sigma)."""
    context_pass: bool = True
    """Run the denoised chunk once more at t=0 to write clean K/V into the cache (Self-Forcing, LongLive).
    If False, the K/V of the last denoising step are written instead (one forward fewer per chunk)."""
    position_mode: str = "absolute"
    """``absolute``: RoPE frame index = frame number in the stream (what released checkpoints saw).
    ``bounded``: frames are re-indexed over what the cache keeps (sinks first, then the window in order, then
    the chunk), so positions never exceed ``sink_frames + window_frames`` and a stream can run forever."""
    prompt_switch: str = "recache"
    """What a prompt switch does to the cache: ``keep`` (old K/V stay), ``reset`` (start over from an empty
    cache), ``recache`` (re-run the kept frames at t=0 under the new prompt, as LongLive)."""
    blend_chunks: int = 0
    """Chunks over which a new prompt's embedding is interpolated from the old one (0: switch at once)."""
    blend_mode: str = "linear"
    """``linear`` or ``slerp`` interpolation of prompt embeddings during a blend."""
    strength: float = 1.0
    """Video-to-video: multiplier on the noise levels of the step list (1: the list as configured; lower keeps
    more of the input)."""
    motion_aware: bool = False
    """Video-to-video: scale the noise strength with the measured frame-to-frame motion of the input."""
    motion_strength_range: tuple[float, float] = (0.5, 0.9)
    """Video-to-video, motion-aware: strength used for still input and for fast input."""
    attention_backend: str = "sdpa"
    """Self-attention backend in :mod:`stream_runtime.attention`: ``sdpa`` (PyTorch), ``naive`` (fp32 reference),
    ``blocksparse`` (Triton kernel, dense table), ``radial`` (Triton kernel, radial sparse table)."""
    attention_reuse: int = 0
    """Cross-step reuse of attention to the cached frames: 0 off; 1 split exactly (equals plain attention); N > 1
    compute the cached part at step 0 and every N steps and reuse it in between (approximate, faster)."""
    max_text_tokens: int | None = None
    """Override of the text encoder's maximum prompt length (default: the model's)."""
    sampler: str = "renoise"
    """How a chunk goes from one step to the next: ``renoise`` (fresh noise: the distilled few-step models this
    runtime targets) or ``euler`` (the flow ODE: models trained by plain flow matching, such as the tiny-world
    model). See :func:`stream_runtime.pipelines.wan.sampling.next_sample`."""
    guidance_scale: float = 1.0
    """Classifier-free guidance: each step's flow is ``uncond + guidance_scale * (cond - uncond)``, the prompt's
    prediction pushed away from the ``negative_prompt``'s. 1 disables it (one pass per step). Above 1 every pass
    (steps, context pass, recache) runs on a batch of two, the prompt and the negative prompt, each row with its
    own cache of the same frames, so a chunk costs about twice the denoising. Only for models trained with
    caption dropout, such as the tiny-world model; the distilled few-step checkpoints are not: keep 1."""
    negative_prompt: str = ""
    """What guidance steers away from; ``""`` is the unconditional (empty) prompt."""
    early_first_frame: bool = False
    """Hand out the stream's first latent frame on its own as soon as it is decoded (one frame for Wan2.1), and the
    rest of the first chunk from the next call, which decodes without denoising. The time to first frame then
    drops by the decode of the first chunk's other latent frames. Later chunks are whole. The frames are the same,
    only the first chunk is split. Sessions in shared forwards run their first chunk alone."""
    stream_batch: bool = False
    """Run the passes of successive chunks as one batch (StreamDiffusionV2's stream batch): one forward advances
    every chunk in flight by one pass, so a chunk comes out per forward after a warm-up. A chunk attends to the
    cache as it stands at each forward, which holds only chunks that have finished all their passes; see
    :mod:`stream_runtime.stream_batch` for the exact schedule. Video-to-video chunks enter with their encoded input."""
    stream_batch_stride: int = 1
    """Stream batch: forwards between two passes of one chunk. 1 on one device; a pipeline over N stages uses N so
    that N batches circulate at once (every stage busy). Outputs depend on it, since it decides what is cached."""

    def __post_init__(self) -> None:
        def positive(name: str, value: int, minimum: int = 1) -> None:
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive("chunk_frames", self.chunk_frames)
        positive("sink_frames", self.sink_frames, 0)
        positive("window_frames", self.window_frames)
        if self.window_frames < self.chunk_frames:
            raise ValueError(
                f"window_frames counts the chunk's own frames and must be >= chunk_frames={self.chunk_frames}, "
                f"got {self.window_frames}"
            )
        steps = tuple(float(t) for t in self.timesteps)
        if (
            not steps
            or any(not 0 < t <= 1000 for t in steps)
            or any(a <= b for a, b in zip(steps, steps[1:], strict=False))
        ):
            raise ValueError(f"timesteps must be a non-empty decreasing list in (0, 1000], got {self.timesteps!r}")
        object.__setattr__(self, "timesteps", steps)
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        for name, value, allowed in (
            ("position_mode", self.position_mode, POSITION_MODES),
            ("prompt_switch", self.prompt_switch, PROMPT_SWITCH_MODES),
            ("blend_mode", self.blend_mode, BLEND_MODES),
            ("sampler", self.sampler, SAMPLERS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        positive("blend_chunks", self.blend_chunks, 0)
        positive("attention_reuse", self.attention_reuse, 0)
        positive("stream_batch_stride", self.stream_batch_stride)
        if self.stream_batch_stride > 1 and not self.stream_batch:
            raise ValueError(f"stream_batch_stride={self.stream_batch_stride} needs stream_batch=True")
        if self.stream_batch and self.prompt_switch == "reset":
            raise ValueError(
                "stream_batch does not support prompt_switch='reset' (chunks in flight keep their frame numbers); "
                "use 'keep' or 'recache'"
            )
        if self.stream_batch and self.attention_reuse:
            raise ValueError(
                "stream_batch does not support attention_reuse (each chunk in a batch is at its own step); "
                "set attention_reuse=0"
            )
        if not isinstance(self.guidance_scale, (int, float)) or not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be a number >= 1 (1 disables guidance), got {self.guidance_scale!r}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string ('' = unconditional), got {self.negative_prompt!r}")
        if self.stream_batch and self.guided:
            raise ValueError(
                "stream_batch does not support classifier-free guidance (its batch holds chunks at different passes); "
                "set guidance_scale=1 (on the command line: --guidance-scale 1)"
            )
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        lo, hi = self.motion_strength_range
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"motion_strength_range must satisfy 0 < low <= high <= 1, got {(lo, hi)}")

    @property
    def guided(self) -> bool:
        """True when classifier-free guidance is on (``guidance_scale != 1``)."""
        return self.guidance_scale != 1.0

    @property
    def cache_frames(self) -> int:
        """Latent frames the KV cache stores: the sinks plus the window minus the chunk being generated."""
        return self.sink_frames + self.window_frames - self.chunk_frames

    def replace(self, **changes) -> StreamConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def text_to_video_config(**overrides) -> StreamConfig:
    """Defaults of the text-to-video reference systems (Self-Forcing / LongLive): 3-frame chunks, 4 steps, shift 5,
    clean context pass, 3 sink + 9 window frames."""
    return StreamConfig(**overrides)


def video_to_video_config(**overrides) -> StreamConfig:
    """Defaults of StreamDiffusionV2's video-to-video: 1-frame chunks, steps [700, 500] with shift 8, no context
    pass, 3 sink + 3 window frames."""
    base = dict(
        chunk_frames=1,
        sink_frames=3,
        window_frames=3,
        timesteps=(700.0, 500.0),
        shift=8.0,
        context_pass=False,
    )
    base.update(overrides)
    return StreamConfig(**base)


def check_resolution(height: int, width: int, multiple: int) -> None:
    """Raise a ValueError unless both sides are positive multiples of ``multiple`` (16 for Wan2.1)."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} pixels, got {value!r}")
