"""Decode throughput: exact keyframe-parallel decoder vs one sequential PyAV decode.

Generates (once, cached) a synthetic 720p H.264 file with a keyframe every ``--gop-seconds``, then
decodes it to RGB with ``decode_sequential`` (PyAV defaults, the baseline), with FFmpeg's own frame
threads, and with ``decode_parallel`` for each backend and worker count. Prints a table and writes
``bench/results/bench_decode.{json,md}``.

    python bench/bench_decode.py                      # 10 minutes of video (the default)
    python bench/bench_decode.py --duration 30        # a short run
    python bench/bench_decode.py --duration 30 --verify   # also check frames equal sequential
    python bench/bench_decode.py --duration 30 --backends thread process
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np

from stream_runtime.ingest import DecodedFrame, decode_parallel, decode_sequential, default_workers, scan_stream

RESULTS = Path(__file__).resolve().parent / "results"
# Chroma planes of yuv420p are half the luma size in each direction.
CHROMA_SUBSAMPLING = 2
GRAY = 128
BOX_FRACTION = 4  # the moving box is 1/4 of the frame height
DIGEST_BYTES = 16
ROUND_ORDER_SEED = 0
MS_PER_S = 1000.0


def synthetic_planes(width: int, height: int, index: int) -> np.ndarray:
    """One yuv420p frame ``[H * 3 / 2, W]``: a scrolling gradient with a moving box (cheap to make and encode)."""
    chroma_h, chroma_w = height // CHROMA_SUBSAMPLING, width // CHROMA_SUBSAMPLING
    luma = (
        (np.arange(width, dtype=np.uint16)[None, :] + np.arange(height, dtype=np.uint16)[:, None] + index) % 256
    ).astype(np.uint8)
    box = height // BOX_FRACTION
    x, y = (index * 7) % (width - box), (index * 3) % (height - box)
    luma[y : y + box, x : x + box] = 255 - luma[y : y + box, x : x + box]
    u = np.full((chroma_h, chroma_w), GRAY, np.uint8)
    v = np.full((chroma_h, chroma_w), (GRAY + index) % 256, np.uint8)
    return np.concatenate([luma, u.reshape(-1, width), v.reshape(-1, width)])


def generate(path: Path, duration: float, fps: int, width: int, height: int, gop_seconds: float, bframes: int) -> float:
    """Encode the synthetic clip with libx264 ultrafast; returns seconds taken."""
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    keyint = max(1, round(gop_seconds * fps))
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {
            "preset": "ultrafast",
            "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes={bframes}",
        }
        for index in range(round(duration * fps)):
            frame = av.VideoFrame.from_ndarray(synthetic_planes(width, height, index), format="yuv420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    partial.rename(path)
    return time.perf_counter() - start


def run(frames: Iterator[DecodedFrame]) -> tuple[int, float, float]:
    """Consume ``frames``; returns (count, wall seconds, CPU seconds of this process: all its threads)."""
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    count = sum(1 for _ in frames)
    return count, time.perf_counter() - start, _cpu_seconds() - cpu_start


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def digests_of(frames: Iterator[DecodedFrame]) -> list[bytes]:
    """A short hash of each frame's pts and pixels, to compare decoders without holding the frames."""
    return [
        hashlib.blake2b(frame.image.tobytes(), digest_size=DIGEST_BYTES).digest() + str(frame.pts).encode()
        for frame in frames
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of video (default 600)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--gop-seconds", type=float, default=2.0, help="keyframe interval")
    parser.add_argument("--bframes", type=int, default=0, help="B-frames (ultrafast's default is 0)")
    parser.add_argument("--path", type=Path, default=None, help="where to cache the clip (default: temp dir)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["thread"],
        choices=["thread", "process"],
        help="parallel backends to time (the process backend is much slower: frames are pickled back)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all configurations")
    parser.add_argument("--verify", action="store_true", help="check every parallel run equals sequential")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    size = f"{args.width}x{args.height}_{args.fps}fps"
    name = f"bench_{size}_{args.duration:g}s_gop{args.gop_seconds:g}_bf{args.bframes}.mp4"
    path = args.path or Path(tempfile.gettempdir()) / "stream_runtime_bench" / name
    generation_s = None
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        generation_s = generate(path, args.duration, args.fps, args.width, args.height, args.gop_seconds, args.bframes)
        print(f"generated in {generation_s:.1f} s", flush=True)
    scan_start = time.perf_counter()
    index = scan_stream(path)
    scan_s = time.perf_counter() - scan_start

    configs: list[tuple[str, int, Callable[[], Iterator[DecodedFrame]]]] = [
        ("sequential (PyAV defaults)", 1, lambda: decode_sequential(path)),
        ("sequential, FFmpeg frame threads (auto)", 0, lambda: decode_sequential(path, decoder_threads=0)),
    ]
    for backend in args.backends:
        for workers in args.workers:
            make = functools.partial(decode_parallel, path, workers=workers, backend=backend)
            configs.append((f"parallel, {backend} backend", workers, make))

    load_before = os.getloadavg()[0]
    # Rounds interleave the configurations, in a new order each round, so that load from other processes
    # and the after-effects of the previous run hit them all alike; each keeps its best and median time.
    order = random.Random(ROUND_ORDER_SEED)
    times: list[list[float]] = [[] for _ in configs]
    cpu: list[list[float]] = [[] for _ in configs]
    counts = [0] * len(configs)
    for round_index in range(args.repeats):
        for position in order.sample(range(len(configs)), len(configs)):
            label, workers, make = configs[position]
            counts[position], seconds, cpu_seconds = run(make())
            times[position].append(seconds)
            cpu[position].append(cpu_seconds)
            print(f"round {round_index + 1}: {label:>40} workers={workers}: {counts[position] / seconds:7.1f} fps")
    reference = digests_of(decode_sequential(path)) if args.verify else None
    rows = []
    for (label, workers, make), count, seconds, cpu_seconds in zip(configs, counts, times, cpu, strict=True):
        rows.append({"decoder": label, "workers": workers, "frames": count, "seconds": seconds, "cpu_s": cpu_seconds})
        if reference is not None and label.startswith("parallel"):
            rows[-1]["equal_to_sequential"] = digests_of(make()) == reference
    baseline = rows[0]
    for row in rows:
        row["fps_best"] = row["frames"] / min(row["seconds"])
        row["fps_median"] = row["frames"] / statistics.median(row["seconds"])
        row["speedup_best"] = min(baseline["seconds"]) / min(row["seconds"])
        row["speedup_median"] = statistics.median(baseline["seconds"]) / statistics.median(row["seconds"])
        row["cpu_ms_per_frame"] = MS_PER_S * statistics.median(row["cpu_s"]) / row["frames"]

    report = {
        "clip": {
            "path": str(path),
            "duration_s": args.duration,
            "fps": args.fps,
            "size": [args.width, args.height],
            "gop_s": args.gop_seconds,
            "bframes": args.bframes,
            "keyframes": len(index.keyframes),
            "frames": len(index.frame_pts),
            "generation_s": generation_s,
            "scan_s": scan_s,
        },
        "machine": {
            "cpus": default_workers(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "pyav": av.__version__,
        },
        "repeats": args.repeats,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_decode.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench_decode.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    clip, machine, load = report["clip"], report["machine"], report["load_average_1min"]
    generated = "cached" if clip["generation_s"] is None else f"generated in {clip['generation_s']:.1f} s"
    lines = [
        f"# Decode throughput ({clip['size'][0]}x{clip['size'][1]}, {clip['duration_s']:g} s at {clip['fps']} fps)",
        "",
        f"Clip: {clip['frames']} frames, {clip['keyframes']} keyframes (every {clip['gop_s']:g} s), "
        f"{clip['bframes']} B-frames, {generated}; keyframe scan {clip['scan_s']:.2f} s.",
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}, PyAV {machine['pyav']}.",
        f"Decode to RGB uint8; {report['repeats']} interleaved rounds, best and median; speed-up over the "
        f"sequential PyAV decode. 1-min load average {load['before']:.1f} before, {load['after']:.1f} after "
        "(other processes on the machine make timings noisy when it exceeds the CPU count). "
        "CPU ms/frame: this process's CPU time (all threads; not the process backend's workers) per frame.",
        "",
        "| decoder | workers | fps best | fps median | speed-up best | speed-up median | CPU ms/frame | equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        equal = {True: "yes", False: "NO", None: "-"}[row.get("equal_to_sequential")]
        workers = row["workers"] or "auto"
        lines.append(
            f"| {row['decoder']} | {workers} | {row['fps_best']:.1f} | {row['fps_median']:.1f} "
            f"| {row['speedup_best']:.2f}x | {row['speedup_median']:.2f}x | {row['cpu_ms_per_frame']:.2f} | {equal} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
