"""The embedded tiny-world captioner: a structured model that reads a window of 64x64 frames and writes the world's
caption.

Colours are unique within a tiny-world scene, so an object *is* its colour. The model therefore answers, for each
of the seven shape colours, "is it there, what shape, what size, how does it move", plus "which background", and
writes the caption with the world's own grammar (:func:`~stream_runtime.pipelines.tinyworld.captions.
format_description`). Present objects are listed in the palette's order (``red, green, blue, yellow, cyan,
magenta, white``): the world's captions list objects in the order the scene was sampled, which no video shows, so
a predicted caption is compared with the truth as a *set* of objects plus the background (see ``evaluate``).

Layers (per frame ``[H, W, 3]`` at ``config.size``; ``K`` palette entries, ``C`` shape colours, ``T`` frames):

* palette front end (no parameters): every pixel's soft assignment to the world's palette,
  ``softmax(-|rgb - palette|^2 / (2 sigma^2))`` -> ``[T, K, H, W]``; the first ``C`` channels are the
  shape-colour masks, the rest the background colours;
* shape encoder (learned, shared by all colours): a small CNN with circular padding (the world is a torus, so a
  shape cut by an edge is seen whole) over ``[mask of this colour, mask of every other shape colour]`` ->
  shape logits ``[3]`` per colour and frame; occluders are in the second channel, so a bitten outline can be
  recognised as such; a window's shape is the mean of its frames' log-probabilities;
* track head (learned, shared by all colours): per-frame mass and circular moments of a colour's mask give its
  area and its displacement between consecutive frames (phase differences of the moments: exact on a torus);
  a dilated 1-D CNN over those ``[T - 1]`` steps, pooled over time, gives presence ``[1]``, size ``[3]`` and
  motion ``[10]`` logits;
* background head (learned): per frame, the background-colour shares of the top, bottom, left and right
  halves -> logits over the 15 backgrounds (3 plain + 6 top/bottom + 6 left/right), mean over the window.

Example::

    model = TinyWorldCaptioner.from_pretrained("assets/tinyworld-captioner")
    prediction = model.predict(frames)     # frames: uint8 [T, 64, 64, 3] RGB, T = config.window_frames
    prediction.caption                      # 'a small red circle moving left on a black background'
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stream_runtime.assets import asset_candidates, find_asset
from stream_runtime.pipelines.tinyworld.captions import format_description
from stream_runtime.pipelines.tinyworld.spec import (
    BACKGROUND_COLOURS,
    LAYOUTS,
    MOTIONS,
    SHAPE_COLOURS,
    SHAPES,
    SIZES,
    WORLD_FPS,
    BackgroundSpec,
    ObjectDescription,
    SceneDescription,
)
from stream_runtime.pipelines.tinyworld.world import DEFAULT_SIZE, MIN_FRAMES_TO_JUDGE_BOUNCE

ASSET_NAME = "tinyworld-captioner"
"""Folder of the shipped weights under the repository's (or the installed package's) ``assets/``."""
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRACK_FEATURES = 9
"""Per-step inputs of the track head: dx, dy, area, area change, |x moment|, |y moment|, cos/sin of the y phase,
and whether the colour is seen in both frames of the step."""
HALVES = 4
"""Background regions: top, bottom, left and right halves of the frame."""


def background_classes() -> list[BackgroundSpec]:
    """Every background of the world, in a fixed order: plain colours, then ordered pairs per two-tone layout."""
    names = list(BACKGROUND_COLOURS)
    classes = [BackgroundSpec((name,), "plain") for name in names]
    for layout in LAYOUTS:
        if layout != "plain":
            classes += [BackgroundSpec((a, b), layout) for a in names for b in names if a != b]
    return classes


@dataclass(frozen=True)
class CaptionerConfig:
    """Sizes of the captioner and the world vocabulary it was trained on (saved as ``config.json``)."""

    window_frames: int = MIN_FRAMES_TO_JUDGE_BOUNCE + 2
    """Frames per caption (24): two more than the world's ``MIN_FRAMES_TO_JUDGE_BOUNCE``, so every window shows a
    bouncing shape turn."""
    size: int = DEFAULT_SIZE
    """Square side (pixels) frames are read at; other sizes are resized to it."""
    fps: float = float(WORLD_FPS)
    """Frame rate the world (and so the window's speeds) is defined at."""
    colour_sigma: float = 32.0
    """Width (RGB units) of the soft palette assignment: shape colours are >= 155 apart, so a clean pixel gets
    ~1 for its colour; antialiased and compressed edges are shared between their neighbours."""
    presence_gate: float = 0.25
    """A colour counts as seen in a frame when its mask covers this share of the smallest shape's area: the
    shape encoder runs on those colours only, and steps of the track head are marked valid."""
    velocity_scale: float = 0.05
    """Displacements (short sides per frame) are divided by this before the track head (bounces reach 0.08)."""
    shape_channels: tuple[int, ...] = (16, 32, 32, 48)
    """Channels of the shape encoder's stride-2 convolutions (64 -> 32 -> 16 -> 8 -> 4 pixels)."""
    track_channels: int = 48
    """Channels of the track head's dilated 1-D convolutions."""
    track_dilations: tuple[int, ...] = (1, 2, 4)
    """Dilations of the track head's kernel-3 convolutions (receptive field 15 steps)."""
    background_hidden: int = 32
    """Hidden width of the background head."""
    shape_colours: tuple[str, ...] = tuple(SHAPE_COLOURS)
    background_colours: tuple[str, ...] = tuple(BACKGROUND_COLOURS)
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = tuple(SIZES)
    motions: tuple[str, ...] = MOTIONS
    smallest_area: float = field(default=math.pi * min(SIZES.values()) ** 2)
    """Area of the smallest shape as a share of the short side squared (areas are read in this unit)."""

    def __post_init__(self) -> None:
        if self.window_frames < 2:
            raise ValueError(f"window_frames: expected >= 2 (motion needs two frames), got {self.window_frames}")
        minimum = 2 ** len(self.shape_channels)
        if self.size < minimum or self.size % minimum:
            raise ValueError(f"size: expected a multiple of {minimum} (the shape encoder's strides), got {self.size}")
        for name, value in (("colour_sigma", self.colour_sigma), ("velocity_scale", self.velocity_scale)):
            if not value > 0:
                raise ValueError(f"{name}: expected > 0, got {value}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CaptionerConfig:
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def check_world(self) -> None:
        """Raise if the saved vocabulary is not the world's (weights trained on another palette or grammar)."""
        world = CaptionerConfig()
        for name in ("shape_colours", "background_colours", "shapes", "sizes", "motions"):
            if getattr(self, name) != getattr(world, name):
                raise ValueError(
                    f"config.{name}: expected the tiny world's {getattr(world, name)}, got {getattr(self, name)}; "
                    "these weights were trained on another version of the world"
                )


@dataclass(frozen=True)
class Prediction:
    """What the captioner read from one window."""

    description: SceneDescription
    """Present objects (palette order) and the background."""
    caption: str
    """``format_description(description)``."""
    present_prob: np.ndarray
    """float [C]: probability that each shape colour is in the window (palette order)."""


@dataclass
class FrameFeatures:
    """Per-frame outputs of the front end and the per-frame heads, for ``T`` frames (see ``frame_features``)."""

    mass: torch.Tensor
    """float [T, C]: mask area of each shape colour, in units of ``smallest_area``."""
    moments: torch.Tensor
    """float [T, C, 4]: mass-normalised circular moments (cos x, sin x, cos y, sin y) of each mask."""
    shape_logprobs: torch.Tensor
    """float [T, C, S]: per-frame shape log-probabilities; 0 where the colour is not seen (``seen`` False)."""
    seen: torch.Tensor
    """bool [T, C]: mass above ``presence_gate``."""
    background_logprobs: torch.Tensor
    """float [T, B]: per-frame background log-probabilities."""


class ShapeEncoder(nn.Module):
    """``[M, 2, H, W]`` (this colour's mask, the other shape colours' masks) -> shape logits ``[M, S]``."""

    def __init__(self, channels: tuple[int, ...], num_shapes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 2
        for out_ch in channels:
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU()]
            in_ch = out_ch
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * in_ch, in_ch), nn.ReLU(), nn.Linear(in_ch, num_shapes))

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        features = self.convs(masks).flatten(2)  # [M, ch, h*w]
        return self.head(torch.cat([features.mean(-1), features.amax(-1)], dim=-1))


