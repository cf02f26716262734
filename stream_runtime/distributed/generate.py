"""Offline generation of one stream over N pipeline stages (one process per GPU, or gloo processes on a CPU)::

    torchrun --nproc_per_node=4 -m stream_runtime.distributed.generate --model Wan2.1-T2V-1.3B-Diffusers \\
        --checkpoint self_forcing_dmd.pt --prompt "a fox running in snow" --seconds 10 --out clip.mp4
    torchrun --nproc_per_node=2 -m stream_runtime.distributed.generate --prompt "a fox" --seconds 2 --out tiny.mp4

Takes the arguments of ``stream-runtime generate`` plus the stage options below, and writes the same MP4 as
``stream-runtime generate --stream-batch --stream-batch-stride N`` (N = number of processes) with the same
arguments: the last stage decodes and writes it. ``--input VIDEO`` (video-to-video): the first stage reads and
encodes the input, the last decodes. Every wait on another rank is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .comm import Channel, init_stage_groups
from .stage import PipelineStage, RunPlan, switch_forward

log = logging.getLogger("stream_runtime.distributed")


def chunk_frame_counts(num_frames: int, chunk_frames: int, temporal_factor: int) -> list[int]:
    """Output frames of each chunk until ``num_frames`` are written (the first chunk's first latent frame decodes
    to one frame, every other latent frame to ``temporal_factor``), the last count cut to fit."""
    counts, written = [], 0
    while written < num_frames:
        n = temporal_factor * chunk_frames - (temporal_factor - 1 if not counts else 0)
        counts.append(min(n, num_frames - written))
        written += counts[-1]
    return counts


def plan_switches(switch_frames: list[tuple[int, str]], counts: list[int], lag: int) -> tuple[tuple[int, str], ...]:
    """(output frame, prompt) switches as (forward, prompt), made where ``stream-runtime generate`` makes them:
    before the first chunk whose start has reached the switch frame."""
    out, written, pending = [], 0, sorted(switch_frames)
    for k, n in enumerate(counts):
        while pending and pending[0][0] <= written:
            out.append((switch_forward(k, lag), pending.pop(0)[1]))
        written += n
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    from stream_runtime.apps.cli import add_generate_args

    parser = argparse.ArgumentParser(
        prog="python -m stream_runtime.distributed.generate", description=__doc__.split("\n")[0]
    )
    add_generate_args(parser)
    g = parser.add_argument_group("pipeline stages")
    g.add_argument("--bounds", help="inner block boundaries of the stages, e.g. 10,20 for 3 stages (default: even)")
    g.add_argument(
        "--rebalance",
        choices=("off", "auto", "forced"),
        default="off",
        help="auto: time the stages after the warm-up and move blocks to shrink the slowest; forced: move to "
        "--rebalance-to",
    )
    g.add_argument("--rebalance-to", dest="rebalance_to", help="block boundaries after a forced rebalance")
    g.add_argument("--rebalance-at", type=int, dest="rebalance_at", help="forward after which to rebalance")
    g.add_argument(
        "--rebalance-rounds",
        type=int,
        default=2,
        dest="rebalance_rounds",
        help="auto: rebalance this many times, each on the stage times since the last (default 2)",
    )
    g.add_argument("--measure-forwards", type=int, default=4, dest="measure_forwards", help="forwards timed")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds any wait on another rank may take")
    g.add_argument("--tiny-layers", type=int, default=2, dest="tiny_layers", help="blocks of the built-in tiny model")
    return parser


def _bounds(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(b) for b in text.split(","))


def init_process_group(timeout_s: float, cuda: bool | None = None) -> tuple[int, int, torch.device]:
    """Join the torchrun job: NCCL with one GPU per process when CUDA is there (``cuda``: None) or asked for
    (True), else gloo on the CPU; then the process groups that stage messages travel on."""
    if "RANK" not in os.environ:
        raise ValueError("launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, ...): torchrun -m ...")
    if torch.cuda.is_available() if cuda is None else cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    init_stage_groups()
    return dist.get_rank(), dist.get_world_size(), device


def load(args: argparse.Namespace, device: torch.device):
    from stream_runtime.apps.cli import DTYPES, load_pipeline
    from stream_runtime.pipelines.tinyworld.model import shipped_model_path
    from stream_runtime.pipelines.wan.pipeline import StreamPipeline

    if args.model is None and (args.tiny_random or shipped_model_path() is None):
        pipe = StreamPipeline.tiny_random(
            device=device, dtype=DTYPES[args.dtype] if args.dtype else torch.float32, num_layers=args.tiny_layers
        )
        pipe.set_decoder(args.decoder)
        return pipe
    args.device = str(device)
    return load_pipeline(args)


def usable_input_frames(frames: int, chunk_frames: int, temporal_factor: int) -> int:
    """Input frames that whole video-to-video chunks consume out of ``frames`` (the first chunk takes
    ``1 + t * (F - 1)``, every later one ``t * F``); the output has as many."""
    first, later = 1 + temporal_factor * (chunk_frames - 1), temporal_factor * chunk_frames
    return 0 if frames < first else first + (frames - first) // later * later


def make_plan(args: argparse.Namespace, pipe, world: int, input_frames: int | None = None) -> RunPlan:
    """The run every rank makes; ``input_frames``: video-to-video, the frames of the input (read on rank 0)."""
    from stream_runtime.apps.cli import _parse_switches, _stream_overrides
    from stream_runtime.pipelines.wan.stream_batch import passes_of

    if args.seconds <= 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds}")
    if args.decode_ahead:  # the last stage decodes while the ring carries the next chunks already
        raise ValueError(
            "--decode-ahead is for one process (here other chunks are in the ring while the last stage decodes)"
        )
    overrides = _stream_overrides(args)
    overrides["stream_batch"] = True
    overrides.setdefault("stream_batch_stride", world)
    mode = "t2v" if input_frames is None else "v2v"
    config = pipe.stream_config(mode, **overrides)
    height, width = resolution(args, pipe)
    total = math.ceil(args.seconds * args.fps)
    if input_frames is not None:
        usable = usable_input_frames(input_frames, config.chunk_frames, pipe.temporal_factor)
        if usable == 0:
            raise ValueError(f"--input has {input_frames} frames at --fps {args.fps:g}: too few for one chunk")
        total = min(total, usable)
    counts = chunk_frame_counts(total, config.chunk_frames, pipe.temporal_factor)
    lag = (passes_of(config) - 1) * config.stream_batch_stride
    return RunPlan(
        prompt=args.prompt,
        seed=args.seed,
        num_chunks=len(counts),
        height=height,
        width=width,
        config=config,
        switches=plan_switches(_parse_switches(args.switch, args.fps), counts, lag),
        bounds=_bounds(args.bounds),
        rebalance=args.rebalance,
        rebalance_to=_bounds(args.rebalance_to),
        rebalance_at=args.rebalance_at,
        measure_forwards=args.measure_forwards,
        rebalance_rounds=args.rebalance_rounds if args.rebalance == "auto" else 1,
        timeout_s=args.timeout,
        mode=mode,
    )


def resolution(args: argparse.Namespace, pipe) -> tuple[int, int]:
    return args.height or pipe.default_resolution[0], args.width or pipe.default_resolution[1]


def read_input(args: argparse.Namespace, pipe, rank: int) -> list | None:
    """Video-to-video: rank 0 decodes the whole input (resampled and resized as ``stream-runtime generate``
    does); every rank learns its frame count, or the error that ended the read, so no rank waits for a rank 0
    that failed. Returns rank 0's frames (None on the others, and without ``--input``)."""
    from stream_runtime.apps.cli import _input_frames

    if args.input is None:
        return None
    frames, news = None, [None]
    if rank == 0:
        try:
            frames = list(_input_frames(args.input, *resolution(args, pipe), args.fps))
            news = [len(frames)]
        except ValueError as exc:
            news = [f"error: {exc}"]
    dist.broadcast_object_list(news, src=0)
    if isinstance(news[0], str):
        raise ValueError(news[0].removeprefix("error: "))
    args.input_frames = news[0]
    return frames


def main(argv: list[str] | None = None) -> int:
    from stream_runtime.video_io import VideoWriter

    args = build_parser().parse_args(argv)
    rank, world, device = init_process_group(args.timeout)
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    try:
        pipe = load(args, device)
        frames = read_input(args, pipe, rank)
        plan = make_plan(args, pipe, world, getattr(args, "input_frames", None))
        total = math.ceil(args.seconds * args.fps)
        writer = VideoWriter(args.out, fps=args.fps) if rank == world - 1 else None

        def write(chunk, x0, frames):
            writer.write(frames[: total - writer.frames_written])

        start = time.perf_counter()
        channel = Channel(rank, device, plan.timeout_s)
        source = iter(frames) if frames is not None else None
        stage = PipelineStage(pipe, plan, rank, world, channel, on_chunk=write, source=source)
        log.info("blocks %s of %d, %d chunks", list(stage.layers), pipe.net.num_layers, plan.num_chunks)
        if writer is not None:
            with writer:
                stage.run()
            elapsed = time.perf_counter() - start
            print(
                f"wrote {writer.frames_written} frames to {args.out} over {world} stages in {elapsed:.1f} s "
                f"({writer.frames_written / elapsed:.1f} frames/s)"
            )
        else:
            stage.run()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
