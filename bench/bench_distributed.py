"""Throughput of one stream over N pipeline stages, one GPU each (issue #7): how the stream batch scales with GPUs.

    torchrun --nproc_per_node=1 bench/bench_distributed.py --out bench/results                     # the baseline
    torchrun --nproc_per_node=2 bench/bench_distributed.py --rebalance auto --out bench/results     # 2 GPUs
    torchrun --nproc_per_node=2 bench/bench_distributed.py --tiny --out /tmp/bench                 # CPU, gloo
    python bench/bench_distributed.py --summary bench/results                 # one line: FPS(N) / FPS(1)

Every rank builds bench_stream.py's random-weight model (Wan2.1 1.3B or 14B shape, bf16; the same seed on every rank,
so the same weights; a rank keeps only its own blocks on the GPU) and runs
:class:`~stream_runtime.distributed.PipelineStage` over the t2v config (3 latent frames per chunk, 4 steps + the clean
context pass, 3 sink + 9 window frames) on the stream batch with stride N, at 480x832. The last stage decodes with
the Wan VAE. Two streams, one after the other:

1. warm-up and balance: ``(P-1)*N + 2*M + 1`` chunks (P = 5 passes, M = ``--measure-forwards``), so that every
   timed forward is a full batch. The stage code times each stage over M forwards after the pipeline's warm-up
   (a compute-stream sync after every block), moves blocks to shrink the slowest stage (``--rebalance auto``; with
   ``off`` the blocks stay: the even split, or ``--bounds``), and times the stages again over M forwards.
2. timed: a new stream on the warm pipeline, with run 1's blocks and no timers (no syncs). It starts when every rank
   has left a barrier.

Figures (from the last stage, which decodes):

- ``fps``: frames per second over ``--chunks`` chunk intervals after ``--warmup`` chunks of run 2: (frames of those
  chunks) / (time from the frames of chunk W reaching the host to those of chunk W+K). Every forward involved is a
  full batch (the run goes on for the pipeline's lag so that no draining forward is timed). End to end: DiT stages,
  the transfers, the VAE decode and the copy to the host.
- ``ttff_s``: run 2's barrier to the first chunk's frames on the host: setting up the stages (caches, prompt), the
  ``(P-1)*N + 1`` forwards before the first chunk leaves the pipeline, its decode. Warm (kernels, allocator).
- ``interval_s_p50`` / ``_p99`` / ``_std`` (jitter): the timed chunk intervals.
- ``stage_ms_before`` / ``_predicted`` / ``_after``: ms per forward of each stage (blocks + its own extra work:
  embedding, head, decode) in run 1, with ``blocks_start`` / ``blocks`` (block ranges before / after the rebalance;
  run 2 uses ``blocks``).
- ``stage_wait_ms_before`` / ``_after``: ms per forward each stage waited for its input before its timers started
  (on a GPU; on a CPU the blocking receive happens before and this reads about 0).
- ``peak_mem_gib``: peak allocated GPU memory of each rank over run 2 (weights of its blocks, cache, activations).

Writes JSON and a markdown table to ``--out`` (``pipeline_<model>_<attention>_<gpu>x<N>_<date>``). Every wait on
another rank is bounded by ``--timeout``; a rank that fails exits non-zero at once, and torchrun then ends the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import statistics
import sys
import time
import traceback
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from results_table import write_markdown

from stream_runtime.config import text_to_video_config
from stream_runtime.distributed import Channel, PipelineStage, RunPlan, even_partition
from stream_runtime.distributed.generate import init_process_group
from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.pipelines.wan.stream_batch import passes_of
from stream_runtime.stream_batch import StreamBatchSchedule

PROMPT = "a fox running in snow"
SEED = 0
TINY_LAYERS = 4
"""Blocks of the tiny model (enough to split over up to 4 stages)."""

log = logging.getLogger("stream_runtime.distributed")


def build_pipeline(model: str, device: torch.device, height: int, width: int, decoder: str = "vae") -> StreamPipeline:
    """The random-weight pipeline every rank builds (the same weights for the same arguments on the same kind of
    device): ``tiny`` (StreamPipeline.tiny_random) or bench_stream.py's ``1.3b`` / ``14b``. bf16 on CUDA, fp32 on
    the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(SEED)
    if model == "tiny":
        if decoder != "vae":
            raise ValueError(f"the tiny model decodes with its VAE: use --decoder vae, got {decoder!r}")
        return StreamPipeline.tiny_random(
            seed=SEED, height=height, width=width, device=device, dtype=dtype, num_layers=TINY_LAYERS
        )
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from bench_stream import build

    return build(SimpleNamespace(tiny=False, model=model, height=height, width=width, decoder=decoder), device, dtype)


