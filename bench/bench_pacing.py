"""Frame-interval jitter of a paced stream: a session played through ``stream_runtime.pacing.Paced`` at ``--fps``.

Usage::

    python bench/bench_pacing.py                      # the embedded tiny-world model on this CPU, 16 fps, 30 s
    python bench/bench_pacing.py --model PATH --device cuda --fps 16 --seconds 60
    python bench/bench_pacing.py --model random-1.3b --device cuda --compile   # Wan2.1 1.3B shape, random weights

The session generates in Paced's producer thread while the consumer takes one frame every ``1 / fps`` seconds, as a
display or a live encoder would. Reports the median interval and the median / p99 / max of ``|interval - 1/fps|``.
Intervals across an underrun are left out of the jitter and counted as underruns. The generator's own speed is
``bench_tinyworld_cpu.py``'s figure; here it only has to stay ahead of ``--fps``. Writes
``bench/results/pacing_<device>_buffer<s>_<date>.json`` and ``.md``. The GPU performance issue's target: p99 jitter
<= 10 ms when output is paced.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import time

import torch

from stream_runtime import StreamPipeline
from stream_runtime.pacing import Paced

MS = 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="assets/tinyworld",
        help="a model folder, or random-1.3b / random-14b (bench_stream's shapes at 480x832) / random-tiny (a check)",
    )
    parser.add_argument("--compile", action="store_true", help="StreamPipeline.compile + warm_up before pacing")
    parser.add_argument("--cuda-graphs", action="store_true", help="StreamPipeline.enable_cuda_graphs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of paced output")
    parser.add_argument("--buffer", type=float, default=0.5, help="seconds queued before the clock starts")
    parser.add_argument("--prompt", default="a medium red circle moving right and a small yellow square bouncing")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model.startswith("random-"):
        from bench_stream import build  # bench/ is on sys.path when this file runs as a script

        name = args.model.removeprefix("random-")
        tiny = name == "tiny"
        shape = argparse.Namespace(tiny=tiny, model=name, height=32 if tiny else 480, width=32 if tiny else 832)
        shape.decoder = "vae"
        device = torch.device(args.device)
        pipe = build(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        args.prompt = "a fox running in snow"  # the random model's vocabulary
    else:
        pipe = StreamPipeline.from_pretrained(args.model, device=args.device)
    if args.cuda_graphs:
        pipe.enable_cuda_graphs()
    if args.compile:
        pipe.compile()
        print(f"compiled and warmed up in {pipe.warm_up(modes=('t2v',)):.0f} s", flush=True)
    frames_wanted = round(args.seconds * args.fps)

    with pipe.session(args.prompt, seed=0) as session:
        with Paced(session, fps=args.fps, buffer_s=args.buffer) as paced:
            start = time.perf_counter()
            for n, _ in enumerate(paced, start=1):
                if n == frames_wanted:
                    break
            wall = time.perf_counter() - start
            generated = session.output_frames
    stats = paced.stats()
    row = {
        "fps_target": args.fps,
        "frames": stats.frames,
        "underruns": stats.underruns,
        "interval_p50_ms": stats.interval_p50_s * MS,
        "jitter_p50_ms": stats.jitter_p50_s * MS,
        "jitter_p99_ms": stats.jitter_p99_s * MS,
        "jitter_max_ms": stats.jitter_max_s * MS,
        "generated_frames": generated,  # ahead of the output by at most the queue's chunks
        "wall_s": wall,
    }
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.machine()})",
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "model": args.model,
        "buffer_s": args.buffer,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "torch": torch.__version__,
        "stats": dataclasses.asdict(stats),
    }
    print(json.dumps(row))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    stem = f"pacing_{tag}_buffer{args.buffer:g}s{'_graphs' if args.cuda_graphs else ''}_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "row": row}, indent=2) + "\n")
    lines = [
        f"# Paced output ({meta['device']}, {args.threads} threads, {args.model}, {meta['date']})",
        "",
        f"`python bench/bench_pacing.py --fps {args.fps:g} --seconds {args.seconds:g} --threads {args.threads} "
        f"--buffer {args.buffer:g}`; "
        f"clock starts after {args.buffer:g} s of frames are queued.",
        "",
        "| fps | frames | underruns | interval p50 | jitter p50 | jitter p99 | jitter max |",
        "|---|---|---|---|---|---|---|",
        f"| {args.fps:g} | {row['frames']} | {row['underruns']} | {row['interval_p50_ms']:.2f} ms "
        f"| {row['jitter_p50_ms']:.2f} ms | {row['jitter_p99_ms']:.2f} ms | {row['jitter_max_ms']:.2f} ms |",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
