"""Training data of the tiny-world model: rendered clips for the VAE, encoded latent streams for the transformer.

Only training seeds (:func:`world.train_seeds`) are ever rendered here; the held-out prompts stay unseen.

Example::

    clips = ClipDataset(frames=9, size=64, seed=0)          # endless float [3, 9, 64, 64] clips in [-1, 1]
    streams = encode_streams(vae, count=512, latent_frames=12)  # LatentStreams: [512, z, 12, 8, 8] + captions
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from stream_runtime.pipelines.wan.vae_stream import StreamingVAEEncoder

from .model import NATIVE_SIZE, frames_to_pixels
from .spec import SHAPE_COLOURS, SHAPES, SceneSpec
from .world import (
    HELD_OUT_COUNT,
    background_frame,
    caption,
    held_out_captions,
    render,
    render_frames,
    sample_spec,
    split_of,
    train_seeds,
)

START_FRAME_RANGE = 256
"""VAE clips start anywhere in the first this many frames of a scene's stream (the first frame of a clip is
encoded alone whatever it shows, so it need not be the scene's frame 0)."""
SEED_SPACE = 1 << 31
"""VAE clips draw their scene seeds from ``HELD_OUT_COUNT .. SEED_SPACE - 1``."""


def random_train_seed(rng: np.random.Generator) -> int:
    """A uniformly drawn training seed (redrawn while it is held out or repeats a held-out caption)."""
    while True:
        seed = int(rng.integers(HELD_OUT_COUNT, SEED_SPACE))
        if split_of(seed) == "train":
            return seed


def check_clip_frames(frames: int, temporal_factor: int = 4) -> None:
    if frames < 1 or (frames - 1) % temporal_factor:
        raise ValueError(
            f"frames: expected 1 + {temporal_factor}k frames (the VAE's first frame is alone), got {frames}"
        )


class ClipDataset(torch.utils.data.IterableDataset):
    """Endless clips ``float [3, frames, crop, crop]`` in [-1, 1] from training seeds, deterministic in ``seed``.

    Each clip is a random training scene from a random start frame, rendered at ``size`` and, with ``crop``,
    cut to a random ``crop x crop`` square (the VAE is convolutional: crops train it on a quarter of the pixels
    at the same object scale). With DataLoader workers, worker ``i`` of ``n`` takes every n-th clip, so the
    stream of clips is the same for any worker count.
    """

    def __init__(self, frames: int, size: int = NATIVE_SIZE, crop: int | None = None, seed: int = 0) -> None:
        check_clip_frames(frames)
        if crop is not None and not 8 <= crop <= size:
            raise ValueError(f"crop: expected None or 8 <= crop <= size ({size}), got {crop}")
        self.frames, self.size, self.crop, self.seed = frames, size, crop, seed

    def clip_frames(self, index: int) -> np.ndarray:
        """The ``index``-th clip as rendered: uint8 ``[frames, crop, crop, 3]`` (RGB), numpy only."""
        rng = np.random.default_rng([self.seed, index])
        scene = sample_spec(random_train_seed(rng))
        start = int(rng.integers(START_FRAME_RANGE))
        frames = render_frames(scene, start, self.frames, self.size, self.size)
        if self.crop is not None and self.crop < self.size:
            top, left = (int(v) for v in rng.integers(0, self.size - self.crop + 1, size=2))
            frames = frames[:, top : top + self.crop, left : left + self.crop]
        return frames

    def clip(self, index: int) -> torch.Tensor:
        """The ``index``-th clip of the stream (what iteration yields at that position)."""
        return frames_to_pixels(self.clip_frames(index))

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in itertools.count(worker, workers):
            yield self.clip(index)


def single_threaded_worker() -> None:
    """Initializer of rendering processes: one thread each for torch and OpenCV. Many workers that each start a
    full-width OpenMP pool oversubscribe the cores; on a 16-core machine that made rendering stall."""
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _render_clips(args: tuple[int, int, int | None, int, range]) -> np.ndarray:
    frames, size, crop, seed, indices = args
    dataset = ClipDataset(frames, size, crop, seed)
    return np.stack([dataset.clip_frames(i) for i in indices])


