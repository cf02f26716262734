"""Training and evaluation windows for the captioner: rendered tiny-world clips, their targets, and the
degradations a real video path adds (chroma subsampling, JPEG-like compression, noise).

Training draws only training seeds (``world.split_of(seed) == "train"``: not a held-out seed, and no caption
that repeats a held-out caption); evaluation uses the held-out seeds.

Example::

    batch = render_batch(np.random.default_rng([0, step]), count=32, config=CaptionerConfig())
    batch.frames   # uint8 [32, 24, 64, 64, 3]
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from stream_runtime.pipelines.tinyworld.spec import SceneSpec
from stream_runtime.pipelines.tinyworld.world import HELD_OUT_COUNT, render_frames, sample_spec, split_of

from .model import CaptionerConfig, background_classes

START_FRAME_RANGE = 256
"""Windows start anywhere in the first this many frames of a scene's stream (a bounce's phase, a wrap)."""
SEED_SPACE = 1 << 31
"""Training scene seeds are drawn from ``HELD_OUT_COUNT .. SEED_SPACE - 1``."""
IGNORE = -100
"""Target of an attribute of an absent colour (``cross_entropy``'s ignore index)."""
DEGRADATIONS = ("clean", "chroma", "jpeg")
"""What a training window goes through, drawn uniformly: nothing, 4:2:0 chroma subsampling (what H.264 does to
colour), or JPEG at a random quality."""
JPEG_QUALITY = (40, 95)
NOISE_PROBABILITY = 0.3
NOISE_SIGMA = (1.0, 6.0)
"""Gaussian noise (RGB units) added to a share of the windows, on top of the degradation."""


@dataclass
class Batch:
    frames: torch.Tensor
    """uint8 [B, T, H, W, 3] RGB."""
    present: torch.Tensor
    """float [B, C]: 1 where the shape colour is in the scene."""
    shape: torch.Tensor
    """long [B, C]: index into ``config.shapes`` (IGNORE when absent); likewise ``size`` and ``motion``."""
    size: torch.Tensor
    motion: torch.Tensor
    background: torch.Tensor
    """long [B]: index into ``background_classes()``."""
    specs: list[SceneSpec]
    seeds: list[int]
    """The scene seeds (training seeds unless given)."""


def random_train_seed(rng: np.random.Generator) -> int:
    """A uniformly drawn training seed (redrawn while held out or repeating a held-out caption)."""
    while True:
        seed = int(rng.integers(HELD_OUT_COUNT, SEED_SPACE))
        if split_of(seed) == "train":
            return seed


def degrade(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random real-video degradation of uint8 ``[T, H, W, 3]`` RGB frames (see :data:`DEGRADATIONS`)."""
    kind = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
    out = frames
    if kind == "chroma":
        out = np.empty_like(frames)
        height, width = frames.shape[1:3]
        for t, frame in enumerate(frames):
            ycc = cv2.cvtColor(frame, cv2.COLOR_RGB2YCrCb)
            half = cv2.resize(ycc[..., 1:], (width // 2, height // 2), interpolation=cv2.INTER_AREA)
            ycc[..., 1:] = cv2.resize(half, (width, height), interpolation=cv2.INTER_LINEAR)
            out[t] = cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)
    elif kind == "jpeg":
        quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        out = np.empty_like(frames)
        for t, frame in enumerate(frames):
            ok, data = cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
            assert ok
            out[t] = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
    if rng.random() < NOISE_PROBABILITY:
        sigma = rng.uniform(*NOISE_SIGMA)
        out = np.clip(out + rng.normal(0.0, sigma, out.shape), 0, 255).astype(np.uint8)
    return out


def targets(specs: list[SceneSpec], config: CaptionerConfig) -> dict[str, torch.Tensor]:
    """Per-colour targets ``present/shape/size/motion [B, C]`` and ``background [B]`` of scenes."""
    colours = {c: i for i, c in enumerate(config.shape_colours)}
    count = len(specs)
    present = torch.zeros(count, len(colours))
    shape, size, motion = (torch.full((count, len(colours)), IGNORE, dtype=torch.long) for _ in range(3))
    backgrounds = {bg: i for i, bg in enumerate(background_classes())}
    background = torch.empty(count, dtype=torch.long)
    for b, spec in enumerate(specs):
        for s in spec.shapes:
            c = colours[s.colour]
            present[b, c] = 1.0
            shape[b, c] = config.shapes.index(s.shape)
            size[b, c] = config.sizes.index(s.size)
            motion[b, c] = config.motions.index(s.motion)
        background[b] = backgrounds[spec.background]
    return {"present": present, "shape": shape, "size": size, "motion": motion, "background": background}


def render_batch(
    rng: np.random.Generator, count: int, config: CaptionerConfig, augment: bool = True, seeds: list[int] | None = None
) -> Batch:
    """``count`` windows of ``config.window_frames`` frames: random training scenes (or the given ``seeds``) from
    random start frames, degraded when ``augment``. Deterministic in ``rng``'s state."""
    specs, clips, used = [], [], []
    for i in range(count):
        seed = random_train_seed(rng) if seeds is None else seeds[i]
        used.append(seed)
        spec = sample_spec(seed)
        start = int(rng.integers(START_FRAME_RANGE))
        clip = render_frames(spec, start, config.window_frames, config.size, config.size)
        clips.append(degrade(clip, rng) if augment else clip)
        specs.append(spec)
    return Batch(frames=torch.from_numpy(np.stack(clips)), specs=specs, seeds=used, **targets(specs, config))
