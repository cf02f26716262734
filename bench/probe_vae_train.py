"""Time tiny-world VAE training steps on this device for a few shapes and precisions (synthetic clips).

Usage: python bench/probe_vae_train.py [--out bench/results/probe_vae_train.json]

Prints one line per configuration (seconds per step, clips per second) and writes them as JSON; the GPU training
script reads the fastest precision per ``base_dim`` from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKLWan

from stream_runtime.pipelines.tinyworld import train_common as common
from stream_runtime.pipelines.tinyworld.model import vae_config
from stream_runtime.pipelines.tinyworld.train_vae import vae_loss


def time_steps(base_dim: int, precision: str, batch: int, frames: int, device: torch.device, steps: int = 6) -> float:
    vae = AutoencoderKLWan(**vae_config(base_dim=base_dim)).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    pixels = torch.rand(batch, 3, frames, 64, 64, device=device) * 2 - 1
    times = []
    for i in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with common.autocast(device, precision):
            loss, _ = vae_loss(vae, pixels, 1e-4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/probe_vae_train.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    args = parser.parse_args()
    device = common.pick_device(args.device)
    rows = []
    for base_dim in (12, 16):
        for precision in ("bf16", "fp32"):
            s = time_steps(base_dim, precision, args.batch, args.frames, device)
            rows.append(
                {
                    "base_dim": base_dim,
                    "precision": precision,
                    "batch": args.batch,
                    "frames": args.frames,
                    "seconds_per_step": s,
                    "clips_per_s": args.batch / s,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    common.write_json(args.out, {"device": name, "rows": rows})


if __name__ == "__main__":
    main()
