"""The websocket server with its engine over 2 gloo pipeline stages (forked processes, CPU, tiny model): a client's
frames equal the single-process stream batch, prompt switch included; a dead rank ends the server with an error."""

import json
import os
import signal
import socket
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from stream_runtime.distributed import Channel
from stream_runtime.distributed.comm import TAG_FORWARD
from stream_runtime.distributed.ring import StageRing, config_from_wire, run_stage_loop
from stream_runtime.distributed.serve import RingEngine, build_parser, serve_rank0
from stream_runtime.pipelines.wan.pipeline import StreamPipeline
from stream_runtime.serving.api import SessionRequest, SessionUpdate
from stream_runtime.serving.engine import EngineConfig
from stream_runtime.serving.protocol import PROTOCOL, unpack_frame

SIZE = 32
LAYERS = 4
WORLD = 2
STAGE_TIMEOUT_S = 10.0  # any wait of one rank on another
RUN_TIMEOUT_S = 30.0  # a whole test: start, stream, stop
RECV_TIMEOUT_S = 15.0  # one websocket message
DEAD_EXIT = 3  # the exit status of the rank the dead-rank test kills


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(
        seed=0, height=SIZE, width=SIZE, num_layers=LAYERS, chunk_frames=1, sink_frames=1, window_frames=3
    )


