"""Triton kernels, each beside a naive fp32 PyTorch reference (imported as ``stream_runtime.kernels``)."""
