"""Stage 2 of the tiny-world model: train the block-causal ``WanTransformer3DModel`` (and the UMT5 prompt encoder)
by flow matching on the trained VAE's latents.

Usage::

    python -m stream_runtime.pipelines.tinyworld.train_dit --vae runs/vae --out runs/dit --minutes 10 --device cuda

What a training sequence is. The stream (``model.STREAM``) generates one chunk at a time while attending to the
sink frames (the stream's first latent frames) and a window of the most recent frames, with ``bounded`` RoPE
positions: sinks at 0..S-1, the window after them, whatever the stream's age. A training sequence is exactly
that view: latent frames ``[0 .. S-1]`` of an encoded stream followed by ``W`` consecutive frames starting at a
random chunk-aligned ``k >= S`` (``k = S``: a fresh stream, no gap), at positions ``0 .. S+W-1``, under
:func:`block_causal_mask` with the stream's chunk, sink and window. For a fresh stream the training pass equals
the stream's computation exactly (``tests/test_tinyworld_train.py`` checks it); with a gap, the last chunk sees
what the stream shows it, but the window frames' own keys come from a pass over the shorter history before them.

Objectives (``--objective``):

- ``teacher`` (default): the sequence twice, ``[context | noisy]``. The context copy is the clean latents plus
  a little noise (noisy-context augmentation: what the stream caches are the model's own imperfect estimates)
  at timestep 0, as the stream's context pass writes them; the noisy copy has its own noise level per chunk
  (diffusion forcing) and attends to the context copy's earlier chunks through the same sink + window mask,
  plus its own chunk. Every chunk is a target with the context the stream will give it.
- ``diffusion``: one sequence, each chunk with its own noise level (diffusion forcing); a random share of the
  chunks before the last are context instead (lightly noised, timestep 0, no loss).

Shape pairs (``--pair-weight``). Shapes of one size have equal areas, so a circle and a square at one place differ
in a few outline pixels: in the flow loss the shape word explains almost nothing, and models trained by it alone
drew the prompt's colours and motions but ignored its shapes (the same blob for "circle", "square" and
"triangle"). With a pair weight the data are scenes and their shape siblings (``train_data.shapes_rotated``: the
same scene with every shape changed), a batch holds both halves of each pair with the same noise, noise levels,
window and caption dropout, and the loss adds ``pair_weight`` times the squared error of the pair's difference
of predictions against its difference of targets. That part is what the shape words (and the outlines in the
noisy input) decide; the term weighs it ``1 + 2 * pair_weight`` times as much as the plain loss does.

Noise levels are the stream's own shifted step list with probability ``grid_prob`` (few-step sampling only ever
asks for those) and shifted-uniform otherwise. The loss is the MSE to the flow ``noise - x0`` (Wan's convention,
``pipelines.wan.sampling``). An EMA of the weights is what gets saved.

Measured on one H100 (bf16 autocast): ``--batch 256 --layers 6 --clips 6144 --latent-frames 12 --workers 14
--encode-batch 256`` renders and encodes its data in 35 s and trains about 12 steps/s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pathlib
import time
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from stream_runtime.config import StreamConfig
from stream_runtime.pipelines.wan import sampling
from stream_runtime.pipelines.wan.transformer import StreamingWanTransformer, block_causal_mask

from . import train_common as common
from .model import (
    LAYOUT_FIELDS,
    NATIVE_SIZE,
    STREAM,
    build_tokenizer,
    check_stream_layout,
    encode_tokens,
    stream_fields,
    stream_from_fields,
    text_encoder_config,
    tokenize,
    transformer_config,
)
from .train_data import LatentStreams, encode_streams

LOG_FILE = "train_log.json"
EXPORT_LOG_FILE = "training.json"
"""What ``export`` writes beside the model: both stages' logs."""
OBJECTIVES = ("teacher", "diffusion")