def render_pool(dataset: ClipDataset, count: int, workers: int = 0, group: int = 256) -> torch.Tensor:
    """The first ``count`` clips of ``dataset`` as uint8 ``[count, T, H, W, 3]`` (``pool_batch`` turns rows into
    exactly what ``dataset.clip`` gives), rendered ``group`` clips per job in ``workers`` spawned processes.

    A pool held on the GPU feeds a training step without a DataLoader: at 64x64 a 9-frame clip is 110 KB, so
    16,384 clips take 1.8 GB.
    """
    jobs = [
        (dataset.frames, dataset.size, dataset.crop, dataset.seed, range(lo, min(lo + group, count)))
        for lo in range(0, count, group)
    ]
    if workers > 0:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=single_threaded_worker) as pool:
            parts = list(pool.map(_render_clips, jobs))
    else:
        parts = [_render_clips(job) for job in jobs]
    return torch.from_numpy(np.concatenate(parts))


def pool_batch(pool: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch ``[batch, 3, T, H, W]`` of pool clips as float in [-1, 1] on the pool's device."""
    rows = torch.randint(pool.shape[0], (batch,), generator=generator, device=generator.device)
    return frames_to_pixels(pool[rows.to(pool.device)])


def clip_loader(dataset: ClipDataset, batch: int, workers: int) -> Iterator[torch.Tensor]:
    """Endless batches ``[batch, 3, T, H, W]``."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    return iter(loader)


# --------------------------------------------------------------------------------------------- latents


def stream_pixel_frames(latent_frames: int, temporal_factor: int = 4) -> int:
    """Video frames that encode to ``latent_frames`` latent frames from a stream's start (1 + 4(n - 1))."""
    return 1 + temporal_factor * (latent_frames - 1)


def shapes_rotated(spec: SceneSpec, k: int) -> SceneSpec:
    """``spec`` with every object's shape moved ``k`` places along :data:`SHAPES` (circle -> square -> triangle
    for ``k = 1``), all else equal: colours, sizes, motions, positions, speeds and background. The shapes have
    equal areas at one size, so the two clips differ only along the objects' outlines."""
    shapes = tuple(dataclasses.replace(s, shape=SHAPES[(SHAPES.index(s.shape) + k) % len(SHAPES)]) for s in spec.shapes)
    return SceneSpec(shapes, spec.background)


def colours_rotated(spec: SceneSpec, k: int) -> SceneSpec:
    """``spec`` with every object's colour moved ``k`` places along the shape colours (a cyclic shift, so the scene's
    colours stay distinct), all else equal: the colour counterpart of :func:`shapes_rotated`, for probes."""
    names = list(SHAPE_COLOURS)
    shapes = tuple(dataclasses.replace(s, colour=names[(names.index(s.colour) + k) % len(names)]) for s in spec.shapes)
    return SceneSpec(shapes, spec.background)


def shape_sibling(seed: int) -> int | None:
    """The rotation ``k`` (1 or 2) of :func:`shapes_rotated` that makes the training scene ``seed``'s shape
    sibling: the first whose caption is not a held-out caption, or None when both are (the seed is skipped)."""
    spec = sample_spec(seed)
    for k in range(1, len(SHAPES)):
        if caption(shapes_rotated(spec, k)) not in held_out_captions():
            return k
    return None


FOREGROUND_THRESHOLD = 24
"""A pixel is foreground when a channel differs from the scene's background by more than this (uint8 levels):
shapes and most of their antialiased edge pixels, never the background itself."""


def foreground_shares(clip: np.ndarray, background: np.ndarray, spatial: int, temporal: int = 4) -> np.ndarray:
    """Share of foreground pixels in each latent cell of a stream ``clip`` (uint8 ``[1 + temporal(L - 1), H, W,
    3]`` from its frame 0) drawn over ``background`` (``[H, W, 3]``): float32 ``[L, H / spatial, W / spatial]``.

    Latent frame 0 covers video frame 0 alone and latent frame ``j`` frames ``4j - 3 .. 4j`` (the causal VAE's
    grouping); a cell covers ``spatial x spatial`` pixels."""
    frames, height, width = clip.shape[:3]
    if (frames - 1) % temporal or height % spatial or width % spatial:
        raise ValueError(
            f"clip: expected 1 + {temporal}k frames of sides divisible by {spatial}, got {list(clip.shape)}"
        )
    fg = np.abs(clip.astype(np.int16) - background.astype(np.int16)).max(axis=-1) > FOREGROUND_THRESHOLD
    fg = fg.astype(np.float32)
    groups = np.concatenate([fg[:1], fg[1:].reshape(-1, temporal, height, width).mean(axis=1)])
    return groups.reshape(len(groups), height // spatial, spatial, width // spatial, spatial).mean(axis=(2, 4))


def _render_stream(args: tuple[int, int, int, int, int]) -> tuple[np.ndarray, str, np.ndarray | None]:
    seed, frames, size, rotation, spatial = args
    spec = sample_spec(seed)
    if rotation:
        spec = shapes_rotated(spec, rotation)
    clip = render(spec, frames, size, size)
    shares = foreground_shares(clip, background_frame(spec, size, size), spatial) if spatial else None
    return clip, caption(spec), shares


@dataclass
class LatentStreams:
    """Encoded training streams, each from its scene's frame 0."""

    latents: torch.Tensor
    """float ``[N, z_dim, L, h, w]``: normalised latents (posterior mode), what the transformer generates."""
    captions: list[str]
    """The N captions."""
    seeds: list[int]
    """The N training seeds (with ``paired``, each twice)."""
    paired: bool = False
    """Rows ``2i`` and ``2i + 1`` are a scene and its shape sibling (:func:`shapes_rotated`)."""
    foreground: torch.Tensor | None = None
    """float16 ``[N, 1, L, h, w]`` or None: each latent cell's share of foreground (shape) pixels
    (:func:`foreground_shares`), for the foreground-weighted loss (``train_dit --fg-weight``)."""


@torch.no_grad()
def encode_streams(
    vae: AutoencoderKLWan,
    count: int,
    latent_frames: int,
    size: int = NATIVE_SIZE,
    batch: int = 64,
    workers: int = 0,
    first_seed: int = 0,
    shape_pairs: bool = False,
    foreground: bool = False,
    single_share: float = 0.0,
) -> LatentStreams:
    """Render ``count`` training scenes (training seeds from the ``first_seed``-th on) for ``latent_frames``
    latent frames and encode them with ``vae`` through the streaming encoder (the path a video input takes).

    ``shape_pairs``: ``count`` (even) rows of ``count / 2`` scenes, each followed by its shape sibling
    (:func:`shape_sibling`; seeds without one are skipped). ``workers`` > 0 renders in that many processes
    (spawned: the parent may hold a CUDA context), a batch at a time, so memory holds one batch of video.
    ``foreground``: also each latent cell's share of shape pixels (``LatentStreams.foreground``).
    ``single_share``: the first ``round(count * single_share)`` rows are one-object training scenes (the next
    training seeds whose scene has one shape), the rest the usual seeds after them. Latents are returned on the CPU.
    """
    if not 0.0 <= single_share <= 1.0 or (single_share and shape_pairs):
        raise ValueError(f"single_share: expected a share in [0, 1], without shape_pairs, got {single_share}")
    spatial = vae.config.scale_factor_spatial if foreground else 0
    frames = stream_pixel_frames(latent_frames, vae.config.scale_factor_temporal)
    if shape_pairs:
        if count % 2:
            raise ValueError(f"count: expected an even number of rows for shape pairs, got {count}")
        siblings = ((s, shape_sibling(s)) for s in train_seeds(first_seed))
        chosen = list(itertools.islice(((s, k) for s, k in siblings if k is not None), count // 2))
        seeds = [s for s, _ in chosen for _ in (0, 1)]
        jobs = [(s, frames, size, r, spatial) for s, k in chosen for r in (0, k)]
    else:
        ones = (s for s in train_seeds(first_seed) if len(sample_spec(s).shapes) == 1)
        seeds = list(itertools.islice(ones, round(count * single_share)))
        taken = set(seeds)
        seeds += list(itertools.islice((s for s in train_seeds(first_seed) if s not in taken), count - len(seeds)))
        jobs = [(s, frames, size, 0, spatial) for s in seeds]
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=single_threaded_worker) if workers else None
    rendered = pool.map(_render_stream, jobs, chunksize=16) if pool else map(_render_stream, jobs)
    latents, captions, shares = [], [], []
    try:
        while True:
            group = list(itertools.islice(rendered, batch))
            if not group:
                break
            pixels = frames_to_pixels(np.stack([clip for clip, _, _ in group])).to(device=vae.device, dtype=vae.dtype)
            latents.append(StreamingVAEEncoder(vae).encode(pixels).float().cpu())
            captions.extend(text for _, text, _ in group)
            if foreground:
                shares.append(torch.from_numpy(np.stack([share for _, _, share in group]))[:, None].half())
    finally:
        if pool:
            pool.shutdown()
    latents = torch.cat(latents)
    fg = torch.cat(shares) if foreground else None
    if fg is not None and fg.shape[2:] != latents.shape[2:]:
        raise RuntimeError(f"foreground shares {list(fg.shape)} do not match the latents {list(latents.shape)}")
    return LatentStreams(latents, captions, seeds, paired=shape_pairs, foreground=fg)
