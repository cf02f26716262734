"""Speed of the embedded tiny-world captioner on this CPU: frames per second against the world's 16 fps.

Two figures, each the median of ``--repeats`` runs over the same stream:

* ``model``: the captioner alone, streaming (:class:`CaptionStream`, one frame pushed at a time, a caption every
  8 frames over the last 24), on frames already in memory;
* ``end_to_end``: ``understand(path)`` on an H.264 MP4 of a tiny-world stream that the bench writes itself:
  decode, sampling, resize, the prefetch thread and the captioner, as the CLI runs it.

Usage::

    python bench/bench_captioner.py --seconds 60 --threads 1     # writes bench/results/captioner_speed.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import av
import torch

from stream_runtime.pipelines.captioner.model import default_captioner_path, load_captioner
from stream_runtime.pipelines.captioner.stream import CaptionStream
from stream_runtime.pipelines.tinyworld.spec import WORLD_FPS
from stream_runtime.pipelines.tinyworld.world import held_out_seeds, render, sample_spec
from stream_runtime.understanding import understand

RESULTS = Path(__file__).resolve().parent / "results"


def write_mp4(path: Path, frames) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=WORLD_FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stream length (world seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "captioner_speed"), help="path without extension")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_captioner()
    count = round(args.seconds * WORLD_FPS)
    frames = render(sample_spec(held_out_seeds()[0]), count)

    model_fps, e2e_fps, captions = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "world.mp4"
        write_mp4(path, frames)
        for _ in range(args.repeats):
            stream = CaptionStream(model)
            start = time.perf_counter()
            for frame in frames:
                stream.push(frame[None])
            model_fps.append(count / (time.perf_counter() - start))
            start = time.perf_counter()
            captions = sum(1 for _ in understand(path, model))
            e2e_fps.append(count / (time.perf_counter() - start))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"load average {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "threads": args.threads,
        "frames": count,
        "resolution": [model.config.size, model.config.size],
        "world_fps": WORLD_FPS,
        "captions_per_run": captions,
        "model_fps_median": round(statistics.median(model_fps), 1),
        "end_to_end_fps_median": round(statistics.median(e2e_fps), 1),
        "model_fps_runs": [round(v, 1) for v in model_fps],
        "end_to_end_fps_runs": [round(v, 1) for v in e2e_fps],
        "weights_mb": round(sum(f.stat().st_size for f in default_captioner_path().iterdir()) / 2**20, 3),
    }
    result["realtime_factor_end_to_end"] = round(result["end_to_end_fps_median"] / WORLD_FPS, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"# Embedded captioner speed ({result['date']})\n\n"
        f"`python bench/bench_captioner.py --seconds {args.seconds:g} --threads {args.threads}` on "
        f"{result['machine']}, torch {result['torch']}.\n\n"
        f"| what | frames/s (median of {args.repeats}) | x real time (16 fps) |\n|---|---|---|\n"
        f"| captioner alone, streaming | {result['model_fps_median']} | "
        f"{result['model_fps_median'] / WORLD_FPS:.1f} |\n"
        f"| `understand(file)`: decode + captioner | {result['end_to_end_fps_median']} | "
        f"{result['realtime_factor_end_to_end']} |\n\n"
        f"{count} frames at 64x64, {captions} captions per run (window 24, stride 8); weights "
        f"{result['weights_mb']} MB.\n"
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
