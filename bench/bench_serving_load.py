"""Serving under load: concurrent websocket clients against a real uvicorn server process on loopback, the tiny
random model. Two phases of ``--seconds`` each on one server (after a short warm-up):

- ``alone``: ``--fast`` clients that read everything at once;
- ``mixed``: the same fast clients plus ``--slow`` clients that read one message per ``--slow-interval`` seconds
  through a 4 KiB socket receive buffer (a client on a slow link).

Reported per client: FPS received, chunks received / generated / dropped, whether they add up (received + dropped =
generated), time to first frame. Per phase: the server process's RSS over time (from /proc), the engine's outbox
sizes (from /metrics), chunks generated per second, load average. The headline: the fast clients' mean FPS with the
slow clients beside them over their FPS alone (target: >= 0.8).

Frames are raw RGBA by default (4 KiB at 32x32, ~50 KiB a chunk: closer to a full-size JPEG stream's bytes than a
32x32 JPEG) and the server's kernel send buffer is 64 KiB (``--send-buffer-kb``; 0 = the kernel's autotuning, up to
4 MiB, which a slow reader of a tiny stream never fills in 30 s). Writes JSON and markdown to ``--out``.

    python bench/bench_serving_load.py --out bench/results        # 2 x 30 s
    python bench/bench_serving_load.py --seconds 5 --out /tmp/b    # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from stream_runtime.serving.load import ClientResult, run_clients

WARMUP_S = 3.0
SAMPLE_S = 0.5
STARTUP_TIMEOUT_S = 120.0
FAST_RATIO_TARGET = 0.8


def serve(args) -> None:
    """The server process: prints ``PORT n`` once it listens, then serves until killed."""
    from stream_runtime.pipelines.wan.pipeline import StreamPipeline
    from stream_runtime.serving import Engine, EngineConfig
    from stream_runtime.serving.limits import ClientLimits
    from stream_runtime.serving.server import build_app, create_server

    engine = Engine(
        StreamPipeline.tiny_random(height=args.size, width=args.size), EngineConfig(max_sessions=args.fast + args.slow)
    )
    send_buffer = int(args.send_buffer_kb * 2**10) or None
    server, sock = create_server(build_app(engine, limits=ClientLimits(send_buffer_bytes=send_buffer)), "127.0.0.1", 0)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def scrape(base: str) -> dict[str, float]:
    """The unlabelled samples of /metrics (``name value``)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        parts = line.split(" ")
        if not line.startswith("#") and len(parts) == 2 and "{" not in parts[0]:
            values[parts[0].removeprefix("stream_runtime_")] = float(parts[1])
    return values


class Monitor:
    """Samples the server's RSS and /metrics every SAMPLE_S seconds in a thread."""

    def __init__(self, pid: int, base: str) -> None:
        self.pid, self.base = pid, base
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            m = scrape(self.base)
            self.samples.append(
                {
                    "t_s": round(time.perf_counter() - self._t0, 2),
                    "rss_mib": rss_bytes(self.pid) / 2**20,
                    "sessions": m["sessions_active"],
                    "chunks_total": m["chunks_total"],
                    "outboxes": m["outboxes"],
                    "unsent_chunks": m["outbox_unsent_chunks"],
                    "unsent_chunks_max": m["outbox_unsent_chunks_max"],
                    "pending_events_max": m["outbox_pending_events_max"],
                }
            )

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_phase(name: str, url: str, base: str, pid: int, args, slow: int) -> dict:
    load_before = os.getloadavg()
    kw = dict(fmt=args.format, steps=args.steps, height=args.size, width=args.size)
    start = time.perf_counter()
    with Monitor(pid, base) as monitor:
        results: list[ClientResult] = asyncio.run(
            run_clients(url, args.fast, slow, args.seconds, args.slow_interval, **kw)
        )
    wall = time.perf_counter() - start
    samples = monitor.samples
    fast = [r for r in results if not r.slow]
    generated = sum(r.chunks_generated for r in results)
    phase = {
        "phase": name,
        "wall_s": wall,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "clients": [r.to_json() for r in results],
        "fast_fps_mean": statistics.mean(r.fps for r in fast),
        "fast_share_of_chunks": sum(r.chunks_generated for r in fast) / generated,
        "chunks_per_s": (samples[-1]["chunks_total"] - samples[0]["chunks_total"])
        / (samples[-1]["t_s"] - samples[0]["t_s"]),
        "rss_mib": {
            "start": samples[0]["rss_mib"],
            "max": max(s["rss_mib"] for s in samples),
            "end": samples[-1]["rss_mib"],
        },
        "outbox_unsent_chunks_max": max(s["unsent_chunks_max"] for s in samples),
        "outbox_pending_events_max": max(s["pending_events_max"] for s in samples),
        "all_accounted": all(r.accounted for r in results),
        "samples": samples,
    }
    print(
        f"{name}: fast mean {phase['fast_fps_mean']:.1f} FPS, {phase['chunks_per_s']:.1f} chunks/s, RSS "
        f"{phase['rss_mib']['start']:.0f}..{phase['rss_mib']['max']:.0f} MiB, load {phase['load_avg_after'][0]:.2f}",
        flush=True,
    )
    return phase


