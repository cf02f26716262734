"""Configuration of the streaming VLM cache policy and its runner."""

from __future__ import annotations

from dataclasses import dataclass

# Defaults follow StreamingVLM (Xu et al., 2025): 512 sink tokens, a 512-token text window and a
# 16-second vision window at 1 fps, with a short commentary per second of video.
DEFAULT_SINK_TOKENS = 512
DEFAULT_TEXT_WINDOW_TOKENS = 512
DEFAULT_VISION_WINDOW_FRAMES = 16
DEFAULT_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class StreamingVLMConfig:
    """Sizes of the streaming cache policy, in tokens and frames.

    Memory after every step is bounded by ``sink tokens + vision_window_frames * tokens per frame +
    text_window_tokens`` (plus two vision-marker tokens per kept frame chunk), whatever the length of the
    stream; during a step it grows by at most that step's inputs and ``max_new_tokens``.

    Example::

        StreamingVLMConfig(sink_tokens=32, vision_window_frames=8, text_window_tokens=256, max_new_tokens=12)
    """

    sink_tokens: int = DEFAULT_SINK_TOKENS
    """The first tokens of the stream kept forever (attention sinks; put the system prompt there). Rounded up
    to a whole unit: a frame chunk that starts inside the sink region is kept whole, as a sink."""
    vision_window_frames: int = DEFAULT_VISION_WINDOW_FRAMES
    """Most recent frames whose tokens stay in the cache. Whole chunks are evicted: after a step, the newest
    chunks whose frame counts sum to at most this are kept, older ones dropped."""
    text_window_tokens: int = DEFAULT_TEXT_WINDOW_TOKENS
    """Most recent text tokens (prompts and generated commentary, sinks excluded) kept in the cache."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    """Greedy tokens decoded per step at most (a stop token ends the step earlier). 0 only ingests frames."""
    frames_per_second: float = 1.0
    """Frame rate of the chunks handed to the runner. Qwen2.5-VL spaces temporal M-RoPE positions by
    ``tokens_per_second * temporal_patch_size / frames_per_second``; Qwen2-VL ignores it."""
    stop_token_ids: tuple[int, ...] | None = None
    """Token ids that end a step's decoding; ``None`` takes the model's ``eos_token_id``."""

    def __post_init__(self) -> None:
        for name, low in (
            ("sink_tokens", 0),
            ("vision_window_frames", 1),
            ("text_window_tokens", 0),
            ("max_new_tokens", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"StreamingVLMConfig.{name}: expected an int >= {low}, got {value!r}")
        if not self.frames_per_second > 0:
            raise ValueError(f"StreamingVLMConfig.frames_per_second: expected > 0, got {self.frames_per_second!r}")
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(
                f"StreamingVLMConfig.stop_token_ids: expected a tuple of ints or None, got {self.stop_token_ids!r}"
            )
