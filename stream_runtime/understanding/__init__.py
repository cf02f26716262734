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

How it plugs into ``understand(source)`` later (not built here): the ingest yields
``(timestamp, uint8 [H, W, 3])`` frames (``stream_runtime.ingest.open_source`` with ``Sampling`` at the chosen
fps and a ``Resize`` to multiples of ``patch_size * spatial_merge_size``); ``understand`` would load the model
with ``Qwen2VLForConditionalGeneration.from_pretrained(local_path)`` and its tokenizer, build one
:class:`StreamingVLMRunner`, feed the system prompt once (``runner.step(None, system_prompt)``), then group
frames into chunks of ``temporal_patch_size`` frames and yield ``(timestamp, runner.step(chunk))`` per chunk.
"""

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
    "VLMSpec",
    "frames_to_patches",
    "rotate_keys",
    "text_positions",
    "vision_unit_extent",
    "vision_unit_positions",
]
