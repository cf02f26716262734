"""Teacher-forcing loss per noise level of a train_dit folder on its own training scenes (the first N of
train_seeds(0), which every stage so far trained on) against unseen training-range scenes (train_seeds(100000))
and the held-out scenes: does the transformer generalise past the 6,144 scenes it trains on?

Usage: python bench/results/h100_2026-12-07_session12/diag_seen_vs_unseen.py VAE_FOLDER DIT_FOLDER N
"""

import itertools
import sys

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5EncoderModel

from stream_runtime.pipelines.tinyworld import model, train_dit
from stream_runtime.pipelines.tinyworld.model import frames_to_pixels
from stream_runtime.pipelines.tinyworld.train_data import _render_stream, stream_pixel_frames
from stream_runtime.pipelines.tinyworld.world import held_out_seeds, train_seeds
from stream_runtime.pipelines.wan import sampling
from stream_runtime.pipelines.wan.transformer import StreamingWanTransformer
from stream_runtime.pipelines.wan.vae_stream import StreamingVAEEncoder

torch.set_num_threads(2)
vae_dir, dit_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
vae = AutoencoderKLWan.from_pretrained(vae_dir).eval()
net = StreamingWanTransformer(WanTransformer3DModel.from_pretrained(f"{dit_dir}/transformer").eval())
text_encoder = UMT5EncoderModel.from_pretrained(f"{dit_dir}/text_encoder").eval()
stream = model.STREAM
tokenizer = model.build_tokenizer()
grid = torch.tensor(sampling.sigmas_for(stream.timesteps, stream.shift), dtype=torch.float32)


def encode(seeds: list[int]) -> tuple[torch.Tensor, list[str]]:
    rendered = [_render_stream((s, stream_pixel_frames(12), 64, 0, 0)) for s in seeds]
    with torch.no_grad():
        latents = StreamingVAEEncoder(vae).encode(frames_to_pixels(np.stack([r[0] for r in rendered]))).float()
    return latents, [r[1] for r in rendered]


sets = {
    "train (seen)": list(itertools.islice(train_seeds(0), count)),
    "train range, unseen": list(itertools.islice(train_seeds(100000), count)),
    "held out": held_out_seeds()[:count],
}
for name, seeds in sets.items():
    latents, captions = encode(seeds)
    ids, mask = model.tokenize(tokenizer, captions)
    with torch.no_grad():
        text_kv = net.text_kv(model.encode_tokens(text_encoder, ids, mask))
        x0 = latents[:, :, : stream.sink_frames + stream.window_frames]  # fresh streams
        levels = train_dit.loss_per_level(net, x0, text_kv, stream, grid, torch.Generator().manual_seed(0))
    print(f"{name:22s} std {latents.std():.3f}", " ".join(f"{k}:{v:.4f}" for k, v in levels.items()), flush=True)
