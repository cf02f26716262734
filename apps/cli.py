"""The stream-runtime command line.

stream-runtime generate --prompt "a fox running in snow" --seconds 10 --out clip.mp4
stream-runtime generate --model Wan2.1-T2V-1.3B-Diffusers --checkpoint self_forcing_dmd.pt --device cuda ...
stream-runtime generate --model Wan2.1-T2V-1.3B-Diffusers --decoder taehv:taew2_1.pth ...   # the tiny TAEHV decoder
stream-runtime serve --port 7860 --max-sessions 4      # the app at http://127.0.0.1:7860/ + websocket server
stream-runtime serve --host 0.0.0.0 --token auto      # other machines too: every client needs the printed token
stream-runtime understand tinyworld.mp4           # the embedded tiny-world captioner: one caption every 0.5 s
stream-runtime understand match.mp4 --model Qwen2-VL-2B-Instruct --fps 1   # one line of description per step
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import logging
import math
import os
import sys
import time

import numpy as np
import torch

from stream_runtime.attention import available_backends
from stream_runtime.config import POSITION_MODES, PROMPT_SWITCH_MODES, SAMPLERS

CAPTIONER_THREADS = 1
"""The embedded captioner runs faster than real time on one thread; leave the other cores to decoding."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="diffusers-layout folder (default: the embedded tiny-world model in assets/tinyworld, or the tiny "
        "random-weights model where that folder is missing)",
    )
    g.add_argument(
        "--tiny-random",
        action="store_true",
        help="use the tiny random-weights model (moving noise, any prompt): checks an install or a launch in seconds",
    )
    g.add_argument("--checkpoint", help="original-format causal transformer checkpoint (.pt/.safetensors)")
    g.add_argument("--lora", help="LoRA file merged into --checkpoint on load (LongLive)")
    g.add_argument("--lora-scale", type=float, default=1.0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument(
        "--text-encoder-device",
        help="run the text encoder here instead of on --device, e.g. cpu: it runs once per new prompt, and Wan2.1's "
        "UMT5-XXL encoder takes some 11 GB of GPU memory",
    )
    g.add_argument(
        "--decoder",
        default="vae",
        metavar="vae|taehv:PATH",
        help="what decodes latents to frames: the full Wan VAE (default) or TAEHV weights such as taew2_1.pth "
        "(much cheaper, slightly lower quality)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer blocks and the Wan VAE, whose conv weights also go channels-last on "
        "CUDA (H200: 1.3x DiT FPS for text-to-video; VAE decode 91 -> 49 ms per latent frame; the first chunks "
        "of each shape compile first, which takes a while)",
    )
    g.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each stream's steady-state passes as CUDA graphs (CUDA only; with or without --compile): "
        "fewer kernel launches, which is what limits small chunks such as video-to-video's",
    )


def load_pipeline(args: argparse.Namespace):
    pipe = _load_pipeline(args)
    if getattr(args, "compile", False):
        print("--compile: the first chunks compile the model (slow); later ones run compiled.")
        pipe.compile()
    if getattr(args, "cuda_graphs", False):
        pipe.enable_cuda_graphs()  # refuses a CPU device with a clear message
    return pipe


def _load_pipeline(args: argparse.Namespace):
    from stream_runtime.pipelines.wan.pipeline import StreamPipeline

    dtype = DTYPES[args.dtype] if args.dtype else None
    model = args.model
    if model is not None and args.tiny_random:
        raise ValueError("--tiny-random and --model exclude each other")
    if model is None:
        if args.checkpoint:
            raise ValueError("--checkpoint needs --model FOLDER (the VAE, text encoder and tokenizer come from it)")
        from stream_runtime.pipelines.tinyworld.model import shipped_model_path

        model = None if args.tiny_random else shipped_model_path()
        if model is None:
            why = "--tiny-random" if args.tiny_random else "No --model given and no assets/tinyworld"
            print(f"{why}: using the tiny random-weights model (moving noise, no trained content).")
            pipe = StreamPipeline.tiny_random(device=args.device, dtype=dtype or torch.float32)
            if getattr(args, "text_encoder_device", None):
                pipe.to(args.device, args.text_encoder_device)
            pipe.set_decoder(args.decoder)
            return pipe
        print(f"No --model given: using the embedded tiny-world model ({model}).")
    return StreamPipeline.from_pretrained(
        model,
        device=args.device,
        dtype=dtype,
        transformer_checkpoint=args.checkpoint,
        lora=args.lora,
        lora_scale=args.lora_scale,
        decoder=args.decoder,
        text_encoder_device=getattr(args, "text_encoder_device", None),
    )


