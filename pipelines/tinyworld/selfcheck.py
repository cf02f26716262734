"""Measure the evaluator on clean renders of the held-out prompts (it must be near perfect there), or, with
``--vae``, on a VAE's reconstructions of them: the most a transformer generating in that VAE's latent space can
score.

Usage: ``python -m stream_runtime.pipelines.tinyworld.selfcheck [--frames 32] [--height 64] [--width 64]
[--vae assets/tinyworld/vae]``; prints a JSON summary (accuracies, clip and object counts, seconds), the errors
counted by kind (``"small square -> circle": 25``), and the objects it got wrong.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np

from .evaluate import evaluate
from .world import DEFAULT_SIZE, held_out_seeds, render, sample_spec

DEFAULT_FRAMES = 32
"""Two seconds at WORLD_FPS: longer than MIN_FRAMES_TO_JUDGE_BOUNCE."""


def error_counts(scores: list[dict]) -> dict[str, int]:
    """Wrong objects by kind: ``"<size> <shape> -> <detected shape>"`` for shapes, ``"<field>: a -> b"`` else."""
    counts = Counter()
    for score in scores:
        for o in score["objects"]:
            expected, detected = o["expected"], o["detected"] or {}
            if not o["shape_ok"]:
                counts[f"{expected['size']} {expected['shape']} -> {detected.get('shape', 'missing')}"] += 1
            for field in ("colour", "motion", "size"):
                if not o[f"{field}_ok"]:
                    counts[f"{field}: {expected[field]} -> {detected.get(field, 'missing')}"] += 1
    return dict(counts.most_common())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    parser.add_argument("--height", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--width", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--no-antialias", action="store_true")
    parser.add_argument("--vae", default=None, help="score this VAE folder's reconstructions (frames: 1 + 4k)")
    args = parser.parse_args(argv)
    if args.vae is not None and (args.frames - 1) % 4:
        parser.error(f"--vae: the VAE takes 1 + 4k frames, got --frames {args.frames} (try {args.frames + 1})")
    start = time.perf_counter()
    seeds = held_out_seeds()
    specs = [sample_spec(seed) for seed in seeds]
    clips = np.stack([render(s, args.frames, args.height, args.width, not args.no_antialias) for s in specs])
    if args.vae is not None:
        from diffusers import AutoencoderKLWan

        from .train_vae import reconstruct

        clips = reconstruct(AutoencoderKLWan.from_pretrained(args.vae).eval(), clips)
    result = evaluate(list(clips), specs)
    summary = {k: v for k, v in result.items() if k != "scores"}
    summary.update(frames=args.frames, height=args.height, width=args.width, vae=args.vae)
    summary.update(errors=error_counts(result["scores"]), seconds=time.perf_counter() - start)
    print(json.dumps(summary, indent=2))
    for seed, score in zip(seeds, result["scores"], strict=True):
        for o in score["objects"]:
            if not all(o[k] for k in ("colour_ok", "shape_ok", "motion_ok", "size_ok")):
                print(f"seed {seed}: expected {o['expected']}, detected {o['detected']}")
    return summary


if __name__ == "__main__":
    main()
