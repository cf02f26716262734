"""The two ways a chunk goes from one denoising step to the next (``StreamConfig.sampler``)."""

import pytest
import torch

from stream_runtime import StreamConfig
from stream_runtime.pipelines.wan import sampling


def test_euler_is_one_step_of_the_flow_ode_and_renoise_uses_fresh_noise():
    g = torch.Generator().manual_seed(0)
    x, flow, noise = (torch.randn(2, 4, 1, 3, 3, generator=g) for _ in range(3))
    sigma, nxt = 0.8, 0.5
    x0 = sampling.to_x0(x, flow, sigma)
    euler = sampling.next_sample(x0, x, flow, sigma, nxt, noise, "euler")
    torch.testing.assert_close(euler, x + (nxt - sigma) * flow)
    renoise = sampling.next_sample(x0, x, flow, sigma, nxt, noise, "renoise")
    torch.testing.assert_close(renoise, (1 - nxt) * x0 + nxt * noise)
    # A flow that is exactly noise - x0 takes Euler along the straight path: the next sample is x0 noised with the
    # same noise, at the next level.
    clean, true_noise = torch.randn(2, 4, 1, 3, 3, generator=g), torch.randn(2, 4, 1, 3, 3, generator=g)
    xt = sampling.add_noise(clean, true_noise, sigma)
    step = sampling.next_sample(clean, xt, true_noise - clean, sigma, nxt, noise, "euler")
    torch.testing.assert_close(step, sampling.add_noise(clean, true_noise, nxt))


def test_unknown_sampler_is_refused():
    x = torch.zeros(1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="sampler"):
        sampling.next_sample(x, x, x, 0.5, 0.2, x, "ddim")
    with pytest.raises(ValueError, match="sampler"):
        StreamConfig(sampler="ddim")
