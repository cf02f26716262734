"""``understand(source, model)``: a running description of a video source, one event per step of frames.

The ingest decodes (and samples, and resizes) in a background thread through a bounded :func:`prefetch`
buffer while the model runs; frames are grouped into steps of ``frames_per_step`` and each step goes through
one :class:`~.runner.StreamingVLMRunner` (bounded cache), yielding an :class:`UnderstandEvent` as soon as its
text is decoded.

Example::

    model, tokenizer = load_vlm("Qwen2-VL-2B-Instruct", device="cuda")
    for event in understand("match.mp4", model, codec=tokenizer, fps=1.0):
        print(f"[{event.start_s:.1f}-{event.end_s:.1f}] {event.text}")
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from stream_runtime.ingest import FrameSource, IngestError, Resize, Sampling, open_source, prefetch
from stream_runtime.ingest.sampling import check_rgb_frame

from .config import StreamingVLMConfig
from .runner import StreamingVLMRunner, TokenCodec

DEFAULT_PROMPT = "Describe what happens in the video, briefly, as it happens."
DEFAULT_MAX_TOKENS_PER_FRAME = 256
"""LLM tokens per frame at most when ``size`` is not given: frames are scaled down (keeping their aspect) to
``256 * (patch_size * spatial_merge_size) ** 2`` pixels (448 x 448 for Qwen2-VL), so a 16-frame vision window
holds a few thousand tokens."""
PREFETCH_STEPS = 2
"""Steps of frames the decoder may run ahead of the model (the prefetch buffer holds this many steps)."""
SLOT_TOLERANCE = 1e-9
"""Seconds of float error forgiven when finding a frame's sampling slot (pts * time_base is rounded)."""


@dataclass(frozen=True)
class UnderstandEvent:
    """The text the model produced for one step of frames."""

    start_s: float
    """Timestamp of the step's first frame, in seconds of stream time."""
    end_s: float
    """End of the sampling slot of the step's last frame (``<=`` the next event's ``start_s``)."""
    text: str
    """Decoded text of the step (stop tokens removed); may be empty."""
    step: int
    """Index of the step, from 0."""


MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def load_vlm(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, TokenCodec]:
    """Load a Qwen2-VL / Qwen2.5-VL model and its tokenizer from a local folder (no download).

    The folder is what ``model.save_pretrained(dir)`` and ``tokenizer.save_pretrained(dir)`` write (a Hub
    snapshot of e.g. ``Qwen/Qwen2-VL-2B-Instruct`` is one). ``dtype`` defaults to bf16 on CUDA, fp32 otherwise.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer is the codec
        :func:`understand` and :class:`StreamingVLMRunner` take.

    Example::

        model, tokenizer = load_vlm("models/Qwen2-VL-2B-Instruct", device="cuda")
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model: expected a local model folder (save_pretrained layout), got {str(path)!r}")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    class_name = MODEL_CLASSES.get(config.model_type)
    if class_name is None:
        raise ValueError(
            f"model: expected a folder holding one of the model types {tuple(MODEL_CLASSES)}, got "
            f"{config.model_type!r} in {str(folder)!r}"
        )
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_cls = getattr(transformers, class_name)
    model = model_cls.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def understand(
    source: str | os.PathLike | int | Iterable[tuple[float, np.ndarray]],
    model: StreamingVLMRunner | torch.nn.Module | None = None,
    *,
    codec: TokenCodec | None = None,
    fps: float | None = None,
    frames_per_step: int | None = None,
    prompt: str | None = DEFAULT_PROMPT,
    config: StreamingVLMConfig | None = None,
    size: tuple[int, int] | None = None,
    workers: int = 1,
) -> Iterator[UnderstandEvent]:
    """Describe ``source`` as it is decoded: one :class:`UnderstandEvent` per step of ``frames_per_step`` frames.

    Without ``model`` (or with a ``TinyWorldCaptioner``) the embedded tiny-world captioner describes it
    (:mod:`.embedded`): the source is sampled at ``fps`` (default the world's 16) and resized to 64x64, and every
    ``frames_per_step`` frames (default 8) an event carries the caption of the last window of 24 frames; ``codec``,
    ``config`` and ``size`` must then be None and ``prompt`` None or the default.

    Args:
        source: a file path or URL (:class:`~stream_runtime.ingest.FileSource`), a capture device index
            (:class:`~stream_runtime.ingest.WebcamSource`), or any iterable of ``(seconds, uint8 [H, W, 3] RGB)``
            (a :class:`~stream_runtime.ingest.PushSource`, a list, a generator).
        model: a :class:`StreamingVLMRunner` (used as is, cache included: ``config`` and ``codec`` must then be
            ``None`` and its ``config.frames_per_second`` must equal ``fps``), or a loaded Qwen2-VL / Qwen2.5-VL
            model (e.g. from :func:`load_vlm`), for which a runner is built with ``config`` (default
            ``StreamingVLMConfig(frames_per_second=fps)``) and ``codec``.
        codec: text <-> ids for the prompt and the output (the model's tokenizer). Without one, ``prompt`` must be
            ``None`` and event texts are the generated ids, space-separated.
        fps: frames kept per second of stream time (:class:`~stream_runtime.ingest.Sampling`; slower sources keep
            every frame). Default 1.0 for a VLM.
        frames_per_step: frames per step; default the model's ``temporal_patch_size`` (one temporal patch, the
            cheapest step). A step short of a multiple of it is padded by repeating its last frame, as the
            Qwen2-VL processor does. At most ``config.vision_window_frames``.
        prompt: fed once before the first frames (it lands in the attention sinks); its own reply is dropped.
        config: the cache policy when ``model`` is not a runner.
        size: ``(width, height)`` frames are resized to, multiples of ``patch_size * spatial_merge_size``. Default:
            the source's size scaled down (aspect kept) to at most :data:`DEFAULT_MAX_TOKENS_PER_FRAME` LLM tokens
            per frame, each side rounded to a multiple of that factor (so the aspect may change slightly).
        workers: decode threads for a local file (keyframe-parallel, same frames as 1).

    Yields:
        One event per step, as soon as its text is decoded. The last step may hold fewer frames.

    Raises:
        IngestError: (a ``ValueError``) the source cannot be opened (raised here, before iterating), fails
            mid-stream (raised after the events of every frame delivered before the failure, a partial last
            step included), or has no frames at all.
        ValueError: an argument is invalid (raised here, before iterating).

    Example::

        model, tokenizer = load_vlm("Qwen2-VL-2B-Instruct", device="cuda")
        for event in understand(0, model, codec=tokenizer, fps=1.0):   # webcam 0
            print(event.start_s, event.text)
    """
    if model is None or _is_captioner(model):
        return _embedded(source, model, codec, fps, frames_per_step, prompt, config, size, workers)
    fps = 1.0 if fps is None else fps
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not (0 < fps < math.inf):
        raise ValueError(f"fps: expected a finite number > 0, got {fps!r}")
    runner = _runner(model, codec=codec, config=config, fps=float(fps))
    spec = runner.spec
    if frames_per_step is None:
        frames_per_step = spec.temporal_patch_size
    window = runner.config.vision_window_frames
    if not isinstance(frames_per_step, int) or isinstance(frames_per_step, bool) or not 1 <= frames_per_step <= window:
        raise ValueError(
            f"frames_per_step: expected an int in [1, vision_window_frames = {window}], got {frames_per_step!r}"
        )
    factor = spec.patch_size * spec.spatial_merge_size
    if size is not None:
        _check_size(size, factor)
    if prompt is not None and runner.codec is None:
        raise ValueError("prompt: a text prompt needs a codec; pass codec=tokenizer, or prompt=None")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")

    sampling = Sampling(fps=fps)
    if isinstance(source, (str, os.PathLike, int)) and not isinstance(source, bool):
        opened: FrameSource | None = open_source(
            source, sampling=sampling, **({"workers": workers} if not isinstance(source, int) else {})
        )
        frames: Iterable[tuple[float, np.ndarray]] = opened
        name = str(source)
    elif isinstance(source, Iterable):
        opened, frames, name = None, _sampled(source, sampling), "<frames>"
    else:
        raise TypeError(
            f"source: expected a path, URL, device index or iterable of (seconds, frame), got {type(source).__name__}"
        )
    max_pixels = DEFAULT_MAX_TOKENS_PER_FRAME * factor**2
    resized = _resized(frames, size, factor, max_pixels)
    return _events(runner, resized, opened, name, fps, frames_per_step, prompt)


def _is_captioner(model: object) -> bool:
    from stream_runtime.pipelines.captioner.model import TinyWorldCaptioner

    return isinstance(model, TinyWorldCaptioner)


def _embedded(
    source, captioner, codec, fps, frames_per_step, prompt, config, size, workers
) -> Iterator[UnderstandEvent]:
    """The embedded captioner's path of :func:`understand` (arguments checked, then :mod:`.embedded`)."""
    from stream_runtime.pipelines.captioner.model import load_captioner

    from .embedded import captioner_events

    for name, value in (("codec", codec), ("config", config), ("size", size)):
        if value is not None:
            raise ValueError(f"{name}: the embedded captioner takes none (it is for VLMs), got {value!r}")
    if prompt not in (None, DEFAULT_PROMPT):
        raise ValueError(f"prompt: the embedded captioner takes no prompt (pass model=... for a VLM), got {prompt!r}")
    captioner = load_captioner() if captioner is None else captioner
    return captioner_events(source, captioner, fps=fps, stride_frames=frames_per_step, workers=workers)


def _runner(
    model: StreamingVLMRunner | torch.nn.Module,
    *,
    codec: TokenCodec | None,
    config: StreamingVLMConfig | None,
    fps: float,
) -> StreamingVLMRunner:
    if isinstance(model, StreamingVLMRunner):
        if config is not None or codec is not None:
            raise ValueError(
                "config/codec: a StreamingVLMRunner already has its own; pass them to the runner, or pass the model"
            )
        if model.config.frames_per_second != fps:
            raise ValueError(
                f"fps: expected the runner's config.frames_per_second = {model.config.frames_per_second}, got {fps}; "
                "build the runner with StreamingVLMConfig(frames_per_second=fps)"
            )
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a StreamingVLMRunner or a Qwen2-VL model, got {type(model).__name__}")
    config = StreamingVLMConfig(frames_per_second=fps) if config is None else replace(config, frames_per_second=fps)
    return StreamingVLMRunner(model, config, codec=codec)


def _check_size(size: object, factor: int) -> None:
    ok = isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)
    if not ok or size[0] % factor or size[1] % factor:
        raise ValueError(
            f"size: expected (width, height), both positive multiples of patch_size * spatial_merge_size = {factor}, "
            f"got {size!r}"
        )


