"""Pipeline stages on 2 GPUs (NCCL): bench/bench_distributed.py under torchrun gives the frames of a single-GPU
stream-batch session with the same stride, for the tiny model and for the Wan 1.3B shape (random weights) at a
reduced resolution. Skipped without 2 CUDA devices.

What is compared: every chunk of both of the script's runs (run 1 starts with one block on the first GPU, and its
``--rebalance auto`` moves blocks and their caches between the GPUs in the middle of the stream; run 2 starts from
the new split) against a session in this process on one GPU.

Tolerance: bf16's (conftest.TOLERANCES, 2e-2 absolute and relative) on the latents and on the frames as values in
[-1, 1]. Each stage runs the same kernels on the same batches as the single-GPU session and activations travel
between GPUs exactly, so the frames are expected to be equal; the latents differ by half a bf16 step, because the
reference reads them back from the session's cache, which keeps them in bf16 (on CPU in bf16: at most 0.008 at
magnitudes near 2, frames equal to the byte). The tolerance also absorbs a kernel that would pick another reduction
order on the other GPU. Both processes build the weights from one seed on the same kind of GPU; the test first
checks that they did build the same weights (a fingerprint), so that a mismatch there reads as such.

The same comparison runs on CPU with gloo: tests/test_distributed.py (PipelineStage in forked processes) and the
last test here (this launch path, with the script's ``--tiny`` model).
"""

import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_chunks, run_torchrun, session_chunks

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
RUN_TIMEOUT_S = 100.0
"""A whole torchrun launch: start-up, model build, both runs (the 1.3B one is expected to take 20-40 s on an H200)."""
STAGE_TIMEOUT_S = 30
"""Any wait of one rank on another inside a launch (a hung rank then fails the test in well under RUN_TIMEOUT_S)."""


@pytest.fixture(scope="module")
def bench(request):
    """bench/bench_distributed.py as a module (its builders make the single-process reference)."""
    sys.path.insert(0, str(BENCH_DIR))
    request.addfinalizer(lambda: sys.path.remove(str(BENCH_DIR)))
    import bench_distributed

    return bench_distributed


def launch(tmp_path: Path, world: int, args: list[str]) -> dict:
    """Run the benchmark script on ``world`` processes with ``args``; return what its last rank saved."""
    saved = tmp_path / "chunks.pt"
    script = [str(BENCH_DIR / "bench_distributed.py"), *args, "--chunks", "2", "--warmup", "1"]
    # One block on the first stage at the start: run 1's rebalance moves blocks (and their caches) between ranks.
    script += ["--bounds", "1", "--rebalance", "auto", "--measure-forwards", "2"]
    script += ["--timeout", str(STAGE_TIMEOUT_S), "--save-chunks", str(saved)]
    script += ["--out", str(tmp_path)]
    done = run_torchrun(["--standalone", f"--nproc_per_node={world}", *script], RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "chunks.pt").is_file(), done.stdout[-2000:]
    return torch.load(saved, weights_only=False)


def check_against_one_process(bench, saved: dict, model: str, height: int, width: int, world: int, device: str):
    pipe = bench.build_pipeline(model, torch.device(device), height, width)
    assert bench.weight_fingerprint(pipe) == saved["fingerprint"], (
        "this process built other weights than the torchrun ranks from the same seed: the frames cannot be compared"
    )
    runs = saved["runs"]
    config = bench.stream_config(world, "sdpa")
    reference = session_chunks(pipe, config, max(map(len, runs)), bench.PROMPT, bench.SEED, height, width)
    for run in runs:
        assert_same_chunks(run, reference[: len(run)], dtype=pipe.dtype)


def test_the_launch_path_on_cpu(bench, tmp_path):
    """The GPU tests' path (torchrun, the script, its saved chunks, the reference) on 2 gloo processes, tiny model."""
    saved = launch(tmp_path, 2, ["--tiny"])
    check_against_one_process(bench, saved, "tiny", 32, 32, world=2, device="cpu")
    assert len(list(tmp_path.glob("pipeline_tiny_sdpa_cpux2_*.json"))) == 1


@pytest.mark.parametrize(
    "model, height, width",
    [
        pytest.param("tiny", 64, 64, id="tiny"),
        pytest.param("1.3b", 240, 416, id="wan-1.3b-shape-240x416"),  # half of 480x832 each side
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_give_the_frames_of_one(bench, tmp_path, model, height, width):
    saved = launch(tmp_path, 2, ["--model", model, "--height", str(height), "--width", str(width)])
    check_against_one_process(bench, saved, model, height, width, world=2, device="cuda")
    if model != "tiny":  # 1 block against 29 and the decode: the balance must have moved blocks to the first GPU
        assert saved["blocks"][0][1] > 1, saved["blocks"]
