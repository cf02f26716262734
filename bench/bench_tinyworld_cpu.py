"""End-to-end speed of the embedded tiny-world model on this machine's CPU: text in, decoded RGB frames out.

Usage::

    python bench/bench_tinyworld_cpu.py [--model assets/tinyworld] [--threads 2] [--seconds 20] \
        [--compare-defaults [conv3d norm rope]]

Streams held-out prompts through ``StreamPipeline.from_pretrained(model).session`` (sink + rolling cache, the
folder's stream) and reports, per prompt and overall: frames per second end to end (session start, prompt
encoding, denoising, context pass, VAE decode, copy to uint8), the median steady-state frame rate and chunk
latency. Without ``--model`` (or when the folder is missing) it builds the tiny-world shapes with random
weights: the work per frame does not depend on the weight values, so the figures hold for the trained model
(the JSON says which was measured). ``--compare-defaults`` streams every prompt twice, alternating: with the
pipeline's CPU paths and with the named ones (all three when none is named) as PyTorch and diffusers run them:
``conv3d`` the VAE's Conv3d layers (``vae_stream.conv3d_onednn``), ``norm`` its RMS norms
(``vae_stream.rms_norms_rsqrt``), ``rope`` the transformer's RoPE (``rope.apply_rope``'s complex product); it
reports both. Writes ``bench/results/tinyworld_cpu_<date>.json`` and ``.md``.

The issue's target: at least 12 frames per second end to end on the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def random_weights_folder(root: pathlib.Path) -> pathlib.Path:
    """A tiny-world model folder with the shipped shapes and random weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from stream_runtime.pipelines.tinyworld import model
    from stream_runtime.pipelines.wan.pipeline import StreamPipeline

    torch.manual_seed(0)
    tokenizer = model.build_tokenizer()
    vae = AutoencoderKLWan(**model.vae_config())
    text = UMT5EncoderModel(UMT5Config(**model.text_encoder_config(len(tokenizer))))
    wan = WanTransformer3DModel(**model.transformer_config(vae.config.z_dim, text.config.d_model))
    folder = root / "tinyworld_random"
    StreamPipeline(wan, vae, text, tokenizer, model.runtime_defaults()).save_pretrained(folder)
    return folder


def _conv3d(pipe, pipeline: bool) -> None:
    from stream_runtime.pipelines.wan.vae_stream import conv3d_onednn

    conv3d_onednn(pipe.vae, pipeline)


def _norm(pipe, pipeline: bool) -> None:
    from stream_runtime.pipelines.wan.vae_stream import rms_norms_rsqrt

    rms_norms_rsqrt(pipe.vae, pipeline)


def _rope(pipe, pipeline: bool) -> None:
    from stream_runtime.pipelines.wan.rope import apply_rope, apply_rope_real

    pipe.net._regions.rope = apply_rope if pipeline else apply_rope_real  # the eager block regions' RoPE


DEFAULT_PATHS = {"conv3d": _conv3d, "norm": _norm, "rope": _rope}
"""CPU paths the pipeline chooses, each switched to the pipeline's choice (True) or to PyTorch's/diffusers' own."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/tinyworld", help="model folder (random weights if missing)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="stream length per prompt (video seconds)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--compare-defaults",
        nargs="*",
        choices=sorted(DEFAULT_PATHS),
        default=None,
        help="also stream each prompt with these CPU paths as PyTorch/diffusers run them (none named: all)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from stream_runtime.pipelines.tinyworld.model import FPS
    from stream_runtime.pipelines.tinyworld.world import caption, held_out_seeds, sample_spec
    from stream_runtime.pipelines.wan.pipeline import StreamPipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(args.model)
        weights = "trained"
        if not (folder / "model_index.json").is_file():
            folder, weights = random_weights_folder(pathlib.Path(tmp)), "random (same shapes)"
        pipe = StreamPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
        frames_wanted = int(args.seconds * FPS)
        runs = []
        with pipe.session(caption(sample_spec(held_out_seeds()[-1])), seed=0) as warm:  # first-call costs
            next(warm), next(warm)
        compare = None if args.compare_defaults is None else sorted(args.compare_defaults or DEFAULT_PATHS)
        variants = ["pipeline"] + (["default: " + " ".join(compare)] if compare else [])
        for seed in held_out_seeds()[: args.prompts]:
            prompt = caption(sample_spec(seed))
            for variant in variants:
                for name in compare or []:
                    DEFAULT_PATHS[name](pipe, variant == "pipeline")
                start = time.perf_counter()
                latencies, frames = [], 0
                with pipe.session(prompt, seed=seed) as session:
                    while frames < frames_wanted:
                        t = time.perf_counter()
                        frames += len(next(session))
                        latencies.append(time.perf_counter() - t)
                seconds = time.perf_counter() - start
                chunk_frames = pipe.temporal_factor * pipe.stream_config().chunk_frames
                runs.append(
                    {
                        "prompt": prompt,
                        "cpu_paths": variant,
                        "frames": frames,
                        "fps_end_to_end": frames / seconds,
                        "chunk_latency_s_median": statistics.median(latencies[1:]),
                        "chunk_latency_s_p99": float(np.percentile(latencies[1:], 99)),
                        "steady_fps": chunk_frames / statistics.median(latencies[1:]),
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "weights": weights,
        "resolution": list(pipe.default_resolution),
        "stream": {
            k: v
            for k, v in vars(pipe.stream_config()).items()
            if k in ("chunk_frames", "sink_frames", "window_frames", "timesteps", "context_pass")
        },
        "fps_end_to_end_median": statistics.median(r["fps_end_to_end"] for r in runs if r["cpu_paths"] == "pipeline"),
        "steady_fps_median": statistics.median(r["steady_fps"] for r in runs if r["cpu_paths"] == "pipeline"),
        "runs": runs,
    }
    if compare:
        result["defaults_fps_end_to_end_median"] = statistics.median(
            r["fps_end_to_end"] for r in runs if r["cpu_paths"] != "pipeline"
        )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tinyworld_cpu_{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    command = " ".join(sys.argv[1:])
    rows = "\n".join(
        f"| {r['cpu_paths']} | {r['frames']} | {r['fps_end_to_end']:.1f} | {r['steady_fps']:.1f} "
        f"| {1000 * r['chunk_latency_s_median']:.0f} | {1000 * r['chunk_latency_s_p99']:.0f} |"
        for r in runs
    )
    stem.with_suffix(".md").write_text(
        f"# Tiny-world on CPU ({result['date']}, {result['machine']}, {args.threads} threads, {weights} weights)\n\n"
        "| CPU paths | frames | FPS end to end | steady FPS | chunk ms p50 | chunk ms p99 |\n"
        f"|---|---|---|---|---|---|\n{rows}\n\nCommand: `python bench/bench_tinyworld_cpu.py {command}`\n"
    )
    if compare:
        print(f"{variants[1]}: {result['defaults_fps_end_to_end_median']:.1f} FPS end to end")
    print(
        f"end to end {result['fps_end_to_end_median']:.1f} FPS (median of {args.prompts} prompts), "
        f"steady {result['steady_fps_median']:.1f} FPS; wrote {stem}.json/.md"
    )


if __name__ == "__main__":
    main()
