"""How much a tiny-world transformer's predictions depend on the shapes: a probe that needs no sampling.

Usage::

    python -m stream_runtime.pipelines.tinyworld.shape_probe --model assets/tinyworld [--pairs 48] [--out probe.json]

Each of the first ``--pairs`` held-out scenes is rendered beside its shape sibling (``train_data.shapes_rotated``:
every shape changed, all else equal), both are encoded with the folder's VAE, noised with the same noise to one
level, and the transformer predicts the flow of every frame from a clean context copy (the teacher-forcing view
of ``train_dit``, fresh streams). The figure is the share of the siblings' difference of targets that the
difference of predictions explains, ``1 - |dp - dt|^2 / |dt|^2``: 1 when the model draws each scene's own shapes,
0 when its prediction is the same for both (it ignores the shape words and the outlines in its input), below 0
when the difference it predicts is wrong. It is given per noise level for the stream's first latent frame, which
the model draws from the prompt alone, and for the later frames, which can copy the shapes from the context.

That share mixes two sources: the words, and the outline the noisy input already shows (the siblings' noisy
inputs differ too). The second figure, ``words``, isolates the first: the scene's own noisy input with the
sibling's caption instead of its own, and how far that moves the first frame's clean estimate
(``x0 = x_t - sigma * flow``), relative to how far the two scenes' clean first frames differ: 0 when the model
ignores the shape words, about 1 when the words alone move its estimate from one shape to the other.

At the highest level the first frame's figure is near 0 for any model (where a shape will be is not yet known,
so the best prediction averages over places); what separates models is the middle levels. On 2026-12-02 (48
pairs) the shipped model (8x VAE, some 9,000 steps) explained -5 % / 27 % of the first frame's shape difference
at levels 0.75 / 0.5, and its transformer moved onto a 4x VAE (``train_dit --fresh-io``) 51 % / 65 % after 1,101
steps (``bench/results/h200_2026-12-02_session9/shape_probe_*.json``). The ``words`` figure (2026-12-07) shows
that neither uses the shape words: they move the first frame's estimate by 1-4 %, where colour words move it by
10-49 % (``--attribute colour``; ``bench/results/h100_2026-12-07_session12/``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5EncoderModel

from stream_runtime.pipelines.wan import sampling
from stream_runtime.pipelines.wan.transformer import StreamingWanTransformer
from stream_runtime.pipelines.wan.vae_stream import StreamingVAEEncoder

from .model import STREAM, build_tokenizer, encode_tokens, frames_to_pixels, stream_sequence_frames, tokenize
from .train_data import colours_rotated, shapes_rotated, stream_pixel_frames
from .train_dit import teacher_forcing_mask
from .world import DEFAULT_SIZE, caption, held_out_seeds, render, sample_spec

DEFAULT_LEVELS = (1.0, 0.75, 0.5, 0.25)
SIBLINGS = {"shape": shapes_rotated, "colour": colours_rotated}
"""What the siblings change (``--attribute``)."""


def explained(pred: torch.Tensor, sibling_pred: torch.Tensor, target: torch.Tensor, sibling_target: torch.Tensor):
    """``1 - |dp - dt|^2 / |dt|^2`` per frame (dim 2) of ``[B, C, T, h, w]`` predictions and targets of scenes
    and their siblings (``d``: scene minus sibling), as a float tensor ``[T]``."""
    dims = (0, 1, 3, 4)
    want = target - sibling_target
    error = (pred - sibling_pred - want).pow(2).sum(dim=dims)
    return 1.0 - error / want.pow(2).sum(dim=dims).clamp_min(1e-12)


@torch.no_grad()
def probe(
    folder: str | pathlib.Path,
    pairs: int = 48,
    levels=DEFAULT_LEVELS,
    seed: int = 0,
    batch: int = 16,
    attribute: str = "shape",
) -> dict:
    """The probe's figures for the model folder ``folder`` (see the module docstring). ``attribute="colour"``:
    the siblings differ in every object's colour instead (:func:`train_data.colours_rotated`), the yardstick of
    how much a model that has learned its words moves."""
    if attribute not in SIBLINGS:
        raise ValueError(f"attribute: expected one of {sorted(SIBLINGS)}, got {attribute!r}")
    root = pathlib.Path(folder)
    if not 1 <= pairs <= len(held_out_seeds()):
        raise ValueError(f"pairs: expected 1 .. {len(held_out_seeds())}, got {pairs}")
    vae = AutoencoderKLWan.from_pretrained(root / "vae").eval()
    wan = WanTransformer3DModel.from_pretrained(root / "transformer").eval()
    text_encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder").eval()
    net = StreamingWanTransformer(wan)
    tokenizer = build_tokenizer()
    frames = stream_sequence_frames(STREAM)
    pixel_frames = stream_pixel_frames(frames, vae.config.scale_factor_temporal)
    specs = [sample_spec(s) for s in held_out_seeds()[:pairs]]
    scenes = {"scene": specs, "sibling": [SIBLINGS[attribute](s, 1) for s in specs]}
    latents, embeds = {}, {}
    for name, group in scenes.items():
        clips = np.stack([render(s, pixel_frames, DEFAULT_SIZE, DEFAULT_SIZE) for s in group])
        latents[name] = torch.cat(
            [StreamingVAEEncoder(vae).encode(frames_to_pixels(clips[i : i + batch])) for i in range(0, pairs, batch)]
        ).float()
        ids, mask = tokenize(tokenizer, [caption(s) for s in group])
        embeds[name] = encode_tokens(text_encoder, ids, mask)
    mask = teacher_forcing_mask(frames, STREAM)
    positions = list(range(frames)) * 2
    rows = []
    for level in levels:
        noise = torch.randn(latents["scene"].shape, generator=torch.Generator().manual_seed(seed))
        t = torch.tensor([0.0] * frames + [1000.0 * level] * frames).expand(pairs, -1)
        preds, targets, seqs = {}, {}, {}
        for name, x0 in latents.items():
            seqs[name] = torch.cat([x0, sampling.add_noise(x0, noise, level)], dim=2)
            text_kv = net.text_kv(embeds[name])
            pred = net.forward_full(seqs[name], t, text_kv, frame_mask=mask, frame_positions=positions)
            preds[name], targets[name] = pred[:, :, frames:].float(), noise - x0
        share = explained(preds["scene"], preds["sibling"], targets["scene"], targets["sibling"])
        # The words alone: the scene's noisy input under the sibling's caption.
        swapped = net.forward_full(
            seqs["scene"], t, net.text_kv(embeds["sibling"]), frame_mask=mask, frame_positions=positions
        )[:, :, frames:].float()
        moved = level * (swapped - preds["scene"])[:, :, 0]  # change of the first frame's clean estimate
        apart = (latents["scene"] - latents["sibling"])[:, :, 0]
        rows.append(
            {
                "level": float(level),
                "first_frame": share[0].item(),
                "later_frames": share[1:].mean().item(),
                "words_first_frame": (moved.norm() / apart.norm().clamp_min(1e-12)).item(),
                "per_frame": share.tolist(),
                "difference_first_frame": (targets["scene"] - targets["sibling"])[:, :, 0].pow(2).mean().item(),
            }
        )
    return {"model": str(root), "attribute": attribute, "pairs": pairs, "frames": frames, "levels": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported tiny-world folder")
    parser.add_argument("--pairs", type=int, default=48, help="held-out scenes, each beside its shape sibling")
    parser.add_argument("--levels", type=float, nargs="+", default=list(DEFAULT_LEVELS))
    parser.add_argument("--attribute", choices=sorted(SIBLINGS), default="shape", help="what the siblings change")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = probe(args.model, args.pairs, args.levels, attribute=args.attribute)
    result["seconds"] = time.perf_counter() - start
    print("level  first frame  later frames  (share of the shape siblings' difference explained)  words (first frame)")
    for row in result["levels"]:
        shares = f"{row['first_frame']:11.3f}  {row['later_frames']:12.3f}"
        print(f"{row['level']:5.2f}  {shares}  {row['words_first_frame']:10.3f}")
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
