"""Does cuBLASLt's GELU epilogue pay for the Wan feed-forward? One FFN (linear, tanh-GELU, linear) at the stream's
shape, four ways, timed and checked against an fp32 reference:

- ``eager``: diffusers' ``FeedForward`` as the block runs it;
- ``compiled``: the same under ``torch.compile`` (Inductor fuses the GELU into its own elementwise kernel);
- ``epilogue``: ``torch._addmm_activation(bias, x, w.t(), use_gelu=True)`` (the GELU runs inside the first
  matmul's epilogue on CUDA, so the ``[tokens, ffn_dim]`` intermediate is written once and never re-read);
- ``epilogue_compiled``: that under ``torch.compile`` (Inductor keeps ``_addmm_activation`` as an extern call).

A profile of one compiled t2v chunk (H200, 2026-12-01) spent 8.3 ms of ~296 ms of DiT time in the GELU kernel,
so this is worth at most ~3 % of the DiT. On CUDA the epilogue computes the tanh approximation that Wan uses.
On the CPU, ``_addmm_activation`` computes the exact GELU, so there the check reports a difference:
``--tiny`` on the CPU only checks that the script runs.

    python bench/probe_ffn_gelu.py --out bench/results/x           # 1.3B shape, bf16, CUDA
    python bench/probe_ffn_gelu.py --tiny --out /tmp/x
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from results_table import write_markdown


def epilogue_ffn(ffn: FeedForward):
    up, down = ffn.net[0].proj, ffn.net[2]

    def run(x: torch.Tensor) -> torch.Tensor:
        h = torch._addmm_activation(up.bias, x.flatten(0, -2), up.weight.t(), use_gelu=True)
        return F.linear(h, down.weight, down.bias).view(*x.shape[:-1], -1)

    return run


def timed(fn, x, repeats: int) -> float:
    cuda = x.is_cuda
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4680, help="query tokens of a chunk (3 latent frames, 480x832)")
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--ffn-dim", type=int, default=8960)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU: checks the script")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.tiny:
        args.tokens, args.dim, args.ffn_dim, args.repeats = 64, 32, 64, 3
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ffn = FeedForward(args.dim, inner_dim=args.ffn_dim, activation_fn="gelu-approximate").to(device, dtype).eval()
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype)
    with torch.no_grad():
        reference = ffn.float()(x.float())
        ffn.to(dtype)
        variants = {
            "eager": ffn,
            "compiled": torch.compile(ffn),
            "epilogue": epilogue_ffn(ffn),
            "epilogue_compiled": torch.compile(epilogue_ffn(ffn)),
        }
        rows = []
        for name, fn in variants.items():
            ms = timed(fn, x, args.repeats)
            err = (fn(x).float() - reference).abs().max().item()
            flops = 2 * 2 * args.tokens * args.dim * args.ffn_dim
            rows.append({"variant": name, "median_ms": ms, "tflops": flops / ms / 1e9, "max_abs_err_vs_fp32": err})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["median_ms"]
    for row in rows:
        row["speedup_vs_eager"] = base / row["median_ms"]
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "tokens": args.tokens,
        "dim": args.dim,
        "ffn_dim": args.ffn_dim,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ffn_gelu_{'tiny' if args.tiny else meta['device'].replace(' ', '_')}_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    cols = ["variant", "median_ms", "tflops", "speedup_vs_eager", "max_abs_err_vs_fp32"]
    print(write_markdown(out / f"{stem}.md", "FFN GELU epilogue", meta, cols, rows))


if __name__ == "__main__":
    main()