def weight_fingerprint(pipe: StreamPipeline) -> list[float]:
    """(sum, sum of squares) of every weight in float64: equal on processes that hold the same weights."""
    sums = []
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        for p in module.parameters():
            x = p.detach().double()
            sums.append(torch.stack([x.sum(), (x * x).sum()]))
    return torch.stack(sums).sum(0).tolist()


def stream_config(world: int, attention: str):
    """The t2v config (bench_stream.py's) on the stream batch, one pass of a chunk per trip around the ring."""
    return text_to_video_config(attention_backend=attention, stream_batch=True, stream_batch_stride=world)


def run_chunks(measure: int, lag: int, warmup: int, timed: int, rounds: int = 1) -> tuple[int, int]:
    """Chunks of run 1 (warm-up and balance) and run 2 (timed) so that every timed forward is a full batch: in run
    1 the forwards ``lag + 1 .. lag + (rounds + 1) * measure`` (one window per rebalance round, one for the
    report), in run 2 the leave forwards of chunks ``warmup .. warmup+timed`` (a forward is full when it is past
    the warm-up, ``f >= lag``, and a new chunk enters, ``f < chunks``)."""
    return lag + (rounds + 1) * measure + 1, warmup + timed + lag + 1


def _barrier(channel: Channel, what: str) -> None:
    channel.all_gather(torch.zeros(1), what)


