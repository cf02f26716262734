"""Does SDPA's cuDNN backend run on the pipeline's tensor layout? (GPU only.)

On one H100 (2026-11-23) the attention benchmark timed SDPA's cuDNN backend at 1.06 ms against flash's 1.73 ms at
the chunk-vs-cache shape, yet the whole stream ran at the same speed with ``--attention sdpa`` and ``sdpa_cudnn``.
The benchmark feeds contiguous ``[B, H, L, D]`` tensors; the stream feeds ``[B, L, H, D]`` views transposed to
``[B, H, L, D]``, the keys and values a prefix of the cache buffer. This probe times each SDPA backend alone
(``sdpa_kernel([backend])``: an error means it refused the inputs) on both layouts, and what
``stream_runtime.attention``'s ``sdpa`` and ``sdpa_cudnn`` backends take, at the Wan 1.3B t2v shape.

    python bench/probe_sdpa_layout.py --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from stream_runtime.attention import get_backend


def time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def top_kernel(fn) -> str:
    """Name of the kernel that took the most device time in one call (which SDPA backend actually ran)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return max(events, key=lambda e: e.self_device_time_total).key[:160] if events else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=4680, help="3 latent frames at 480x832")
    parser.add_argument("--keys", type=int, default=18720, help="12 latent frames: sinks + window + chunk")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    h, d, lq, lk = args.heads, args.head_dim, args.queries, args.keys
    dev, dt = torch.device("cuda"), torch.bfloat16
    # The stream's layout: [B, L, H, D] tensors; keys/values a prefix of a bigger cache buffer.
    q_stream = torch.randn(1, lq, h, d, device=dev, dtype=dt)
    k_buffer = torch.randn(1, lk + lq, h, d, device=dev, dtype=dt)
    v_buffer = torch.randn(1, lk + lq, h, d, device=dev, dtype=dt)
    k_stream, v_stream = k_buffer[:, :lk], v_buffer[:, :lk]
    layouts = {
        "contiguous_bhld": tuple(t.transpose(1, 2).contiguous() for t in (q_stream, k_stream, v_stream)),
        "stream_views": tuple(t.transpose(1, 2) for t in (q_stream, k_stream, v_stream)),
    }
    flops = 4 * h * lq * lk * d
    rows = []
    for layout, (q, k, v) in layouts.items():
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            row = {"layout": layout, "backend": backend.name}
            try:
                with sdpa_kernel([backend]):
                    row["ms"] = time_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
                row["tflops"] = flops / row["ms"] / 1e9
            except RuntimeError as exc:  # the backend refused these inputs
                row["error"] = str(exc).splitlines()[0][:200]
            rows.append(row)
            print(json.dumps(row))
    # What a backend that copies the stream's views into contiguous [B, H, L, D] tensors first would cost.
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        row = {"layout": "stream_views_copied_to_contiguous", "backend": backend.name}

        def copied(backend=backend):
            q, k, v = (t.transpose(1, 2).contiguous() for t in (q_stream, k_stream, v_stream))
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

        try:
            row["ms"] = time_ms(copied)
            row["tflops"] = flops / row["ms"] / 1e9
        except RuntimeError as exc:
            row["error"] = str(exc).splitlines()[0][:200]
        rows.append(row)
        print(json.dumps(row))
    for name in ("sdpa", "sdpa_cudnn"):
        fn = get_backend(name)
        ms = time_ms(lambda fn=fn: fn(q_stream, k_stream, v_stream))
        row = {"layout": "stream_runtime.attention", "backend": name, "ms": ms, "tflops": flops / ms / 1e9}
        row["top_kernel"] = top_kernel(lambda fn=fn: fn(q_stream, k_stream, v_stream))
        rows.append(row)
        print(json.dumps(row))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    name = f"probe_sdpa_layout_{datetime.date.today().isoformat()}.json"
    (out / name).write_text(json.dumps({"meta": meta, "shape": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
