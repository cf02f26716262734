"""Tiny models, media and multi-process launchers shared by the tests."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import assert_close
from diffusers import WanTransformer3DModel

from stream_runtime.cache import CacheLayout, RollingKVCache
from stream_runtime.pipelines.wan.presets import tiny_transformer_config
from stream_runtime.pipelines.wan.transformer import StreamingWanTransformer


def tiny_net(seed: int = 0, **overrides) -> StreamingWanTransformer:
    torch.manual_seed(seed)
    wan = WanTransformer3DModel(**tiny_transformer_config(**overrides)).eval().requires_grad_(False)
    return StreamingWanTransformer(wan)


def make_cache(net, grid, sink, window, chunk, latent_shape=None) -> RollingKVCache:
    layout = CacheLayout(grid[0] * grid[1], sink, window, chunk)
    return RollingKVCache(layout, net.num_layers, 1, net.heads, net.head_dim, latent_shape=latent_shape)


def write_clip(path: Path, frames: np.ndarray, fps: int) -> Path:
    """Write uint8 RGB ``frames [T, H, W, 3]`` as an H.264 MP4 at ``fps``; returns ``path``."""
    import av  # here: the GPU machine that runs test_multi_gpu.py has no PyAV

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


# -- pipeline stages (tests/test_distributed.py on CPU, tests/test_multi_gpu.py on GPUs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return kids


def run_torchrun(args: list[str], timeout_s: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run ARGS`` with output captured. At the deadline the launcher is told to stop
    (it passes SIGTERM on to its workers), then it and its workers (each in a session of its own) are killed, and
    the test fails: a hung rank never outlives the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        workers = _children(proc.pid)
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise AssertionError(f"torchrun still running after {timeout_s} s; stderr:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def session_chunks(pipe, config, num_chunks, prompt, seed, height, width, switches=()):
    """Chunks of a single-process session: ``[(x0 [1, C, F, h, w], frames uint8 [T, H, W, 3])]``; ``switches``:
    (chunks out, prompt) pairs, each switch made after that many chunks came out."""
    switches = dict(switches)
    out = []
    with pipe.session(prompt, seed=seed, height=height, width=width, config=config) as s:
        for k in range(num_chunks):
            if k in switches:
                s.set_prompt(switches[k])
            frames = s.next_chunk()
            out.append((s.cache.kept_latents()[1][:, :, -config.chunk_frames :].clone(), frames))
    return out


def assert_same_chunks(stage_chunks, reference, dtype: torch.dtype = torch.float32):
    """The last stage's ``[(chunk, x0, frames)]`` equal a session's ``[(x0, frames)]`` chunk by chunk, within the
    tolerance of ``dtype`` (the pipeline's compute dtype): the latents, and the frames as values in [-1, 1]."""
    assert [c for c, _, _ in stage_chunks] == list(range(len(reference)))
    for (c, x0, frames), (ref_x0, ref_frames) in zip(stage_chunks, reference, strict=True):
        assert frames.shape == ref_frames.shape, f"chunk {c}"
        assert_close(x0.cpu(), ref_x0.cpu(), dtype=dtype)  # the stage's chunks were saved on the host
        # Same batches, same ops: equal in practice; one level of rounding allowed if fp32 sums reorder.
        if dtype == torch.float32:
            assert abs(frames.astype(int) - ref_frames.astype(int)).max() <= 1, f"chunk {c}"
        else:
            pixels, ref_pixels = (torch.from_numpy(f).float() / 127.5 - 1 for f in (frames, ref_frames))
            assert_close(pixels, ref_pixels, dtype=dtype)
