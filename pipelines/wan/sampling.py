"""Flow-matching arithmetic of the distilled few-step Wan models (Self-Forcing, CausVid, LongLive, SDv2).

Convention (Wan): ``x_t = (1 - sigma) * x0 + sigma * noise``, the network predicts the flow ``noise - x0`` at
timestep ``1000 * sigma``. A step list such as ``[1000, 750, 500, 250]`` is given before the shift and mapped
through ``sigma' = shift * s / (1 + (shift - 1) * s)`` with ``s = t / 1000``, as the reference systems' warped
step lists do.
"""

from __future__ import annotations

import torch

from stream_runtime.config import SAMPLERS


def shifted_sigma(t: float | torch.Tensor, shift: float) -> float | torch.Tensor:
    """Noise level for a step ``t`` on the 0..1000 scale after the time shift."""
    s = t / 1000.0
    return shift * s / (1.0 + (shift - 1.0) * s)


def sigmas_for(timesteps: tuple[float, ...], shift: float, strength: float | torch.Tensor = 1.0) -> list:
    """Shifted noise levels of a step list; ``strength`` scales the steps (video-to-video)."""
    return [shifted_sigma(t * strength, shift) for t in timesteps]


def to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma) -> torch.Tensor:
    """Clean estimate from a noisy sample and the predicted flow."""
    return x_t - sigma * flow.to(x_t.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Noisy sample at level ``sigma`` (scalar or broadcastable tensor)."""
    return (1.0 - sigma) * x0 + sigma * noise


def next_sample(x0, x, flow, sigma, sigma_next, noise: torch.Tensor, sampler: str = "renoise") -> torch.Tensor:
    """The input of the next denoising step, at ``sigma_next``, from this step's input ``x`` at ``sigma``, its
    clean estimate ``x0`` and predicted ``flow``.

    ``renoise`` (the distilled few-step models: Self-Forcing, CausVid, SDv2) noises ``x0`` again with fresh
    ``noise``. ``euler`` carries the noise the network saw (``x + (1 - sigma) * flow``) to the next level: one
    Euler step of the flow ODE, the sampler of models trained by plain flow matching (the tiny-world model),
    whose ``x0`` at high noise is a blurred average that fresh noise would not sharpen. ``noise`` is drawn by the
    caller either way, so a stream consumes its random numbers alike under both samplers.
    """
    if sampler == "euler":
        return add_noise(x0, x + (1.0 - sigma) * flow.to(x.dtype), sigma_next)
    if sampler != "renoise":
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    return add_noise(x0, noise, sigma_next)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation per token between embeddings ``a`` and ``b`` (falls back to linear when parallel
    or when either is zero, e.g. the zero padding of prompt embeddings)."""
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(dim=-1, keepdim=True), b32.norm(dim=-1, keepdim=True)
    cos = ((a32 * b32).sum(-1, keepdim=True) / (na * nb).clamp_min(eps)).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    lin = (1 - w) * a32 + w * b32
    sl = (torch.sin((1 - w) * omega) * a32 + torch.sin(w * omega) * b32) / so.clamp_min(eps)
    use_lin = (so < 1e-4) | (na < eps) | (nb < eps)
    return torch.where(use_lin, lin, sl).to(a.dtype)
