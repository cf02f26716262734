"""Streaming latent-decoder time: the full Wan2.1 VAE against TAEHV (taew2_1's shape), random weights.

Each decoder streams ``--latent-frames`` latent frames in chunks of ``--chunk`` (the session's path: a
``StreamingVAEDecoder`` / ``StreamingTAEHVDecoder`` kept across chunks) after ``--warmup`` chunks; the figure is
milliseconds per latent frame (4 output frames) over the timed chunks, median of ``--repeats`` streams. Decode time
does not depend on weight values. Writes JSON and a markdown table to ``--out``.

    python bench/bench_latent_decoder.py --out bench/results                         # GPU, 480x832, bf16
    python bench/bench_latent_decoder.py --sizes 64x64,480x832 --decoders taehv --out /tmp/bench   # CPU note
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import time

import torch
from diffusers import AutoencoderKLWan
from results_table import write_markdown

from stream_runtime.pipelines.wan.taehv import TAEHV, StreamingTAEHVDecoder, TAEHVConfig
from stream_runtime.pipelines.wan.vae_stream import StreamingVAEDecoder, conv_weights_channels_last

MS_PER_S = 1000.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def channels_last(module: torch.nn.Module) -> None:
    """Conv weights in channels-last order (:func:`conv_weights_channels_last`)."""
    conv_weights_channels_last(module)


def make_decoder(name: str, device: torch.device, dtype: torch.dtype):
    """A fresh-weights streaming decoder and its (latent channels, spatial factor).

    ``vae``: the eager Wan VAE; ``vae_channels_last``: its conv weights channels-last; ``vae_compiled``: its decoder
    through ``torch.compile`` (what ``StreamPipeline.compile`` does); ``vae_compiled_channels_last``: both."""
    if name.startswith("vae"):
        vae = AutoencoderKLWan().to(device, dtype).eval().requires_grad_(False)  # diffusers' default: Wan2.1's
        if name in ("vae_channels_last", "vae_compiled_channels_last"):
            channels_last(vae)
        if name in ("vae_compiled", "vae_compiled_channels_last"):
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            vae.decoder.compile(dynamic=False)
        if name not in ("vae", "vae_channels_last", "vae_compiled", "vae_compiled_channels_last"):
            raise ValueError(f"unknown decoder {name!r}")
        return StreamingVAEDecoder(vae), vae.config.z_dim, vae.config.scale_factor_spatial
    taehv = TAEHV(TAEHVConfig()).to(device, dtype).eval().requires_grad_(False)
    return StreamingTAEHVDecoder(taehv), taehv.config.latent_channels, taehv.config.spatial_factor


def time_stream(decoder, latents: torch.Tensor, chunk: int, warmup: int, device: torch.device) -> float:
    """Seconds per latent frame over the chunks after the first ``warmup`` ones of one stream."""
    decoder.reset()
    chunks = latents.split(chunk, dim=2)
    for part in chunks[:warmup]:
        decoder.decode(part)
    sync(device)
    start = time.perf_counter()
    for part in chunks[warmup:]:
        decoder.decode(part)
    sync(device)
    return (time.perf_counter() - start) / sum(part.shape[2] for part in chunks[warmup:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="480x832", help="comma-separated HEIGHTxWIDTH output resolutions")
    ap.add_argument("--decoders", default="vae,taehv")
    ap.add_argument("--chunk", type=int, default=3, help="latent frames per decode call (t2v: 3, v2v: 1)")
    ap.add_argument("--latent-frames", type=int, default=12, dest="latent_frames", help="per stream, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="chunks decoded before timing (the first trims frames)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.latent_frames <= args.warmup * args.chunk:
        raise ValueError(f"--latent-frames must exceed --warmup * --chunk ({args.warmup * args.chunk})")

    rows = []
    for name in args.decoders.split(","):
        decoder, channels, factor = make_decoder(name, device, dtype)
        for size in args.sizes.split(","):
            height, width = (int(n) for n in size.split("x"))
            generator = torch.Generator(device=device).manual_seed(0)
            shape = (1, channels, args.latent_frames, height // factor, width // factor)
            latents = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            with torch.no_grad():
                start = time.perf_counter()
                time_stream(decoder, latents, args.chunk, args.warmup, device)  # first stream: compiles, if any
                first_stream_s = time.perf_counter() - start
                times = [time_stream(decoder, latents, args.chunk, args.warmup, device) for _ in range(args.repeats)]
            row = {
                "decoder": name,
                "height": height,
                "width": width,
                "chunk": args.chunk,
                "ms_per_latent_frame": statistics.median(times) * MS_PER_S,
                "ms_per_latent_frame_min": min(times) * MS_PER_S,
                "first_stream_s": first_stream_s,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del decoder

    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype),
        "weights": "random (taew2_1 shape / diffusers' default AutoencoderKLWan = Wan2.1)",
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"latent_decoder_{meta['device'].replace(' ', '_')}_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    cols = ["decoder", "height", "width", "chunk", "ms_per_latent_frame", "ms_per_latent_frame_min", "first_stream_s"]
    print(write_markdown(out / f"{stem}.md", "Latent decoders", meta, cols, rows, digits=4))


if __name__ == "__main__":
    main()