def run_rank(args: argparse.Namespace) -> dict | None:
    """One rank's part of the benchmark; the last rank returns the result row."""
    rank, world, device = init_process_group(args.timeout, cuda=False if args.cpu else None)
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    last = rank == world - 1
    pipe = build_pipeline(args.model, device, args.height, args.width, args.decoder)
    channel = Channel(rank, device, args.timeout)
    prints = channel.all_gather(torch.tensor(weight_fingerprint(pipe), dtype=torch.float64), "weight fingerprints")
    same_weights = all(torch.equal(p.cpu(), prints[0].cpu()) for p in prints)
    if not same_weights and rank == 0:
        log.warning("the ranks built different weights (timings are still valid; outputs are not comparable)")

    config = stream_config(world, args.attention)
    lag = StreamBatchSchedule(passes_of(config), world).lag
    rounds = args.rebalance_rounds if args.rebalance == "auto" else 1
    chunks1, chunks2 = run_chunks(args.measure_forwards, lag, args.warmup, args.chunks, rounds)
    num_layers = pipe.net.num_layers
    start = tuple(r.start for r in even_partition(num_layers, world)[1:]) if args.bounds is None else args.bounds
    plan = dict(prompt=PROMPT, seed=SEED, height=args.height, width=args.width, config=config, timeout_s=args.timeout)
    saved: list[list] = [[], []]  # --save-chunks: (chunk, x0, frames) of run 1 and run 2
    times, frames_out = [], []  # run 2: when each chunk's frames reached the host, and how many

    def collect(run: int):
        def on_chunk(chunk: int, x0: torch.Tensor, frames: np.ndarray) -> None:
            if run == 1:
                times.append(time.perf_counter())
                frames_out.append(len(frames))
            if args.save_chunks:
                saved[run].append((chunk, x0.float().cpu(), frames))

        return on_chunk if last else None

    # Run 1: warm-up, stage times, rebalance ("forced" to the same blocks times the stages without moving any).
    rebalance = {"rebalance": "forced", "rebalance_to": start}
    if args.rebalance == "auto":
        rebalance = {"rebalance": "auto", "rebalance_rounds": rounds}
    plan1 = RunPlan(num_chunks=chunks1, bounds=start, measure_forwards=args.measure_forwards, **rebalance, **plan)
    stage = PipelineStage(pipe, plan1, rank, world, channel, on_chunk=collect(0))
    stage.run()
    report, ranges = stage.report, stage.ranges
    del stage

    # Run 2: timed, on the warm pipeline with run 1's blocks.
    plan2 = RunPlan(num_chunks=chunks2, bounds=tuple(r.start for r in ranges[1:]), **plan)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    _barrier(channel, "the start of the timed run")
    start = time.perf_counter()
    stage = PipelineStage(pipe, plan2, rank, world, channel, on_chunk=collect(1))
    stage.run()
    elapsed = time.perf_counter() - start
    del stage
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else -1.0
    peaks = [float(p) for p in channel.all_gather(torch.tensor([peak], dtype=torch.float64), "peak memory")]
    peaks = [p if p >= 0 else None for p in peaks]  # None: no GPU
    if args.save_chunks and last:
        torch.save(
            {"runs": saved, "fingerprint": prints[0].tolist(), "blocks": [[r.start, r.stop] for r in ranges]},
            args.save_chunks,
        )
    _barrier(channel, "the end")
    if not last:
        return None

    w, k = args.warmup, args.chunks
    intervals = [times[c] - times[c - 1] for c in range(w + 1, w + k + 1)]
    return {
        "gpus": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model,
        "resolution": [args.height, args.width],
        "config": "t2v",
        "attention": args.attention,
        "decoder": args.decoder,
        "stride": world,
        "fps": sum(frames_out[w + 1 : w + k + 1]) / (times[w + k] - times[w]),
        "ttff_s": times[0] - start,
        "interval_s_p50": statistics.median(intervals),
        "interval_s_p99": float(np.percentile(intervals, 99)),
        "interval_s_std": statistics.pstdev(intervals),
        "frames_per_chunk": statistics.median(frames_out[1:]),
        "warmup_chunks": w,
        "timed_chunks": k,
        "run_chunks": [chunks1, chunks2],
        "timed_run_s": elapsed,
        "rebalance": args.rebalance,
        "blocks_start": report["blocks_before"],
        "blocks": report["blocks_after"],
        "stage_ms_before": report["ms_before"],
        "stage_ms_predicted": report["ms_predicted"],
        "rebalance_rounds": report.get("rounds"),
        "stage_ms_after": report.get("ms_after"),
        "stage_wait_ms_before": report.get("ms_wait_before"),
        "stage_wait_ms_after": report.get("ms_wait_after"),
        "peak_mem_gib": peaks,
        "same_weights_on_all_ranks": same_weights,
    }


def _stem(row: dict) -> str:
    gpu = "cpu" if row["device"] == "cpu" else (row["device"].replace("NVIDIA", "").split() or ["gpu"])[0].lower()
    return f"pipeline_{row['model']}_{row['attention']}_{gpu}x{row['gpus']}_{row['date']}"


