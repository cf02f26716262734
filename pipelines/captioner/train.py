"""Train the embedded tiny-world captioner on clips rendered on the fly from training seeds.

Usage (what produced ``assets/tinyworld-captioner``; one CPU thread)::

    python -m stream_runtime.pipelines.captioner.train --out runs/captioner --minutes 25 --seed 0
    python -m stream_runtime.pipelines.captioner.train --out runs/captioner --steps N --seed 0   # repeat exactly

With only ``--minutes`` the step count is fixed from the speed of the first steps and written to
``config.json`` (``training.planned_steps``); ``--steps`` with the same seed repeats the run. Every batch is
a function of ``(seed, step)``: windows of random training scenes from random start frames, each degraded at
random (``data.degrade``). Losses: presence (binary), size and motion (track head, present colours), shape
(shape encoder on ``--shape-frames`` random frames per window, colours seen there) and background (every frame).
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from stream_runtime.pipelines.tinyworld.train_common import Ema, StepPlan, log, lr_at, seed_everything

from .data import IGNORE, Batch, render_batch
from .model import CaptionerConfig, TinyWorldCaptioner

LOG_EVERY = 50
WARMUP_STEPS = 100
EMA_DECAY = 0.995
WEIGHT_DECAY = 1e-4
GRAD_CLIP = 1.0


def losses(model: TinyWorldCaptioner, batch: Batch, shape_frames: int, generator: torch.Generator) -> dict:
    """Training losses of one batch (see the module docstring); ``"total"`` is their sum."""
    frames = batch.frames
    count, window = frames.shape[:2]
    with torch.no_grad():  # the front end has no parameters
        measured = model.front_end(frames.flatten(0, 1))
    mass, moments, seen = (measured[k].unflatten(0, (count, window)) for k in ("mass", "moments", "seen"))
    track = model.track_logits(model.track_steps(mass, moments, seen))
    out = {
        "present": F.binary_cross_entropy_with_logits(track["present"], batch.present),
        "size": F.cross_entropy(track["size"].flatten(0, 1), batch.size.flatten(), ignore_index=IGNORE),
        "motion": F.cross_entropy(track["motion"].flatten(0, 1), batch.motion.flatten(), ignore_index=IGNORE),
    }
    # Shape: a few random frames per window, every present colour seen in them.
    picked = torch.randint(window, (count, shape_frames), generator=generator)
    rows = (torch.arange(count)[:, None] * window + picked).flatten()  # [count * shape_frames] flat frame index
    owner = rows // window
    usable = measured["seen"][rows] & (batch.shape[owner] != IGNORE)  # [count * shape_frames, C]
    pair, colour = usable.nonzero(as_tuple=True)
    logits = model.shape_logits(measured["masks"], rows[pair], colour)
    out["shape"] = F.cross_entropy(logits, batch.shape[owner[pair], colour])
    background = model.background_logits(measured["background"])  # [count * window, B]
    out["background"] = F.cross_entropy(background, batch.background.repeat_interleave(window))
    out["total"] = sum(out.values())
    return out


@torch.no_grad()
def window_accuracy(model: TinyWorldCaptioner, batch: Batch) -> float:
    """Share of windows whose predicted description equals the truth (set of objects + background)."""
    from .evaluate import same_scene

    hits = [
        same_scene(model.predict(clip).description, spec) for clip, spec in zip(batch.frames, batch.specs, strict=True)
    ]
    return float(np.mean(hits))


def train(
    out: str,
    steps: int | None = None,
    minutes: float = 25.0,
    batch: int = 32,
    lr: float = 2e-3,
    shape_frames: int = 3,
    seed: int = 0,
    threads: int = 1,
    config: CaptionerConfig | None = None,
    check_windows: int = 64,
) -> dict:
    """Train, then save the EMA weights to ``out`` (``save_pretrained`` layout). Returns the training log."""
    if batch < 1 or shape_frames < 1:
        raise ValueError(f"batch, shape_frames: expected >= 1, got {batch}, {shape_frames}")
    torch.set_num_threads(threads)
    import cv2

    cv2.setNumThreads(1)
    seed_everything(seed)
    config = config or CaptionerConfig()
    model = TinyWorldCaptioner(config)
    ema_model = copy.deepcopy(model)
    ema = Ema(model, EMA_DECAY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(seed)
    check = render_batch(np.random.default_rng([seed, 1 << 30]), check_windows, config, augment=False)
    plan = StepPlan(steps, minutes * 60.0)
    history, step, started = [], 0, time.perf_counter()
    running: dict[str, float] = {}
    logged = 0
    while not plan.done(step):
        total = plan.total(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, lr, WARMUP_STEPS)
        data = render_batch(np.random.default_rng([seed, step]), batch, config)
        parts = losses(model, data, shape_frames, generator)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        ema.update()
        for key, value in parts.items():
            running[key] = running.get(key, 0.0) + float(value.detach())
        logged += 1
        step += 1
        if step % LOG_EVERY == 0 or plan.done(step):
            means = {k: round(v / logged, 4) for k, v in running.items()}
            running, logged = {}, 0
            entry = {"step": step, "seconds": round(time.perf_counter() - started, 1), **means}
            if step % (LOG_EVERY * 10) == 0:
                ema.copy_to(ema_model)
                entry["check_accuracy"] = window_accuracy(ema_model.eval(), check)
            history.append(entry)
            log(" ".join(f"{k}={v}" for k, v in entry.items()))
    ema.copy_to(ema_model)
    ema_model.eval()
    summary = {
        "seed": seed,
        "planned_steps": step,
        "batch": batch,
        "lr": lr,
        "shape_frames": shape_frames,
        "threads": threads,
        "stopped_by_time": plan.stopped_by_time,
        "seconds": round(time.perf_counter() - started, 1),
        "check_accuracy_train_seeds": window_accuracy(ema_model, check),
        "history": history,
    }
    ema_model.save_pretrained(out, extra=summary)
    log(f"saved {out}: {step} steps, check accuracy {summary['check_accuracy_train_seeds']:.3f}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    parser.add_argument("--steps", type=int, default=None, help="exact step count (default: fit --minutes)")
    parser.add_argument("--minutes", type=float, default=25.0, help="time budget when --steps is not given")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--shape-frames", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    return train(
        args.out,
        steps=args.steps,
        minutes=args.minutes,
        batch=args.batch,
        lr=args.lr,
        shape_frames=args.shape_frames,
        seed=args.seed,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
