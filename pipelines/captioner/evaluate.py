"""Held-out accuracy of the captioner.

**Caption accuracy** is the share of windows whose predicted scene description equals the true one: the same
*set* of objects (each object = colour, shape, size, motion) and the same background (colours and layout). A set,
because the world's captions list objects in the order the scene was sampled, which no video shows; the captioner
lists them in palette order. Equal descriptions give the same caption up to the order of its objects.

Per-attribute accuracies: ``presence`` over every (window, shape colour) pair; ``shape``, ``size`` and ``motion``
over the colours truly present (read at that colour whatever the presence decision); ``background`` and
``object_count`` per window.

Windows: each held-out seed (``world.held_out_seeds()``: 0 .. 127, never trained on) gives ``--windows-per-seed``
windows of ``config.window_frames`` frames from start frames drawn with ``--seed``.

Usage::

    python -m stream_runtime.pipelines.captioner.evaluate --model assets/tinyworld-captioner --windows-per-seed 2 \\
        --out bench/results/captioner_eval.json [--degrade chroma|jpeg|h264]
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np

from stream_runtime.pipelines.tinyworld.spec import SceneDescription, SceneSpec, describe
from stream_runtime.pipelines.tinyworld.world import held_out_seeds, render_frames, sample_spec

from .data import START_FRAME_RANGE
from .model import TinyWorldCaptioner

DEGRADE_CHOICES = ("none", "chroma", "jpeg", "h264")
JPEG_EVAL_QUALITY = 75
"""JPEG quality of the ``jpeg`` evaluation (a typical webcam/browser setting)."""


def same_scene(predicted: SceneDescription, spec: SceneSpec) -> bool:
    """Whether ``predicted`` describes ``spec``: equal object sets and equal backgrounds."""
    truth = describe(spec)
    return set(predicted.objects) == set(truth.objects) and predicted.background == truth.background


def h264_roundtrip(frames: np.ndarray, fps: int) -> np.ndarray:
    """Encode uint8 ``[T, H, W, 3]`` to H.264 (yuv420p, libx264 defaults) in memory and decode it back."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    buffer.seek(0)
    with av.open(buffer) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _degraded(frames: np.ndarray, degrade: str, fps: int) -> np.ndarray:
    if degrade == "none":
        return frames
    if degrade == "h264":
        return h264_roundtrip(frames, fps)
    import cv2

    out = np.empty_like(frames)
    for t, frame in enumerate(frames):
        if degrade == "jpeg":
            _, data = cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_EVAL_QUALITY])
            out[t] = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
        else:  # chroma: 4:2:0
            ycc = cv2.cvtColor(frame, cv2.COLOR_RGB2YCrCb)
            height, width = frame.shape[:2]
            half = cv2.resize(ycc[..., 1:], (width // 2, height // 2), interpolation=cv2.INTER_AREA)
            ycc[..., 1:] = cv2.resize(half, (width, height), interpolation=cv2.INTER_LINEAR)
            out[t] = cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)
    return out


def evaluate(
    model: TinyWorldCaptioner,
    seeds: list[int] | None = None,
    windows_per_seed: int = 2,
    seed: int = 0,
    degrade: str = "none",
) -> dict:
    """Caption and per-attribute accuracies (see the module docstring) over ``len(seeds) * windows_per_seed``
    windows; ``seeds`` defaults to the held-out seeds. Also lists the first wrong windows."""
    if degrade not in DEGRADE_CHOICES:
        raise ValueError(f"degrade: expected one of {DEGRADE_CHOICES}, got {degrade!r}")
    if windows_per_seed < 1:
        raise ValueError(f"windows_per_seed: expected >= 1, got {windows_per_seed}")
    seeds = held_out_seeds() if seeds is None else seeds
    config = model.config
    rng = np.random.default_rng(seed)
    hits: Counter = Counter()
    totals: Counter = Counter()
    wrong = []
    for scene_seed in seeds:
        spec = sample_spec(scene_seed)
        truth = {s.colour: s for s in spec.shapes}
        for _ in range(windows_per_seed):
            start = int(rng.integers(START_FRAME_RANGE))
            frames = render_frames(spec, start, config.window_frames, config.size, config.size)
            frames = _degraded(frames, degrade, round(config.fps))
            logits = model.window_logits(model.frame_features(frames))
            prediction = model.decide(logits)
            ok = same_scene(prediction.description, spec)
            hits["caption"] += ok
            totals["caption"] += 1
            if not ok and len(wrong) < 20:
                wrong.append({"seed": scene_seed, "start": start, "predicted": prediction.caption})
            hits["background"] += prediction.description.background == spec.background
            hits["object_count"] += len(prediction.description.objects) == len(spec.shapes)
            totals["background"] += 1
            totals["object_count"] += 1
            for i, colour in enumerate(config.shape_colours):
                hits["presence"] += bool(prediction.present_prob[i] > 0.5) == (colour in truth)
                totals["presence"] += 1
                if colour not in truth:
                    continue
                for attribute in ("shape", "size", "motion"):
                    names = getattr(config, attribute + "s")
                    guess = names[int(logits[attribute][i].argmax())]
                    hits[attribute] += guess == getattr(truth[colour], attribute)
                    totals[attribute] += 1
    accuracy = {key: round(hits[key] / totals[key], 4) for key in totals}
    return {
        "windows": totals["caption"],
        "seeds": len(seeds),
        "windows_per_seed": windows_per_seed,
        "window_frames": config.window_frames,
        "degrade": degrade,
        "caption_accuracy": accuracy.pop("caption"),
        "attribute_accuracy": accuracy,
        "wrong_examples": wrong,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="captioner folder (config.json + model.safetensors)")
    parser.add_argument("--windows-per-seed", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="draws the windows' start frames")
    parser.add_argument("--degrade", choices=DEGRADE_CHOICES, default="none")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    model = TinyWorldCaptioner.from_pretrained(args.model)
    with torch.no_grad():
        result = evaluate(model, windows_per_seed=args.windows_per_seed, seed=args.seed, degrade=args.degrade)
    result["model"] = args.model
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