def markdown(report: dict) -> str:
    a, m = report["phases"]["alone"], report["phases"]["mixed"]
    cfg = report["config"]
    lines = [
        f"# Serving load, {report['date']}",
        "",
        f"{cfg['fast']} fast + {cfg['slow']} slow websocket clients (one message per {cfg['slow_interval_s']} s, "
        f"4 KiB receive buffer) for {cfg['seconds']:.0f} s against a uvicorn server process on loopback; the tiny "
        f"random model at {cfg['size']}x{cfg['size']}, {cfg['steps']} step, {cfg['format']} frames, kernel send "
        f"buffer {cfg['send_buffer_kb'] or 'autotuned'} KiB. Machine: {report['machine']}.",
        "",
        f"**Fast clients with the slow ones beside them: {report['fast_fps_ratio']:.2f} of their FPS alone** "
        f"({m['fast_fps_mean']:.2f} vs {a['fast_fps_mean']:.2f} FPS; target >= {FAST_RATIO_TARGET}); "
        f"{report['fast_fps_ratio_normalized']:.2f} per chunk the engine made (the machine's speed drifts between "
        f"the phases: engine {a['chunks_per_s']:.2f} chunks/s alone, {m['chunks_per_s']:.2f} mixed). The fast "
        "sessions got "
        f"{m['fast_share_of_chunks']:.1%} of the chunks generated in the mixed phase (plain round-robin: "
        f"{cfg['fast'] / (cfg['fast'] + cfg['slow']):.0%}).",
        "",
        "| phase | load avg (1 min) before / after | RSS start / max / end (MiB) | max unsent chunks per outbox "
        "| max unread events per outbox | every chunk accounted for |",
        "|---|---|---|---|---|---|",
    ]
    for p in (a, m):
        r = p["rss_mib"]
        lines.append(
            f"| {p['phase']} | {p['load_avg_before'][0]:.2f} / {p['load_avg_after'][0]:.2f} | {r['start']:.0f} / "
            f"{r['max']:.0f} / {r['end']:.0f} | {p['outbox_unsent_chunks_max']:.0f} | "
            f"{p['outbox_pending_events_max']:.0f} | {'yes' if p['all_accounted'] else 'NO'} |"
        )
    lines += [
        "",
        "| phase | client | FPS | chunks received | generated | dropped | received + dropped = generated | TTFF (ms) "
        "| MiB received |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in (a, m):
        for c in p["clients"]:
            ttff = "" if c["ttff_s"] is None else f"{c['ttff_s'] * 1000:.0f}"
            lines.append(
                f"| {p['phase']} | {c['name']} | {c['fps']:.2f} | {c['chunks_received']} | {c['chunks_generated']} | "
                f"{c['dropped_chunks']} | {'yes' if c['accounted'] else 'NO'} | {ttff} | "
                f"{c['bytes_received'] / 2**20:.1f} |"
            )
    step = max(1, round(5 / SAMPLE_S))
    rss = ", ".join(f"{s['t_s']:.0f} s: {s['rss_mib']:.0f} MiB" for s in m["samples"][::step])
    lines += ["", f"Server RSS over the mixed phase (every ~5 s): {rss}."]
    lines += [
        "",
        "A slow client costs the fast ones little because the engine runs a session whose last chunk is still "
        "unsent only when no other session can run: with the engine busy, a slow client's chunks are deferred rather "
        "than generated and dropped (a fast client's one drop is the chunk in progress when it closed). Timings on a "
        "shared 2-core CPU are noisy (load averages above).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--fast", type=int, default=6)
    parser.add_argument("--slow", type=int, default=2)
    parser.add_argument("--slow-interval", type=float, default=1.0, dest="slow_interval")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--format", default="rgba", choices=["jpeg", "raw", "rgba"])
    parser.add_argument("--send-buffer-kb", type=float, default=64.0, dest="send_buffer_kb")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="serving_load")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return

    argv = [sys.executable, __file__, "--serve", "--size", str(args.size), "--fast", str(args.fast)]
    argv += ["--slow", str(args.slow), "--send-buffer-kb", str(args.send_buffer_kb)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the server process did not start: {line!r}")
        port = int(line.split()[1])
        base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        warm = dict(fmt=args.format, steps=args.steps, height=args.size, width=args.size)
        asyncio.run(run_clients(url, 2, 0, WARMUP_S, **warm))
        phases = {
            "alone": run_phase("alone", url, base, server.pid, args, slow=0),
            "mixed": run_phase("mixed", url, base, server.pid, args, slow=args.slow),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)

    report = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores, shared; Python {sys.version.split()[0]}",
        "config": {**vars(args), "slow_interval_s": args.slow_interval},
        "fast_fps_ratio": phases["mixed"]["fast_fps_mean"] / phases["alone"]["fast_fps_mean"],
        # The same ratio per chunk generated: it cancels a change of the machine's speed between the phases.
        "fast_fps_ratio_normalized": (phases["mixed"]["fast_fps_mean"] / phases["mixed"]["chunks_per_s"])
        / (phases["alone"]["fast_fps_mean"] / phases["alone"]["chunks_per_s"]),
        "phases": phases,
    }
    del report["config"]["serve"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report))
    print(
        f"fast FPS ratio (mixed / alone): {report['fast_fps_ratio']:.2f}, per chunk generated "
        f"{report['fast_fps_ratio_normalized']:.2f}; wrote {out / args.name}.json and .md"
    )


if __name__ == "__main__":
    main()
