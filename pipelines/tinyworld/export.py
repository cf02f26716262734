"""Stage 3 of the tiny-world model: write the trained stages as one folder that ``StreamPipeline.from_pretrained``
loads (diffusers' Wan layout plus ``stream_runtime.json``).

Usage::

    python -m stream_runtime.pipelines.tinyworld.export --vae runs/vae --dit runs/dit --out assets/tinyworld

The folder's ``stream_runtime.json`` holds the native resolution, fps, prompt length, ``unknown_words: error``
and the stream the transformer was trained for; ``training.json`` keeps both stages' logs. The export is
reloaded and one chunk generated before the command returns, and it fails if the folder exceeds ``--max-mb``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import AutoTokenizer, UMT5EncoderModel

from stream_runtime.pipelines.wan.pipeline import StreamPipeline

from . import train_dit, train_vae
from .model import runtime_defaults

MAX_MB = 30.0
"""Size limit of the embedded default (it ships inside the package's assets)."""
CHECK_PROMPT = "a small red circle moving right on a black background"


def folder_mb(path: pathlib.Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def stage_logs(vae_dir: pathlib.Path, dit_dir: pathlib.Path) -> dict:
    """``training.json`` of the export: each stage's log, also when a stage came from an exported folder (a VAE
    taken as ``<folder>/vae``, a transformer fine-tuned with ``train_dit --init <folder>``: that folder's whole
    ``training.json`` is kept under ``earlier``, so the chain of runs behind a model stays on record)."""
    logs = {}
    for stage, folder, name in (("vae", vae_dir, train_vae.LOG_FILE), ("dit", dit_dir, train_dit.LOG_FILE)):
        if (folder / name).is_file():
            logs[stage] = json.loads((folder / name).read_text())
    exported = vae_dir.parent / train_dit.EXPORT_LOG_FILE
    if "vae" not in logs and exported.is_file():
        logs["vae"] = json.loads(exported.read_text()).get("vae")
    init = (logs.get("dit") or {}).get("config", {}).get("init")
    if init is not None and (pathlib.Path(init) / train_dit.EXPORT_LOG_FILE).is_file():
        logs["earlier"] = json.loads((pathlib.Path(init) / train_dit.EXPORT_LOG_FILE).read_text())
    return logs


def export(vae_dir: str, dit_dir: str, out: str, max_mb: float = MAX_MB, guidance_scale: float | None = None) -> dict:
    """Assemble, save, size-check and reload the model; return a summary (folder, size, frames of one chunk).
    ``guidance_scale``: the stream's default classifier-free guidance (for a transformer trained with
    ``--uncond-prob``; None keeps the runtime's default, off)."""
    vae_dir, dit_dir, root = pathlib.Path(vae_dir), pathlib.Path(dit_dir), pathlib.Path(out)
    for folder, what in ((vae_dir, "--vae (train_vae --out)"), (dit_dir, "--dit (train_dit --out)")):
        if not folder.is_dir():
            raise ValueError(f"{what}: expected a folder, got {str(folder)!r}")
    defaults = runtime_defaults(*train_dit.load_trained_for(dit_dir))
    if guidance_scale is not None:
        for mode in ("stream_t2v", "stream_v2v"):
            defaults[mode]["guidance_scale"] = guidance_scale
    pipe = StreamPipeline(
        WanTransformer3DModel.from_pretrained(dit_dir / "transformer"),
        AutoencoderKLWan.from_pretrained(vae_dir),
        UMT5EncoderModel.from_pretrained(dit_dir / "text_encoder"),
        AutoTokenizer.from_pretrained(dit_dir / "tokenizer"),
        defaults,
    )
    logs = stage_logs(vae_dir, dit_dir)  # before the folder is replaced: it may hold an input (--vae out/vae)
    if root.exists():
        shutil.rmtree(root)
    pipe.save_pretrained(root)
    (root / train_dit.EXPORT_LOG_FILE).write_text(json.dumps(logs, indent=2) + "\n")
    size = folder_mb(root)
    if size > max_mb:
        shutil.rmtree(root)
        raise ValueError(f"the exported folder is {size:.1f} MB, over the {max_mb} MB limit; train smaller components")

    loaded = StreamPipeline.from_pretrained(root, device="cpu", dtype=torch.float32)
    with loaded.session(CHECK_PROMPT, seed=0) as session:
        frames = next(session)
    return {"out": str(root), "megabytes": round(size, 2), "first_chunk_frames": list(frames.shape)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="folder written by train_vae --out")
    parser.add_argument("--dit", required=True, help="folder written by train_dit --out")
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--max-mb", type=float, default=MAX_MB)
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="default classifier-free guidance of the stream (1: off)"
    )
    args = parser.parse_args(argv)
    summary = export(args.vae, args.dit, args.out, args.max_mb, args.guidance_scale)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
