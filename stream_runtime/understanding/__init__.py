"""Streaming video understanding: a StreamingVLM-style KV cache policy for transformers VLMs.

A running description of a long video, in real time and constant memory: the cache keeps attention sinks
(the first ``sink_tokens`` tokens: put the system prompt there), the frame chunks of the last
``vision_window_frames`` frames and the last ``text_window_tokens`` text tokens, and re-indexes M-RoPE positions
contiguously over what it keeps, so both memory and the position range stay bounded for hours.

Pieces, by concept:

* :mod:`.config` -- :class:`StreamingVLMConfig` (sizes, decode length).
* :mod:`.ledger` -- :class:`TokenLedger`: kind and 3-D position of every cached token, the eviction decision.
* :mod:`.rope` -- M-RoPE positions of text and frame chunks, :func:`rotate_keys` (re-indexing kept keys).
* :mod:`.cache` -- :class:`StreamingVLMCache`, a ``DynamicCache`` that applies evictions to every layer.
* :mod:`.frames` -- uint8 frames to ``pixel_values_videos`` / ``video_grid_thw`` without a processor.
* :mod:`.family` -- :class:`VLMSpec`: what is read from a Qwen2-VL / Qwen2.5-VL model, checked once.
* :mod:`.runner` -- :class:`StreamingVLMRunner`: ``step(frames, prompt) -> str`` reusing the cache.
* :mod:`.tiny` -- tiny random configs for tests.

* :mod:`.api` -- ``understand(source, model)``: ingest (:mod:`stream_runtime.ingest`, sampled at ``fps`` and resized
  to multiples of ``patch_size * spatial_merge_size``) decoding ahead through a bounded prefetch, frames grouped
  into steps of ``temporal_patch_size``, one :class:`UnderstandEvent` per step from one
  :class:`StreamingVLMRunner`; ``load_vlm(path)`` loads a local Qwen2-VL folder. CLI: ``stream-runtime understand``.
* :mod:`.embedded` -- ``understand(source)`` without a model: the embedded tiny-world captioner
  (``stream_runtime.pipelines.captioner``) over a sliding window of frames at the world's 16 fps.
"""

from .api import UnderstandEvent, load_vlm, understand
from .cache import StreamingVLMCache
from .config import StreamingVLMConfig
from .family import VLMSpec
from .frames import frames_to_patches
from .ledger import Eviction, TokenKind, TokenLedger
from .rope import rotate_keys, text_positions, vision_unit_extent, vision_unit_positions
from .runner import StepOutput, StreamingVLMRunner, TokenCodec

__all__ = [
    "Eviction",
    "StepOutput",
    "StreamingVLMCache",
    "StreamingVLMConfig",
    "StreamingVLMRunner",
    "TokenCodec",
    "TokenKind",
    "TokenLedger",
    "UnderstandEvent",
    "VLMSpec",
    "frames_to_patches",
    "load_vlm",
    "rotate_keys",
    "text_positions",
    "understand",
    "vision_unit_extent",
    "vision_unit_positions",
]
