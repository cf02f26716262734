"""Flow-matching arithmetic of the distilled few-step Wan models (Self-Forcing, CausVid, LongLive, SDv2).

Convention (Wan): ``x_t = (1 - sigma) * x0 + sigma * noise``, the network predicts the flow ``noise - x0`` at
timestep ``1000 * sigma``. A step list such as ``[1000, 750, 500, 250]`` is given before the shift and mapped
through ``sigma' = shift * s / (1 + (shift - 1) * s)`` with ``s = t / 1000``, as the reference systems' warped
step lists do.
"""

from __future__ import annotations

import torch


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