def _stream_overrides(args: argparse.Namespace) -> dict:
    overrides = {}
    if args.steps:
        overrides["timesteps"] = tuple(float(t) for t in args.steps.split(","))
    for name in ("chunk_frames", "sink_frames", "window_frames", "shift", "sampler", "position_mode", "prompt_switch"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.strength is not None:
        overrides["strength"] = args.strength
    if args.guidance_scale is not None:
        overrides["guidance_scale"] = args.guidance_scale
    if args.negative_prompt is not None:
        overrides["negative_prompt"] = args.negative_prompt
    if args.attention:
        overrides["attention_backend"] = args.attention
    if args.attention_reuse is not None:
        overrides["attention_reuse"] = args.attention_reuse
    if args.stream_batch:
        overrides["stream_batch"] = True
    if args.stream_batch_stride is not None:
        overrides["stream_batch_stride"] = args.stream_batch_stride
    return overrides


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stream_runtime.video_io import VideoWriter

    if args.seconds <= 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds}")
    pipe = load_pipeline(args)
    height, width = args.height or pipe.default_resolution[0], args.width or pipe.default_resolution[1]
    total = math.ceil(args.seconds * args.fps)
    source = None if args.input is None else _input_frames(args.input, height, width, args.fps)  # fails early
    writer = VideoWriter(args.out, fps=args.fps)
    mode = "t2v" if source is None else "v2v"
    overrides = _stream_overrides(args)
    session = pipe.session(args.prompt, seed=args.seed, mode=mode, height=height, width=width, **overrides)
    switches = sorted(_parse_switches(args.switch, args.fps))
    bar = tqdm(total=total, unit="frame", desc="generating", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        with session, writer, _decode_ahead(session, getattr(args, "decode_ahead", False), source) as ahead:
            control = ahead or session
            while writer.frames_written < total:
                while switches and switches[0][0] <= writer.frames_written:
                    control.set_prompt(switches.pop(0)[1])
                if ahead is not None:
                    frames = next(ahead, None)  # None: the input video ended
                else:
                    frames = session.next_chunk() if source is None else _next_v2v_chunk(session, source)
                if frames is None:  # the input video ended
                    break
                frames = frames[: total - writer.frames_written]
                writer.write(frames)
                bar.update(len(frames))
                bar.set_postfix(fps=f"{writer.frames_written / (time.perf_counter() - start):.1f}")
    except KeyboardInterrupt:
        bar.close()
        print(f"\nstopped: {writer.frames_written} frames written to {args.out} (a playable file)")
        return 130
    bar.close()
    elapsed = time.perf_counter() - start
    print(
        f"wrote {writer.frames_written} frames ({writer.frames_written / args.fps:.1f} s) to {args.out} "
        f"in {elapsed:.1f} s ({writer.frames_written / elapsed:.1f} frames/s)"
    )
    return 0


def _decode_ahead(session, enabled: bool, frames=None):
    """A DecodeAhead runner over ``session`` (video-to-video: reading ``frames``; closed on exit), or a no-op
    context that gives None."""
    if not enabled:
        return contextlib.nullcontext()
    from stream_runtime.pipelines.wan.decode_ahead import DecodeAhead

    return DecodeAhead(session, frames=frames)


def _input_frames(path: str, height: int, width: int, fps: float):
    """Frames of the input video for video-to-video: resampled to ``fps`` and stretched to the session's size."""
    from stream_runtime.ingest.sampling import Resize, Sampling
    from stream_runtime.ingest.sources import FileSource

    source = FileSource(path, sampling=Sampling(fps=fps), resize=Resize(width=width, height=height, keep_aspect=False))
    return (frame for _, frame in source)


def _next_v2v_chunk(session, frames) -> np.ndarray | None:
    """Feed ``session`` input frames until a chunk comes out; None once the input ends and nothing is in flight
    (a stream batch is drained first, so its last chunks come out too)."""
    while True:
        need = session.frames_needed()
        batch = list(itertools.islice(frames, need))
        if batch:
            session.push_frames(np.stack(batch))
        if len(batch) < need:  # the input ended
            if not session.chunks_in_flight:
                return None
            session.set_stream_batch(False)
        out = session.next_chunk()
        if out is not None:
            return out


def _parse_switches(items: list[str] | None, fps: float) -> list[tuple[int, str]]:
    """``--switch SECONDS:PROMPT`` items as (output frame number, prompt)."""
    from stream_runtime.serving.client import parse_switch

    return [(round(seconds * fps), prompt) for seconds, prompt in map(parse_switch, items or [])]


def serve_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``serve`` other than the pipeline, from ``serve``'s arguments (a public host
    without a token is refused here, before any model is loaded)."""
    from stream_runtime.serving.auth import TOKEN_ENV, resolve_token
    from stream_runtime.serving.engine import EngineConfig
    from stream_runtime.serving.limits import ClientLimits

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    resolve_token(args.host, token)
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
    config = EngineConfig(
        max_sessions=args.max_sessions,
        memory_budget_bytes=budget,
        fps=args.fps,
        scheduler=args.scheduler,
        max_sessions_per_forward=args.share_forwards,
    )
    limits = ClientLimits(
        max_text_bytes=int(args.max_text_kb * 2**10),
        max_frame_bytes=None if args.max_frame_mb is None else int(args.max_frame_mb * 2**20),
        messages_per_second=args.message_rate,
        message_burst=args.message_burst,
        send_buffer_bytes=None if args.send_buffer_kb is None else int(args.send_buffer_kb * 2**10),
    )
    extra_mount = app_path = None
    if not args.no_app and importlib.util.find_spec("gradio") is None:
        print("gradio is not installed: serving without the app (pip install gradio==6.31.0 to get it)")
    elif not args.no_app:
        extra_mount, app_path = _mount_app, "/"
    return dict(
        host=args.host,
        port=args.port,
        config=config,
        extra_mount=extra_mount,
        app_path=app_path,
        token=token,
        limits=limits,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from stream_runtime.serving.server import serve

    settings = serve_settings(args)
    pipe = load_pipeline(args)
    if args.compile:  # compile before the first client arrives, not during its first chunks
        print(f"warmed up in {pipe.warm_up(progress=print):.0f} s")
    serve(pipe, **settings)
    return 0


def _mount_app(app):
    from stream_runtime.apps.gradio_app import mount  # gradio takes seconds to import: only when serving

    return mount(app, path="/")


def _is_captioner_folder(path: str) -> bool:
    """Whether ``path`` holds a tiny-world captioner (``save_pretrained`` of ``TinyWorldCaptioner``)."""
    import json
    import pathlib

    config = pathlib.Path(path) / "config.json"
    try:
        return (
            config.is_file() and "config" in json.loads(config.read_text()) and "model_type" not in config.read_text()
        )
    except (OSError, ValueError):
        return False


def cmd_understand(args: argparse.Namespace) -> int:
    from stream_runtime.understanding import StreamingVLMConfig, load_vlm, understand
    from stream_runtime.understanding.api import DEFAULT_PROMPT

    source = int(args.source) if args.source.isdigit() else args.source  # a bare number is a webcam index
    if args.model is None or _is_captioner_folder(args.model):
        from stream_runtime.pipelines.captioner.model import load_captioner

        torch.set_num_threads(min(torch.get_num_threads(), CAPTIONER_THREADS))
        for name in ("prompt", "max_new_tokens"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} is for a VLM (--model DIR); the captioner takes none")
        events = understand(
            source,
            load_captioner(args.model),
            fps=args.fps,
            frames_per_step=args.frames_per_step,
            prompt=None,
            workers=args.workers,
        )
    else:
        model, tokenizer = load_vlm(args.model, device=args.device)
        config = (
            StreamingVLMConfig()
            if args.max_new_tokens is None
            else StreamingVLMConfig(max_new_tokens=args.max_new_tokens)
        )
        events = understand(
            source,
            model,
            codec=tokenizer,
            fps=args.fps,
            frames_per_step=args.frames_per_step,
            prompt=DEFAULT_PROMPT if args.prompt is None else args.prompt,
            config=config,
            workers=args.workers,
        )
    for event in events:  # printed as they come: on a mid-stream error, what was understood is already out
        print(f"[{event.start_s:.2f}-{event.end_s:.2f}] {event.text}", flush=True)
    return 0


def add_generate_args(gen: argparse.ArgumentParser) -> None:
    """The arguments of ``generate`` (shared with ``python -m stream_runtime.distributed.generate``)."""
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--seconds", type=float, default=10.0)
    gen.add_argument("--out", default="clip.mp4")
    gen.add_argument("--fps", type=float, default=16.0, help="frame rate of the output file (Wan2.1: 16)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--switch", action="append", metavar="SECONDS:PROMPT", help="live prompt switch (repeatable)")
    gen.add_argument(
        "--input",
        metavar="VIDEO",
        help="video-to-video: restyle this video file or URL (resampled to --fps, stretched to the model's size) "
        "instead of generating from noise; stops at its end or after --seconds",
    )
    s = gen.add_argument_group("stream")
    s.add_argument("--steps", help="comma-separated step list before the shift, e.g. 1000,750,500,250")
    s.add_argument("--shift", type=float)
    s.add_argument("--strength", type=float, help="video-to-video: how far the input is noised, in (0, 1]")
    s.add_argument(
        "--sampler", choices=SAMPLERS, help="renoise (distilled models) or euler (flow ODE); default: the model's"
    )
    s.add_argument(
        "--guidance-scale",
        type=float,
        dest="guidance_scale",
        help="classifier-free guidance (1 off; > 1 doubles the denoising batch); default: the model's",
    )
    s.add_argument(
        "--negative-prompt", dest="negative_prompt", help="what guidance steers away from (default: the empty prompt)"
    )
    s.add_argument("--chunk-frames", type=int, dest="chunk_frames")
    s.add_argument("--sink-frames", type=int, dest="sink_frames")
    s.add_argument("--window-frames", type=int, dest="window_frames")
    s.add_argument("--position-mode", choices=POSITION_MODES, dest="position_mode")
    s.add_argument("--prompt-switch", choices=PROMPT_SWITCH_MODES, dest="prompt_switch")
    s.add_argument("--attention", choices=available_backends(), help="self-attention backend (default sdpa)")
    s.add_argument(
        "--attention-reuse",
        type=int,
        dest="attention_reuse",
        metavar="N",
        help="reuse attention to the cached frames across steps, recomputed every N steps (0 off, 1 exact)",
    )
    s.add_argument(
        "--stream-batch",
        action="store_true",
        dest="stream_batch",
        help="run the steps of successive chunks as one batch (a chunk per forward after a warm-up)",
    )
    s.add_argument(
        "--decode-ahead",
        action="store_true",
        dest="decode_ahead",
        help="denoise (and, with --input, encode) the next chunk while this one is decoded (GPU: the two share "
        "the device; a --switch lands up to two chunks later). On one H200 it gained nothing: the DiT and the VAE "
        "each keep the GPU busy",
    )
    s.add_argument(
        "--stream-batch-stride",
        type=int,
        dest="stream_batch_stride",
        metavar="N",
        help="forwards between two passes of a chunk: 1 on one device, N for a pipeline over N stages",
    )
    _add_model_args(gen)


def add_serve_args(srv: argparse.ArgumentParser) -> None:
    """The arguments of ``serve`` (shared with ``python -m stream_runtime.distributed.serve``)."""
    from stream_runtime.serving.limits import ClientLimits  # light: no server dependencies

    srv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    srv.add_argument("--no-app", action="store_true", dest="no_app", help="the websocket only, without the Gradio app")
    srv.add_argument("--port", type=int, default=7860)
    srv.add_argument("--max-sessions", type=int, default=4, dest="max_sessions")
    srv.add_argument(
        "--scheduler",
        choices=("round_robin", "slo"),
        default="round_robin",
        help="round_robin: one chunk per session per round; slo: per-session targets (open's slo_ttff_s / slo_fps), "
        "sequential or stream-batch denoising per chunk, violations reported (README: SLO-aware scheduling)",
    )
    srv.add_argument(
        "--share-forwards",
        type=int,
        default=1,
        dest="share_forwards",
        metavar="N",
        help="round_robin: up to N sessions with the same settings generate their chunks in shared forwards "
        "(default 1: one session per forward; slo groups where measured costs say it pays)",
    )
    srv.add_argument(
        "--memory-budget-gb",
        type=float,
        dest="memory_budget_gb",
        help="KV-cache memory all sessions may hold (default: 90%% of free CUDA memory; none on CPU)",
    )
    srv.add_argument("--fps", type=float, default=16.0, help="frame rate the stream is played at (Wan2.1: 16)")
    a = srv.add_argument_group("access and per-client limits (docs/protocol.md)")
    a.add_argument(
        "--token",
        help="clients must send this token (required unless --host is loopback); 'auto': a random one, printed in "
        "the URLs (default: $STREAM_RUNTIME_TOKEN)",
    )
    defaults = ClientLimits()
    a.add_argument(
        "--max-text-kb",
        type=float,
        default=defaults.max_text_bytes / 2**10,
        dest="max_text_kb",
        help="largest JSON control message",
    )
    a.add_argument(
        "--max-frame-mb",
        type=float,
        dest="max_frame_mb",
        help="largest binary input frame (default: an RGBA frame at the largest resolution, plus 64 KiB)",
    )
    a.add_argument(
        "--message-rate",
        type=float,
        default=defaults.messages_per_second,
        dest="message_rate",
        help="client messages per second (token bucket); beyond it they are dropped",
    )
    a.add_argument("--message-burst", type=int, default=defaults.message_burst, dest="message_burst")
    a.add_argument(
        "--send-buffer-kb",
        type=float,
        dest="send_buffer_kb",
        help="kernel send buffer per connection: a slow client's backlog before its stale chunks are dropped "
        "(default: the kernel's autotuning, up to 4 MiB)",
    )
    _add_model_args(srv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-runtime", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream text-to-video (or, with --input, video-to-video) into an MP4 file")
    add_generate_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve the Gradio app and live streams over a websocket (docs/protocol.md)")
    add_serve_args(srv)
    srv.set_defaults(func=cmd_serve)

    und = sub.add_parser("understand", help="describe a video file, URL or webcam as it plays, one line per step")
    und.add_argument("source", help="video file, URL (rtsp/http/hls), or a webcam index such as 0")
    und.add_argument(
        "--model",
        help="local Qwen2-VL / Qwen2.5-VL folder (model + tokenizer, save_pretrained layout), or a tiny-world "
        "captioner folder (default: the embedded captioner, assets/tinyworld-captioner)",
    )
    und.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    und.add_argument("--fps", type=float, help="frames kept per second of video (default: VLM 1, captioner 16)")
    und.add_argument(
        "--frames-per-step",
        type=int,
        dest="frames_per_step",
        help="VLM: frames per step (default one temporal patch, 2); captioner: frames between captions (default 8)",
    )
    und.add_argument("--prompt", help="instruction fed once, before the frames (default: describe the video)")
    und.add_argument("--max-new-tokens", type=int, dest="max_new_tokens", help="text tokens per step at most (16)")
    und.add_argument("--workers", type=int, default=1, help="decode threads for a local file")
    und.set_defaults(func=cmd_understand)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if getattr(args, "compile", False) and _is_compile_failure(exc):
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            print(
                f"error: torch.compile failed ({first}); run without --compile (on a CPU, inductor also needs a "
                "C++ compiler)",
                file=sys.stderr,
            )
            return 2
        raise


def _is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came out of torch.compile (dynamo or a backend), not out of the model itself."""
    module = type(exc).__module__
    return module.startswith(("torch._dynamo", "torch._inductor"))


if __name__ == "__main__":
    sys.exit(main())