class TrackHead(nn.Module):
    """``[M, TRACK_FEATURES, T - 1]`` steps of one colour -> ``[M, 1 + sizes + motions]`` (presence, size, motion)."""

    def __init__(self, channels: int, dilations: tuple[int, ...], num_outputs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = TRACK_FEATURES
        for dilation in dilations:
            layers += [nn.Conv1d(in_ch, channels, 3, padding=dilation, dilation=dilation), nn.ReLU()]
            in_ch = channels
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * channels, channels), nn.ReLU(), nn.Linear(channels, num_outputs))

    def forward(self, steps: torch.Tensor) -> torch.Tensor:
        features = self.convs(steps)  # [M, ch, T - 1]
        return self.head(torch.cat([features.mean(-1), features.amax(-1)], dim=-1))


class TinyWorldCaptioner(nn.Module):
    """The embedded captioner (see the module docstring). Inputs are uint8 RGB frames at ``config.size``."""

    def __init__(self, config: CaptionerConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CaptionerConfig()
        self.backgrounds = background_classes()
        palette = [SHAPE_COLOURS[c] for c in config.shape_colours] + [
            BACKGROUND_COLOURS[c] for c in config.background_colours
        ]
        self.register_buffer("palette", torch.tensor(palette, dtype=torch.float32), persistent=False)  # [K, 3]
        size = config.size
        phase = 2 * math.pi * (torch.arange(size, dtype=torch.float32) + 0.5) / size
        self.register_buffer("phase_table", torch.stack([phase.cos(), phase.sin()], dim=1), persistent=False)
        self.shape_encoder = ShapeEncoder(config.shape_channels, len(config.shapes))
        self.track_head = TrackHead(
            config.track_channels, config.track_dilations, 1 + len(config.sizes) + len(config.motions)
        )
        colours = len(config.background_colours)
        self.background_head = nn.Sequential(
            nn.Linear(HALVES * colours, config.background_hidden),
            nn.ReLU(),
            nn.Linear(config.background_hidden, len(self.backgrounds)),
        )

    # ------------------------------------------------------------------------------------------ front end

    def check_frames(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 ``[T, size, size, 3]`` (numpy or torch) -> the same as a torch tensor; ValueError otherwise."""
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        size = self.config.size
        if (
            not isinstance(frames, torch.Tensor)
            or frames.dtype != torch.uint8
            or tuple(frames.shape[1:]) != (size, size, 3)
        ):
            got = f"{getattr(frames, 'dtype', type(frames).__name__)} {tuple(getattr(frames, 'shape', ()))}"
            raise ValueError(f"frames: expected uint8 [T, {size}, {size}, 3] RGB, got {got}")
        return frames

    def palette_probs(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> soft palette assignment float ``[N, K, H, W]`` (sums to 1 over K)."""
        pixels = frames.permute(0, 3, 1, 2).float()  # [N, 3, H, W]
        scale = 1.0 / (2 * self.config.colour_sigma**2)
        # -|x - p|^2 / (2 sigma^2) up to the per-pixel |x|^2, which softmax over K ignores: a 1x1 convolution.
        weight = (2 * scale * self.palette)[:, :, None, None]  # [K, 3, 1, 1]
        bias = -scale * self.palette.pow(2).sum(-1)  # [K]
        return torch.softmax(F.conv2d(pixels, weight, bias), dim=1)

    def front_end(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter-free per-frame measurements of uint8 ``[N, size, size, 3]`` frames (any N, e.g. ``B * T``):
        ``masks [N, C, H, W]``, ``background [N, G, H, W]`` (palette probabilities), ``mass [N, C]`` (area in
        units of ``smallest_area``), ``moments [N, C, 4]`` (mass-normalised circular moments cos x, sin x, cos y,
        sin y) and ``seen [N, C]`` (mass above ``presence_gate``)."""
        config = self.config
        colours = len(config.shape_colours)
        probs = self.palette_probs(frames)
        masks = probs[:, :colours]
        raw_mass = masks.sum((-1, -2))  # [N, C]
        x_moments = masks.sum(-2) @ self.phase_table  # [N, C, 2]
        y_moments = masks.sum(-1) @ self.phase_table  # [N, C, 2]
        mass = raw_mass / (config.smallest_area * config.size**2)
        return {
            "masks": masks,
            "background": probs[:, colours:],
            "mass": mass,
            "moments": torch.cat([x_moments, y_moments], dim=-1) / raw_mass.clamp_min(1e-6)[..., None],
            "seen": mass > config.presence_gate,
        }

    def frame_features(self, frames: torch.Tensor | np.ndarray) -> FrameFeatures:
        """Everything the window heads need from uint8 ``[T, size, size, 3]`` frames, frame by frame (so a stream
        computes each frame once; see ``CaptionStream``). The shape encoder runs on seen colours only."""
        frames = self.check_frames(frames).to(self.palette.device)
        measured = self.front_end(frames)
        seen = measured["seen"]
        shape_logprobs = torch.zeros(*seen.shape, len(self.config.shapes), device=frames.device)
        frame_index, colour_index = seen.nonzero(as_tuple=True)
        if frame_index.numel():
            logits = self.shape_logits(measured["masks"], frame_index, colour_index)
            shape_logprobs[frame_index, colour_index] = torch.log_softmax(logits, dim=-1)
        background_logprobs = torch.log_softmax(self.background_logits(measured["background"]), dim=-1)
        return FrameFeatures(measured["mass"], measured["moments"], shape_logprobs, seen, background_logprobs)

    def shape_logits(self, masks: torch.Tensor, frame_index: torch.Tensor, colour_index: torch.Tensor) -> torch.Tensor:
        """Shape logits ``[M, S]`` of the (frame, colour) pairs given by the index tensors ``[M]``; ``masks``
        ``[T, C, H, W]``."""
        own = masks[frame_index, colour_index]  # [M, H, W]
        others = masks[frame_index].sum(1) - own
        return self.shape_encoder(torch.stack([own, others], dim=1))

    def background_logits(self, background: torch.Tensor) -> torch.Tensor:
        """``[N, G, H, W]`` background-colour probabilities -> per-frame background logits ``[N, B]``."""
        return self.background_head(self.background_shares(background))

    @staticmethod
    def background_shares(background: torch.Tensor) -> torch.Tensor:
        """``[N, G, H, W]`` background-colour probabilities -> ``[N, HALVES * G]``: each half's colour shares."""
        height, width = background.shape[-2:]
        halves = [
            background[..., : height // 2, :],
            background[..., height // 2 :, :],
            background[..., :, : width // 2],
            background[..., :, width // 2 :],
        ]
        shares = []
        for half in halves:
            total = half.sum((-1, -2))  # [T, G]
            shares.append(total / total.sum(-1, keepdim=True).clamp_min(1e-6))
        return torch.cat(shares, dim=-1)

    # ---------------------------------------------------------------------------------------- window heads

    def track_steps(self, mass: torch.Tensor, moments: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Track-head inputs of windows of ``T`` frames: ``mass [..., T, C]``, ``moments [..., T, C, 4]`` and
        ``seen [..., T, C]`` -> ``[..., C, TRACK_FEATURES, T - 1]``."""
        mass, seen = mass.transpose(-1, -2), seen.transpose(-1, -2)  # [..., C, T]
        moments = moments.transpose(-2, -3)  # [..., C, T, 4]
        x = torch.complex(moments[..., 0], moments[..., 1])
        y = torch.complex(moments[..., 2], moments[..., 3])
        # Phase difference of consecutive circular moments = displacement on the torus as a share of the (square)
        # frame's side, i.e. in short sides per frame, the world's unit of speed.
        dx = torch.angle(x[..., 1:] * x[..., :-1].conj()) / (2 * math.pi)
        dy = torch.angle(y[..., 1:] * y[..., :-1].conj()) / (2 * math.pi)
        valid = (seen[..., 1:] & seen[..., :-1]).float()  # [..., C, T - 1]
        y_unit = y[..., :-1] / y[..., :-1].abs().clamp_min(1e-6)
        steps = [
            dx / self.config.velocity_scale * valid,
            dy / self.config.velocity_scale * valid,
            mass[..., :-1],
            mass[..., 1:] - mass[..., :-1],
            x[..., :-1].abs(),
            y[..., :-1].abs(),
            y_unit.real * valid,
            y_unit.imag * valid,
            valid,
        ]
        return torch.stack(steps, dim=-2)

    def track_logits(self, steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[..., C, TRACK_FEATURES, T - 1]`` -> ``present [..., C]``, ``size [..., C, Z]``, ``motion [..., C, M]``."""
        sizes = len(self.config.sizes)
        out = self.track_head(steps.flatten(0, -3)).unflatten(0, steps.shape[:-2])
        return {"present": out[..., 0], "size": out[..., 1 : 1 + sizes], "motion": out[..., 1 + sizes :]}

    def window_logits(self, features: FrameFeatures) -> dict[str, torch.Tensor]:
        """Logits of one window from its ``T >= 2`` frames' features: ``present [C]``, ``size [C, Z]``,
        ``motion [C, M]``, ``shape [C, S]`` (mean per-frame log-probabilities over frames that see the colour)
        and ``background [B]``."""
        track = self.track_logits(self.track_steps(features.mass, features.moments, features.seen))
        seen = features.seen.float()  # [T, C]
        shape = (features.shape_logprobs * seen[..., None]).sum(0) / seen.sum(0).clamp_min(1.0)[:, None]
        return {**track, "shape": shape, "background": features.background_logprobs.mean(0)}

    def decide(self, logits: dict[str, torch.Tensor]) -> Prediction:
        """Turn a window's logits into a description and its caption (objects in palette order)."""
        config = self.config
        present_prob = torch.sigmoid(logits["present"]).detach().cpu().numpy()
        shape = logits["shape"].argmax(-1).tolist()
        size = logits["size"].argmax(-1).tolist()
        motion = logits["motion"].argmax(-1).tolist()
        objects = tuple(
            ObjectDescription(colour, config.shapes[shape[i]], config.sizes[size[i]], config.motions[motion[i]])
            for i, colour in enumerate(config.shape_colours)
            if present_prob[i] > 0.5
        )
        if not objects:  # the grammar needs one object: name the likeliest colour rather than fail
            i = int(present_prob.argmax())
            objects = (
                ObjectDescription(
                    config.shape_colours[i], config.shapes[shape[i]], config.sizes[size[i]], config.motions[motion[i]]
                ),
            )
        background = self.backgrounds[int(logits["background"].argmax())]
        description = SceneDescription(objects, background)
        return Prediction(description, format_description(description), present_prob)

    @torch.no_grad()
    def predict(self, frames: torch.Tensor | np.ndarray) -> Prediction:
        """Caption one window: uint8 ``[T, size, size, 3]`` RGB frames, ``T >= 2`` (``config.window_frames``
        is what it was trained for)."""
        frames = self.check_frames(frames)
        if frames.shape[0] < 2:
            raise ValueError(f"frames: expected at least 2 frames (motion needs two), got {frames.shape[0]}")
        return self.decide(self.window_logits(self.frame_features(frames)))

    # ----------------------------------------------------------------------------------------------- files

    def save_pretrained(self, folder: str | os.PathLike, extra: dict | None = None) -> None:
        """Write ``config.json`` (+ ``extra`` under ``"training"``) and ``model.safetensors`` into ``folder``."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        payload = {"config": self.config.to_json(), **({"training": extra} if extra else {})}
        (root / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(root / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> TinyWorldCaptioner:
        """Load a folder written by :meth:`save_pretrained` (eval mode, on ``device``)."""
        root = Path(folder)
        if not (root / CONFIG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"captioner: expected {CONFIG_FILE} and {WEIGHTS_FILE} in {str(root)!r} (written by save_pretrained)"
            )
        config = CaptionerConfig.from_json(json.loads((root / CONFIG_FILE).read_text())["config"])
        config.check_world()
        model = cls(config)
        model.load_state_dict(load_file(str(root / WEIGHTS_FILE)))
        return model.to(device).eval()


def default_captioner_path() -> Path:
    """The shipped captioner: ``assets/tinyworld-captioner`` of a source checkout (editable install), or of the
    installed package (``stream_runtime/assets/``, package data of a wheel)."""
    folder = find_asset(ASSET_NAME, WEIGHTS_FILE)
    if folder is None:
        raise FileNotFoundError(
            f"the embedded captioner was not found (looked in {[str(c) for c in asset_candidates(ASSET_NAME)]}); "
            "reinstall the package, or train one: python -m stream_runtime.pipelines.captioner.train --out DIR"
        )
    return folder


def load_captioner(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> TinyWorldCaptioner:
    """The captioner in ``path`` (default: the shipped one, :func:`default_captioner_path`), in eval mode."""
    return TinyWorldCaptioner.from_pretrained(default_captioner_path() if path is None else path, device=device)
