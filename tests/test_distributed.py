"""Pipeline stages over gloo processes (CPU, tiny model): the frames equal the single-process stream batch."""

import os
import pathlib
import time
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_same_chunks, free_port, run_torchrun, session_chunks

from stream_runtime.config import StreamConfig
from stream_runtime.distributed import (
    Channel,
    PipelineStage,
    RunPlan,
    StageError,
    balance,
    even_partition,
    ranges_from_bounds,
    stage_times,
)
from stream_runtime.distributed.comm import TAG_LAYERS, TAG_RESULT, init_stage_groups
from stream_runtime.distributed.generate import chunk_frame_counts, plan_switches
from stream_runtime.pipelines.wan.pipeline import StreamPipeline

SIZE = 32
LAYERS = 4
RUN_TIMEOUT_S = 60.0  # a whole multi-process run; the tiny runs take a few seconds
STAGE_TIMEOUT_S = 20.0  # any wait of one rank on another


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(seed=0, height=SIZE, width=SIZE, num_layers=LAYERS)


# -- partitions


def test_even_partition_and_bounds():
    assert even_partition(5, 2) == [range(0, 3), range(3, 5)]
    assert even_partition(4, 4) == [range(i, i + 1) for i in range(4)]
    assert ranges_from_bounds([1, 3], 4) == [range(0, 1), range(1, 3), range(3, 4)]
    with pytest.raises(ValueError, match="every stage owns a block"):
        ranges_from_bounds([2, 2], 4)
    with pytest.raises(ValueError, match="stages"):
        even_partition(2, 3)


def test_balance_moves_blocks_off_the_stage_with_extra_work():
    blocks = [1.0] * 8
    # The last stage decodes (extra 3): the optimum gives it fewer blocks.
    ranges = balance(blocks, [0.0, 0.0, 3.0])
    assert ranges[-1] == range(7, 8)
    assert max(stage_times(ranges, blocks, [0.0, 0.0, 3.0])) == 4.0
    # Brute force over every split agrees on the slowest stage's time.
    costs, extras = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0], [0.5, 0.0, 2.0]
    best = min(
        max(stage_times(ranges_from_bounds([a, b], 7), costs, extras)) for a in range(1, 6) for b in range(a + 1, 7)
    )
    assert max(stage_times(balance(costs, extras), costs, extras)) == best


def test_switch_planning_matches_the_generate_loop():
    # 2 latent frames per chunk, temporal factor 4: chunks give 5, 8, 8, ... frames.
    assert chunk_frame_counts(20, 2, 4) == [5, 8, 7]
    # A switch at frame 6 is made after two chunks are out (5 + 8 >= 6 > 5), before the forward that follows.
    assert plan_switches([(6, "b")], [5, 8, 7], lag=3) == ((5, "b"),)
    assert plan_switches([(0, "b")], [5, 8, 7], lag=3) == ((0, "b"),)


# -- multi-process runs


