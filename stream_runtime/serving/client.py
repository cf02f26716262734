"""A minimal Python client of the ``stream-runtime/1`` websocket protocol: records a stream to an MP4.

    python -m stream_runtime.serving.client --url ws://127.0.0.1:7860/ws --prompt "a fox in snow" \\
        --seconds 5 --out out.mp4 --switch "2.5:a fox in a desert"

Switch times are stream time (frames received / fps), as in ``stream-runtime generate``. The file is written at the
stream's fps; frames of chunks the server dropped (this client fell behind) are filled with the last frame, so the
file keeps the stream's timing. No pacing is needed here: a file has its own clock. A live player paces frames
client-side from ``first_frame`` / ``pts_s`` and the ``fps`` of ``opened`` (see docs/protocol.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field

from stream_runtime.serving.protocol import PROTOCOL, decode_frame, unpack_frame


class ServerError(RuntimeError):
    """The server answered with an ``error`` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class ClientStats:
    """What one recording saw."""

    frames_written: int = 0
    frames_received: int = 0
    chunks: int = 0
    dropped_chunks: int = 0
    """Chunks the server dropped because this client was slow (from the last chunk's metadata)."""
    ttff_s: float | None = None
    """From sending ``open`` to the first frame received."""
    fps: float | None = None
    """Frames received per second after the first one."""
    switches_sent: int = 0
    opened: dict = field(default_factory=dict)


def parse_switch(item: str) -> tuple[float, str]:
    """``"SECONDS:PROMPT"`` -> (seconds, prompt)."""
    at, sep, prompt = item.partition(":")
    try:
        seconds = float(at)
    except ValueError:
        seconds = -1.0
    if not sep or seconds < 0 or not prompt.strip():
        raise ValueError(f"--switch must look like SECONDS:PROMPT (e.g. '5:a fox in a desert'), got {item!r}")
    return seconds, prompt


async def record(
    url: str,
    prompt: str,
    seconds: float,
    out: str,
    switches: list[tuple[float, str]] | None = None,
    seed: int = 0,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    fmt: str = "jpeg",
    quality: int = 90,
    timeout: float = 120.0,
) -> ClientStats:
    """Open a text-to-video session at ``url``, write ``seconds`` of it to ``out`` (MP4), close it.

    ``timeout``: seconds to wait for any one message before giving up.
    """
    from websockets.asyncio.client import connect

    from stream_runtime.video_io import VideoWriter

    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    stats = ClientStats()

    async def receive(ws):
        return await asyncio.wait_for(ws.recv(), timeout)

    async with connect(url, max_size=None) as ws:
        hello = json.loads(await receive(ws))
        if hello.get("type") != "hello" or hello.get("protocol") != PROTOCOL:
            raise ServerError("protocol_version", f"expected a {PROTOCOL} hello, got {hello!r}")
        request = {"type": "open", "protocol": PROTOCOL, "prompt": prompt, "seed": seed, "format": fmt}
        request.update({k: v for k, v in dict(steps=steps, height=height, width=width).items() if v is not None})
        if fmt == "jpeg":
            request["quality"] = quality
        sent_open = time.perf_counter()
        await ws.send(json.dumps(request))
        while True:
            event = json.loads(await receive(ws))
            if event["type"] == "error":
                raise ServerError(event["code"], event["message"])
            if event["type"] == "opened":
                break
        stats.opened = event
        fps = float(event["fps"])
        total = math.ceil(seconds * fps)
        pending = sorted((round(at * fps), text) for at, text in switches or [])
        first_at = last = None
        closing = False
        with VideoWriter(out, fps=fps) as writer:
            while True:
                message = await receive(ws)
                if isinstance(message, str):
                    event = json.loads(message)
                    if event["type"] == "chunk":
                        stats.chunks += 1
                        stats.dropped_chunks = event["drops"]
                    elif event["type"] == "error":
                        if event.get("fatal"):
                            raise ServerError(event["code"], event["message"])
                        print(f"server: {event['code']}: {event['message']}", file=sys.stderr)
                    elif event["type"] == "closed":
                        break
                    continue
                if closing:
                    continue  # frames already on the way when we asked to close
                header, payload = unpack_frame(message)
                frame = decode_frame(header, payload)
                now = time.perf_counter()
                if first_at is None:
                    first_at = now
                    stats.ttff_s = now - sent_open
                stats.frames_received += 1
                if stats.frames_received > 1:
                    stats.fps = (stats.frames_received - 1) / (now - first_at) if now > first_at else None
                while last is not None and writer.frames_written < min(header.frame, total):
                    writer.write(last)  # a dropped chunk's frames: hold the last frame
                if writer.frames_written < total:
                    writer.write(frame)
                last = frame
                while pending and pending[0][0] <= writer.frames_written:
                    await ws.send(json.dumps({"type": "update", "prompt": pending.pop(0)[1]}))
                    stats.switches_sent += 1
                if writer.frames_written >= total:
                    await ws.send(json.dumps({"type": "close"}))
                    closing = True
            stats.frames_written = writer.frames_written
    return stats


def main(argv: list[str] | None = None) -> int:
    from websockets.exceptions import ConnectionClosed, WebSocketException

    parser = argparse.ArgumentParser(
        prog="python -m stream_runtime.serving.client", description="Record a stream-runtime stream to an MP4."
    )
    parser.add_argument("--url", default="ws://127.0.0.1:7860/ws")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default="out.mp4")
    parser.add_argument("--switch", action="append", metavar="SECONDS:PROMPT", help="live prompt switch (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--format", choices=("jpeg", "raw", "rgba"), default="jpeg", dest="fmt")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100")
    args = parser.parse_args(argv)
    try:
        switches = [parse_switch(item) for item in args.switch or []]
        stats = asyncio.run(
            record(
                args.url,
                args.prompt,
                args.seconds,
                args.out,
                switches,
                seed=args.seed,
                steps=args.steps,
                height=args.height,
                width=args.width,
                fmt=args.fmt,
                quality=args.quality,
            )
        )
    except ConnectionClosed as exc:  # e.g. 1012 when the server shuts down
        print(f"error: the server closed the connection ({exc}); what was received is in {args.out}", file=sys.stderr)
        return 2
    except (ValueError, ServerError, OSError, TimeoutError, WebSocketException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nstopped; what was received is in {args.out} (a playable file)")
        return 130
    fps = f"{stats.fps:.1f}" if stats.fps else "n/a"
    ttff = f"{stats.ttff_s:.2f} s" if stats.ttff_s is not None else "n/a"
    print(
        f"wrote {stats.frames_written} frames to {args.out}: time to first frame {ttff}, {fps} frames/s received, "
        f"{stats.chunks} chunks, {stats.dropped_chunks} dropped, {stats.switches_sent} prompt switches"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
