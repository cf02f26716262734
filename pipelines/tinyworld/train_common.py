"""Pieces the tiny-world training stages share: device and seeding, a step plan that fits a time budget, the
learning-rate schedule, an EMA of weights and the JSON run log.

A stage is reproducible from its seed when the number of steps is fixed: with only ``--minutes`` a stage times
its first steps, fixes the step count from that, and writes it to its log (``planned_steps``), so that
``--steps N`` repeats the run exactly on the same device and software.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

PROBE_STEPS = 8
"""Steps timed before the step count is fixed from the time budget (the learning-rate warm-up covers them)."""
UNTIMED_STEPS = 2
"""First steps left out of the timing: they include one-off costs (kernel selection, allocator growth), which
on a CPU can be tens of times a normal step."""
SAVE_RESERVE = 0.1
"""Share of a stage's time budget kept for what follows the training loop (statistics, evaluation, saving)."""


def pick_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``); a ValueError when CUDA is asked for and absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} was asked for, but this machine has no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {name!r}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # every step has the same conv shapes
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA (the tiny models train in fp32 master weights), nothing on CPU or for ``fp32``."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps (at most a fifth of ``total``), then a cosine down to a tenth of
    ``peak`` at ``total``."""
    warmup = max(1, min(warmup, total // 5))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class StepPlan:
    """How many steps a stage runs: ``steps`` if given, else as many as fit ``budget_s`` at the speed of the
    first :data:`PROBE_STEPS` steps. ``done(step)`` also stops a run that outlasts the budget (slower later
    steps, a busy machine); the log then says so."""

    def __init__(self, steps: int | None, budget_s: float) -> None:
        if steps is not None and steps < 1:
            raise ValueError(f"steps: expected >= 1 or None, got {steps}")
        if budget_s <= 0:
            raise ValueError(f"minutes: the time budget left for training is {budget_s:.0f} s; give more minutes")
        self.steps = steps
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.stopped_by_time = False
        self._timed_from: tuple[int, float] | None = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def total(self, step: int) -> int:
        """The planned step count (a provisional estimate during the probe steps)."""
        if self._timed_from is None and step >= UNTIMED_STEPS:
            self._timed_from = (step, self.elapsed)
        if self.steps is None and step >= PROBE_STEPS:
            first, at = self._timed_from
            per_step = (self.elapsed - at) / max(1, step - first)
            self.steps = max(step, step + int((self.budget_s - self.elapsed) / per_step))
        return self.steps if self.steps is not None else max(PROBE_STEPS, 1_000_000)

    def done(self, step: int) -> bool:
        if step >= self.total(step):
            return True
        if self.elapsed > self.budget_s:
            self.stopped_by_time = True
            return True
        return False


class Ema:
    """Exponential moving average of a module's parameters (kept in fp32), with a warm-up so that short runs
    are not dominated by the initial weights: decay at step n is ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay: expected 0 <= decay < 1, got {decay}")
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the averaged weights into ``module`` (a copy of the trained one)."""
        params = [p for p in module.parameters() if p.requires_grad]
        if len(params) != len(self.shadow):
            raise ValueError(f"module: expected {len(self.shadow)} trainable parameters, got {len(params)}")
        for p, s in zip(params, self.shadow, strict=True):
            p.copy_(s.to(p.dtype))


def write_json(path: str | pathlib.Path, data: dict[str, Any]) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")


def since(start: float) -> str:
    """Seconds since ``start`` (a ``time.perf_counter()`` value), formatted for a log line."""
    return f"{time.perf_counter() - start:.0f} s"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
