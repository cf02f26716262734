"""Sessions sharing a forward (``pipelines.wan.batching.next_chunks``) against the same sessions one after the other.

For ``n`` open streams of one configuration, a *round* gives every stream its next chunk: ``n`` calls of
``next_chunk`` in turn (what the round-robin engine does with ``max_sessions_per_forward=1``), or one
``next_chunks`` call whose denoising steps and context passes are shared forwards (``--share-forwards n``).
Reports the median round time over ``--rounds`` warm rounds (the two schedules alternate round by round), the
frames per second of all streams together and the ratio. Decode (per session) is included in both.

    python bench/bench_shared_forwards.py --threads 2                       # the tiny-world model on this CPU
    python bench/bench_shared_forwards.py --shape 1.3b --mode v2v --device cuda --sessions 1,2,4   # GPU, random 1.3B

Writes JSON and a markdown table to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import time

import numpy as np
import torch
from results_table import write_markdown

from stream_runtime.pipelines.wan import batching
from stream_runtime.pipelines.wan.pipeline import StreamPipeline

PROMPTS = (
    "a medium red circle moving right on a grey background",
    "a large blue square moving up on a black background",
    "a small yellow triangle bouncing on a navy background",
    "a medium green circle moving left on a grey background",
)


def load(args, device: torch.device) -> StreamPipeline:
    if args.shape:
        from bench_stream import build  # the random-weights Wan shapes of the GPU benchmark

        build_args = argparse.Namespace(
            tiny=False, model=args.shape, height=args.height, width=args.width, decoder="vae"
        )
        return build(build_args, device, torch.bfloat16)
    return StreamPipeline.from_pretrained(args.model, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def open_streams(pipe, n: int, args) -> list:
    height, width = (args.height, args.width) if args.shape else pipe.default_resolution
    sessions = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)] if not args.shape else "a fox running in snow"
        sessions.append(pipe.session(prompt, seed=i, mode=args.mode, height=height, width=width))
    return sessions


def feed(sessions, rng: np.random.Generator) -> None:
    for s in sessions:
        if s.mode == "v2v":
            s.push_frames(rng.integers(0, 256, (s.frames_needed(), s.height, s.width, 3), dtype=np.uint8))


def time_rounds(streams: dict[bool, list], rounds: int, device: torch.device) -> dict[bool, list[float]]:
    """Round times of both schedules (``streams[shared]``: that schedule's sessions), alternating round by round so
    that drift of the machine (clocks, other load) falls on both alike."""
    rng = np.random.default_rng(0)
    out: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds + 1):  # the first round warms up (and is the streams' first, shorter chunk)
        for shared, sessions in streams.items():
            feed(sessions, rng)
            sync(device)
            start = time.perf_counter()
            if shared:
                batching.next_chunks(sessions)
            else:
                for s in sessions:
                    s.next_chunk()
            sync(device)
            if r:
                out[shared].append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/tinyworld", help="model folder (ignored with --shape)")
    parser.add_argument("--shape", choices=("1.3b", "14b"), help="random weights at a Wan2.1 shape instead")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--mode", choices=("t2v", "v2v"), default="t2v")
    parser.add_argument("--sessions", default="1,2,4", help="comma-separated stream counts")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipe = load(args, device)
    rows = []
    with torch.no_grad():
        for n in (int(v) for v in args.sessions.split(",")):
            streams = {shared: open_streams(pipe, n, args) for shared in (False, True)}
            medians = {k: statistics.median(v) for k, v in time_rounds(streams, args.rounds, device).items()}
            frames = sum(s.last_chunk.num_frames for s in streams[True])
            for sessions in streams.values():
                for s in sessions:
                    s.close()
            row = {
                "streams": n,
                "round_s_in_turn": medians[False],
                "round_s_shared": medians[True],
                "fps_in_turn": frames / medians[False],
                "fps_shared": frames / medians[True],
                "speedup": medians[False] / medians[True],
            }
            print(json.dumps(row))
            rows.append(row)
    stamp = datetime.date.today().isoformat()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    meta = {
        "date": stamp,
        "device": where,
        "model": args.shape or args.model,
        "mode": args.mode,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"shared_forwards_{args.shape or 'tinyworld'}_{args.mode}_{device.type}_{stamp}"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    cols = ["streams", "round_s_in_turn", "round_s_shared", "fps_in_turn", "fps_shared", "speedup"]
    print(write_markdown(out / f"{name}.md", "Sessions sharing forwards", meta, cols, rows))


if __name__ == "__main__":
    main()
