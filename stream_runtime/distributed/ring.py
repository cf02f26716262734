"""Live streams over a ring of pipeline stages: rank 0 runs the engine (and the server), the other ranks run
:func:`run_stage_loop` and take their work from rank 0 over the ring.

One session at a time goes through the ring (sessions one after another)::

    rank 0 (engine thread)                       ranks 1 .. N-1 (stage loop)
    ──────────────────────                       ───────────────────────────
    open:       its own PipelineStage, then   ──open──>  each builds its PipelineStage ──> ack (TAG_CONTROL)
    next_chunk: forwards up to the chunk's    ──fwd───>  blocks ... last stage: head, decode
                leave forward + lookahead     <─frames── (TAG_FRAMES) and latents (TAG_RESULT) back to rank 0
    set_prompt: a switch before the next forward not yet sent (it travels the ring in order)
    close:      take what is in flight, then  ──close─>  each drops its stage ──> ack
    idle:       a heartbeat when the ring     ──ping──>  ──> ack   (so every wait, everywhere, stays bounded)
                was quiet for timeout / 4
    shutdown:                                 ──stop──>  each loop returns ──> ack

Control messages travel on ``TAG_FORWARD``, in order with the forwards, and come back from the last stage on
``TAG_CONTROL``. Every wait is bounded by the channel's timeout; a failure of the ring (a dead or hung rank, a
malformed message) marks it failed (:attr:`StageRing.failure`), the session in progress gets the error, and the
listeners registered with :meth:`StageRing.on_failure` end the server.

Run-ahead: after chunk ``k`` comes out, rank 0 has already sent the forwards up to ``k``'s leave forward +
``lookahead`` (default N - 1), so every stage stays busy while the engine hands chunk ``k`` out. A prompt switch
therefore acts before the first forward not yet sent: the frames equal a single-process stream-batch session
(stride N) that switches ``lookahead`` chunks later (the ``switch_delay_chunks`` of the ``opened`` event).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from stream_runtime.config import StreamConfig
from stream_runtime.pipelines.wan.pipeline import config_to_json
from stream_runtime.pipelines.wan.session import ChunkInfo

from .comm import TAG_CONTROL, TAG_FORWARD, TAG_FRAMES, Channel, StageError
from .stage import PipelineStage, RunPlan

log = logging.getLogger("stream_runtime.distributed")

HEARTBEATS_PER_TIMEOUT = 4
"""Heartbeats a quiet ring sends per timeout: the other ranks hear from rank 0 well before their waits give up."""


def config_from_wire(data: dict) -> StreamConfig:
    """A config from its ``config_to_json`` form (lists back to tuples), as it travels to the other ranks."""
    return StreamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class StageRing:
    """Rank 0's end of the ring of ``world`` stages. Thread-safe: the engine thread drives sessions, a heartbeat
    thread keeps the quiet ring alive, the main thread stops it.

    Example::

        ring = StageRing(pipe, world, Channel(0, device, timeout_s=60)).start()
        session = ring.open("a fox", seed=0, height=480, width=832, config=config)   # stream_batch_stride = world
        frames = session.next_chunk()                                                # uint8 [T, H, W, 3]
        session.close()
        ring.stop()                                                                  # every stage loop returns
    """

    def __init__(
        self,
        pipe,
        world: int,
        channel: Channel,
        lookahead: int | None = None,
        bounds: tuple[int, ...] | None = None,
    ) -> None:
        if not isinstance(world, int) or world < 2:
            raise ValueError(f"world must be an integer >= 2 (rank 0 and at least one more stage), got {world!r}")
        lookahead = world - 1 if lookahead is None else lookahead
        if not isinstance(lookahead, int) or lookahead < 0:
            raise ValueError(f"lookahead must be an integer >= 0 (forwards sent ahead of a chunk), got {lookahead!r}")
        self.pipe, self.world, self.channel = pipe, world, channel
        self.lookahead, self.bounds = lookahead, bounds
        self.timeout_s = channel.timeout.total_seconds()
        self.lock = threading.Lock()
        """Held for every exchange on the ring (rank 0 talks to it from more than one thread)."""
        self.failure: BaseException | None = None
        """What broke the ring, if something did; after that nothing more is sent on it."""
        self.session: RingSession | None = None
        self._seq = itertools.count()
        self._listeners: list[Callable[[BaseException], None]] = []
        self._stopped = threading.Event()
        self._quiet_since = time.monotonic()
        self._heartbeat: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> StageRing:
        """Start the heartbeat thread (idempotent)."""
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, name="stream-runtime-ring-heartbeat", daemon=True)
            self._heartbeat.start()
        return self

    def on_failure(self, listener: Callable[[BaseException], None]) -> None:
        """Call ``listener(exc)`` once, from the thread that found the ring broken."""
        self._listeners.append(listener)

    def stop(self) -> None:
        """End the heartbeat and every stage loop (a no-op on the ring once it failed)."""
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.join(self.timeout_s)

        def stop_stages() -> None:
            self._control("stop")
            self.channel.flush()

        with self.lock:
            if self.failure is None:
                self.exchange(stop_stages)

    def open(self, prompt: str, seed: int, height: int, width: int, config: StreamConfig) -> RingSession:
        """Start a text-to-video session on every stage. ``config`` must be a stream-batch config; its stride
        should be ``world`` (:meth:`stream_config` does both). ValueError for a bad request, StageError if the ring
        is broken."""
        if self.session is not None:
            raise ValueError("the stages serve one session at a time; close the open one first")
        plan = RunPlan(prompt, seed, None, height, width, config, bounds=self.bounds, timeout_s=self.timeout_s)
        with self.lock:
            self._check()
            stage = PipelineStage(self.pipe, plan, 0, self.world, self.channel)  # validates before the ring hears
            wire = {"prompt": prompt, "seed": seed, "height": height, "width": width, "config": config_to_json(config)}
            self.exchange(lambda: self._control("open", **wire))
        self.session = RingSession(self, stage, prompt, seed, height, width, config)
        return self.session

    def stream_config(self, config: StreamConfig) -> StreamConfig:
        """``config`` as the ring runs it: the stream batch, one pass of a chunk per trip around the ring."""
        return config.replace(stream_batch=True, stream_batch_stride=self.world)

    # -- talking to the ring

    def exchange(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` (traffic on the ring; the lock held by the caller). Any failure breaks the ring: the
        message stream is then in an unknown state, so nothing more is sent and the listeners are told."""
        self._check()
        try:
            result = fn()
        except BaseException as exc:
            self._fail(exc)
            raise
        self._quiet_since = time.monotonic()
        return result

    def _control(self, kind: str, **data) -> None:
        seq = next(self._seq)
        self.channel.send(1, {"kind": kind, "seq": seq, **data}, [], TAG_FORWARD)
        ack, _ = self.channel.recv(self.world - 1, TAG_CONTROL, f"the acknowledgement of {kind!r}")
        if ack.get("kind") != kind or ack.get("seq") != seq:
            raise StageError(f"rank 0: expected the acknowledgement of {kind!r} #{seq}, got {ack}")

    def _check(self) -> None:
        if self.failure is not None:
            raise StageError(f"the pipeline stages failed earlier: {self.failure}")

    def _fail(self, exc: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = exc
        log.error("the ring of pipeline stages failed: %s", exc)
        for listener in self._listeners:
            listener(exc)

    def _beat(self) -> None:
        interval = self.timeout_s / HEARTBEATS_PER_TIMEOUT
        while not self._stopped.wait(interval):
            if self.failure is not None:
                return
            if time.monotonic() - self._quiet_since < interval or not self.lock.acquire(blocking=False):
                continue  # traffic flows: the other ranks are hearing from rank 0
            try:
                if self.failure is None and not self._stopped.is_set():
                    self.exchange(lambda: self._control("ping"))
            except BaseException:
                return  # _fail has told the listeners
            finally:
                self.lock.release()


class RingSession:
    """Rank 0's view of the session running on the ring: the part of ``StreamSession``'s interface the engine
    uses (``next_chunk``, ``set_prompt``, ``close``, ``chunk_index``, ``last_chunk``, ...)."""

    mode = "t2v"

    def __init__(self, ring: StageRing, stage: PipelineStage, prompt, seed, height, width, config) -> None:
        self.ring, self.stage = ring, stage
        self.prompt, self.seed, self.height, self.width, self.config = prompt, seed, height, width, config
        self.schedule = stage.schedule
        self.chunk_index = 0
        """Chunks handed out so far."""
        self.output_frames = 0
        self.last_chunk: ChunkInfo | None = None
        self.next_forward = 0
        """The first forward not yet sent into the ring (a prompt switch acts before it)."""
        self.closed = False

    @property
    def cache(self):
        """Rank 0's part of the KV cache (its blocks only)."""
        return self.stage.cache

    @property
    def stream_batching(self) -> bool:
        return True

    @property
    def switch_delay_chunks(self) -> int:
        """How many chunks later than a single-process session a prompt switch acts (the run-ahead)."""
        return self.ring.lookahead

    def frames_needed(self) -> int:
        return 0  # text-to-video takes no input frames

    @torch.no_grad()
    def next_chunk(self) -> np.ndarray:
        """Send the forwards up to this chunk's leave forward + lookahead, then wait for its frames from the
        last stage: uint8 ``[T, H, W, 3]``."""
        self._check_open()
        start = time.perf_counter()
        k = self.chunk_index
        target = self.schedule.leave_forward(k) + self.ring.lookahead
        ring = self.ring

        def run():
            while self.next_forward <= target:
                self.stage.step(self.next_forward)
                self.next_forward += 1
            return self._frames(k)

        with ring.lock:
            frames = ring.exchange(run)
        self.last_chunk = ChunkInfo(k, self.output_frames, len(frames), time.perf_counter() - start)
        self.chunk_index += 1
        self.output_frames += len(frames)
        return frames

    def _frames(self, chunk: int) -> np.ndarray:
        meta, tensors = self.ring.channel.recv(self.ring.world - 1, TAG_FRAMES, f"the frames of chunk {chunk}")
        if meta.get("chunk") != chunk:
            raise StageError(f"rank 0: expected the frames of chunk {chunk}, got those of chunk {meta.get('chunk')}")
        return tensors[0].cpu().numpy()

    def set_prompt(self, prompt: str, blend_chunks: int | None = None) -> None:
        """Switch before the next forward not yet sent (``switch_delay_chunks`` later than on one process)."""
        self._check_open()
        if blend_chunks:
            raise ValueError("prompt blending is not supported over pipeline stages: switch with blend_chunks=0")
        self.stage.switch_at(self.next_forward, prompt)
        self.prompt = prompt

    def set_config(self, config: StreamConfig) -> None:
        raise ValueError("a session over pipeline stages keeps its step list and strength; open a new session")

    def push_frames(self, frames) -> None:
        raise ValueError("sessions over pipeline stages are text-to-video only")

    def close(self) -> None:
        """Take every result and frame still in flight, then end the session on every stage. Never raises: a
        broken ring is reported through the ring's failure listeners."""
        if self.closed:
            return
        self.closed = True
        ring = self.ring
        ring.session = None

        def drain():
            self.stage.drain_results(self.next_forward - 1)
            for chunk in range(self.chunk_index, max(self.chunk_index, self.next_forward - self.schedule.lag)):
                self._frames(chunk)
            ring._control("close")

        with ring.lock:
            if ring.failure is None:
                try:
                    ring.exchange(drain)
                except BaseException as exc:
                    log.error("closing the session on the stages failed: %s", exc)
        self.stage = None

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this session is closed")


def run_stage_loop(pipe, rank: int, world: int, channel: Channel, bounds: tuple[int, ...] | None = None) -> int:
    """Ranks 1 .. N-1: handle what comes from the previous stage until rank 0 says stop; return the number of
    sessions served. A wait that times out (rank 0 or a neighbour died or hangs) raises :class:`StageError`."""
    if not 1 <= rank < world:
        raise ValueError(f"rank must be in 1..{world - 1} (rank 0 runs the engine), got {rank}")
    last = rank == world - 1
    stage: PipelineStage | None = None
    served = 0

    def send_frames(chunk: int, x0: torch.Tensor, frames: np.ndarray) -> None:
        channel.send(0, {"chunk": chunk}, [torch.from_numpy(frames)], TAG_FRAMES)

    while True:
        meta, tensors = channel.recv(rank - 1, TAG_FORWARD, "work or a heartbeat from rank 0")
        kind = meta.get("kind", "forward")
        if kind in ("forward", "switch"):
            if stage is None:
                raise StageError(f"rank {rank}: got a {kind} with no session open")
            stage.take(meta, tensors)
            continue
        if kind == "open":
            plan = RunPlan(
                meta["prompt"],
                meta["seed"],
                None,
                meta["height"],
                meta["width"],
                config_from_wire(meta["config"]),
                bounds=bounds,
                timeout_s=channel.timeout.total_seconds(),
            )
            stage = PipelineStage(pipe, plan, rank, world, channel, on_chunk=send_frames if last else None)
            served += 1
        elif kind == "close":
            stage = None
        elif kind not in ("ping", "stop"):
            raise StageError(f"rank {rank}: unknown message kind {kind!r}")
        channel.send(0 if last else rank + 1, meta, [], TAG_CONTROL if last else TAG_FORWARD)
        if kind == "stop":
            channel.flush()
            return served
