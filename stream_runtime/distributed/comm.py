"""Point-to-point messages between pipeline stages over torch.distributed, every wait bounded by a timeout.

A message is a small JSON header (host metadata: forward index, chunks, prompt switches) plus a list of tensors.
On the wire::

    sizes  int64 [2]              (header bytes, number of tensors)
    header uint8 [header bytes]   JSON: {"meta": {...}, "tensors": [[dtype, shape], ...]}
    tensor 0, tensor 1, ...

Sends are non-blocking (``isend``): a stage posts its output and goes on to receive, so a ring of stages never
deadlocks on sends. Receives wait at most ``timeout_s``; a peer that died or hangs ends the run with a
:class:`StageError` naming the rank, instead of a hang. Gloo on CPU, NCCL on GPU (tensors then travel on the
device; the header too, as NCCL moves device memory only).

Two properties of NCCL shape the wire, and gloo runs the same way so that the CPU tests cover it:

- NCCL ignores tags: messages between two ranks arrive in the order they were sent, whatever the tag. So the tag
  travels in the header, and :meth:`Channel.recv` keeps messages of other tags that arrive first until they are
  asked for (a last stage's latents that are still in flight when a rebalance sends it cache layers, say).
- NCCL runs the operations of one process group on one CUDA stream, in the order they were posted: a send to a
  peer that waits for that peer's receive holds up this rank's later receives from the same peer. Two stages that
  send to each other (the ring of two) would deadlock on a single group. Messages therefore travel on one group
  per direction (:func:`init_stage_groups`: lower to higher rank, higher to lower rank), collectives on the
  default group.
"""

from __future__ import annotations

import json
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

TAG_FORWARD = 1
"""Activations of one forward (or a prompt switch) from a stage to the next."""
TAG_RESULT = 2
"""Latents of one forward from the last stage back to the first (the ring's closing edge)."""
TAG_LAYERS = 3
"""K/V of cache layers that change owner in a rebalance."""
TAG_FRAMES = 4
"""Serving: decoded frames of a chunk from the last stage to the first (which runs the engine)."""
TAG_CONTROL = 5
"""Serving: a control message (open, close, heartbeat, stop) back from the last stage to the first, once every
stage has handled it (it travels the ring on ``TAG_FORWARD``, in order with the forwards)."""

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8)}


class StageError(RuntimeError):
    """A pipeline stage could not talk to another one (dead or hung rank, timeout)."""


_stage_groups: tuple | None = None
"""(default group, lower->higher rank group, higher->lower rank group) from :func:`init_stage_groups`."""


def init_stage_groups() -> None:
    """Make the two process groups that point-to-point messages travel on, one per direction. Collective: every
    rank calls it once, right after ``init_process_group`` (``generate.init_process_group`` does). Required over
    NCCL; without it (gloo) messages travel on the default group."""
    global _stage_groups
    upward, downward = dist.new_group(), dist.new_group()
    _stage_groups = (dist.group.WORLD, upward, downward)


class Channel:
    """Messages to and from other ranks of the default process group.

    Example::

        ch = Channel(rank=0, device=torch.device("cpu"), timeout_s=60)
        ch.send(1, {"forward": 3}, [h], tag=TAG_FORWARD)
        meta, tensors = ch.recv(1, tag=TAG_RESULT, what="the latents of forward 0")
    """

    def __init__(self, rank: int, device: torch.device, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        groups = _stage_groups if _stage_groups is not None and _stage_groups[0] is dist.group.WORLD else None
        if groups is None and device.type == "cuda":
            raise ValueError(
                "over NCCL, call stream_runtime.distributed.comm.init_stage_groups() on every rank right after "
                "init_process_group (one process group per direction; a single one deadlocks a ring of two stages)"
            )
        self.rank = rank
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self._upward, self._downward = (groups[1], groups[2]) if groups is not None else (None, None)
        self._pending: list[tuple] = []  # (work, tensors kept alive until the send completes)
        self._early: dict[tuple[int, int], deque] = {}  # (src, tag) -> messages that came before they were asked for

    def send(self, dst: int, meta: dict, tensors: list[torch.Tensor], tag: int) -> None:
        """Post a message to ``dst`` without waiting for it to be received."""
        tensors = [t.detach().to(self.device).contiguous() for t in tensors]
        shapes = [[str(t.dtype), list(t.shape)] for t in tensors]
        header = json.dumps({"tag": tag, "meta": meta, "tensors": shapes}).encode()
        head = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device)
        sizes = torch.tensor([head.numel(), len(tensors)], dtype=torch.int64, device=self.device)
        parts = [sizes, head, *tensors]
        group = self._group(self.rank, dst)
        works = [dist.isend(t, dst, group=group) for t in parts]
        self._pending.append((works, parts))
        self._pending = [(w, p) for w, p in self._pending if not all(x.is_completed() for x in w)]

    def recv(self, src: int, tag: int, what: str) -> tuple[dict, list[torch.Tensor]]:
        """Receive the next message with ``tag`` from ``src``; ``what`` names it in the error if none comes.
        Messages of other tags that ``src`` sent before it are kept, in order, for the calls that ask for them."""
        early = self._early.get((src, tag))
        if early:
            return early.popleft()
        while True:
            sent_tag, meta, tensors = self._recv_message(src, what)
            if sent_tag == tag:
                return meta, tensors
            self._early.setdefault((src, sent_tag), deque()).append((meta, tensors))

    def _recv_message(self, src: int, what: str) -> tuple[int, dict, list[torch.Tensor]]:
        """The next message from ``src`` on the wire, whatever its tag."""
        sizes = self._recv(torch.empty(2, dtype=torch.int64, device=self.device), src, what)
        head = self._recv(torch.empty(int(sizes[0]), dtype=torch.uint8, device=self.device), src, what)
        header = json.loads(bytes(head.cpu().tolist()))
        tensors = []
        for dtype, shape in header["tensors"]:
            buf = torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
            tensors.append(self._recv(buf, src, what))
        if len(tensors) != int(sizes[1]):
            raise StageError(f"rank {self.rank}: malformed message from rank {src} ({what})")
        return header["tag"], header["meta"], tensors

    def _group(self, src: int, dst: int):
        """The process group of messages from rank ``src`` to rank ``dst`` (None: the default group)."""
        return self._upward if src < dst else self._downward

    def _recv(self, buf: torch.Tensor, src: int, what: str) -> torch.Tensor:
        try:
            dist.irecv(buf, src, group=self._group(src, self.rank)).wait(self.timeout)
        except RuntimeError as exc:
            raise StageError(
                f"rank {self.rank}: waiting for {what} from rank {src} failed (timeout "
                f"{self.timeout.total_seconds():.0f} s): {exc}. Rank {src} died or hangs; see its log."
            ) from exc
        return buf

    def all_gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all), bounded by the timeout."""
        tensor = tensor.to(self.device)
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        try:
            dist.all_gather(out, tensor, async_op=True).wait(self.timeout)
        except RuntimeError as exc:
            raise StageError(f"rank {self.rank}: all-gather of {what} failed: {exc}. A rank died or hangs.") from exc
        return out

    def flush(self) -> None:
        """Wait (bounded) until every posted send has been received."""
        for works, _ in self._pending:
            for work in works:
                try:
                    work.wait(self.timeout)
                except RuntimeError as exc:
                    raise StageError(f"rank {self.rank}: a send was never received: {exc}") from exc
        self._pending.clear()
