"""Evaluate a tiny-world model through the real streaming path: held-out prompts in, OpenCV scores out.

Usage::

    python -m stream_runtime.pipelines.tinyworld.eval_model --model assets/tinyworld --prompts 50 \\
        --out bench/results/tinyworld_eval.json [--stability 96]

Each held-out prompt is streamed with ``StreamPipeline.from_pretrained(model).session(prompt, seed)`` (sink +
rolling cache, the folder's stream settings unless overridden) until ``--frames`` frames are out, and the clip
is scored against the prompt with :func:`evaluate.evaluate` (colour, shape, size, motion, count). Speed is
frames per second of the whole stream (session start, denoising, decoding, copy to the host) on ``--device``.
``--stability N`` also streams N latent frames for a few prompts, with and without the sink, and reports
:func:`evaluate.stability` for each. ``--switch N`` streams N held-out prompts, switches each to the next
held-out prompt mid-stream and scores the frames from :data:`SWITCH_SETTLE_CHUNKS` chunks after the switch
against the new prompt (does the new colour / motion hold within that many chunks?).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import numpy as np
import torch

from stream_runtime.pipelines.wan.pipeline import StreamPipeline

from .evaluate import evaluate, stability
from .model import FPS
from .world import MIN_FRAMES_TO_JUDGE_BOUNCE, caption, held_out_seeds, sample_spec

DEFAULT_FRAMES = 32
"""Two seconds: more than MIN_FRAMES_TO_JUDGE_BOUNCE, so a bounce shows a turn."""
SWITCH_SETTLE_CHUNKS = 2
"""Chunks after a prompt switch that are not scored: the new prompt must hold from the next chunk on."""


def stream_clip(pipe: StreamPipeline, prompt: str, seed: int, frames: int, **overrides) -> tuple[np.ndarray, dict]:
    """Stream ``prompt`` until at least ``frames`` frames are out; return (uint8 ``[T, H, W, 3]``, timings)."""
    start = time.perf_counter()
    chunks, latencies = [], []
    with pipe.session(prompt, seed=seed, **overrides) as session:
        count = 0
        while count < frames:
            chunk = next(session)
            chunks.append(chunk)
            latencies.append(session.last_chunk.latency_s)
            count += len(chunk)
    seconds = time.perf_counter() - start
    clip = np.concatenate(chunks)
    timing = {
        "seconds": seconds,
        "frames": len(clip),
        "fps": len(clip) / seconds,
        # after the first chunk (which pays for prompt encoding, cache set-up and a one-frame decode)
        "steady_fps": (len(clip) - len(chunks[0])) / max(sum(latencies[1:]), 1e-9),
        "chunk_latency_s": float(np.median(latencies[1:])) if len(latencies) > 1 else latencies[0],
    }
    return clip, timing


def evaluate_prompts(pipe: StreamPipeline, count: int, frames: int, seed: int = 0, **overrides) -> dict:
    """Stream and score the first ``count`` held-out prompts; accuracies, speed and per-prompt results."""
    if not 1 <= count <= len(held_out_seeds()):
        raise ValueError(f"prompts: expected 1 .. {len(held_out_seeds())}, got {count}")
    if frames < MIN_FRAMES_TO_JUDGE_BOUNCE:
        raise ValueError(f"frames: expected >= {MIN_FRAMES_TO_JUDGE_BOUNCE} to judge bounces, got {frames}")
    seeds = held_out_seeds()[:count]
    captions = [caption(sample_spec(s)) for s in seeds]
    clips, timings = [], []
    for i, (s, text) in enumerate(zip(seeds, captions, strict=True)):
        clip, timing = stream_clip(pipe, text, seed + s, frames, **overrides)
        clips.append(clip)
        timings.append(timing)
        print(f"[{i + 1}/{count}] {timing['fps']:.1f} fps  {text}", flush=True)
    scores = evaluate(clips, captions)
    total_frames = sum(t["frames"] for t in timings)
    total_seconds = sum(t["seconds"] for t in timings)
    per_prompt = [
        {"seed": s, "caption": text, **timing, **score}
        for s, text, timing, score in zip(seeds, captions, timings, scores.pop("scores"), strict=True)
    ]
    return {
        **scores,
        "fps_end_to_end": total_frames / total_seconds,
        "steady_fps_median": float(np.median([t["steady_fps"] for t in timings])),
        "chunk_latency_s_median": float(np.median([t["chunk_latency_s"] for t in timings])),
        "per_prompt": per_prompt,
    }


def stability_runs(pipe: StreamPipeline, latent_frames: int, prompts: int, seed: int = 0, **overrides) -> dict:
    """Stream ``latent_frames`` latent frames for the first ``prompts`` held-out prompts, with the folder's sink
    and with ``sink_frames=0``; :func:`evaluate.stability` of each (per-second windows left out)."""
    base = pipe.stream_config(**overrides)
    frames = 1 + pipe.temporal_factor * (latent_frames - 1)
    out = {}
    for label, sink in (("with_sink", base.sink_frames), ("without_sink", 0)):
        runs = []
        for s in held_out_seeds()[:prompts]:
            text = caption(sample_spec(s))
            clip, timing = stream_clip(pipe, text, seed + s, frames, **{**overrides, "sink_frames": sink})
            result = stability(clip, FPS)
            result.pop("windows")
            runs.append({"seed": s, "caption": text, "fps": timing["fps"], **result})
            print(f"stability {label} seed {s}: stable={result['stable']}", flush=True)
        out[label] = {
            "sink_frames": sink,
            "stable_fraction": float(np.mean([r["stable"] for r in runs])),
            "count_stable_fraction": float(np.mean([r["count_stable_fraction"] for r in runs])),
            "size_stable_fraction": float(np.mean([r["size_stable_fraction"] for r in runs])),
            "collapsed_fraction": float(np.mean([r["collapsed_fraction"] for r in runs])),
            "runs": runs,
        }
    return {"latent_frames": latent_frames, "video_frames": frames, **out}


def switch_runs(pipe: StreamPipeline, count: int, frames: int, seed: int = 0, **overrides) -> dict:
    """Prompt switches: held-out prompt ``i`` streams ``frames`` frames, then the stream switches to prompt
    ``i + 1`` (``session.set_prompt``, the folder's switch mode) and goes on; the frames from
    :data:`SWITCH_SETTLE_CHUNKS` chunks after the switch (``frames`` of them) are scored against the new
    prompt. Returns the accuracies of :func:`evaluate.evaluate` over the ``count`` switches and each switch."""
    seeds = held_out_seeds()
    if not 1 <= count < len(seeds):
        raise ValueError(f"switch: expected 1 .. {len(seeds) - 1} prompts, got {count}")
    if frames < MIN_FRAMES_TO_JUDGE_BOUNCE:
        raise ValueError(f"frames: expected >= {MIN_FRAMES_TO_JUDGE_BOUNCE} to judge bounces, got {frames}")
    clips, targets, runs = [], [], []
    for i in range(count):
        before, after = caption(sample_spec(seeds[i])), caption(sample_spec(seeds[i + 1]))
        with pipe.session(before, seed=seed + seeds[i], **overrides) as session:
            count_before = 0
            while count_before < frames:
                count_before += len(next(session))
            session.set_prompt(after)
            chunks = []
            for _ in range(SWITCH_SETTLE_CHUNKS):
                next(session)
            while sum(len(c) for c in chunks) < frames:
                chunks.append(next(session))
        clips.append(np.concatenate(chunks))
        targets.append(after)
        runs.append({"before": before, "after": after})
        print(f"switch [{i + 1}/{count}] -> {after}", flush=True)
    scores = evaluate(clips, targets)
    for run, score in zip(runs, scores.pop("scores"), strict=True):
        run.update(score)
    return {"settle_chunks": SWITCH_SETTLE_CHUNKS, "switches": count, **scores, "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by export (or any tiny-world model folder)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="added to each prompt's held-out seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--timesteps", type=float, nargs="+", default=None, help="override the folder's steps")
    parser.add_argument("--shift", type=float, default=None, help="override the folder's shift")
    parser.add_argument("--sampler", choices=("renoise", "euler"), default=None, help="override the folder's")
    parser.add_argument("--attention", default=None, help="self-attention backend (default: the folder's, sdpa)")
    parser.add_argument(
        "--reuse", type=int, default=None, metavar="N", help="cross-step attention reuse refresh interval (0: exact)"
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="classifier-free guidance (1: off; default: the folder's)"
    )
    parser.add_argument("--stability", type=int, default=0, metavar="LATENT_FRAMES", help="0: no stability run")
    parser.add_argument("--stability-prompts", type=int, default=4)
    parser.add_argument("--switch", type=int, default=0, metavar="PROMPTS", help="0: no prompt-switch run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    if args.timesteps:
        overrides["timesteps"] = tuple(args.timesteps)
    if args.shift is not None:
        overrides["shift"] = args.shift
    if args.sampler is not None:
        overrides["sampler"] = args.sampler
    if args.attention is not None:
        overrides["attention_backend"] = args.attention
    if args.reuse is not None:
        overrides["attention_reuse"] = args.reuse
    if args.guidance_scale is not None:
        overrides["guidance_scale"] = args.guidance_scale
    pipe = StreamPipeline.from_pretrained(args.model, device=args.device)
    start = time.perf_counter()
    result = {
        "model": str(args.model),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "stream": {k: v for k, v in vars(pipe.stream_config(**overrides)).items()},
        "prompts": args.prompts,
        "frames_per_clip": args.frames,
        **evaluate_prompts(pipe, args.prompts, args.frames, args.seed, **overrides),
    }
    if args.stability:
        result["stability"] = stability_runs(pipe, args.stability, args.stability_prompts, args.seed, **overrides)
    if args.switch:
        result["switch"] = switch_runs(pipe, args.switch, args.frames, args.seed, **overrides)
        print(json.dumps({k: v for k, v in result["switch"].items() if k != "runs"}, indent=2))
    result["seconds"] = time.perf_counter() - start
    summary = {k: v for k, v in result.items() if k not in ("per_prompt", "stability", "switch")}
    print(json.dumps(summary, indent=2, default=str))
    if "stability" in result:
        print(
            json.dumps(
                {k: v for k, v in result["stability"].items() if not isinstance(v, dict)}
                | {
                    k: {kk: vv for kk, vv in v.items() if kk != "runs"}
                    for k, v in result["stability"].items()
                    if isinstance(v, dict)
                },
                indent=2,
            )
        )
    if args.out:
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return result


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
