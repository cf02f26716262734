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


def export(vae_dir: str, dit_dir: str, out: str, max_mb: float = MAX_MB) -> dict:
    """Assemble, save, size-check and reload the model; return a summary (folder, size, frames of one chunk)."""
    vae_dir, dit_dir, root = pathlib.Path(vae_dir), pathlib.Path(dit_dir), pathlib.Path(out)
    for folder, what in ((vae_dir, "--vae (train_vae --out)"), (dit_dir, "--dit (train_dit --out)")):
        if not folder.is_dir():
            raise ValueError(f"{what}: expected a folder, got {str(folder)!r}")
    pipe = StreamPipeline(
        WanTransformer3DModel.from_pretrained(dit_dir / "transformer"),
        AutoencoderKLWan.from_pretrained(vae_dir),
        UMT5EncoderModel.from_pretrained(dit_dir / "text_encoder"),
        AutoTokenizer.from_pretrained(dit_dir / "tokenizer"),
        runtime_defaults(*train_dit.load_trained_for(dit_dir)),
    )
    if root.exists():
        shutil.rmtree(root)
    pipe.save_pretrained(root)
    logs = {}
    for stage, folder, name in (("vae", vae_dir, train_vae.LOG_FILE), ("dit", dit_dir, train_dit.LOG_FILE)):
        if (folder / name).is_file():
            logs[stage] = json.loads((folder / name).read_text())
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
    args = parser.parse_args(argv)
    summary = export(args.vae, args.dit, args.out, args.max_mb)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
