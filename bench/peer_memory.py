"""Peak GPU memory of the peer benchmark, which ``peer_sdv2.py`` does not report.

Runs the peer script in this process (``runpy``, with the arguments after its path) and then reports
``torch.cuda.max_memory_allocated()`` over the whole run. That covers the peer's text-to-video DiT (3 latent frames
per chunk, a 12-frame cache), its video-to-video DiT and its VAE decode, with the transformer loaded throughout.
Our ``bench_stream.py`` reports the peak of a text-to-video stream, DiT and VAE decode together.

    python bench/peer_memory.py .whl/peer_sdv2.py --out results/peer_sdv2.jsonl
"""

from __future__ import annotations

import json
import runpy
import sys

import torch

GIB = 2**30


def main(argv: list[str]) -> dict:
    if not argv:
        raise SystemExit("usage: peer_memory.py PEER_SCRIPT [ARGS...]")
    script, rest = argv[0], argv[1:]
    out = rest[rest.index("--out") + 1] if "--out" in rest else None
    sys.argv = [script, *rest]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:  # the peer ends with SystemExit(0) when it skips the VAE
        if exc.code not in (None, 0):
            raise
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    row = {"figure": "peer_peak_mem_gib", "value": peak, "script": script}
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