@dataclass(frozen=True)
class DiTTrainConfig:
    """One transformer training run."""

    vae: str
    """Folder of the trained VAE (``train_vae --out``)."""
    out: str
    """Folder for ``transformer/``, ``text_encoder/``, ``tokenizer/`` and ``train_log.json``."""
    minutes: float = 10.0
    """Wall-clock budget of the whole stage (data encoding included)."""
    steps: int | None = None
    """Fixed step count (reproducible); None: as many as fit ``minutes``."""
    device: str = "cpu"
    seed: int = 0
    batch: int = 256
    """Sequences per step (the measured H100 recipe; use fewer on a CPU)."""
    size: int = NATIVE_SIZE
    """Render resolution of the training streams (the model's native one)."""
    clips: int = 6144
    """Training streams rendered and encoded once at the start."""
    latent_frames: int = 12
    """Latent frames encoded per stream: the window starts anywhere up to ``latent_frames - window``."""
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    patch: int | None = None
    """Spatial patch of the transformer (``patch_size`` (1, p, p)): 2 (the default of a new model) gives 4x4 tokens
    per 8x8 latent frame, each token 16x16 pixels; 1 gives 8x8 tokens of 8x8 pixels (four times the tokens).
    None with ``init``: the init's patch; 1 with an init of patch 2: that model re-patched (:func:`repatch`)."""
    text_dim: int = 64
    text_layers: int = 2
    text: str = "train"
    """``train``: the prompt encoder learns with the transformer; ``frozen``: it keeps its random weights."""
    objective: str = "teacher"
    """``teacher`` or ``diffusion`` (see the module docstring)."""
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.999
    context_noise: float = 0.1
    """Largest noise level added to context chunks (their timestep stays 0)."""
    context_prob: float = 0.5
    """``diffusion`` objective: share of the chunks before the last that are context."""
    self_context_prob: float = 0.0
    """``teacher`` objective: share of sequences whose context copy is the model's own clean estimate (one
    no-grad pass over the sequence noised to a random level up to ``self_context_noise`` per chunk) instead of
    the data: the stream caches the model's estimates, not the data, and its errors compound over a long stream
    (exposure bias). The estimates stay aligned with the data, so the noisy chunks keep the data as target. Costs
    one extra forward without gradients per step when > 0."""
    self_context_noise: float = 0.6
    """Largest noise level of the pass that makes the self-context estimates."""
    fresh_prob: float = 0.3
    """Share of sequences that are a stream's start (window right after the sinks)."""
    uncond_prob: float = 0.0
    """Share of sequences trained with the empty prompt (caption dropout), so that the model also learns the
    unconditional flow that classifier-free guidance (``StreamConfig.guidance_scale``) steers away from."""
    grid_prob: float = 0.5
    """Share of chunk noise levels taken from the stream's shifted step list."""
    pair_weight: float = 0.0
    """Weight of the shape-pair term (see the module docstring); > 0 renders the data as shape pairs (``clips``
    rows of ``clips / 2`` scenes) and needs an even ``batch``. 0: the plain loss, as before the term existed."""
    fg_weight: float = 0.0
    """Extra weight of the latent cells on and next to shapes in the flow loss: a cell weighs ``1 + fg_weight x``
    its share of shape pixels after a 3x3 dilation (so outlines' surroundings count: two shapes of one size
    differ there), normalised by the batch's mean weight. Shapes cover a tenth of a frame, so in the plain loss
    the background's easy cells outweigh what the shape and colour words decide. 0: the plain loss."""
    swap_prob: float = 0.0
    """Share of shape pairs whose sink frames are noised from the sibling's clean frame instead of their own (at
    noise levels >= ``swap_min_level``), with the flow that leads to their own clean frame as the target
    (``(x_t - x0) / sigma``): the noisy input then shows the other shape's outline and only the caption says which
    shape to draw. Models trained by the plain loss read the outline from the noisy input and ignore the shape
    words (``shape_probe``'s words figure: 1-4 %). > 0 renders the data as shape pairs (as ``pair_weight``) and
    needs an even ``batch``."""
    swap_min_level: float = 0.5
    """Lowest noise level at which ``swap_prob`` swaps (below it the outline is too clear to overrule)."""
    sink_weight: float = 1.0
    """Weight of the sink frames' flow loss (the stream's first latent frames, drawn from the prompt alone: the
    only frames that cannot copy their shapes and colours from the context, so the only ones where the model must
    learn what the words mean), relative to the window frames' (combined with ``fg_weight``). 1: the plain loss."""
    train_shift: float = 1.0
    """Shift of the shifted-uniform noise levels (1: uniform, as the stream's Euler levels are)."""
    chunk_frames: int = STREAM.chunk_frames
    sink_frames: int = STREAM.sink_frames
    window_frames: int = STREAM.window_frames
    timesteps: tuple[float, ...] = STREAM.timesteps
    shift: float = STREAM.shift
    sampler: str = STREAM.sampler
    workers: int = 0
    """Processes rendering the training streams."""
    encode_batch: int = 256
    compile: str | None = None
    """A ``torch.compile`` backend (``inductor`` on a GPU) for the transformer's block halves and RoPE in the
    training passes (``StreamingWanTransformer.compile_blocks``; attention stays SDPA): fewer, fused kernels for
    a model whose steps are short. None: eager. The first steps pay the compile time; the saved weights are the
    same modules'."""
    log_every: int = 50
    threads: int | None = None
    """CPU threads for torch (None: torch's default); the CPU fine-tunes of the shipped model used 1."""
    fresh_io: bool = False
    """With ``init``: a transformer for another VAE's latents (e.g. ``train_vae --spatial 4``): keep ``init``'s
    blocks, embedders and modulation (what a token of 8x8 pixels means to them stays: pick ``patch`` so that a
    token covers as many pixels as ``init``'s did) and start a fresh patch embedding and output projection
    (:func:`fresh_io`)."""
    grow_layers: int = 0
    """With ``init``: append this many transformer blocks that start as the identity (:func:`grow_blocks`), so a
    trained model gains depth without losing what it draws. 0: the init's depth."""
    single_share: float = 0.0
    """Share of the training streams rendered from one-object scenes (the rest from the world's own mix of one to
    three): the shape words need no binding to an object there. 0: the world's mix, as before."""
    init: str | None = None
    """Continue from an earlier run's folder (its ``transformer/`` and ``text_encoder/``; their shapes win over
    ``layers``/``heads``/... and the stream must match): chains 10-minute runs into a longer training."""

    def stream(self) -> StreamConfig:
        """The stream this run trains for (saved with the weights; ``export`` writes it as the default)."""
        return STREAM.replace(
            chunk_frames=self.chunk_frames,
            sink_frames=self.sink_frames,
            window_frames=self.window_frames,
            timesteps=tuple(self.timesteps),
            shift=self.shift,
            sampler=self.sampler,
        )