def fit_size(width: int, height: int, factor: int, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` scaled down to at most ``max_pixels`` (aspect kept), sides rounded to ``factor``."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    out_w = max(factor, round(width * scale / factor) * factor)
    out_h = max(factor, round(height * scale / factor) * factor)
    if out_w * out_h > max_pixels:  # rounding up overshot the budget: round down instead
        out_w = max(factor, math.floor(width * scale / factor) * factor)
        out_h = max(factor, math.floor(height * scale / factor) * factor)
    return out_w, out_h


def _sampled(frames: Iterable[tuple[float, np.ndarray]], sampling: Sampling) -> Iterator[tuple[float, np.ndarray]]:
    selector = sampling.selector()
    for timestamp, frame in frames:
        if selector.keep(timestamp):
            yield float(timestamp), check_rgb_frame(frame)


def _resized(
    frames: Iterable[tuple[float, np.ndarray]], size: tuple[int, int] | None, factor: int, max_pixels: int
) -> Iterator[tuple[float, np.ndarray]]:
    """Frames resized to ``size``, or to the first frame's fitted size (every frame of a stream gets one size)."""
    resize = None if size is None else Resize(*size, keep_aspect=False)
    for timestamp, frame in frames:
        if resize is None:
            height, width = frame.shape[:2]
            resize = Resize(*fit_size(width, height, factor, max_pixels), keep_aspect=False)
        yield timestamp, resize(frame)


def _events(
    runner: StreamingVLMRunner,
    frames: Iterator[tuple[float, np.ndarray]],
    opened: FrameSource | None,
    name: str,
    fps: float,
    frames_per_step: int,
    prompt: str | None,
) -> Iterator[UnderstandEvent]:
    # Decode, sampling and resizing run in the prefetch thread, at most PREFETCH_STEPS steps ahead of the model.
    buffer = prefetch(frames, maxsize=PREFETCH_STEPS * frames_per_step)
    origin: float | None = None
    step = 0
    group: list[tuple[float, np.ndarray]] = []

    def run(chunk: list[tuple[float, np.ndarray]]) -> UnderstandEvent:
        images = np.stack([image for _, image in chunk])  # [T, H, W, 3]
        text = runner.step(images)
        last_slot = math.floor((chunk[-1][0] - origin) * fps + SLOT_TOLERANCE)
        return UnderstandEvent(start_s=chunk[0][0], end_s=origin + (last_slot + 1) / fps, text=text, step=step)

    try:
        while True:
            try:
                item = next(buffer)
            except StopIteration:
                break
            except Exception:
                if group:  # understand the frames delivered before the failure, then raise it
                    yield run(group)
                raise
            if origin is None:
                origin = item[0]
                if prompt is not None:
                    runner.step(None, prompt)
            group.append(item)
            if len(group) == frames_per_step:
                yield run(group)
                step, group = step + 1, []
        if group:
            yield run(group)
        if origin is None:
            raise IngestError(name, "the stream has no frames (nothing to understand)")
    finally:
        buffer.close()
        if opened is not None:
            opened.close()
