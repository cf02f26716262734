"""Peak GPU memory of the peer benchmark, which ``peer_sdv2.py`` does not report.

Runs the peer script in this process (``runpy``, with the arguments after its path) and then reports
``torch.cuda.max_memory_allocated()`` over the whole run. That covers the peer's text-to-video DiT (3 latent frames
per chunk, a 12-frame cache), its video-to-video DiT and its VAE decode, with the transformer loaded throughout.
Our ``bench_stream.py`` reports the peak of a text-to-video stream, DiT and VAE decode together.

The peer frees its KV caches before it builds its VAE, so its overall peak is the larger of two phases, never
both at once as in a stream. Where the peer's VAE module imports, the peak up to the VAE's construction (the
DiT phase) is reported too, and the peak after it (the VAE phase: transformer weights, VAE weights, its decode).

    python bench/peer_memory.py .whl/peer_sdv2.py --out results/peer_sdv2.jsonl
"""

from __future__ import annotations

import json
import runpy
import sys

import torch

GIB = 2**30


def _watch_vae_phase() -> dict:
    """Record the peak so far when the peer builds its VAE (``models.wan.wan_base.modules.vae.WanVAE_``), then
    reset the peak counter; no-op without CUDA or the peer's package."""
    phases: dict[str, int] = {}
    if not torch.cuda.is_available():
        return phases
    try:
        from models.wan.wan_base.modules import vae as peer_vae
    except ImportError:
        return phases
    original = peer_vae.WanVAE_

    def build(*args, **kwargs):
        torch.cuda.synchronize()
        phases["dit_peak"] = torch.cuda.max_memory_allocated()
        phases["at_vae"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return original(*args, **kwargs)

    peer_vae.WanVAE_ = build
    return phases


def main(argv: list[str]) -> dict:
    if not argv:
        raise SystemExit("usage: peer_memory.py PEER_SCRIPT [ARGS...]")
    script, rest = argv[0], argv[1:]
    out = rest[rest.index("--out") + 1] if "--out" in rest else None
    sys.argv = [script, *rest]
    phases = _watch_vae_phase()
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:  # the peer ends with SystemExit(0) when it skips the VAE
        if exc.code not in (None, 0):
            raise
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    row = {"figure": "peer_peak_mem_gib", "value": peak, "script": script}
    if "dit_peak" in phases:
        row.update(dit_phase_peak_gib=phases["dit_peak"] / GIB, vae_phase_peak_gib=peak)
        row.update(allocated_at_vae_start_gib=phases["at_vae"] / GIB, value=max(peak, phases["dit_peak"] / GIB))
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