# -------------------------------------------------------------------------------------------- sequences


def teacher_forcing_mask(num_frames: int, stream: StreamConfig, device=None) -> torch.Tensor:
    """Frame mask ``[2T, 2T]`` over ``[context | noisy]`` copies of a T-frame sequence.

    Context frames attend like the stream's context pass (``block_causal_mask`` with the stream's chunk, sink
    and window); a noisy chunk attends to the context frames its chunk may see in earlier chunks, plus itself:
    what the stream's denoising passes see in the cache and the chunk.
    """
    base = block_causal_mask(num_frames, stream.chunk_frames, stream.sink_frames, stream.window_frames, device=device)
    chunk = torch.arange(num_frames, device=device) // stream.chunk_frames
    earlier = chunk[None, :] < chunk[:, None]
    same = chunk[None, :] == chunk[:, None]
    top = torch.cat([base, torch.zeros_like(base)], dim=1)
    bottom = torch.cat([base & earlier, same], dim=1)
    return torch.cat([top, bottom], dim=0)


def sequence_frames(
    batch: int, stream: StreamConfig, stream_frames: int, fresh_prob: float, generator: torch.Generator
) -> torch.Tensor:
    """Latent frame indices ``[batch, S + W]`` of training sequences: the sinks, then a window from a random
    chunk-aligned start ``k`` in ``S .. stream_frames - W`` (``k = S`` with probability ``fresh_prob``)."""
    s, w, c = stream.sink_frames, stream.window_frames, stream.chunk_frames
    if stream_frames < s + w:
        raise ValueError(f"latent_frames: expected >= sink + window = {s + w}, got {stream_frames}")
    starts = (stream_frames - w - s) // c + 1  # chunk-aligned choices of k
    k = s + c * torch.randint(starts, (batch,), generator=generator)
    fresh = torch.rand(batch, generator=generator) < fresh_prob
    k = torch.where(fresh, torch.full_like(k, s), k)
    sinks = torch.arange(s).expand(batch, s)
    return torch.cat([sinks, k[:, None] + torch.arange(w)], dim=1)


def sample_sigmas(
    batch: int, chunks: int, grid: torch.Tensor, grid_prob: float, shift: float, generator: torch.Generator
) -> torch.Tensor:
    """Per-chunk noise levels ``[batch, chunks]`` in (0, 1]: a level of ``grid`` with probability ``grid_prob``,
    else shifted-uniform."""
    u = 1.0 - torch.rand(batch, chunks, generator=generator)  # (0, 1]
    shifted = sampling.shifted_sigma(u * 1000.0, shift)
    pick = grid[torch.randint(len(grid), (batch, chunks), generator=generator)]
    use_grid = torch.rand(batch, chunks, generator=generator) < grid_prob
    return torch.where(use_grid, pick, shifted).clamp_min(1e-3)


