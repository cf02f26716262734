"""Attention over [sink | window | current chunk] at Wan2.1 shapes: block-sparse kernel (dense and radial tables)
beside torch SDPA (FLASH and CUDNN backends). GPU only.

    python bench/bench_attention.py --out bench/results

Shapes derive from the resolution and the cache layout: latent frames of (H/16) x (W/16) patches (VAE stride 8,
patch 2), a ``chunk``-frame query chunk against ``sink + window + chunk`` key frames. At 480x832 with 1 sink frame,
an 8-frame window and 3-frame chunks that is 4,680 queries against 18,720 keys. Every backend is checked against an
fp32 reference on two heads (relative L2 error) before it is timed; the median of ``triton.testing.do_bench`` is
reported with TFLOP/s (4 * B * H * Lq * Lk * D, and for the radial kernel also counted over computed pairs only).
Writes ``bench_attention.json`` and ``bench_attention.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from stream_runtime.kernels.block_sparse_attn import (
    BlockTable,
    block_sparse_attention,
    dense_block_table,
    naive_attention,
)
from stream_runtime.kernels.radial import radial_block_table, rolling_cache_layout

# Attention heads of the two Wan2.1 text-to-video models (head_dim 128 in both): 1.3B has dim 1536, 14B dim 5120.
MODELS = {"wan-1.3b": 12, "wan-14b": 40}
HEAD_DIM = 128
VAE_STRIDE, PATCH = 8, 2
# Kernel launch configs tried per table: (BLOCK_M, BLOCK_N, num_warps, num_stages[, "tma"]); None = the kernel's
# default. "tma" loads key/value tiles through tensor descriptors (Hopper's TMA engine).
POINTER_CONFIGS = [
    None,
    (128, 128, 8, 2),
    (128, 128, 8, 4),
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 3),
]
TMA_CONFIGS = [(128, 128, 8, 3, "tma"), (128, 128, 8, 4, "tma"), (128, 64, 4, 3, "tma"), (128, 64, 8, 3, "tma")]
# "splitN": split-K over N programs per query tile (more programs: 37 query tiles x 12 heads = 444 fill 3.4 waves of an
# H200's 132 SMs, so the 4th wave runs a third full); "tma+split2": both.
SPLIT_CONFIGS = [(128, 128, 8, 3, "split2"), (128, 128, 8, 3, "split3"), (128, 128, 8, 3, "tma+split2")]
# "ws": Triton warp-specialises the key loop (tl.range(..., warp_specialize=True); Triton 3.6 has a Hopper pass).
WS_CONFIGS = [
    (128, 128, 8, 3, "ws"),
    (128, 128, 8, 3, "tma+ws"),
    (128, 128, 4, 3, "tma+ws"),
    (128, 128, 8, 2, "tma+ws"),
    (128, 64, 4, 3, "tma+ws"),
]
CONFIG_SETS = {
    "all": POINTER_CONFIGS + TMA_CONFIGS + SPLIT_CONFIGS + WS_CONFIGS,
    "pointer": POINTER_CONFIGS,
    "tma": [None, *TMA_CONFIGS],
    "split": [None, *SPLIT_CONFIGS],
    "ws": [None, (128, 128, 8, 3, "tma"), *WS_CONFIGS],
}
MAX_REL_ERR = 2e-2  # bf16 operands against an fp32 reference: expect a few 1e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def sdpa(q, k, v, backend: SDPBackend, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on our [B, L, H, D] layout (transposed views, no copies)."""
    with sdpa_kernel([backend]):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
    return out.transpose(1, 2)


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def run_model(name: str, heads: int, table_dense, table_radial, configs: list) -> list[dict]:
    q_len, k_len = table_dense.q_len, table_dense.k_len
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_k = (1, q_len, heads, HEAD_DIM), (1, k_len, heads, HEAD_DIM)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(shape_k, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape_k, device="cuda", dtype=torch.bfloat16, generator=gen)
    dense_flops = 4.0 * heads * q_len * k_len * HEAD_DIM

    # fp32 references on the first few heads (they materialise the [Lq, Lk] scores): dense, and under the radial mask.
    ref_heads = min(heads, 2)
    q_ref, k_ref, v_ref = (x[:, :, :ref_heads] for x in (q, k, v))
    reference = naive_attention(q_ref, k_ref, v_ref)[0]
    radial_reference = naive_attention(q_ref, k_ref, v_ref, mask=table_radial.to_mask())[0]
    del q_ref, k_ref, v_ref

    rows = []

    def record(backend, fn, ref, density, config=None):
        row = {"model": name, "heads": heads, "q_len": q_len, "k_len": k_len, "head_dim": HEAD_DIM}
        row.update(backend=backend, config=config, density=density)
        try:
            out = fn()
            torch.cuda.synchronize()
        except Exception as exc:  # a backend this build or GPU lacks: report, keep going
            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            rows.append(row)
            print(f"{name:9s} {backend:22s} {str(config):22s} unavailable: {row['error']}", flush=True)
            return
        err = rel_err(out[:, :, :ref_heads], ref)
        row["rel_err"] = err
        if not math.isfinite(err) or err > MAX_REL_ERR:
            row["error"] = f"wrong result: relative L2 error {err:.2e} > {MAX_REL_ERR}"
            rows.append(row)
            print(f"{name:9s} {backend:22s} {str(config):22s} {row['error']}", flush=True)
            return
        ms = bench(fn)
        row.update(ms=ms, tflops_dense_equiv=dense_flops / ms * 1e-9, tflops_computed=density * dense_flops / ms * 1e-9)
        rows.append(row)
        print(
            f"{name:9s} {backend:22s} {str(config):22s} {ms:8.3f} ms  {row['tflops_computed']:6.1f} TFLOP/s computed  "
            f"{row['tflops_dense_equiv']:6.1f} dense-equiv  err {err:.1e}",
            flush=True,
        )

    record("sdpa-flash", lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION), reference, 1.0)
    record("sdpa-cudnn", lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION), reference, 1.0)
    # The same full table built from a mask: the kernel reads every block index (as a sparse table makes it do),
    # where dense_block_table's marks it dense and the kernel walks the keys without the index loads.
    full = torch.ones(1, 1, table_dense.n_q_blocks, table_dense.n_k_blocks, dtype=torch.bool)
    table_indexed = BlockTable.from_block_mask(
        full, table_dense.block_m, table_dense.block_n, table_dense.q_len, table_dense.k_len
    ).to("cuda")
    for label, table, ref in (
        ("triton-dense", table_dense, reference),
        ("triton-dense-indexed", table_indexed, reference),
        ("triton-radial", table_radial, radial_reference),
    ):
        for config in configs:
            kwargs = (
                {}
                if config is None
                else dict(zip(("block_m", "block_n", "num_warps", "num_stages"), config[:4], strict=True))
            )
            if config is not None and len(config) > 4:
                marks = config[4].split("+")
                kwargs["tma"] = "tma" in marks
                kwargs["warp_specialize"] = "ws" in marks
                for mark in marks:
                    if mark.startswith("split"):
                        kwargs["splits"] = int(mark.removeprefix("split"))
            fn = lambda table=table, kwargs=kwargs: block_sparse_attention(q, k, v, table, **kwargs)[0]
            record(label, fn, ref, table.density(), config or "default")
    return rows


