"""Measure the evaluator on clean renders of the held-out prompts (it must be near perfect there).

Usage: ``python -m stream_runtime.pipelines.tinyworld.selfcheck [--frames 32] [--height 64] [--width 64]``;
prints a JSON summary (accuracies, clip and object counts, seconds) and the objects it got wrong.
"""

from __future__ import annotations

import argparse
import json
import time

from .evaluate import evaluate
from .world import DEFAULT_SIZE, held_out_seeds, render, sample_spec

DEFAULT_FRAMES = 32
"""Two seconds at WORLD_FPS: longer than MIN_FRAMES_TO_JUDGE_BOUNCE."""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    parser.add_argument("--height", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--width", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--no-antialias", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    seeds = held_out_seeds()
    specs = [sample_spec(seed) for seed in seeds]
    clips = [render(s, args.frames, args.height, args.width, not args.no_antialias) for s in specs]
    result = evaluate(clips, specs)
    summary = {k: v for k, v in result.items() if k != "scores"}
    summary.update(frames=args.frames, height=args.height, width=args.width, seconds=time.perf_counter() - start)
    print(json.dumps(summary, indent=2))
    for seed, score in zip(seeds, result["scores"], strict=True):
        for o in score["objects"]:
            if not all(o[k] for k in ("colour_ok", "shape_ok", "motion_ok", "size_ok")):
                print(f"seed {seed}: expected {o['expected']}, detected {o['detected']}")
    return summary


if __name__ == "__main__":
    main()
