"""Where the GPU memory of a stream goes: weights, the stream's caches, and the transient peaks of the DiT and
of the VAE decode within one steady-state chunk (issue 8's target: peak memory no higher than the peer's).

For each config (t2v, v2v) it opens a session, runs it to the steady state (cache full, graphs captured), and
then measures one chunk with the allocator's peak counter reset between phases. With ``--trace`` it also records
the allocator's history over that chunk and lists the transient allocations that were live at the chunk's peak,
grouped by the first frame of this repository (or diffusers) that made them. Writes JSON and markdown to --out.

    python bench/probe_memory.py --compile --cuda-graphs --trace --out bench/results/x
    python bench/probe_memory.py --tiny --out /tmp/x     # CPU: checks the script; byte counts of the state only
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import pathlib

import torch
from bench_stream import build  # bench/ is on sys.path when this file runs as a script
from results_table import write_markdown

from stream_runtime.config import text_to_video_config, video_to_video_config

GIB = 2**30
OURS = ("stream_runtime", "pipelines/", "diffusers", "bench/")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under ``tensors``: more than :func:`nbytes` where a tensor is a view that
    keeps a larger buffer alive."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def module_bytes(module) -> int:
    return nbytes(module.parameters()) + nbytes(module.buffers())


def state_bytes(session) -> dict[str, int]:
    """Bytes the session keeps between chunks, by part (what a stream holds for ever)."""
    cache = session.cache
    parts = {
        "kv_cache": nbytes(cache.k.values()) + nbytes(cache.v.values()),
        "latent_cache": nbytes([cache.latents]),
        "text_kv": nbytes(t for kv in session._text for t in kv),
        "decoder_conv_cache": nbytes(session.decoder.cache.slots) if hasattr(session.decoder, "cache") else 0,
        "encoder_conv_cache": 0 if session.encoder is None else nbytes(session.encoder.cache.slots),
    }
    if hasattr(session.decoder, "cache"):
        parts["decoder_conv_cache_storage"] = storage_bytes(session.decoder.cache.slots)
    if session.encoder is not None:
        parts["encoder_conv_cache_storage"] = storage_bytes(session.encoder.cache.slots)
    if session.graphs is not None:
        parts["graph_static_inputs"] = sum(
            nbytes([g.x, g.timestep, g.out, *g.ropes]) + nbytes(t for kv in g.text for t in kv)
            for g in session.graphs._graphs.values()
        )
    return parts


def site(frames: list[dict]) -> str:
    """The innermost frame of this repository or diffusers that an allocation came from."""
    for f in frames:
        name = f.get("filename", "")
        if any(key in name for key in OURS) and "probe_memory" not in name:
            short = name.split("site-packages/")[-1].split("/work/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "(other)"


def live_at_peak(snapshot: dict) -> tuple[int, list[tuple[str, int]]]:
    """Replay the recorded allocator events: the peak of bytes allocated during the recording, and those bytes
    by allocation site."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for trace in snapshot.get("device_traces", []):
        for event in trace:
            action, addr, size = event["action"], event["addr"], event["size"]
            if action == "alloc":
                live[addr] = (size, site(event.get("frames", [])))
                total += size
                if total > peak:
                    peak, at_peak = total, dict(live)
            elif action == "free_completed" and addr in live:
                total -= live.pop(addr)[0]
    by_site = collections.Counter()
    for size, where in at_peak.values():
        by_site[where] += size
    return peak, by_site.most_common(12)


def measure(pipe, name: str, cfg, args, device) -> dict:
    cuda = device.type == "cuda"
    session = pipe.session("a fox running in snow", seed=0, mode="v2v" if name == "v2v" else "t2v", config=cfg)
    if name == "v2v":
        session.push_frames(torch.randint(0, 256, (4 * 64, args.height, args.width, 3), dtype=torch.uint8).numpy())
    chunks = 0
    while session.cache.valid_frames < session.cache.layout.cache_frames or (
        session.graphs is not None and not session.graphs.captures
    ):
        session.next_chunk()
        chunks += 1
    session.next_chunk()  # one more, so that anything lazily made in the steady state exists
    row = {"config": name, "fill_chunks": chunks, **{k + "_gib": v / GIB for k, v in state_bytes(session).items()}}
    if not cuda:
        session.close()
        return row

    marks = {}
    decode = session.decoder.decode

    def timed_decode(latents):  # the DiT phase (context pass, encode, steps) ends where the decode starts
        torch.cuda.synchronize()
        marks["dit_peak"] = torch.cuda.max_memory_allocated()
        marks["before_decode"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = decode(latents)
        torch.cuda.synchronize()
        marks["decode_peak"] = torch.cuda.max_memory_allocated()
        return out

    session.decoder.decode = timed_decode
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    between = torch.cuda.memory_allocated()
    if args.trace:
        torch.cuda.memory._record_memory_history(max_entries=500_000)
    session.next_chunk()
    torch.cuda.synchronize()
    if args.trace:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, sites = live_at_peak(snapshot)
        row["trace_transient_peak_gib"] = peak / GIB
        row["trace_sites_gib"] = [(where, size / GIB) for where, size in sites]
    session.decoder.decode = decode
    row.update(
        allocated_between_chunks_gib=between / GIB,
        dit_peak_gib=marks["dit_peak"] / GIB,
        dit_transient_gib=(marks["dit_peak"] - between) / GIB,
        decode_peak_gib=marks["decode_peak"] / GIB,
        decode_transient_gib=(marks["decode_peak"] - marks["before_decode"]) / GIB,
        reserved_gib=torch.cuda.memory_reserved() / GIB,
        max_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
    )
    session.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["1.3b", "14b"], default="1.3b")
    ap.add_argument("--configs", default="t2v,v2v")
    ap.add_argument("--compile", action="store_true", help="StreamPipeline.compile (blocks and VAE)")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--trace", action="store_true", help="record allocations over the measured chunk (CUDA)")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    args.decoder = "vae"
    args.height, args.width = (32, 32) if args.tiny else (480, 832)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    pipe = build(args, device, dtype)
    if args.compile:
        pipe.compile()
    if args.cuda_graphs:
        pipe.enable_cuda_graphs()
    weights = {
        "transformer_gib": module_bytes(pipe.transformer) / GIB,
        "vae_gib": module_bytes(pipe.vae) / GIB,
        "text_encoder_gib": module_bytes(pipe.text_encoder) / GIB,
    }
    if device.type == "cuda":
        weights["allocated_after_load_gib"] = torch.cuda.memory_allocated() / GIB
    print(json.dumps(weights), flush=True)
    configs = {"t2v": text_to_video_config(), "v2v": video_to_video_config()}
    rows = []
    for name in args.configs.split(","):
        row = measure(pipe, name, configs[name], args, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny" if args.tiny else args.model,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        **weights,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory_{meta['model']}{'_compiled' if args.compile else ''}{'_graphs' if args.cuda_graphs else ''}"
    stem += f"_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    cols = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "trace_sites_gib"]
    print(write_markdown(out / f"{stem}.md", "Stream memory", meta, cols, rows))


if __name__ == "__main__":
    main()
