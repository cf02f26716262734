"""Scratch diagnostic (2026-12-02): teacher-forced loss per noise level of the shipped coarse transformer, of it
re-patched to patch 1 (train_dit.repatch), and of that with the spatial rotary positions halved (monkeypatched
rope_cos_sin). 48 fresh training streams, CPU. Run from the repo root: python <this file>."""

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5EncoderModel

import stream_runtime.pipelines.wan.transformer as T
from stream_runtime.pipelines.tinyworld import model as M
from stream_runtime.pipelines.tinyworld import train_dit
from stream_runtime.pipelines.tinyworld.train_data import encode_streams
from stream_runtime.pipelines.wan import rope as R
from stream_runtime.pipelines.wan import sampling
from stream_runtime.pipelines.wan.transformer import StreamingWanTransformer

torch.set_num_threads(1)
vae = AutoencoderKLWan.from_pretrained("assets/tinyworld/vae").eval()
streams = encode_streams(vae, 48, 10, 64, batch=48)
latents = streams.latents
stream0, _ = train_dit.load_trained_for("assets/tinyworld")
g = torch.Generator().manual_seed(1)
frames = train_dit.sequence_frames(48, stream0, latents.shape[2], 0.3, g)
x0 = latents[torch.arange(48)[:, None], :, frames].permute(0, 2, 1, 3, 4)
tok = M.build_tokenizer()
ids, attn = M.tokenize(tok, streams.captions)
te = UMT5EncoderModel.from_pretrained("assets/tinyworld/text_encoder").eval()
coarse = WanTransformer3DModel.from_pretrained("assets/tinyworld/transformer").eval()
fine = train_dit.repatch(coarse, 1).eval()
stream, _ = train_dit.load_trained_for("assets/tinyworld")
grid = torch.tensor(sampling.sigmas_for(stream.timesteps, stream.shift), dtype=torch.float32)
orig = R.rope_cos_sin


def scaled(scale):
    def f(frame_positions, grid_hw, head_dim, theta=10000.0, device=None):
        frames = torch.as_tensor(frame_positions, dtype=torch.float64)
        h, w = grid_hw
        dt, dh, dw = R.axis_dims(head_dim)
        ang_t = frames[:, None] * R._inv_freq(dt, theta, "cpu")
        ang_h = (torch.arange(h, dtype=torch.float64) * scale)[:, None] * R._inv_freq(dh, theta, "cpu")
        ang_w = (torch.arange(w, dtype=torch.float64) * scale)[:, None] * R._inv_freq(dw, theta, "cpu")
        n = frames.numel()
        a = torch.cat(
            [
                ang_t[:, None, None, :].expand(n, h, w, -1),
                ang_h[None, :, None, :].expand(n, h, w, -1),
                ang_w[None, None, :, :].expand(n, h, w, -1),
            ],
            -1,
        ).reshape(n * h * w, 1, head_dim // 2)
        return a.cos().float(), a.sin().float()

    return f


out = {}
with torch.no_grad():
    emb = M.encode_tokens(te, ids, attn)
    for name, wan, scale in [("coarse", coarse, 1.0), ("repatch", fine, 1.0), ("repatch_half_pos", fine, 0.5)]:
        T.rope_cos_sin = scaled(scale)
        net = StreamingWanTransformer(wan)
        kv = net.text_kv(emb)
        per = train_dit.loss_per_level(net, x0, kv, stream, grid, torch.Generator().manual_seed(0))
        out[name] = {k: round(v, 4) for k, v in per.items()}
        out[name]["mean"] = round(sum(per.values()) / len(per), 4)
        print(name, out[name], flush=True)
T.rope_cos_sin = orig