def write(row: dict, out: pathlib.Path) -> pathlib.Path:
    """JSON and markdown of the row, with the speed-up over the 1-GPU result of the same date in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(row)
    base = out / f"{_stem({**row, 'gpus': 1})}.json"
    if row["gpus"] > 1 and base.is_file():
        row["fps_1"] = json.loads(base.read_text())["fps"]
        row["speedup"] = row["fps"] / row["fps_1"]
    (out / f"{stem}.json").write_text(json.dumps(row, indent=2) + "\n")
    cols = ["gpus", "fps", "speedup", "ttff_s", "interval_s_p50", "interval_s_p99", "interval_s_std", "blocks"]
    cols += ["stage_ms_before", "stage_ms_after", "peak_mem_gib"]
    meta = {k: row[k] for k in ("date", "device", "torch", "model", "resolution", "attention", "decoder")}
    print(write_markdown(out / f"{stem}.md", f"Pipeline over {row['gpus']} GPU(s)", meta, cols, [row]), flush=True)
    return out / f"{stem}.json"


def summary(out: pathlib.Path) -> list[str]:
    """One line per (model, attention, resolution, device, date) in ``out``: FPS per GPU count and FPS(N)/FPS(1)."""
    groups: dict[tuple, dict[int, float]] = {}
    for path in sorted(out.glob("pipeline_*.json")):
        row = json.loads(path.read_text())
        key = (row["model"], row["attention"], "x".join(map(str, row["resolution"])), row["device"], row["date"])
        groups.setdefault(key, {})[row["gpus"]] = row["fps"]
    lines = []
    for (model, attention, res, device, date), fps in sorted(groups.items()):
        parts, units = [], ("GPU", "GPUs") if device != "cpu" else ("process", "processes")
        for n in sorted(fps):
            ratio = f" ({fps[n] / fps[1]:.2f}x)" if 1 in fps and n > 1 else ""
            parts.append(f"{n} {units[n > 1]} {fps[n]:.1f} fps{ratio}")
        lines.append(f"scaling {model} {attention} {res} t2v on {device} ({date}): " + ", ".join(parts))
    return lines


def _bounds(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in text.split(",")) if text else ()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["1.3b", "14b", "tiny"], default="1.3b")
    ap.add_argument("--configs", default="t2v", help="t2v (the stream batch over stages is text-to-video only)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--chunks", type=int, default=12, help="chunk intervals timed in run 2")
    ap.add_argument("--warmup", type=int, default=3, help="chunks of run 2 before the timing starts")
    ap.add_argument("--rebalance", choices=["auto", "off"], default="auto", help="move blocks after run 1's timing")
    ap.add_argument("--bounds", type=_bounds, help="inner block boundaries at the start, e.g. 10 for 2 stages (even)")
    ap.add_argument("--measure-forwards", type=int, default=4, dest="measure_forwards", help="forwards timed in run 1")
    ap.add_argument(
        "--rebalance-rounds", type=int, default=2, dest="rebalance_rounds", help="auto: rebalances in run 1"
    )
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--decoder", choices=["vae", "taehv"], default="vae", help="vae, or TAEHV with random weights")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds any wait on another rank may take")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU even where CUDA is (implied by --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU/gloo: checks the script, measures nothing")
    ap.add_argument("--save-chunks", dest="save_chunks", help="last rank: torch.save both runs' chunks here (tests)")
    ap.add_argument("--summary", metavar="DIR", help="without torchrun: print the scaling lines of the results in DIR")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if args.summary:
        print("\n".join(summary(pathlib.Path(args.summary))) or f"no pipeline_*.json in {args.summary}")
        return 0
    if args.configs != "t2v":
        ap.error(f"--configs must be t2v (the stream batch over stages is text-to-video only), got {args.configs!r}")
    if args.tiny:
        args.model, args.cpu, args.height, args.width = "tiny", True, 32, 32
        args.chunks, args.warmup, args.measure_forwards = 2, 1, 2
    for name in ("chunks", "measure_forwards"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    try:
        row = run_rank(args)
    except BaseException:
        # Exit at once, without tearing down the process group: with a peer gone, NCCL's teardown can hang. torchrun
        # sees the failed worker and ends the others.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if row is not None:
        row.update(date=datetime.date.today().isoformat(), torch=torch.__version__)
        print(json.dumps(row), flush=True)
        path = write(row, pathlib.Path(args.out))
        print(f"wrote {path}", flush=True)
        for line in summary(pathlib.Path(args.out)):
            print(line, flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
