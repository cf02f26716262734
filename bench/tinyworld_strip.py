"""The README's picture of the embedded generator: a strip of frames per held-out prompt, made by the model.

Usage::

    python bench/tinyworld_strip.py --model assets/tinyworld --out docs/tinyworld_strip.png [--prompts 4] [--every 8]

Each row streams one held-out prompt (``StreamPipeline.session``, the folder's stream settings) and shows every
``--every``-th frame, upscaled with nearest-neighbour; the prompts are printed and written beside the image
(``.txt``), so the README can quote them. Nothing is drawn by hand: the pixels are the model's output.
"""

from __future__ import annotations

import argparse
import pathlib

import cv2
import numpy as np


def strip(pipe, prompts: list[str], frames: int, every: int, scale: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB ``[rows * H * scale, cols * W * scale, 3]``: row i holds frames 0, every, 2 * every, ... of
    prompt i's stream (``frames`` frames streamed)."""
    rows = []
    for i, prompt in enumerate(prompts):
        with pipe.session(prompt, seed=seed + i) as session:
            chunks, count = [], 0
            while count < frames:
                chunks.append(next(session))
                count += len(chunks[-1])
        clip = np.concatenate(chunks)[:frames:every]
        rows.append(np.concatenate(list(clip), axis=1))
    image = np.concatenate(rows, axis=0)
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/tinyworld")
    parser.add_argument("--out", default="docs/tinyworld_strip.png")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args(argv)

    from stream_runtime.pipelines.tinyworld.world import caption, held_out_seeds, sample_spec
    from stream_runtime.pipelines.wan.pipeline import StreamPipeline

    pipe = StreamPipeline.from_pretrained(args.model, device="cpu")
    prompts = [caption(sample_spec(s)) for s in held_out_seeds()[: args.prompts]]
    image = strip(pipe, prompts, args.frames, args.every, args.scale)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), image[..., ::-1])
    out.with_suffix(".txt").write_text("\n".join(f"row {i + 1}: {p}" for i, p in enumerate(prompts)) + "\n")
    print(f"wrote {out} ({image.shape[1]}x{image.shape[0]}) and {out.with_suffix('.txt')}")
    return out


if __name__ == "__main__":
    main()