def flow_loss(
    net: StreamingWanTransformer,
    x0: torch.Tensor,
    text_kv,
    cfg: DiTTrainConfig,
    stream: StreamConfig,
    grid: torch.Tensor,
    generator: torch.Generator,
    paired: bool = False,
    cell_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one batch of clean sequences ``x0 [B, C, T, h, w]`` (see the module docstring) and
    its parts, detached (reading them is left to the logging steps: no host sync per step).

    ``paired``: rows ``i`` and ``B/2 + i`` are shape siblings; they get the same noise and noise levels, and the
    loss adds ``cfg.pair_weight`` times the pair term (part ``"pair"``; part ``"loss"`` stays the plain loss).

    ``cell_weight`` ``[B, 1, T, h, w]`` (see ``DiTTrainConfig.fg_weight``) weighs each latent cell's squared
    error; the loss is the weighted mean (part ``"loss"``), part ``"plain"`` the unweighted one for the log."""
    b, _, frames = x0.shape[:3]
    c = stream.chunk_frames
    chunks = frames // c
    device = x0.device
    if paired and b % 2:
        raise ValueError(f"paired: expected an even batch of [first halves | siblings], got {b} rows")
    half = b // 2 if paired else b

    def twin(v: torch.Tensor) -> torch.Tensor:
        return twin_draw(v, paired)

    def per_frame(v: torch.Tensor) -> torch.Tensor:  # [B, chunks] -> [B, 1, T, 1, 1]
        return v.repeat_interleave(c, dim=1).to(device)[:, None, :, None, None]

    def randn() -> torch.Tensor:
        return twin(torch.randn((half, *x0.shape[1:]), generator=generator)).to(device)

    sigma = twin(sample_sigmas(half, chunks, grid, cfg.grid_prob, cfg.train_shift, generator))
    context_sigma = twin(torch.rand(half, chunks, generator=generator) * cfg.context_noise)
    noise = randn()
    target = noise - x0
    if cfg.objective == "teacher":
        x_t = sampling.add_noise(x0, noise, per_frame(sigma))
        if paired and cfg.swap_prob > 0:
            x_t, target = swap_outlines(x0, x_t, target, noise, per_frame(sigma), cfg, stream, generator)
        x_ctx = sampling.add_noise(x0, randn(), per_frame(context_sigma))
        if cfg.self_context_prob > 0:
            own = self_estimates(net, x0, text_kv, stream, cfg.self_context_noise, generator)
            use = (torch.rand(b, generator=generator) < cfg.self_context_prob).to(device)[:, None, None, None, None]
            x_ctx = torch.where(use, own.to(x_ctx.dtype), x_ctx)
        seq = torch.cat([x_ctx, x_t], dim=2)
        t = torch.cat([torch.zeros(b, frames), 1000.0 * sigma.repeat_interleave(c, dim=1)], dim=1).to(device)
        mask = teacher_forcing_mask(frames, stream, device)
        positions = list(range(frames)) * 2
        pred = net.forward_full(seq, t, text_kv, frame_mask=mask, frame_positions=positions)[:, :, frames:]
        weight = None if cell_weight is None else cell_weight.expand_as(target)
        error = (pred.float() - target).pow(2)
        loss = error.mean() if weight is None else (error * weight).sum() / weight.sum().clamp_min(1e-6)
    else:
        context = twin(torch.rand(half, chunks, generator=generator) < cfg.context_prob)
        context[:, -1] = False  # the last chunk always learns
        level = torch.where(context, context_sigma, sigma)
        x_t = sampling.add_noise(x0, noise, per_frame(level))
        t = 1000.0 * torch.where(context, torch.zeros_like(sigma), sigma).repeat_interleave(c, dim=1)
        mask = block_causal_mask(frames, c, stream.sink_frames, stream.window_frames, device=device)
        pred = net.forward_full(x_t, t.to(device), text_kv, frame_mask=mask)
        weight = learns = per_frame((~context).float()).expand_as(target)
        if cell_weight is not None:
            weight = weight * cell_weight
        error = (pred.float() - target).pow(2)
        loss = (error * weight).sum() / weight.sum().clamp_min(1e-6)
    parts = {"loss": loss.detach()}
    if cell_weight is not None:
        if cfg.objective == "teacher":
            parts["plain"] = error.mean().detach()
        else:
            parts["plain"] = ((error * learns).sum() / learns.sum().clamp_min(1.0)).detach()
    if paired:
        pair = pair_loss(pred.float(), target, None if weight is None else weight[:half])
        parts["pair"] = pair.detach()
        loss = loss + cfg.pair_weight * pair
    return loss, parts


def swap_outlines(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    target: torch.Tensor,
    noise: torch.Tensor,
    level: torch.Tensor,
    cfg: DiTTrainConfig,
    stream: StreamConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)`` of a paired batch ``[first halves | siblings]`` with the sink frames of a ``cfg.swap_prob``
    share of pairs (both siblings) noised from the sibling's clean frame, where the frame's noise ``level``
    (``[B, 1, T, 1, 1]``) is at least ``cfg.swap_min_level``; their target is the flow to their own clean frame,
    ``(x_t - x0) / level`` (for an unswapped frame that is ``noise - x0``). See ``DiTTrainConfig.swap_prob``."""
    b, frames = x0.shape[0], x0.shape[2]
    half = b // 2
    sibling = torch.cat([x0[half:], x0[:half]])
    rows = twin_draw(torch.rand(half, generator=generator) < cfg.swap_prob, True).to(x0.device)
    sinks = torch.arange(frames, device=x0.device) < stream.sink_frames
    use = rows[:, None, None, None, None] & sinks[None, None, :, None, None] & (level >= cfg.swap_min_level)
    x_t = torch.where(use, sampling.add_noise(sibling, noise, level), x_t)
    target = torch.where(use, (x_t.float() - x0.float()) / level.clamp_min(1e-6), target)
    return x_t, target


def twin_draw(v: torch.Tensor | None, paired: bool) -> torch.Tensor | None:
    """One random draw for both halves ``[first halves | siblings]`` of a paired batch (``v`` as is unpaired)."""
    return torch.cat([v, v]) if paired and v is not None else v


def pair_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error of the siblings' difference of predictions against their difference of targets, over a
    batch ``[first halves | siblings]`` (``weight``: per element of one half, as the plain loss weighs it)."""
    half = pred.shape[0] // 2
    error = (pred[:half] - pred[half:] - (target[:half] - target[half:])).pow(2)
    if weight is None:
        return error.mean()
    return (error * weight).sum() / weight.sum().clamp_min(1.0)


def caption_dropout(batch: int, prob: float, generator: torch.Generator) -> torch.Tensor | None:
    """Rows ``[batch]`` (bool) that train with the empty prompt this step, or None when ``prob`` is 0: then the
    generator is not drawn from, so runs without caption dropout repeat the runs from before it existed."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"uncond_prob: expected a probability in [0, 1], got {prob}")
    if prob == 0.0:
        return None
    return torch.rand(batch, generator=generator) < prob


@torch.no_grad()
def self_estimates(
    net: StreamingWanTransformer,
    x0: torch.Tensor,
    text_kv,
    stream: StreamConfig,
    max_noise: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The model's clean estimates of ``x0 [B, C, T, h, w]``: each chunk noised to its own level in
    ``[0, max_noise)``, one block-causal pass (each chunk sees the earlier noised chunks, as in diffusion forcing),
    ``x0 = x - sigma * flow``. Data-aligned frames with the model's kind of error (see ``self_context_prob``)."""
    b, _, frames = x0.shape[:3]
    c = stream.chunk_frames
    level = (torch.rand(b, frames // c, generator=generator) * max_noise).repeat_interleave(c, dim=1).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x = sampling.add_noise(x0, noise, level[:, None, :, None, None])
    mask = block_causal_mask(frames, c, stream.sink_frames, stream.window_frames, device=x0.device)
    flow = net.forward_full(x, 1000.0 * level, text_kv, frame_mask=mask)
    return sampling.to_x0(x.float(), flow.float(), level[:, None, :, None, None])


@torch.no_grad()
def loss_per_level(
    net: StreamingWanTransformer,
    x0: torch.Tensor,
    text_kv,
    stream: StreamConfig,
    grid: torch.Tensor,
    generator: torch.Generator,
) -> dict[str, float]:
    """Teacher-forcing loss of a fixed batch with every chunk at one of the stream's noise levels, per level:
    how well the model does exactly where the sampler asks."""
    frames = x0.shape[2]
    mask = teacher_forcing_mask(frames, stream, x0.device)
    out = {}
    for s in grid.tolist():
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        seq = torch.cat([x0, sampling.add_noise(x0, noise, s)], dim=2)
        t = torch.tensor([0.0] * frames + [1000.0 * s] * frames, device=x0.device).expand(x0.shape[0], -1)
        pred = net.forward_full(seq, t, text_kv, frame_mask=mask, frame_positions=list(range(frames)) * 2)
        out[f"{s:.3f}"] = (pred[:, :, frames:].float() - (noise - x0)).pow(2).mean().item()
    return out


# ------------------------------------------------------------------------------------------------------ train


def repatch(wan: WanTransformer3DModel, patch: int) -> WanTransformer3DModel:
    """``wan`` with spatial patch 1 instead of its ``p x p``, as a start for training the finer model: the blocks,
    embedders and modulation are copied; the patch embedding sums its kernel over the ``p x p`` positions (a token
    of a flat region embeds as the coarse token of that region did) and the output projection averages its
    ``p x p`` sub-pixel rows (each fine token predicts what its coarse token predicted on average)."""
    old = wan.config.patch_size
    if patch != 1 or old[0] != 1:
        raise ValueError(
            f"repatch: only spatial patch (1, p, p) -> (1, 1, 1) is supported, got {tuple(old)} -> {patch}"
        )
    config = {k: v for k, v in wan.config.items() if not k.startswith("_")}
    config["patch_size"] = (1, 1, 1)
    new = WanTransformer3DModel(**config).to(next(wan.parameters()).dtype)
    state = wan.state_dict()
    weight = state["patch_embedding.weight"]  # [D, C, 1, p, p]
    state["patch_embedding.weight"] = weight.sum(dim=(3, 4), keepdim=True)
    rows = old[1] * old[2]
    out_w, out_b = state["proj_out.weight"], state["proj_out.bias"]  # [p*p*C, D] in (p_h, p_w, C) order
    state["proj_out.weight"] = out_w.view(rows, -1, out_w.shape[-1]).mean(dim=0)
    state["proj_out.bias"] = out_b.view(rows, -1).mean(dim=0)
    new.load_state_dict(state)
    return new


FRESH_IO_PREFIXES = ("patch_embedding.", "proj_out.")
"""Parameters of ``WanTransformer3DModel`` that touch the latents' channels and patches: all :func:`fresh_io`
starts anew."""


def fresh_io(wan: WanTransformer3DModel, channels: int, patch: int, seed: int = 0) -> WanTransformer3DModel:
    """``wan`` for latents of ``channels`` channels in ``patch x patch`` patches: a new model whose weights are
    ``wan``'s except the patch embedding and the output projection (freshly initialised from ``seed``)."""
    config = {k: v for k, v in wan.config.items() if not k.startswith("_")}
    config.update(patch_size=(1, patch, patch), in_channels=channels, out_channels=channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = WanTransformer3DModel(**config).to(next(wan.parameters()).dtype)
    kept = {k: v for k, v in wan.state_dict().items() if not k.startswith(FRESH_IO_PREFIXES)}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    if unexpected or not all(k.startswith(FRESH_IO_PREFIXES) for k in missing):
        raise ValueError(f"fresh_io: unexpected parameters {unexpected} / {missing}")
    return new


IDENTITY_ZEROED = ("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2.")
"""Parameters of a ``WanTransformerBlock`` whose zeros make the block the identity: each of its three residual
branches (self-attention, cross-attention, feed-forward) ends in one of them."""


def grow_blocks(wan: WanTransformer3DModel, extra: int) -> WanTransformer3DModel:
    """``wan`` with ``extra`` more blocks after its last: copies of the last block with the output projections of
    its three residual branches zeroed, so the new model computes exactly what ``wan`` does until training moves
    them (their inputs and gradients are the trained block's, not random)."""
    if extra < 0:
        raise ValueError(f"grow_layers: expected >= 0, got {extra}")
    if extra == 0:
        return wan
    config = {k: v for k, v in wan.config.items() if not k.startswith("_")}
    config["num_layers"] = wan.config.num_layers + extra
    new = WanTransformer3DModel(**config).to(next(wan.parameters()).dtype)
    state = wan.state_dict()
    last = wan.config.num_layers - 1
    for i in range(wan.config.num_layers, config["num_layers"]):
        for name, value in wan.blocks[last].state_dict().items():
            zero = name.startswith(IDENTITY_ZEROED)
            state[f"blocks.{i}.{name}"] = torch.zeros_like(value) if zero else value.clone()
    new.load_state_dict(state, strict=True)
    return new


def build_models(cfg: DiTTrainConfig, vae: AutoencoderKLWan, vocab_size: int):
    if cfg.init is not None:
        trained, _ = load_trained_for(cfg.init)
        layout = {k: v for k, v in stream_fields(trained).items() if k in LAYOUT_FIELDS}
        wanted = {k: v for k, v in stream_fields(cfg.stream()).items() if k in LAYOUT_FIELDS}
        if layout != wanted:
            raise ValueError(f"init: {cfg.init!r} was trained for the stream layout {layout}, this run has {wanted}")
        folder = pathlib.Path(cfg.init)
        wan = WanTransformer3DModel.from_pretrained(folder / "transformer")
        text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder")
        if cfg.fresh_io:
            wan = fresh_io(wan, vae.config.z_dim, cfg.patch or 2, cfg.seed)
        if wan.config.in_channels != vae.config.z_dim or text_encoder.config.vocab_size != vocab_size:
            raise ValueError(f"init: {cfg.init!r} does not fit this VAE's latents or this tokenizer")
        if cfg.patch is not None and cfg.patch != wan.config.patch_size[-1]:
            wan = repatch(wan, cfg.patch)
        return grow_blocks(wan, cfg.grow_layers).float(), text_encoder.float()
    text_encoder = UMT5EncoderModel(
        UMT5Config(**text_encoder_config(vocab_size, d_model=cfg.text_dim, layers=cfg.text_layers))
    )
    wan = WanTransformer3DModel(
        **transformer_config(
            vae.config.z_dim,
            cfg.text_dim,
            layers=cfg.layers,
            heads=cfg.heads,
            head_dim=cfg.head_dim,
            patch_size=(1, cfg.patch or 2, cfg.patch or 2),
        )
    )
    return wan, text_encoder


def train(cfg: DiTTrainConfig, streams: LatentStreams | None = None) -> dict:
    """Run one transformer training stage; return its log (also written to ``cfg.out/train_log.json``).

    ``streams`` skips rendering and encoding (tests, or several runs over one data set).
    """
    stage_start = time.perf_counter()
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {cfg.objective!r}")
    if cfg.text not in ("train", "frozen"):
        raise ValueError(f"text: expected 'train' or 'frozen', got {cfg.text!r}")
    if cfg.fresh_io and cfg.init is None:
        raise ValueError("fresh_io: keeps an init's blocks; pass init")
    if cfg.pair_weight < 0:
        raise ValueError(f"pair_weight: expected >= 0, got {cfg.pair_weight}")
    if cfg.fg_weight < 0:
        raise ValueError(f"fg_weight: expected >= 0, got {cfg.fg_weight}")
    if cfg.sink_weight <= 0:
        raise ValueError(f"sink_weight: expected > 0, got {cfg.sink_weight}")
    if cfg.grow_layers and cfg.init is None:
        raise ValueError("grow_layers: grows an init's transformer; pass init")
    if not 0.0 <= cfg.single_share <= 1.0:
        raise ValueError(f"single_share: expected a share in [0, 1], got {cfg.single_share}")
    if cfg.single_share and (cfg.pair_weight > 0 or cfg.swap_prob > 0):
        raise ValueError("single_share: not with shape pairs (pair_weight or swap_prob > 0)")
    if not 0.0 <= cfg.swap_prob <= 1.0 or not 0.0 < cfg.swap_min_level <= 1.0:
        raise ValueError(
            f"swap_prob / swap_min_level: expected [0, 1] / (0, 1], got {cfg.swap_prob} / {cfg.swap_min_level}"
        )
    if cfg.swap_prob > 0 and cfg.objective != "teacher":
        raise ValueError("swap_prob: only with the teacher objective")
    paired = cfg.pair_weight > 0 or cfg.swap_prob > 0
    if paired and cfg.batch % 2:
        raise ValueError(f"batch: expected an even batch for shape pairs (pair_weight, swap_prob), got {cfg.batch}")
    stream = cfg.stream()
    check_stream_layout(stream)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    out = pathlib.Path(cfg.out)
    vae = AutoencoderKLWan.from_pretrained(cfg.vae).to(device).eval().requires_grad_(False)

    if streams is None:
        common.log(f"rendering and encoding {cfg.clips} training streams of {cfg.latent_frames} latent frames")
        streams = encode_streams(
            vae,
            cfg.clips,
            cfg.latent_frames,
            cfg.size,
            batch=cfg.encode_batch,
            workers=cfg.workers,
            shape_pairs=paired,
            foreground=cfg.fg_weight > 0,
            single_share=cfg.single_share,
        )
    if paired and not streams.paired:
        raise ValueError("pair_weight, swap_prob > 0: need streams of shape pairs (encode_streams(shape_pairs=True))")
    if cfg.fg_weight > 0 and streams.foreground is None:
        raise ValueError("fg_weight > 0 needs the streams' foreground shares (encode_streams(foreground=True))")
    latents = streams.latents.to(device)
    cell_weights = None
    if cfg.fg_weight > 0:
        near = torch.nn.functional.max_pool3d(streams.foreground.float(), (1, 3, 3), stride=1, padding=(0, 1, 1))
        cell_weights = (1.0 + cfg.fg_weight * near).half().to(device)  # [N, 1, L, h, w]
    data_seconds = time.perf_counter() - stage_start
    std = latents.std().item()
    common.log(f"latents {list(latents.shape)}, std {std:.3f} ({data_seconds:.0f} s)")

    tokenizer = build_tokenizer()
    ids, attn = (t.to(device) for t in tokenize(tokenizer, streams.captions))
    wan, text_encoder = build_models(cfg, vae, len(tokenizer))
    wan, text_encoder = wan.to(device).train(), text_encoder.to(device)
    net = StreamingWanTransformer(wan)
    if cfg.compile is not None:
        net.compile_blocks(backend=cfg.compile)
    trainable = list(wan.parameters())
    if cfg.text == "train":
        text_encoder.train()
        trainable += list(text_encoder.parameters())
    else:
        text_encoder.eval().requires_grad_(False)
        with torch.no_grad():
            frozen_embeds = torch.cat(
                [encode_tokens(text_encoder, i, m) for i, m in zip(ids.split(256), attn.split(256), strict=True)]
            )
    both = torch.nn.ModuleList([wan, text_encoder])
    ema = common.Ema(both, cfg.ema)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    params = sum(p.numel() for p in wan.parameters()), sum(p.numel() for p in text_encoder.parameters())
    common.log(f"transformer {params[0] / 1e6:.2f}M, text encoder {params[1] / 1e6:.2f}M parameters")

    generator = torch.Generator().manual_seed(cfg.seed)
    grid = torch.tensor(sampling.sigmas_for(stream.timesteps, stream.shift), dtype=torch.float32)
    n = latents.shape[0]

    empty_ids, empty_attn = (t.to(device) for t in tokenize(tokenizer, [""]))  # the unconditional prompt
    if cfg.text == "frozen":
        with torch.no_grad():
            empty_embeds = encode_tokens(text_encoder, empty_ids, empty_attn)

    def twin(v: torch.Tensor | None) -> torch.Tensor | None:
        return twin_draw(v, paired)

    def batch_at(rows: torch.Tensor) -> tuple[torch.Tensor, list, torch.Tensor | None]:
        count = len(rows) // 2 if paired else len(rows)
        frames = twin(sequence_frames(count, stream, latents.shape[2], cfg.fresh_prob, generator)).to(device)
        rows = rows.to(device)
        x0 = latents[rows[:, None], :, frames].permute(0, 2, 1, 3, 4)  # [B, C, T, h, w]
        weight = None
        if cell_weights is not None:
            weight = cell_weights[rows[:, None], :, frames].permute(0, 2, 1, 3, 4).float()
        if cfg.sink_weight != 1.0:
            if weight is None:
                weight = torch.ones(x0.shape[0], 1, *x0.shape[2:], device=device)
            weight[:, :, : stream.sink_frames] *= cfg.sink_weight
        drop = twin(caption_dropout(count, cfg.uncond_prob, generator))
        if cfg.text == "train":
            row_ids, row_attn = ids[rows], attn[rows]
            if drop is not None:
                drop = drop.to(device)
                row_ids = torch.where(drop[:, None], empty_ids, row_ids)
                row_attn = torch.where(drop[:, None], empty_attn, row_attn)
            embeds = encode_tokens(text_encoder, row_ids, row_attn)
        else:
            embeds = frozen_embeds[rows]
            if drop is not None:
                embeds = torch.where(drop.to(device)[:, None, None], empty_embeds, embeds)
        return x0, net.text_kv(embeds), weight

    budget = cfg.minutes * 60 * (1 - common.SAVE_RESERVE) - (time.perf_counter() - stage_start)
    plan = common.StepPlan(cfg.steps, budget)
    history, window, pair_window, plain_window, step = [], [], [], [], 0
    first_loss = None
    while not plan.done(step):
        lr = common.lr_at(step, plan.total(step), cfg.lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if paired:  # [first halves | siblings] of batch / 2 pairs
            pairs = 2 * torch.randint(n // 2, (cfg.batch // 2,), generator=generator)
            rows = torch.cat([pairs, pairs + 1])
        else:
            rows = torch.randint(n, (cfg.batch,), generator=generator)
        with common.autocast(device):
            x0, text_kv, weight = batch_at(rows)
            loss, parts = flow_loss(net, x0, text_kv, cfg, stream, grid, generator, paired=paired, cell_weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        ema.update()
        window.append(parts["loss"])
        if paired:
            pair_window.append(parts["pair"])
        if "plain" in parts:
            plain_window.append(parts["plain"])
        first_loss = parts["loss"].item() if first_loss is None else first_loss
        step += 1
        if step % cfg.log_every == 0 or plan.done(step):
            mean = torch.stack(window).mean().item()
            entry = {"step": step, "seconds": plan.elapsed, "lr": lr, "loss": mean}
            pair_text = ""
            if paired:
                entry["pair_loss"] = torch.stack(pair_window).mean().item()
                pair_text = f"  pair {entry['pair_loss']:.4f}"
            if plain_window:
                entry["plain_loss"] = torch.stack(plain_window).mean().item()
                pair_text += f"  plain {entry['plain_loss']:.4f}"
            history.append(entry)
            common.log(f"step {step}/{plan.total(step)}  loss {mean:.4f}{pair_text}  lr {lr:.2e}")
            window, pair_window, plain_window = [], [], []
    train_seconds = plan.elapsed

    final = copy.deepcopy(both)
    ema.copy_to(final)
    final_wan, final_text = final[0].eval(), final[1].eval()
    eval_net = StreamingWanTransformer(final_wan)
    val_gen = torch.Generator().manual_seed(cfg.seed + 1)
    rows = torch.randperm(n, generator=val_gen)[: min(n, 64)].to(device)
    with torch.no_grad(), common.autocast(device):
        frames = sequence_frames(len(rows), stream, latents.shape[2], cfg.fresh_prob, val_gen).to(device)
        x0 = latents[rows[:, None], :, frames].permute(0, 2, 1, 3, 4)
        text_kv = eval_net.text_kv(encode_tokens(final_text, ids[rows], attn[rows]))
        per_level = loss_per_level(eval_net, x0, text_kv, stream, grid, val_gen)
    common.log(f"EMA loss per noise level (teacher forcing, training streams): {per_level}")

    final_wan.save_pretrained(out / "transformer")
    final_text.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    result = {
        "stage": "dit",
        "config": dataclasses.asdict(cfg),
        "stream": stream_fields(stream),
        "parameters": {"transformer": params[0], "text_encoder": params[1]},
        "latent_std": std,
        "planned_steps": plan.total(step),
        "steps": step,
        "stopped_by_time": plan.stopped_by_time,
        "first_loss": first_loss,
        "data_seconds": data_seconds,
        "train_seconds": train_seconds,
        "stage_seconds": time.perf_counter() - stage_start,
        "device": str(device),
        "history": history,
        "ema_loss_per_level": per_level,
    }
    common.write_json(out / LOG_FILE, result)
    common.log(f"saved {out} after {step} steps ({train_seconds:.0f} s of training)")
    return result


def load_trained_for(dit_folder: str | pathlib.Path) -> tuple[StreamConfig, int]:
    """The stream and the resolution a ``train_dit`` output was trained for. Also takes a folder written by
    ``export`` (``assets/tinyworld``: its ``training.json`` keeps the transformer's log), so a training run can
    continue from the shipped model with ``--init assets/tinyworld``."""
    folder = pathlib.Path(dit_folder)
    path, exported = folder / LOG_FILE, folder / EXPORT_LOG_FILE
    if path.is_file():
        log = json.loads(path.read_text())
    elif exported.is_file() and "dit" in json.loads(exported.read_text()):
        log = json.loads(exported.read_text())["dit"]
    else:
        raise ValueError(
            f"dit folder: expected {str(path)!r} (train_dit) or {str(exported)!r} (export): neither exists"
        )
    return stream_from_fields(log["stream"]), int(log["config"]["size"])


def parse_args(argv: list[str] | None = None) -> DiTTrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = DiTTrainConfig(vae="", out="")
    parser.add_argument("--vae", required=True, help="folder of the trained VAE")
    parser.add_argument("--out", required=True, help="folder for the trained transformer and text encoder")
    for field in dataclasses.fields(DiTTrainConfig):
        if field.name in ("vae", "out"):
            continue
        flag = "--" + field.name.replace("_", "-")
        value = getattr(defaults, field.name)
        if field.name in ("steps", "threads", "patch"):
            parser.add_argument(flag, type=int, default=None)
        elif isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        elif field.name == "init":
            parser.add_argument(flag, default=None, help="folder of an earlier run to continue from")
        elif field.name == "compile":
            parser.add_argument(flag, default=None, help="torch.compile backend of the block halves (inductor)")
        elif field.name == "timesteps":
            parser.add_argument(flag, type=float, nargs="+", default=list(value))
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    args["timesteps"] = tuple(args["timesteps"])
    return DiTTrainConfig(**args)


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
