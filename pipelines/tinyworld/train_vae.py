"""Stage 1 of the tiny-world model: train its ``AutoencoderKLWan`` on rendered clips.

Usage::

    python -m stream_runtime.pipelines.tinyworld.train_vae --out runs/vae --minutes 10 --device cuda

The loss is L1 reconstruction plus a small KL term on the posterior (so that the decoder tolerates the slightly
off latents a few-step sampler gives). Clips are ``1 + 4k`` frames and go through the encoder and decoder the
way ``AutoencoderKLWan`` runs them (first frame alone, then groups of 4; one latent frame per decoder pass,
causal caches between passes), but with gradients and without the output clamp. After training, the folder's
``latents_mean`` / ``latents_std`` are set from the posterior means of fresh training clips, so that normalised
latents have zero mean and unit variance per channel. The run log ``train_log.json`` also holds the evaluator's
scores on reconstructions of held-out clips: the ceiling for the transformer.

Measured on one H100 (bf16 autocast, 12 rendering workers): ``--batch 48 --frames 9`` runs about 4.9 steps/s,
``--batch 32 --frames 17`` about 3 steps/s. 1,700 steps (two runs chained with ``--init``) reached L1 0.096 and
a 14.5 dB PSNR, short of clean colours: plan several 10-minute runs chained with ``--init``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from stream_runtime.pipelines.wan.vae_stream import CausalConvCache

from . import train_common as common
from .evaluate import evaluate
from .model import NATIVE_SIZE, frames_to_pixels, vae_config
from .train_data import ClipDataset, check_clip_frames, clip_loader, pool_batch, render_pool
from .world import MIN_FRAMES_TO_JUDGE_BOUNCE, caption, held_out_seeds, render, sample_spec

LOG_FILE = "train_log.json"


@dataclass(frozen=True)
class VAETrainConfig:
    """One VAE training run."""

    out: str
    """Folder the trained ``AutoencoderKLWan`` is saved to (diffusers layout) with ``train_log.json``."""
    minutes: float = 10.0
    """Wall-clock budget of the whole stage; training gets what is left after setup minus a reserve."""
    steps: int | None = None
    """Fixed step count (reproducible); None: as many as fit ``minutes``."""
    device: str = "cpu"
    seed: int = 0
    batch: int = 48
    """Clips per step (48 x 9 frames: the measured H100 recipe; use fewer on a CPU)."""
    frames: int = 9
    """Clip length, 1 + 4k: 9 covers the first-frame latent and a steady latent with causal context."""
    size: int = NATIVE_SIZE
    """Render resolution (the model's native one)."""
    crop: int | None = None
    """Train on random crop x crop squares of the rendered frames (None: whole frames)."""
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-4
    """Weight of the mean per-element KL divergence against the L1 loss."""
    fg_weight: float = 0.0
    """Extra weight of foreground (shape) pixels in the L1 loss (see :func:`vae_loss`)."""
    l2_weight: float = 0.0
    """Weight of the squared error beside the L1 (see :func:`vae_loss`)."""
    edge_weight: float = 0.0
    """Weight of the L1 between the reconstruction's and the clip's spatial differences (see :func:`vae_loss`)."""
    base_dim: int = 12
    z_dim: int = 16
    spatial: int = 8
    """Spatial factor of a new VAE (``model.vae_config``): 8 (Wan2.1's) or 4 (16x16 latents at 64x64)."""
    workers: int = 0
    """Rendering processes (DataLoader workers, or the pool's renderers)."""
    pool: int = 0
    """Render this many clips once, keep them on the device and draw batches from them (0: render every batch
    afresh through a DataLoader). On a GPU the pool takes rendering off the step's critical path."""
    precision: str = "bf16"
    """``bf16`` (autocast on CUDA) or ``fp32`` (TF32 matmuls/convs on CUDA); CPU always runs fp32."""
    stats_clips: int = 64
    """Fresh training clips whose posterior means set latents_mean / latents_std."""
    eval_clips: int = 16
    """Held-out clips reconstructed and scored by the evaluator at the end (0: skip)."""
    init: str | None = None
    """Start from the weights of an earlier run's folder (its shape wins over base_dim / z_dim)."""
    freeze_encoder: bool = False
    """Train the decoder only (needs ``init``): the encoder, its latent space and the folder's latents_mean /
    latents_std stay as they are, so a transformer trained on the ``init`` VAE's latents still fits."""
    decoder_base_dim: int | None = None
    """With ``freeze_encoder``: a new decoder of this width (``AutoencoderKLWan``'s ``decoder_base_dim``), trained
    from scratch behind ``init``'s encoder; None keeps ``init``'s decoder."""
    log_every: int = 25


# ------------------------------------------------------------------------------ differentiable encode / decode


def encode_moments(vae: AutoencoderKLWan, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and log-variance ``[B, z, 1 + k, h, w]`` of clips ``[B, 3, 1 + 4k, H, W]``, with gradients.

    Same grouping as ``AutoencoderKLWan._encode`` (the first frame alone, then groups of
    ``scale_factor_temporal``) over one causal cache.
    """
    stride = vae.config.scale_factor_temporal
    check_clip_frames(pixels.shape[2], stride)
    cache = CausalConvCache(vae.encoder)
    groups = [pixels[:, :, :1]] + [pixels[:, :, i : i + stride] for i in range(1, pixels.shape[2], stride)]
    h = vae.quant_conv(torch.cat([cache.run(vae.encoder, g) for g in groups], dim=2))
    mean, logvar = h.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def decode_raw(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """Pixels ``[B, 3, 1 + 4(F - 1), H, W]`` from raw (not normalised) latents ``[B, z, F, h, w]``, with gradients
    and no clamp; one latent frame per decoder pass, as ``AutoencoderKLWan._decode``."""
    cache = CausalConvCache(vae.decoder)
    x = vae.post_quant_conv(z)
    frames = [cache.run(vae.decoder, x[:, :, i : i + 1], first_chunk=i == 0) for i in range(x.shape[2])]
    return torch.cat(frames, dim=2)


def foreground(pixels: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """float ``[B, 1, T, H, W]``: 1 where a pixel's colour differs from its frame's median colour (the
    background's main tone) by more than ``threshold`` in some channel, else 0."""
    median = pixels.flatten(3).median(dim=-1).values[..., None, None]
    return ((pixels - median).abs().amax(dim=1, keepdim=True) > threshold).to(pixels.dtype)


def edge_error(recon: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical pixel differences of ``recon`` and ``pixels`` ``[B, C, T, H, W]``:
    it is large where an edge or a corner is blurred, and zero for any constant colour offset."""

    def grads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (rx, ry), (px, py) = grads(recon), grads(pixels)
    return 0.5 * ((rx - px).abs().mean() + (ry - py).abs().mean())


def vae_loss(
    vae: AutoencoderKLWan,
    pixels: torch.Tensor,
    kl_weight: float,
    generator: torch.Generator | None = None,
    fg_weight: float = 0.0,
    l2_weight: float = 0.0,
    train_encoder: bool = True,
    edge_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1 reconstruction of a posterior sample + ``kl_weight`` * mean KL. Returns (loss, detached parts).

    ``fg_weight`` > 0 weighs the L1 of :func:`foreground` pixels ``1 + fg_weight`` times (normalised so the
    loss keeps its scale): the shapes cover a few percent of a frame, and an unweighted loss first settles on
    the background alone. ``l2_weight`` adds that many times the (equally weighted) squared error: with L1
    alone the VAE settled on tying its red and green outputs (a red shape costs the same L1 as black or grey
    when it comes out black), so red, green and black shapes decoded alike; the squared error's gradient grows
    with the error and separates them (measured: 300 CPU steps of single-frame training, red/green/black all
    decoded black with L1, distinct with ``l2_weight=1``). ``l1`` in the parts stays the plain mean.
    ``train_encoder=False`` encodes without gradients (decoder-only training). ``edge_weight`` adds that many
    times :func:`edge_error`: the shipped decoder rounded the corners of small squares until the evaluator read
    them as circles (34 of its 39 shape errors over the 128 held-out clips), which per-pixel losses barely
    charge for, since the corners are a few pixels.
    """
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        mean, logvar = encode_moments(vae, pixels)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * noise
    recon = decode_raw(vae, z)
    error = (recon.float() - pixels.float()).abs()
    l1 = error.mean()
    weight = 1.0 + fg_weight * foreground(pixels.float()) if fg_weight > 0 else torch.ones_like(error[:, :1])
    per_pixel = error + l2_weight * error.pow(2) if l2_weight > 0 else error
    recon_loss = (per_pixel * weight).mean() / weight.mean()
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).mean()
    loss = recon_loss + kl_weight * kl
    parts = {"l1": l1.detach(), "kl": kl.detach()}
    if edge_weight > 0:
        edge = edge_error(recon.float(), pixels.float())
        loss = loss + edge_weight * edge
        parts["edge"] = edge.detach()
    return loss, parts


def with_new_decoder(vae: AutoencoderKLWan, decoder_base_dim: int) -> AutoencoderKLWan:
    """A VAE with ``vae``'s encoder, ``quant_conv`` and ``post_quant_conv`` (copied) and a freshly initialised
    decoder of width ``decoder_base_dim``; the latent statistics stay, so the latent space is ``vae``'s."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    config["decoder_base_dim"] = decoder_base_dim
    new = AutoencoderKLWan(**config)
    for name in ("encoder", "quant_conv", "post_quant_conv"):
        getattr(new, name).load_state_dict(getattr(vae, name).state_dict())
    return new


# ---------------------------------------------------------------------------------------------- after training


@torch.no_grad()
def measure_latent_stats(vae: AutoencoderKLWan, clips: torch.Tensor, batch: int = 16) -> tuple[list, list]:
    """Per-channel mean and std of the posterior means of ``clips [N, 3, T, H, W]``."""
    means = [encode_moments(vae, c.to(vae.device, vae.dtype))[0].float() for c in clips.split(batch)]
    z = torch.cat(means).transpose(0, 1).flatten(1)  # [z, N * F * h * w]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-4).tolist()


@torch.no_grad()
def reconstruct(vae: AutoencoderKLWan, clips: np.ndarray, batch: int = 8) -> np.ndarray:
    """uint8 clips ``[N, T, H, W, 3]`` (``T = 1 + 4k``) through the VAE: posterior mean, decode, uint8 again."""
    out = []
    for lo in range(0, len(clips), batch):
        mean, _ = encode_moments(vae, frames_to_pixels(clips[lo : lo + batch]).to(vae.device, vae.dtype))
        pixels = decode_raw(vae, mean).float().clamp(-1, 1)
        out.append(((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def reconstruction_report(vae: AutoencoderKLWan, count: int, size: int, batch: int = 8) -> dict:
    """Encode (posterior mode) and decode held-out clips long enough to judge a bounce; PSNR and the evaluator's
    accuracies on the reconstructions."""
    frames = 1 + 4 * -(-(MIN_FRAMES_TO_JUDGE_BOUNCE - 1) // 4)  # 1 + 4k >= 22 -> 25
    specs = [sample_spec(seed) for seed in held_out_seeds()[:count]]
    originals = np.stack([render(s, frames, size, size) for s in specs])
    recon = reconstruct(vae, originals, batch)
    mse = np.mean((recon.astype(np.float64) - originals.astype(np.float64)) ** 2)
    scores = evaluate(list(recon), [caption(s) for s in specs])
    return {
        "clips": count,
        "frames": frames,
        "psnr_db": float(10 * np.log10(255.0**2 / max(mse, 1e-12))),
        **{k: v for k, v in scores.items() if k != "scores"},
    }


# ------------------------------------------------------------------------------------------------------ train


def train(cfg: VAETrainConfig) -> dict:
    """Run one VAE training stage; return its log (also written to ``cfg.out/train_log.json``)."""
    stage_start = time.perf_counter()
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    out = pathlib.Path(cfg.out)
    if cfg.decoder_base_dim is not None and not cfg.freeze_encoder:
        raise ValueError("decoder_base_dim: a new decoder is trained behind a frozen encoder (set freeze_encoder)")
    if cfg.init is not None:
        vae = AutoencoderKLWan.from_pretrained(cfg.init)
        if cfg.decoder_base_dim is not None:
            vae = with_new_decoder(vae, cfg.decoder_base_dim)
        vae = vae.to(device).train()
    elif cfg.freeze_encoder:
        raise ValueError("freeze_encoder: needs init (the VAE whose encoder and latent space to keep)")
    else:
        config = vae_config(base_dim=cfg.base_dim, z_dim=cfg.z_dim, spatial=cfg.spatial)
        vae = AutoencoderKLWan(**config).to(device).train()
    if cfg.freeze_encoder:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    params = sum(p.numel() for p in vae.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    if cfg.precision not in ("bf16", "fp32"):
        raise ValueError(f"precision: expected 'bf16' or 'fp32', got {cfg.precision!r}")
    dataset = ClipDataset(cfg.frames, cfg.size, cfg.crop, cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if cfg.pool > 0:
        pool = render_pool(dataset, cfg.pool, cfg.workers).to(device)
        common.log(
            f"rendered a pool of {cfg.pool} clips ({pool.numel() / 2**30:.2f} GiB) in {common.since(stage_start)}"
        )
        batches = iter(lambda: pool_batch(pool, cfg.batch, generator), None)
    else:
        batches = clip_loader(dataset, cfg.batch, cfg.workers)
    trained = sum(p.numel() for p in trainable)
    common.log(
        f"VAE: {params / 1e6:.2f}M parameters ({trained / 1e6:.2f}M trained), "
        f"batch {cfg.batch} x {cfg.frames} frames on {device}"
    )

    budget = cfg.minutes * 60 * (1 - common.SAVE_RESERVE) - (time.perf_counter() - stage_start)
    plan = common.StepPlan(cfg.steps, budget)
    history, window = [], []
    step = 0
    while not plan.done(step):
        lr = common.lr_at(step, plan.total(step), cfg.lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pixels = next(batches).to(device, non_blocking=True)
        with common.autocast(device, cfg.precision):
            loss, parts = vae_loss(
                vae,
                pixels,
                cfg.kl_weight,
                generator,
                cfg.fg_weight,
                cfg.l2_weight,
                not cfg.freeze_encoder,
                cfg.edge_weight,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        window.append(parts)
        step += 1
        if step % cfg.log_every == 0 or plan.done(step):
            mean = {k: torch.stack([p[k] for p in window]).mean().item() for k in window[0]}
            history.append({"step": step, "seconds": plan.elapsed, "lr": lr, **mean})
            edge = f"  edge {mean['edge']:.4f}" if "edge" in mean else ""
            common.log(f"step {step}/{plan.total(step)}  l1 {mean['l1']:.4f}{edge}  kl {mean['kl']:.3f}  lr {lr:.2e}")
            window = []
    train_seconds = plan.elapsed

    vae.eval()
    if cfg.freeze_encoder:  # same encoder: keep the statistics a transformer was trained with
        latents_mean, latents_std = list(vae.config.latents_mean), list(vae.config.latents_std)
    else:
        stats_set = ClipDataset(cfg.frames, cfg.size, None, seed=cfg.seed + 1)
        clips = torch.stack([stats_set.clip(i) for i in range(cfg.stats_clips)])
        latents_mean, latents_std = measure_latent_stats(vae, clips)
        vae.register_to_config(latents_mean=latents_mean, latents_std=latents_std)
    report = reconstruction_report(vae, cfg.eval_clips, cfg.size) if cfg.eval_clips else None
    vae.save_pretrained(out)
    result = {
        "stage": "vae",
        "config": dataclasses.asdict(cfg),
        "parameters": params,
        "planned_steps": plan.total(step),
        "steps": step,
        "stopped_by_time": plan.stopped_by_time,
        "train_seconds": train_seconds,
        "stage_seconds": time.perf_counter() - stage_start,
        "device": str(device),
        "latents_mean": latents_mean,
        "latents_std": latents_std,
        "history": history,
        "reconstruction": report,
    }
    common.write_json(out / LOG_FILE, result)
    if report:
        common.log(
            f"held-out reconstructions: PSNR {report['psnr_db']:.1f} dB, colour {report['colour_accuracy']:.2f}, "
            f"shape {report['shape_accuracy']:.2f}, motion {report['motion_accuracy']:.2f}"
        )
    common.log(f"saved {out} after {step} steps ({train_seconds:.0f} s of training)")
    return result


def parse_args(argv: list[str] | None = None) -> VAETrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = VAETrainConfig(out="")
    parser.add_argument("--out", required=True, help="folder for the trained VAE")
    parser.add_argument("--minutes", type=float, default=defaults.minutes)
    parser.add_argument("--steps", type=int, default=None, help="fixed step count (default: fit --minutes)")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--frames", type=int, default=defaults.frames)
    parser.add_argument("--size", type=int, default=defaults.size)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    parser.add_argument("--fg-weight", type=float, default=defaults.fg_weight)
    parser.add_argument("--l2-weight", type=float, default=defaults.l2_weight)
    parser.add_argument("--edge-weight", type=float, default=defaults.edge_weight)
    parser.add_argument("--base-dim", type=int, default=defaults.base_dim)
    parser.add_argument("--z-dim", type=int, default=defaults.z_dim)
    parser.add_argument("--spatial", type=int, choices=(8, 4), default=defaults.spatial, help="spatial factor")
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--pool", type=int, default=defaults.pool)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=defaults.precision)
    parser.add_argument("--stats-clips", type=int, default=defaults.stats_clips)
    parser.add_argument("--eval-clips", type=int, default=defaults.eval_clips)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--init", default=None, help="folder of an earlier run to continue from")
    parser.add_argument(
        "--freeze-encoder", action="store_true", help="train the decoder only (keeps --init's latent space)"
    )
    parser.add_argument(
        "--decoder-base-dim", type=int, default=None, help="with --freeze-encoder: a new decoder of this width"
    )
    args = parser.parse_args(argv)
    return VAETrainConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()})


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
