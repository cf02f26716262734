"""Streaming throughput of the real session path with random weights (throughput does not depend on weight values).

Configurations (issue: GPU performance), at 480x832 on the Wan2.1 1.3B (or 14B) shape, bf16:
  t2v: 3 latent frames per chunk, steps [1000, 750, 500, 250] + clean context pass, 3 sink + 9 window frames
  v2v: 1 latent frame per chunk, steps [700, 500], 3 sink + 3 window frames, VAE encode of the input included

Figures: DiT-only FPS (denoising steps + context pass, VAE excluded), VAE encode/decode times, end-to-end FPS
(next_chunk: DiT + streaming VAE decode + copy to host, plus encode for v2v), warm time to first frame,
p50/p99 chunk latency, peak GPU memory, achieved TFLOP/s of the DiT against the GPU's measured bf16 matmul
rate.
Writes JSON and a markdown table to --out.

    python bench/bench_stream.py --out bench/results             # GPU
    python bench/bench_stream.py --tiny --out /tmp/bench          # CPU smoke run of the script itself
    python bench/bench_stream.py --decoder taehv --out bench/results   # TAEHV (random taew2_1-shaped) decoder

The text encoder is a one-layer UMT5 of the real width (4096): prompt encoding is outside the timed region
(it happens once per prompt), so its depth does not change any figure.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import pathlib
import statistics
import time

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from results_table import write_markdown
from transformers import UMT5Config, UMT5EncoderModel

from stream_runtime.config import text_to_video_config, video_to_video_config
from stream_runtime.pipelines.wan import presets
from stream_runtime.pipelines.wan.decode_ahead import DecodeAhead
from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.pipelines.wan.taehv import TAEHV, TAEHVConfig
from stream_runtime.pipelines.wan.text import build_word_tokenizer
from stream_runtime.pipelines.wan.vae_stream import conv_weights_channels_last, tiny_vae_config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, iters = time.perf_counter(), 10
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def build(args, device, dtype) -> StreamPipeline:
    words = "a fox running in snow".split()
    tok = build_word_tokenizer(words)
    if args.tiny:
        tcfg, vcfg, text_dim = presets.tiny_transformer_config(in_channels=4), tiny_vae_config(), 32
    else:
        tcfg = presets.WAN_14B if args.model == "14b" else presets.WAN_1_3B
        vcfg, text_dim = {}, tcfg["text_dim"]
    with torch.device(device):
        transformer = WanTransformer3DModel(**tcfg).to(dtype)
        vae = AutoencoderKLWan(**vcfg).to(dtype)
        enc_cfg = presets.tiny_text_encoder_config(len(tok), d_model=text_dim)
        enc_cfg.update(num_layers=1, d_ff=256, num_heads=8, d_kv=text_dim // 8)
        text_encoder = UMT5EncoderModel(UMT5Config(**enc_cfg)).to(dtype)
    defaults = {"height": args.height, "width": args.width, "max_text_tokens": 16 if args.tiny else 512}
    pipe = StreamPipeline(transformer, vae, text_encoder, tok, defaults).to(device)
    if args.decoder == "taehv":
        # taew2_1's shape with random weights (decode time does not depend on weight values).
        pipe.set_decoder(TAEHV(TAEHVConfig(latent_channels=vae.config.z_dim)))
    return pipe


def dit_flops_per_chunk(pipe: StreamPipeline, cfg, height: int, width: int, text_tokens: int) -> float:
    """Matmul FLOPs of the DiT for one chunk (all steps and the context pass), attention included."""
    c = pipe.transformer.config
    d = c.num_attention_heads * c.attention_head_dim
    per_frame = (height // pipe.spatial_factor) * (width // pipe.spatial_factor)
    q = cfg.chunk_frames * per_frame
    k = (cfg.sink_frames + cfg.window_frames) * per_frame
    linear = 2 * q * (4 * d * d + 2 * d * d + 2 * d * c.ffn_dim)
    attn = 4 * q * k * d + 4 * q * text_tokens * d
    passes = len(cfg.timesteps) + int(cfg.context_pass)
    return passes * c.num_layers * (linear + attn)


def profile_chunk(session, device) -> str:
    """Top kernels by device time over one steady-state chunk (``next_chunk``: DiT, decode, copy to the host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        session.next_chunk()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=90)