def _rank_main(rank, world, port, fn, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=STAGE_TIMEOUT_S))
    try:
        result = fn(rank, world)
        torch.save({"ok": result}, pathlib.Path(out_dir) / f"rank{rank}.pt")
    except BaseException as exc:  # reported to the parent, which fails the test with it
        torch.save(
            {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def run_ranks(world, fn, tmp_path, timeout_s=RUN_TIMEOUT_S):
    """Run ``fn(rank, world)`` in ``world`` forked gloo processes; return each rank's result (or error dict).
    Processes still alive at the deadline are killed and the test fails."""
    ctx = mp.get_context("fork")  # children inherit the loaded model: no re-import, no reload
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"ranks {hung} still running after {timeout_s} s"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def single_process(pipe, config, num_chunks, switches=()):
    """Chunks of a single-process stream-batch session: [(x0, frames)]; ``switches``: (chunks out, prompt)."""
    return session_chunks(pipe, config, num_chunks, "a red fox", 7, SIZE, SIZE, switches)


def distributed(pipe, config, world, num_chunks, tmp_path, switches=(), source=None, **plan):
    """The stages' chunks; ``source``: video-to-video input frames ``[T, H, W, 3]`` (read by the first stage)."""
    lag = (len(config.timesteps) + int(config.context_pass) - 1) * config.stream_batch_stride
    forwards = tuple((0 if k == 0 else k + lag, prompt) for k, prompt in switches)
    mode = "t2v" if source is None else "v2v"
    plan = RunPlan(
        "a red fox", 7, num_chunks, SIZE, SIZE, config, switches=forwards, timeout_s=STAGE_TIMEOUT_S, mode=mode, **plan
    )

    def fn(rank, world):
        chunks = []
        stage = PipelineStage(
            pipe,
            plan,
            rank,
            world,
            Channel(rank, torch.device("cpu"), plan.timeout_s),
            on_chunk=lambda c, x0, frames: chunks.append((c, x0, frames)),
            source=None if source is None else iter(source),
        )
        stage.run()
        return {"chunks": chunks, "report": stage.report, "layers": list(stage.layers)}

    results = run_ranks(world, fn, tmp_path)
    for r, res in enumerate(results):
        assert "ok" in res, f"rank {r}: {res.get('trace')}"
    return [res["ok"] for res in results]


@pytest.mark.parametrize("world", [2, 3])
def test_stages_equal_single_process_with_prompt_switch_and_forced_rebalance(pipe, world, tmp_path):
    config = StreamConfig(
        chunk_frames=1,
        sink_frames=1,
        window_frames=3,
        timesteps=(1000, 500),
        stream_batch=True,
        stream_batch_stride=world,
    )
    num_chunks = 7
    switches = [(3, "a blue sea")]
    reference = single_process(pipe, config, num_chunks, switches)
    # Start unbalanced, then force the blocks to move (with their caches) in the middle of the stream.
    start, moved = ((1,), (3,)) if world == 2 else ((1, 2), (2, 3))
    results = distributed(
        pipe,
        config,
        world,
        num_chunks,
        tmp_path,
        switches=switches,
        bounds=start,
        rebalance="forced",
        rebalance_to=moved,
        rebalance_at=4,
        measure_forwards=2,
    )
    assert_same_chunks(results[-1]["chunks"], reference)
    assert all(not res["chunks"] for res in results[:-1])
    report = results[0]["report"]
    assert report["blocks_after"] == [[r.start, r.stop] for r in ranges_from_bounds(list(moved), LAYERS)]
    assert len(report["ms_before"]) == world and len(report["ms_after"]) == world
    assert [res["layers"] for res in results] == [list(r) for r in ranges_from_bounds(list(moved), LAYERS)]


@pytest.mark.parametrize("sampler", ["renoise", "euler"])
def test_stages_equal_single_process_bounded_no_context_pass(pipe, tmp_path, sampler):
    config = StreamConfig(
        sampler=sampler,
        chunk_frames=2,
        sink_frames=1,
        window_frames=4,
        timesteps=(1000, 750, 500),
        context_pass=False,
        position_mode="bounded",
        stream_batch=True,
        stream_batch_stride=2,
    )
    num_chunks = 7
    switches = [(2, "a green snow")]
    reference = single_process(pipe, config, num_chunks, switches)
    results = distributed(
        pipe,
        config,
        2,
        num_chunks,
        tmp_path,
        switches=switches,
        rebalance="auto",
        measure_forwards=2,
        rebalance_rounds=2,
    )
    assert_same_chunks(results[-1]["chunks"], reference)
    report = results[0]["report"]  # two rounds, each from the blocks the last one left
    assert [r["forward"] for r in report["rounds"]] == [report["rounds"][0]["forward"] + k * 2 for k in range(2)]
    assert report["rounds"][1]["blocks_before"] == report["rounds"][0]["blocks_after"]
    assert report["blocks_before"] == report["rounds"][0]["blocks_before"]
    final = [[res["layers"][0], res["layers"][-1] + 1] for res in results]
    assert report["blocks_after"] == report["rounds"][1]["blocks_after"] == final


def test_three_stages_video_to_video_equal_single_process(pipe, tmp_path):
    """The middle stage passes a new chunk's noisy input on with the activations; a prompt switch recaches."""
    config = StreamConfig(
        chunk_frames=1,
        sink_frames=1,
        window_frames=3,
        timesteps=(700.0, 500.0),
        shift=8.0,
        strength=0.8,
        context_pass=False,
        stream_batch=True,
        stream_batch_stride=3,
    )
    num_chunks = 6
    frames = np.random.default_rng(3).integers(0, 256, (1 + 4 * (num_chunks - 1), SIZE, SIZE, 3), dtype=np.uint8)
    reference = []
    with pipe.session("a red fox", seed=7, mode="v2v", height=SIZE, width=SIZE, config=config) as s:
        s.push_frames(frames)
        while len(reference) < num_chunks:
            if len(reference) == 2:
                s.set_prompt("a blue sea")
            out = s.next_chunk()
            if out is None:  # the input is used up: drain the chunks in flight
                s.set_stream_batch(False)
                continue
            reference.append((s.cache.kept_latents()[1][:, :, -1:].clone(), out))
    results = distributed(pipe, config, 3, num_chunks, tmp_path, switches=[(2, "a blue sea")], source=frames)
    assert_same_chunks(results[-1]["chunks"], reference)


def test_a_dead_rank_ends_the_run_with_a_clear_error(tmp_path):
    def fn(rank, world):
        if rank == 1:
            return "left without a word"
        channel = Channel(rank, torch.device("cpu"), timeout_s=5.0)
        try:
            channel.recv(1, TAG_RESULT, "the latents of forward 0")
        except StageError as exc:
            return str(exc)
        return "no error"

    results = run_ranks(2, fn, tmp_path)
    message = results[0]["ok"]
    assert "rank 0: waiting for the latents of forward 0 from rank 1 failed" in message


def test_messages_are_matched_by_tag_in_the_header_on_one_group_per_direction(tmp_path):
    """NCCL ignores tags and delivers in send order: a message asked for by tag is found behind others, which wait
    for their own receive (a rebalance's cache layers overtaking latents still in flight, as in PipelineStage)."""

    def fn(rank, world):
        init_stage_groups()
        channel = Channel(rank, torch.device("cpu"), timeout_s=10.0)
        if rank == 1:
            for i in range(2):
                channel.send(0, {"forward": i}, [torch.full((3,), float(i))], TAG_RESULT)
            channel.send(0, {"layer": 5}, [torch.ones(2, 2)], TAG_LAYERS)
            channel.flush()
            return channel.recv(0, TAG_RESULT, "the answer")[0]
        layer, _ = channel.recv(1, TAG_LAYERS, "the cache of block 5")
        results = [channel.recv(1, TAG_RESULT, f"the latents of forward {i}") for i in range(2)]
        channel.send(1, {"seen": [layer["layer"], *(meta["forward"] for meta, _ in results)]}, [], TAG_RESULT)
        channel.flush()
        return [float(t[0][0]) for _, t in results]

    results = run_ranks(2, fn, tmp_path)
    assert results[0]["ok"] == [0.0, 1.0], results[0].get("trace")
    assert results[1]["ok"] == {"seen": [5, 0, 1]}, results[1].get("trace")


def test_a_channel_on_cuda_needs_the_groups_per_direction():
    with pytest.raises(ValueError, match="init_stage_groups"):
        Channel(0, torch.device("cuda", 0), timeout_s=5.0)


def test_torchrun_writes_the_same_mp4_as_the_single_process_cli(tmp_path):
    """The launch path end to end: 2 gloo processes under torchrun write the MP4 that `stream-runtime generate
    --stream-batch --stream-batch-stride 2` writes, byte for byte (same frames, same encoder settings)."""

    common = [
        "--tiny-random",
        "--prompt",
        "a red fox",
        "--seconds",
        "1.5",
        "--fps",
        "8",
        "--height",
        "32",
        "--width",
        "32",
    ]
    common += ["--steps", "1000,500", "--chunk-frames", "1", "--window-frames", "3", "--sink-frames", "1"]
    common += ["--switch", "1:a blue sea"]
    single, multi, done = cli_and_torchrun(common, tmp_path)
    assert "over 2 stages" in done.stdout
    assert multi == single


def cli_and_torchrun(common: list[str], tmp_path) -> tuple[bytes, bytes, object]:
    """The MP4 bytes of ``stream-runtime generate --stream-batch --stream-batch-stride 2 COMMON`` and of the same
    under torchrun on 2 gloo processes, and torchrun's completed process."""
    from stream_runtime.apps.cli import main as cli_main

    single, multi = tmp_path / "single.mp4", tmp_path / "multi.mp4"
    assert cli_main(["generate", *common, "--stream-batch", "--stream-batch-stride", "2", "--out", str(single)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["--nproc_per_node=2", f"--master_port={free_port()}", "-m", "stream_runtime.distributed.generate"]
    done = run_torchrun([*args, *common, "--out", str(multi), "--timeout", "30"], RUN_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return single.read_bytes(), multi.read_bytes(), done


def test_torchrun_video_to_video_writes_the_same_mp4_as_the_single_process_cli(tmp_path):
    """``--input``: rank 0 reads and encodes the input video, the new chunks' noisy inputs travel to the last stage
    with the activations; the MP4 is byte for byte the single-process stream batch's, which drains at the input's
    end as the stages' schedule does."""
    from helpers import write_clip

    frames = np.zeros((27, 32, 32, 3), np.uint8)
    for i, frame in enumerate(frames):
        frame[8:20, i : i + 8] = (255, 60, 0)
    clip = write_clip(tmp_path / "in.mp4", frames, fps=8)
    common = ["--tiny-random", "--input", str(clip), "--prompt", "a red fox", "--seconds", "10", "--fps", "8"]
    common += ["--height", "32", "--width", "32", "--steps", "700,500", "--strength", "0.8"]
    single, multi, done = cli_and_torchrun(common, tmp_path)
    assert "wrote 25 frames" in done.stdout  # 1 + 4 + ... : the 2 frames left do not fill a chunk
    assert multi == single
