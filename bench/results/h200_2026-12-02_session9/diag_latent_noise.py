"""Is the decoder robust to latent error? 50 held-out clips encoded (posterior mean), Gaussian noise of 0-30 % of
the latents' std added, decoded and scored by the evaluator.

Usage: python bench/results/h200_2026-12-02_session9/diag_latent_noise.py [assets/tinyworld/vae]
"""

import sys

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from stream_runtime.pipelines.tinyworld.evaluate import evaluate
from stream_runtime.pipelines.tinyworld.train_vae import decode_raw, encode_moments, frames_to_pixels
from stream_runtime.pipelines.tinyworld.world import held_out_seeds, render, sample_spec

torch.set_num_threads(2)
vae = AutoencoderKLWan.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "assets/tinyworld/vae").eval()
specs = [sample_spec(s) for s in held_out_seeds()[:50]]
clips = np.stack([render(s, 33, 64, 64) for s in specs])
means = []
with torch.no_grad():
    for lo in range(0, 50, 10):
        m, _ = encode_moments(vae, frames_to_pixels(clips[lo : lo + 10]))
        means.append(m)
mean = torch.cat(means)
std = mean.std().item()
print("latent std", std, "per-channel std", mean.std(dim=(0, 2, 3, 4)).numpy().round(2))
for rel in [0.0, 0.05, 0.1, 0.2, 0.3]:
    g = torch.Generator().manual_seed(0)
    z = mean + rel * std * torch.randn(mean.shape, generator=g)
    outs = []
    with torch.no_grad():
        for lo in range(0, 50, 10):
            p = decode_raw(vae, z[lo : lo + 10]).float().clamp(-1, 1)
            outs.append(((p + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy())
    rec = np.concatenate(outs)
    r = evaluate(list(rec), specs)
    print(rel, {k: round(v, 3) for k, v in r.items() if k.endswith("accuracy")}, flush=True)