def run_config(pipe, name, cfg, args, device, profiles: dict) -> dict:
    mode = "v2v" if name == "v2v" else "t2v"
    frames_in = np.random.default_rng(0).integers(0, 256, (4 * 64, args.height, args.width, 3), dtype=np.uint8)

    def open_session():
        s = pipe.session("a fox running in snow", seed=0, mode=mode, config=cfg)
        if mode == "v2v":
            s.push_frames(frames_in)
        return s

    # warm-up (kernels, allocator), then time to first frame on the warm model
    warm = open_session()
    for _ in range(args.warmup):
        warm.next_chunk()
    warm.close()
    if args.compile:  # a second stream's first chunks, so that any graph a new stream needs exists before timing
        warm = open_session()
        for _ in range(2):
            warm.next_chunk()
        warm.close()
    sync(device)
    start = time.perf_counter()
    s = open_session()
    first = s.next_chunk()
    ttff = time.perf_counter() - start
    assert first is not None
    if s._rest_of_first is not None:  # early_first_frame: hand out the rest of the first chunk before timing chunks
        s.next_chunk()
    # Time the steady state, which a stream keeps for ever: the cache full, and with CUDA graphs the graph
    # captured (its first full pass runs eagerly, the second is captured).
    fill_chunks = 0
    while s.cache.valid_frames < s.cache.layout.cache_frames or (s.graphs is not None and not s.graphs.captures):
        s.next_chunk()
        fill_chunks += 1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dit, encode, decode, out_frames = [], [], [], []
    s.profile = True  # per-phase times, with device syncs around each phase
    for _ in range(args.chunks):
        s.next_chunk()
        dit.append(s.timings["denoise_s"] + s.timings.get("context_s", 0.0))  # steps + the deferred context pass
        decode.append(s.timings["decode_s"])
        encode.append(s.timings.get("encode_s", 0.0))
    s.profile = False

    def time_chunks(next_chunk) -> list[float]:
        took = []
        for _ in range(args.chunks):
            t0 = time.perf_counter()
            out = next_chunk()  # ends with a copy to the host, so it is synchronised
            took.append(time.perf_counter() - t0)
            out_frames.append(len(out))
        return took

    e2e = time_chunks(s.next_chunk)
    e2e_ahead = None
    if args.decode_ahead:  # then the same stream through DecodeAhead (v2v: an endless input)
        ahead = DecodeAhead(s) if mode == "t2v" else DecodeAhead(s, frames=itertools.cycle(frames_in))
        e2e_ahead = time_chunks(ahead.next_chunk)
        ahead.close()
    if args.profile:
        profiles[name] = profile_chunk(s, device)
        print(profiles[name], flush=True)
    frames_per_chunk = statistics.median(out_frames)
    flops = dit_flops_per_chunk(pipe, cfg, args.height, args.width, pipe.prompts.max_tokens)
    return {
        "config": name,
        "dit_chunk_s_median": statistics.median(dit),
        "dit_fps": frames_per_chunk / statistics.median(dit),
        "vae_encode_chunk_s_median": statistics.median(encode),
        "vae_decode_chunk_s_median": statistics.median(decode),
        "e2e_chunk_s_median": statistics.median(e2e),
        "e2e_chunk_s_p99": float(np.percentile(e2e, 99)),
        "e2e_fps": frames_per_chunk / statistics.median(e2e),
        "e2e_ahead_fps": None if e2e_ahead is None else frames_per_chunk / statistics.median(e2e_ahead),
        "e2e_ahead_chunk_s_p99": None if e2e_ahead is None else float(np.percentile(e2e_ahead, 99)),
        "ttff_s": ttff,
        "graph_replays": None if s.graphs is None else s.graphs.replays,
        "fill_chunks": fill_chunks,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "frames_per_chunk": frames_per_chunk,
        "dit_tflops": flops / statistics.median(dit) / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["1.3b", "14b"], default="1.3b")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--configs", default="t2v,v2v")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--decoder", choices=["vae", "taehv"], default="vae", help="latent decoder of the sessions")
    ap.add_argument(
        "--stream-batch", action="store_true", help="t2v with stream batch (passes of successive chunks in one forward)"
    )
    ap.add_argument(
        "--compile",
        nargs="?",
        const="all",
        choices=["blocks", "all"],
        help="torch.compile the transformer's block halves (blocks) or also the VAE (all: StreamPipeline.compile)",
    )
    ap.add_argument(
        "--early-first-frame",
        action="store_true",
        help="StreamConfig.early_first_frame: the first latent frame is handed out alone (time to first frame)",
    )
    ap.add_argument(
        "--decode-ahead",
        action="store_true",
        help="end to end through DecodeAhead: the next chunk's encode and denoising overlap this chunk's decode",
    )
    ap.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="StreamPipeline.enable_cuda_graphs: steady-state passes replay as CUDA graphs",
    )
    ap.add_argument(
        "--cudnn-benchmark",
        choices=["off", "on", "both"],
        default="off",
        help="torch.backends.cudnn.benchmark (cuDNN times its conv kernels); both: each config without, then with",
    )
    ap.add_argument(
        "--vae-channels-last",
        action="store_true",
        help="the VAE's conv weights in channels-last order, so cuDNN needs no layout transposes (--compile does it "
        "on CUDA)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="also profile one steady-state chunk: the top CUDA kernels to --out"
    )
    ap.add_argument(
        "--ffn-epilogue",
        action="store_true",
        help="the feed-forward's GELU inside its first matmul (cuBLASLt epilogue; transformer.ffn_forward)",
    )
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script, measures nothing real")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.tiny:
        args.height, args.width, args.chunks, args.warmup = 32, 32, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    pipe = build(args, device, dtype)
    if args.vae_channels_last:
        conv_weights_channels_last(pipe.vae)
    if args.compile == "all":
        pipe.compile(ffn_epilogue=args.ffn_epilogue)
    elif args.compile == "blocks":
        pipe.net.compile_blocks(ffn_epilogue=args.ffn_epilogue)
    elif args.ffn_epilogue:
        pipe.net.compile_blocks(False, ffn_epilogue=True)
    if args.cuda_graphs:
        pipe.enable_cuda_graphs()
    base = {"attention_backend": args.attention, "early_first_frame": args.early_first_frame}
    configs = {
        "t2v": text_to_video_config(**base, stream_batch=args.stream_batch),
        "v2v": video_to_video_config(**base),
    }
    if args.stream_batch and "v2v" in args.configs.split(","):
        ap.error("--stream-batch is text-to-video only: add --configs t2v")
    matmul = matmul_tflops(device, dtype, 256 if args.tiny else 8192)
    rows, profiles = [], {}
    benchmark_modes = {"off": [False], "on": [True], "both": [False, True]}[args.cudnn_benchmark]
    for name in args.configs.split(","):
        for benchmark in benchmark_modes:
            torch.backends.cudnn.benchmark = benchmark
            row = run_config(pipe, name, configs[name], args, device, profiles)
            if len(benchmark_modes) > 1:
                row["config"] = name + ("+cudnnbench" if benchmark else "")
            row["matmul_tflops"] = matmul
            row["dit_fraction_of_matmul_roof"] = row["dit_tflops"] / matmul
            rows.append(row)
            print(json.dumps(row), flush=True)

    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny" if args.tiny else args.model,
        "resolution": [args.height, args.width],
        "dtype": str(dtype),
        "attention": args.attention,
        "decoder": args.decoder,
        "stream_batch": args.stream_batch,
        "compile": args.compile,
        "decode_ahead": args.decode_ahead,
        "early_first_frame": args.early_first_frame,
        "cuda_graphs": args.cuda_graphs,
        "cudnn_benchmark": args.cudnn_benchmark,
        "vae_channels_last": args.vae_channels_last,
        "ffn_epilogue": args.ffn_epilogue,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    decoder = "" if args.decoder == "vae" else f"_{args.decoder}"
    batch = "_streambatch" if args.stream_batch else ""
    compiled = {None: "", "all": "_compiled", "blocks": "_compiledblocks"}[args.compile]
    ahead = ("_decodeahead" if args.decode_ahead else "") + ("_early" if args.early_first_frame else "")
    ahead += ("_graphs" if args.cuda_graphs else "") + {"off": "", "on": "_cudnnbench", "both": "_cudnnboth"}[
        args.cudnn_benchmark
    ]
    ahead += "_vaecl" if args.vae_channels_last else ""
    ahead += "_ffnepilogue" if args.ffn_epilogue else ""
    stem = f"stream_{meta['model']}_{args.attention}{decoder}{batch}{compiled}{ahead}_{meta['date']}"
    for name, table in profiles.items():
        (out / f"profile_{stem}_{name}.txt").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    cols = [
        "config",
        "dit_fps",
        "e2e_fps",
        "e2e_ahead_fps",
        "ttff_s",
        "e2e_chunk_s_p99",
        "vae_encode_chunk_s_median",
        "vae_decode_chunk_s_median",
        "dit_tflops",
        "peak_mem_gib",
    ]
    print(write_markdown(out / f"{stem}.md", "Streaming benchmark", meta, cols, rows))


if __name__ == "__main__":
    main()