class DyingChannel(Channel):
    """A channel whose rank exits hard (no goodbye) when the ``die_at``-th forward arrives: a crashed GPU worker."""

    def __init__(self, *args, die_at: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.die_at, self.forwards = die_at, 0

    def recv(self, src, tag, what):
        meta, tensors = super().recv(src, tag, what)
        if tag == TAG_FORWARD and "forward" in meta and meta.get("kind") is None:
            self.forwards += 1
            if self.forwards == self.die_at:
                os._exit(DEAD_EXIT)
        return meta, tensors


def _rank_main(rank, world, master_port, pipe, ports, die_at):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=STAGE_TIMEOUT_S))
    cpu = torch.device("cpu")
    if rank == 0:
        ring = StageRing(pipe, world, Channel(rank, cpu, STAGE_TIMEOUT_S))
        code = serve_rank0(pipe, ring, port=0, config=EngineConfig(max_sessions=1), on_listen=ports.put)
    else:
        if die_at is None:
            channel = Channel(rank, cpu, STAGE_TIMEOUT_S)
        else:
            channel = DyingChannel(rank, cpu, STAGE_TIMEOUT_S, die_at=die_at)
        run_stage_loop(pipe, rank, world, channel)
        code = 0
    if code == 0:
        dist.destroy_process_group()
    os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """``WORLD`` forked processes: rank 0 serves on a free port, the others run the stage loop."""

    def __init__(self, pipe, die_at=None) -> None:
        ctx = mp.get_context("fork")  # children inherit the loaded model
        ports = ctx.Queue()
        master = _free_port()
        self.procs = [
            ctx.Process(target=_rank_main, args=(r, WORLD, master, pipe, ports, die_at)) for r in range(WORLD)
        ]
        self.deadline = time.monotonic() + RUN_TIMEOUT_S
        for p in self.procs:
            p.start()
        try:
            self.url = f"ws://127.0.0.1:{ports.get(timeout=RUN_TIMEOUT_S)}/ws"
        except BaseException:
            self.kill()
            raise

    def exit_codes(self) -> list[int]:
        """Wait (until the test's deadline) for every rank to end; kill and fail on one still running."""
        for p in self.procs:
            p.join(max(0.0, self.deadline - time.monotonic()))
        hung = [r for r, p in enumerate(self.procs) if p.is_alive()]
        self.kill()
        assert not hung, f"ranks {hung} still running {RUN_TIMEOUT_S} s after the start"
        return [p.exitcode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


class Client:
    """A websocket client that keeps the frames of every chunk it receives, by chunk index."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.chunks: dict[int, np.ndarray] = {}

    def next_event(self) -> dict:
        """The next JSON event; a chunk's binary frames are read with it and kept."""
        message = self.ws.recv(timeout=RECV_TIMEOUT_S)
        assert isinstance(message, str), "binary frames come only after their chunk event"
        event = json.loads(message)
        if event["type"] == "chunk":
            frames = []
            for _ in range(event["frames"]):
                header, payload = unpack_frame(self.ws.recv(timeout=RECV_TIMEOUT_S))
                frames.append(np.frombuffer(payload, np.uint8).reshape(header.height, header.width, 3))
            self.chunks[event["chunk"]] = np.stack(frames)
        return event

    def event(self, kind: str) -> dict:
        """Skip to the next event of ``kind`` (chunks are kept on the way)."""
        while True:
            event = self.next_event()
            if event["type"] == kind:
                return event
            assert event["type"] in ("chunk", "hello", "opened", "updated"), event

    def until_chunk(self, index: int) -> None:
        while max(self.chunks, default=-1) < index:
            self.next_event()


def open_message(**kw) -> str:
    return json.dumps({"type": "open", "protocol": PROTOCOL, "prompt": "a red fox", "seed": 7, "steps": 2, **kw})


def test_frames_over_two_stages_equal_the_single_process_engine_with_a_prompt_switch(pipe):
    ranks = Ranks(pipe)
    try:
        with connect(ranks.url, max_size=None, open_timeout=RECV_TIMEOUT_S) as ws:
            client = Client(ws)
            assert client.event("hello")["max_sessions"] == 1
            ws.send(open_message(format="raw"))
            opened = client.event("opened")
            assert opened["stages"] == WORLD and opened["switch_delay_chunks"] == WORLD - 1
            config = config_from_wire(opened["config"])
            assert config.stream_batch and config.stream_batch_stride == WORLD
            ws.send(json.dumps({"type": "update", "steps": 1}))
            assert client.event("error")["code"] == "bad_params"  # refused at the API; the stream goes on
            client.until_chunk(2)
            ws.send(json.dumps({"type": "update", "prompt": "a blue sea"}))
            updated = client.event("updated")
            switch_after = updated["next_chunk"] + opened["switch_delay_chunks"]
            client.until_chunk(switch_after + 5)
            ws.send(json.dumps({"type": "close"}))
            closed = client.event("closed")
            assert closed["reason"] == "closed"
        os.kill(ranks.procs[0].pid, signal.SIGINT)  # Ctrl-C on rank 0 ends every rank
        assert ranks.exit_codes() == [0] * WORLD
    finally:
        ranks.kill()

    # The single-process engine's session on the same config, switching where the ring's switch acted.
    def single_process(switch_at):
        out = []
        with pipe.session("a red fox", seed=7, height=SIZE, width=SIZE, config=config) as s:
            for k in range(max(client.chunks) + 1):
                if k == switch_at:
                    s.set_prompt("a blue sea")
                out.append(s.next_chunk())
        return out

    reference = single_process(switch_after)
    assert len(client.chunks) >= 4
    for k, frames in client.chunks.items():
        # Same batches, same ops, the same decoder state: equal to the byte.
        assert np.array_equal(frames, reference[k]), k
    # The tiny random model barely reacts to prompts, but enough to tell: a switch one chunk sooner, or none, gives
    # other frames.
    for wrong in (switch_after - 1, None):
        other = single_process(wrong)
        assert any(not np.array_equal(frames, other[k]) for k, frames in client.chunks.items()), wrong


def test_sigterm_on_rank_0_ends_every_rank_with_status_0(pipe):
    ranks = Ranks(pipe)
    try:
        with connect(ranks.url, open_timeout=RECV_TIMEOUT_S) as ws:
            Client(ws).event("hello")  # uvicorn serves: its signal handlers are in place
        os.kill(ranks.procs[0].pid, signal.SIGTERM)  # what a process manager sends
        assert ranks.exit_codes() == [0] * WORLD
    finally:
        ranks.kill()


def test_a_dead_rank_ends_the_server_with_an_error_to_the_client(pipe):
    ranks = Ranks(pipe, die_at=9)  # after the first chunks are out
    try:
        with connect(ranks.url, max_size=None, open_timeout=RECV_TIMEOUT_S) as ws:
            client = Client(ws)
            client.event("hello")
            ws.send(open_message(format="raw"))
            client.event("opened")
            errors = []
            try:
                while True:
                    event = client.next_event()
                    if event["type"] == "error":
                        errors.append(event)
            except ConnectionClosed:
                pass  # the server went away after telling us
        codes = ranks.exit_codes()
    finally:
        ranks.kill()
    assert codes == [1, DEAD_EXIT]
    assert client.chunks, "the stream ran before the rank died"
    assert errors and all(e["fatal"] for e in errors)
    assert {e["code"] for e in errors} <= {"session_failed", "stage_failed"}
    assert any("rank 1" in e["message"] for e in errors), errors


def test_ring_engine_refuses_what_the_stages_cannot_do(pipe):
    ring = StageRing(pipe, WORLD, Channel(0, torch.device("cpu"), STAGE_TIMEOUT_S))  # no traffic: never started
    with pytest.raises(ValueError, match="max_sessions must be 1"):
        RingEngine(pipe, ring, EngineConfig(max_sessions=2))
    with pytest.raises(ValueError, match="scheduler must be 'round_robin'"):
        RingEngine(pipe, ring, EngineConfig(max_sessions=1, scheduler="slo"))
    engine = RingEngine(pipe, ring)
    for update, message in (
        (SessionUpdate(strength=0.5), "cannot change"),
        (SessionUpdate(prompt="a cat", blend_chunks=2), "blending"),
    ):
        with pytest.raises(ValueError, match=message):
            engine.update(1, update)
    config, _, _ = engine.resolve(SessionRequest(prompt="a fox"))
    assert config.stream_batch and config.stream_batch_stride == WORLD
    with pytest.raises(ValueError, match="lookahead"):
        StageRing(pipe, WORLD, ring.channel, lookahead=-1)
    with pytest.raises(ValueError, match="world must be"):
        StageRing(pipe, 1, ring.channel)
    args = build_parser().parse_args(["--no-app"])
    assert args.max_sessions == 1 and args.timeout > 0
