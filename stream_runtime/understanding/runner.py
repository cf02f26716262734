"""Drive a Qwen2-VL-family model over a live stream: append a chunk of frames, decode a short commentary.

One :meth:`StreamingVLMRunner.step` feeds, in this order, the previous step's last generated token (not yet
in the cache), the chunk as ``<|vision_start|> <|video_pad|>*n <|vision_end|>``, then the prompt's tokens if
any; then it decodes greedily up to ``max_new_tokens`` tokens and evicts (:meth:`.StreamingVLMCache.evict`).
Positions come from the cache's ledger and are passed to the model as ``position_ids [3, 1, L]``, so the
model's own ``get_rope_index``/``rope_deltas`` bookkeeping (which assumes an append-only cache) is bypassed.

Pixels take the processor-free path of :mod:`.frames` (uint8 ``[T, H, W, 3]`` in, no torchvision, no
downloaded processor); text goes through any ``TokenCodec`` (a transformers tokenizer fits: ``encode`` /
``decode``). Batch size is 1: one runner per stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .cache import StreamingVLMCache
from .config import StreamingVLMConfig
from .family import VLMSpec
from .frames import frames_to_patches


class TokenCodec(Protocol):
    """Text <-> token ids (a transformers tokenizer satisfies it)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class StepOutput:
    """What one step fed and produced."""

    input_ids: list[int]
    """Tokens of the step's prefill, in order: pending token, vision chunk (markers included), prompt."""
    token_ids: list[int]
    """Greedily generated tokens (a stop token included when it ended the step)."""
    logits: torch.Tensor
    """``[len(token_ids), vocab]`` fp32 logits each generated token was the argmax of (before the vision marker
    and placeholder ids are masked out)."""
    evicted: int
    """Tokens the end-of-step eviction dropped."""


class StreamingVLMRunner:
    """Running description of a video stream in bounded memory (StreamingVLM-style cache policy).

    Example::

        runner = StreamingVLMRunner(model, StreamingVLMConfig(max_new_tokens=12), codec=tokenizer)
        runner.step(None, "You describe a live video, one sentence per second.")  # system prompt -> sinks
        for t, frame in source:                      # ingest yields (seconds, uint8 [H, W, 3])
            print(t, runner.step(frame[None]))       # one frame per step at 1 fps
    """

    def __init__(self, model: torch.nn.Module, config: StreamingVLMConfig, codec: TokenCodec | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.codec = codec
        self.spec = VLMSpec.from_model(model)
        self.stop_token_ids = set(self.spec.stop_token_ids if config.stop_token_ids is None else config.stop_token_ids)
        self.cache = StreamingVLMCache(config, self.spec.inv_freq)
        self.pending: list[int] = []
        """Last generated token of the previous step, fed at the start of the next one."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def step(self, frames: torch.Tensor | np.ndarray | None, prompt: str | None = None) -> str:
        """Append ``frames`` (uint8 ``[T, H, W, 3]``, or ``None``) and ``prompt``; return the decoded text."""
        if prompt is not None and self.codec is None:
            raise ValueError("prompt: a text prompt needs a codec; pass codec= to StreamingVLMRunner or use step_ids")
        prompt_ids = self.codec.encode(prompt) if prompt is not None else []
        out = self.step_ids(frames, prompt_ids)
        text_ids = [t for t in out.token_ids if t not in self.stop_token_ids]
        if self.codec is None:
            return " ".join(str(t) for t in text_ids)
        return self.codec.decode(text_ids)

    def _vision_inputs(self, frames: torch.Tensor | np.ndarray) -> tuple[tuple[int, int, int], int, dict]:
        """Patchify a chunk (validating it before the ledger changes): LLM grid, frame count, model kwargs."""
        spec = self.spec
        pixels, grid_thw = frames_to_patches(frames, spec.patch_size, spec.spatial_merge_size, spec.temporal_patch_size)
        window = self.config.vision_window_frames
        if len(frames) > window:
            raise ValueError(f"frames: expected at most vision_window_frames = {window} frames, got {len(frames)}")
        kwargs = dict(
            pixel_values_videos=pixels.to(self.device, self.model.model.visual.dtype),
            video_grid_thw=torch.tensor([grid_thw], device=self.device),
        )
        return spec.llm_grid(grid_thw), len(frames), kwargs

    @torch.no_grad()
    def step_ids(self, frames: torch.Tensor | np.ndarray | None, prompt_ids: Sequence[int] = ()) -> StepOutput:
        """:meth:`step` on token ids; returns the fed tokens, generated tokens and their logits."""
        spec, ledger = self.spec, self.cache.ledger
        if reserved := set(prompt_ids) & set(spec.vision_token_ids):
            raise ValueError(
                f"prompt_ids: expected no vision marker or placeholder ids {spec.vision_token_ids}, got "
                f"{sorted(reserved)}; pass pixels as frames and the runner adds those tokens"
            )
        vision = self._vision_inputs(frames) if frames is not None else None
        if not (self.pending or vision or prompt_ids):
            raise ValueError("step: nothing to feed; give frames or a prompt")
        ids = list(self.pending)
        positions = [ledger.append_text(len(ids))]
        kwargs: dict = {}
        if vision is not None:
            llm_grid, num_frames, kwargs = vision
            interval = spec.time_interval(self.config.frames_per_second)
            positions.append(ledger.append_vision(llm_grid, frames=num_frames, time_interval=interval))
            placeholders = [spec.video_token_id] * int(np.prod(llm_grid))
            ids += [spec.vision_start_token_id, *placeholders, spec.vision_end_token_id]
        ids += list(prompt_ids)
        positions.append(ledger.append_text(len(prompt_ids)))

        logits = self._forward(ids, torch.cat(positions, dim=1), **kwargs)
        generated: list[int] = []
        step_logits: list[torch.Tensor] = []
        banned = torch.tensor(spec.vision_token_ids, device=logits.device)
        for i in range(self.config.max_new_tokens):
            # A generated placeholder would desync the model's count of video tokens against pixel features.
            token = int(logits.index_fill(0, banned, float("-inf")).argmax())
            generated.append(token)
            step_logits.append(logits)
            if token in self.stop_token_ids or i == self.config.max_new_tokens - 1:
                break  # the last token is fed next step, so no forward pass is spent on it now
            logits = self._forward([token], ledger.append_text(1))
        self.pending = generated[-1:]
        eviction = self.cache.evict()
        vocab = self.model.config.text_config.vocab_size
        stacked = torch.stack(step_logits) if step_logits else torch.zeros(0, vocab)
        return StepOutput(input_ids=ids, token_ids=generated, logits=stacked, evicted=eviction.evicted)

    def _forward(self, ids: list[int], positions: torch.Tensor, **kwargs) -> torch.Tensor:
        """Run ``ids`` at ``positions [3, L]`` through the model into the cache; returns the last logits [vocab]."""
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=positions[:, None, :].to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.logits[0, -1].float()