def best(rows: list[dict], model: str, backend: str) -> dict | None:
    timed = [r for r in rows if r["model"] == model and r["backend"] == backend and "ms" in r]
    return min(timed, key=lambda r: r["ms"]) if timed else None


def summarize(rows: list[dict], density: float) -> tuple[list[dict], str]:
    lines = [
        "| model | backend | best config | median ms | TFLOP/s (computed) | TFLOP/s (dense-equiv) | rel. err |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    targets = []
    for model in MODELS:
        for backend in ("sdpa-flash", "sdpa-cudnn", "triton-dense", "triton-dense-indexed", "triton-radial"):
            r = best(rows, model, backend)
            if r is None:
                lines.append(f"| {model} | {backend} | unavailable | | | | |")
                continue
            lines.append(
                f"| {model} | {backend} | {r['config']} | {r['ms']:.3f} | {r['tflops_computed']:.1f} | "
                f"{r['tflops_dense_equiv']:.1f} | {r['rel_err']:.1e} |"
            )
        dense, radial = best(rows, model, "triton-dense"), best(rows, model, "triton-radial")
        if dense and radial:
            speedup = dense["ms"] / radial["ms"]
            target = 0.7 / density
            targets.append(
                {"model": model, "density": density, "speedup": speedup, "target": target, "met": speedup >= target}
            )
    lines += ["", "| model | radial density | sparse speedup over dense kernel | target 0.7/density | met |"]
    lines.append("|---|---:|---:|---:|---|")
    for t in targets:
        lines.append(
            f"| {t['model']} | {t['density']:.3f} | {t['speedup']:.2f}x | {t['target']:.2f}x | "
            f"{'yes' if t['met'] else 'no'} |"
        )
    return targets, "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument("--height", type=int, default=480, help="video height in pixels")
    parser.add_argument("--width", type=int, default=832, help="video width in pixels")
    parser.add_argument("--sink", type=int, default=1, help="sink frames (latent)")
    parser.add_argument("--window", type=int, default=8, help="rolling window frames (latent)")
    parser.add_argument("--chunk", type=int, default=3, help="frames per chunk (latent)")
    parser.add_argument("--block", type=int, default=128, help="table block size (queries and keys)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--configs", choices=sorted(CONFIG_SETS), default="all", help="kernel launch configs to try (default all)"
    )
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA device", file=sys.stderr)
        return 2

    grid = (args.height // (VAE_STRIDE * PATCH), args.width // (VAE_STRIDE * PATCH))
    layout = rolling_cache_layout(args.sink, args.window, args.chunk)
    started = time.perf_counter()
    table_radial = radial_block_table(grid, layout, args.block, args.block, device="cuda")
    build_ms = (time.perf_counter() - started) * 1e3
    table_dense = dense_block_table(table_radial.q_len, table_radial.k_len, args.block, args.block, device="cuda")
    density = table_radial.density()
    print(
        f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}\n"
        f"grid {grid[0]}x{grid[1]} patches/frame, {args.sink} sink + {args.window} window + {args.chunk} chunk frames: "
        f"{table_radial.q_len} queries x {table_radial.k_len} keys; radial density {density:.3f} "
        f"(table built in {build_ms:.1f} ms)",
        flush=True,
    )

    rows = []
    for name in args.models:
        rows += run_model(name, MODELS[name], table_dense, table_radial, CONFIG_SETS[args.configs])
        torch.cuda.empty_cache()
    targets, table_md = summarize(rows, density)
    print("\n" + table_md)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "resolution": [args.height, args.width],
        "frame_grid": list(grid),
        "layout": {"sink": args.sink, "window": args.window, "chunk": args.chunk, "block": args.block},
        "radial_density": density,
        "dtype": "bfloat16",
    }
    (args.out / "bench_attention.json").write_text(json.dumps({**meta, "rows": rows, "targets": targets}, indent=2))
    header = (
        f"# Attention benchmark\n\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, bf16, "
        f"{args.height}x{args.width} ({grid[0]}x{grid[1]} patches/frame), {args.sink} sink + {args.window} window + "
        f"{args.chunk} chunk frames, {args.block}-token blocks, radial density {density:.3f}. Median of "
        "`triton.testing.do_bench`; best kernel config per backend (all configs in the JSON).\n\n"
    )
    (args.out / "bench_attention.md").write_text(header + table_md + "\n")
    print(f"\nwrote {args.out / 'bench_attention.json'} and {args.out / 'bench_attention.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
