"""One pipeline stage of a distributed stream: a contiguous range of transformer blocks and their KV cache.

Stages form a ring over the stream-batch schedule (:mod:`stream_runtime.stream_batch`, stride = number of stages,
so that as many batches circulate as there are stages and every stage is busy)::

    stage 0:   new chunk noise + latents back from the ring -> embed -> blocks [0, b1)  --send-->
    stage s:   blocks [b_s, b_s+1)                                                      --send-->
    stage N-1: blocks [.., L) -> head -> x0, re-noise / context-pass input -> VAE decode -> frames
               `--send latents of forward f back to stage 0 (it needs them for forward f + N)

Every stage rebuilds the per-forward conditioning (timesteps, RoPE, modulation) from host metadata and keeps the
same cache bookkeeping (each commits the chunk that leaves in each forward), so only activations travel. A prompt
switch travels through the ring in order as its own message, ahead of the forward it applies to, and carries the
recache passes when ``prompt_switch='recache'``. Outputs equal a single-process stream-batch session with the same
config (``stream_batch_stride`` = number of stages): the same passes, in the same batches, on the same cache views.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from stream_runtime.cache import CacheLayout, RollingKVCache
from stream_runtime.config import StreamConfig
from stream_runtime.pipelines.wan import sampling
from stream_runtime.pipelines.wan.stream_batch import passes_of
from stream_runtime.pipelines.wan.vae_stream import StreamingVAEEncoder
from stream_runtime.stream_batch import StreamBatchSchedule, pass_noise

from .comm import TAG_FORWARD, TAG_LAYERS, TAG_RESULT, Channel
from .partition import balance, even_partition, ranges_from_bounds, stage_times

log = logging.getLogger("stream_runtime.distributed")


@dataclass(frozen=True)
class RunPlan:
    """What every rank knows before the run starts (the same on all ranks)."""

    prompt: str
    seed: int
    num_chunks: int | None
    """Chunks of the stream; None: endless (serving, the first stage drives it forward by forward)."""
    height: int
    width: int
    config: StreamConfig
    """A stream-batch config; its stride should equal the number of stages for a busy pipeline."""
    switches: tuple[tuple[int, str], ...] = ()
    """(forward, prompt): switch before that forward (see :func:`switch_forward`)."""
    bounds: tuple[int, ...] | None = None
    """Inner block boundaries of the stages at the start (None: even split)."""
    rebalance: str = "off"
    """``off``; ``auto``: measure stage times after the warm-up and move blocks to shrink the slowest stage;
    ``forced``: move to ``rebalance_to`` (tests) after ``rebalance_at``."""
    rebalance_to: tuple[int, ...] | None = None
    rebalance_at: int | None = None
    """Forward after which to rebalance (default: the warm-up plus ``measure_forwards``)."""
    measure_forwards: int = 4
    """Forwards timed before a rebalance, and again after it for the report."""
    rebalance_rounds: int = 1
    """``auto``: rebalance this many times, each on the ``measure_forwards`` forwards since the last one. A later
    round corrects the first when the first window's times were off: on two H200 (2026-11-23) the first stage
    timed 405 ms per forward for 15 blocks right after the warm-up and 226 ms for 16 blocks one window later, so
    one round moved a single block off the last stage, which also decodes."""
    timeout_s: float = 300.0
    mode: str = "t2v"
    """``t2v``, or ``v2v``: the first stage encodes each entering chunk's input frames (from its ``source``) and
    noises them to the first level of the step list after ``config.strength``; the noisy input travels with the
    forward's activations to the last stage, which needs it for the chunk's clean estimate."""

    def __post_init__(self) -> None:
        if self.mode not in ("t2v", "v2v"):
            raise ValueError(f"mode must be 't2v' or 'v2v', got {self.mode!r}")
        if self.mode == "v2v" and self.config.motion_aware:
            raise ValueError("motion-aware strength is not supported over pipeline stages: set motion_aware=False")
        if self.rebalance_rounds < 1:
            raise ValueError(f"rebalance_rounds must be >= 1, got {self.rebalance_rounds}")
        if self.rebalance_rounds > 1 and self.rebalance != "auto":
            raise ValueError(f"rebalance_rounds > 1 needs rebalance='auto', got {self.rebalance!r}")


def switch_forward(chunks_out: int, lag: int) -> int:
    """The forward a prompt switch acts before when it is made after ``chunks_out`` chunks came out (as a session's
    ``set_prompt`` between ``next_chunk`` calls): the next forward to run."""
    return 0 if chunks_out == 0 else chunks_out + lag


class PipelineStage:
    """Rank ``rank`` of ``world`` stages. :meth:`run` runs the whole stream; the last stage hands each finished
    chunk to ``on_chunk(chunk, x0 [1, C, F, h, w], frames uint8 [T, H, W, 3])``.

    Example::

        stage = PipelineStage(pipe, plan, rank, world, Channel(rank, device, plan.timeout_s), on_chunk=write)
        stage.run()
    """

    def __init__(
        self,
        pipe,
        plan: RunPlan,
        rank: int,
        world: int,
        channel: Channel,
        on_chunk: Callable[[int, torch.Tensor, np.ndarray], None] | None = None,
        source: Iterator[np.ndarray] | None = None,
    ) -> None:
        config = plan.config
        if plan.mode == "v2v" and rank == 0 and source is None:
            raise ValueError("a video-to-video pipeline needs the input frames on the first stage: pass source=")
        if not config.stream_batch:
            raise ValueError("a pipeline over stages runs the stream batch: pass a config with stream_batch=True")
        if config.blend_chunks:
            raise ValueError("prompt blending is not supported across stages yet: use blend_chunks=0")
        if plan.rebalance not in ("off", "auto", "forced"):
            raise ValueError(f"rebalance must be 'off', 'auto' or 'forced', got {plan.rebalance!r}")
        if plan.rebalance == "forced" and plan.rebalance_to is None:
            raise ValueError("rebalance='forced' needs rebalance_to (the new block boundaries)")
        self.pipe, self.net, self.plan, self.config = pipe, pipe.net, plan, config
        self.rank, self.world, self.channel = rank, world, channel
        self.first, self.last = rank == 0, rank == world - 1
        self.on_chunk = on_chunk
        num_layers = self.net.num_layers
        self.ranges = (
            even_partition(num_layers, world)
            if plan.bounds is None
            else ranges_from_bounds(list(plan.bounds), num_layers)
        )
        if len(self.ranges) != world:
            raise ValueError(f"bounds give {len(self.ranges)} stages for {world} ranks")
        self.schedule = StreamBatchSchedule(passes_of(config), config.stream_batch_stride)
        self.steps = len(config.timesteps)
        strength = config.strength if plan.mode == "v2v" else 1.0  # a v2v field; t2v starts from pure noise
        self.sigmas = sampling.sigmas_for(config.timesteps, config.shift, strength)
        self.source = source  # first stage, video-to-video: uint8 [H, W, 3] input frames
        self.encoder = StreamingVAEEncoder(pipe.vae) if plan.mode == "v2v" and rank == 0 else None
        pipe.check_resolution(plan.height, plan.width)
        factor = pipe.vae.config.scale_factor_spatial
        self.latent_shape = (pipe.vae.config.z_dim, plan.height // factor, plan.width // factor)
        self.grid = self.net.grid(*self.latent_shape[1:])
        layout = CacheLayout(self.grid[0] * self.grid[1], config.sink_frames, config.window_frames, config.chunk_frames)
        self.cache = RollingKVCache(
            layout,
            num_layers,
            1,
            self.net.heads,
            self.net.head_dim,
            dtype=pipe.dtype,
            device=pipe.device,
            layers=self.ranges[rank],
        )
        self._place_blocks()  # before the text K/V, which are computed with this stage's blocks
        self.embeds = pipe.encode_prompt(plan.prompt)
        self.text = self.net.text_kv(self.embeds, self.layers)
        self.switches = dict(plan.switches)
        self.inputs: dict[int, torch.Tensor] = {}  # first stage: chunk -> latents of its next pass
        self.kept_latents: dict[int, torch.Tensor] = {}  # first stage: frame -> clean latents [1, C, 1, h, w]
        self._next_result = 0  # first stage: the next forward whose ring result is due
        self.decoder = pipe.streaming_decoder() if self.last else None
        self._pass_inputs: dict[int, torch.Tensor] = {}  # last stage: chunk -> input of its next pass
        self._timing = False
        self._block_s = [0.0] * num_layers
        self._extra_s = 0.0
        self._wait_s = 0.0
        self._timed = 0
        self.report: dict = {}
        """Rebalance report (every rank): blocks and stage times (ms per forward) before, predicted, after."""

    @property
    def layers(self) -> range:
        return self.ranges[self.rank]

    # -- the loop

    @torch.no_grad()
    def run(self) -> None:
        """Run every forward of the stream in order."""
        total = self.schedule.total_forwards(self.plan.num_chunks)
        rounds, after_at = self._rebalance_forwards()
        for f in range(total):
            # the windows are contiguous: measure forwards before each round, and again before the report
            self._timing = bool(rounds) and rounds[0] - self.plan.measure_forwards < f <= (after_at or rounds[-1])
            items = self.schedule.items(f, self.plan.num_chunks)
            if items:
                self._forward(f, items)
                self._timed += self._timing
            if f in rounds:
                self._rebalance(f)
            elif f == after_at:
                self._report_after()
        if self.first:
            self.drain_results(total - 1)
        self.channel.flush()

    def _rebalance_forwards(self) -> tuple[list[int], int | None]:
        """(forwards after which to rebalance, forward after which to time the result for the report or None
        when the stream ends before)."""
        if self.plan.rebalance == "off":
            return [], None
        at = self.plan.rebalance_at
        if at is None:
            at = self.schedule.warmup_forwards + self.plan.measure_forwards - 1
        total = self.schedule.total_forwards(self.plan.num_chunks)
        rounds = [
            r
            for r in range(at, at + self.plan.rebalance_rounds * self.plan.measure_forwards, self.plan.measure_forwards)
            if r < total
        ]
        after = rounds[-1] + self.plan.measure_forwards
        return rounds, after if after < total else None

    def _forward(self, f: int, items: list[tuple[int, int]]) -> None:
        if self.first:
            self._switch_first(f)
            self._settle()
            start = time.perf_counter()
            xs = [self.inputs.pop(c) if p else self._start(c) for c, p in items]
            # Video-to-video: the last stage needs a new chunk's noisy input (it cannot draw it as noise).
            extra = [xs[b] for b, (_, p) in enumerate(items) if p == 0] if self.plan.mode == "v2v" else []
            h = self.net.embed(torch.cat(xs))
            self._extra(start)
        else:
            meta, tensors = self.channel.recv(self.rank - 1, TAG_FORWARD, f"forward {f}")
            while meta.get("kind") == "switch":
                self._switch_other(meta, tensors)
                meta, tensors = self.channel.recv(self.rank - 1, TAG_FORWARD, f"forward {f}")
            if meta["forward"] != f or [tuple(i) for i in meta["items"]] != items:
                raise RuntimeError(f"rank {self.rank}: expected forward {f} {items}, got {meta}")
            h, extra = tensors[0], tensors[1:]
        self._through(f, items, h, extra)

    # -- an endless stream driven from outside (serving: stream_runtime.distributed.serve)

    def step(self, f: int) -> None:
        """First stage: run forward ``f`` (a prompt switch registered with :meth:`switch_at` first)."""
        self._forward(f, self.schedule.items(f, self.plan.num_chunks))

    def switch_at(self, f: int, prompt: str) -> None:
        """First stage: switch to ``prompt`` before forward ``f`` (which has not run yet); it travels the ring."""
        self.switches[f] = prompt

    def drain_results(self, upto: int) -> None:
        """First stage, at the end of a stream: receive the results of every forward up to ``upto`` that are still
        in flight, so that no send of the last stage is left unreceived. A no-op on a single stage."""
        self._receive_results(upto)

    def take(self, meta: dict, tensors: list[torch.Tensor]) -> None:
        """A later stage: handle one message of the previous stage (a forward or a prompt switch), in order."""
        if meta.get("kind") == "switch":
            self._switch_other(meta, tensors)
            return
        f, items = meta["forward"], [tuple(i) for i in meta["items"]]
        if items != self.schedule.items(f, self.plan.num_chunks):
            raise RuntimeError(f"rank {self.rank}: forward {f} holds {items}, the schedule says otherwise")
        self._through(f, items, tensors[0], tensors[1:])

    def _through(self, f: int, items: list[tuple[int, int]], h: torch.Tensor, extra: list[torch.Tensor]) -> None:
        """This stage's blocks over forward ``f``'s activations ``h``; then send on (with ``extra``: a new chunk's
        video-to-video input), or finish (last stage)."""
        fc = self.config.chunk_frames
        self._settle()
        start = time.perf_counter()
        ts = [self.sigmas[p] * 1000.0 if p < self.steps else 0.0 for _, p in items]
        timesteps = torch.tensor(ts, dtype=torch.float32, device=self.pipe.device)
        cond = self.net.batch_conditioning(
            timesteps, [c * fc for c, _ in items], fc, self.grid, self.cache, self.config.position_mode
        )
        self._extra(start)
        leaving = self.schedule.leaving(f, self.plan.num_chunks)
        commit_item = len(items) - 1 if leaving is not None else None
        h = self._blocks(h, cond, commit_item)
        if leaving is not None:
            self.cache.commit(leaving * fc, fc)
        if not self.last:
            self.channel.send(self.rank + 1, {"forward": f, "items": items}, [h, *extra], TAG_FORWARD)
        else:
            self._finish(f, items, h, cond, leaving, extra)

    def _blocks(self, h: torch.Tensor, cond, commit_item: int | None) -> torch.Tensor:
        for layer in self.layers:
            start = time.perf_counter()
            h = self.net.run_blocks(
                h,
                cond,
                self.text,
                self.cache,
                range(layer, layer + 1),
                commit_item,
                backend=self.config.attention_backend,
            )
            if self._timing:
                self._sync()
                self._block_s[layer] += time.perf_counter() - start
        return h

    def _finish(self, f: int, items, h: torch.Tensor, cond, leaving: int | None, extra: list[torch.Tensor]) -> None:
        """Last stage: head, x0, next inputs back to the first stage, decode of the chunk that left."""
        start = time.perf_counter()
        flow = self.net.head(h, cond).float()
        # x0 = x - sigma * flow needs each chunk's pass input: the last stage made every one of them itself (as
        # re-noised or context-pass inputs) except a new chunk's: noise, which it draws again, or in
        # video-to-video the noisy encoded input, which came with the activations.
        new = iter(extra)
        xs = [self._pass_inputs.pop(c) if p else (next(new) if extra else self._noise(c, 0)) for c, p in items]
        chunks, nexts, out = [], [], None
        for b, (c, p) in enumerate(items):
            x0 = xs[b] if p == self.steps else sampling.to_x0(xs[b], flow[b : b + 1], self.sigmas[p])
            if p + 1 < self.steps:
                nexts.append(
                    sampling.next_sample(
                        x0,
                        xs[b],
                        flow[b : b + 1],
                        self.sigmas[p],
                        self.sigmas[p + 1],
                        self._noise(c, p + 1),
                        self.config.sampler,
                    )
                )
                chunks.append(c)
            elif p + 1 == self.steps and self.config.context_pass:
                nexts.append(x0)
                chunks.append(c)
            if c == leaving:
                out = x0
        self._pass_inputs.update(zip(chunks, nexts, strict=True))
        meta = {"forward": f, "chunks": chunks, "leaving": leaving}
        tensors = ([torch.cat(nexts)] if nexts else []) + ([out] if out is not None else [])
        if self.first:
            self._take_result(meta, tensors)
        else:
            self.channel.send(0, meta, tensors, TAG_RESULT)
        if out is not None:
            pixels = self.decoder.decode(out.to(self.pipe.decoder_dtype))
            frames = ((pixels[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
            if self.on_chunk is not None:
                self.on_chunk(leaving, out, frames.permute(1, 2, 3, 0).cpu().numpy())
        self._extra(start)

    # -- the ring's closing edge: latents back to the first stage

    def _take_result(self, meta: dict, tensors: list[torch.Tensor]) -> None:
        chunks, leaving = meta["chunks"], meta["leaving"]
        if chunks:
            for c, x in zip(chunks, tensors[0].split(1), strict=True):
                self.inputs[c] = x
        if leaving is not None:
            x0 = tensors[-1]
            fc = self.config.chunk_frames
            for i in range(fc):
                self.kept_latents[leaving * fc + i] = x0[:, :, i : i + 1]
            kept = set(self.cache.kept_frames())
            self.kept_latents = {fr: x for fr, x in self.kept_latents.items() if fr in kept}
        self._next_result = meta["forward"] + 1

    def _receive_results(self, upto: int) -> None:
        """First stage: take the ring results of every non-empty forward up to ``upto``."""
        if self.last:  # one stage: results are taken locally
            return
        while self._next_result <= upto:
            g = self._next_result
            if not self.schedule.items(g, self.plan.num_chunks):
                self._next_result += 1
                continue
            meta, tensors = self.channel.recv(self.world - 1, TAG_RESULT, f"the latents of forward {g}")
            if meta["forward"] != g:
                raise RuntimeError(f"rank 0: expected the result of forward {g}, got {meta['forward']}")
            self._take_result(meta, tensors)

    def _start(self, chunk: int) -> torch.Tensor:
        """First stage: a new chunk's first pass input: noise, or in video-to-video its next input frames encoded
        and noised to the first level (as ``StreamBatchRunner`` does in one process)."""
        if self.plan.mode == "t2v":
            return self._noise(chunk, 0)
        t = self.pipe.temporal_factor
        need = 1 + t * (self.config.chunk_frames - 1) if chunk == 0 else t * self.config.chunk_frames
        frames = list(itertools.islice(self.source, need))
        if len(frames) < need:
            raise ValueError(f"the input video ended before chunk {chunk}: {len(frames)} of its {need} frames left")
        vae_dtype = next(self.pipe.vae.parameters()).dtype
        pixels = torch.from_numpy(np.stack(frames)).to(self.pipe.device).permute(3, 0, 1, 2)[None]
        z = self.encoder.encode(pixels.to(vae_dtype) / 127.5 - 1.0).float()
        noise = pass_noise(self.plan.seed, chunk, 0, z.shape, self.pipe.device)
        return sampling.add_noise(z, noise, self.sigmas[0])

    def _noise(self, chunk: int, pass_index: int) -> torch.Tensor:
        shape = (1, self.latent_shape[0], self.config.chunk_frames, *self.latent_shape[1:])
        return pass_noise(self.plan.seed, chunk, pass_index, shape, self.pipe.device)

    # -- prompt switches

    def _switch_first(self, f: int) -> None:
        """First stage, before forward ``f``: take the results it needs, apply a switch due now and send it on."""
        prompt = self.switches.get(f)
        recache = prompt is not None and self.config.prompt_switch == "recache"
        self._receive_results(f - 1 if recache else f - self.schedule.stride)
        if prompt is None:
            return
        self._set_prompt(prompt)
        groups, hs = [], []
        if recache:
            frames = self.cache.kept_frames()
            fc = self.config.chunk_frames
            start = 0
            while start < len(frames):  # runs of kept frames of one chunk, as StreamSession.recache
                end = start + 1
                while end < len(frames) and frames[end] // fc == frames[start] // fc:
                    end += 1
                groups.append([frames[start], end - start])
                x = torch.cat([self.kept_latents[fr] for fr in frames[start:end]], dim=2)
                hs.append(self.net.embed(x))
                start = end
            hs = self._recache(groups, hs)
        if not self.last:
            self.channel.send(1, {"kind": "switch", "forward": f, "prompt": prompt, "groups": groups}, hs, TAG_FORWARD)

    def _switch_other(self, meta: dict, tensors: list[torch.Tensor]) -> None:
        self._set_prompt(meta["prompt"])
        hs = self._recache(meta["groups"], tensors) if meta["groups"] else []
        if not self.last:
            self.channel.send(self.rank + 1, meta, hs, TAG_FORWARD)

    def _set_prompt(self, prompt: str) -> None:
        self.embeds = self.pipe.encode_prompt(prompt)
        self.text = self.net.text_kv(self.embeds, self.layers)

    def _recache(self, groups: list, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Re-run the kept frames at t=0 under the new prompt through this stage's blocks (the same passes as
        :meth:`StreamSession.recache` in stream-batch mode); return the activations for the next stage."""
        self.cache.reset()
        out = []
        zero = torch.zeros(1, dtype=torch.float32, device=self.pipe.device)
        for (first_frame, n), h in zip(groups, hs, strict=True):
            cond = self.net.batch_conditioning(zero, [first_frame], n, self.grid, self.cache, self.config.position_mode)
            out.append(self._blocks(h, cond, 0))
            self.cache.commit(first_frame, n)
        return out

    # -- balancing

    def _extra(self, start: float) -> None:
        if self._timing:
            self._sync()
            self._extra_s += time.perf_counter() - start

    def _settle(self) -> None:
        """While timing, wait for what this stage received before its clocks start. On a GPU a receive only makes
        the compute stream wait for the transfer, so without this the first kernels of the forward (and so the
        first block's timer) absorb the wait for the previous stage: the 2-GPU run of 2026-11-23 timed the first
        stage at 388 ms per forward for 15 blocks before a rebalance and 239 ms for 17 after it, and the balancer,
        trusting the first figure, moved too few blocks off the last stage (which also decodes). The wait itself is
        kept apart (``report['ms_wait_*']``): how long a stage idles for its input per forward."""
        if self._timing:
            start = time.perf_counter()
            self._sync()
            self._wait_s += time.perf_counter() - start

    def _sync(self) -> None:
        # The compute stream only: a device-wide sync would also wait for this rank's NCCL sends, which finish when
        # the next stage takes them, and so would charge the next stage's time to this one.
        if self.pipe.device.type == "cuda":
            torch.cuda.current_stream(self.pipe.device).synchronize()

    def _gather_times(self) -> tuple[list[float], list[float], list[float]]:
        """(per-block seconds per forward, per-stage extra seconds per forward, per-stage seconds waited for input
        per forward), from every rank's timers."""
        mine = torch.tensor([*self._block_s, self._extra_s, self._wait_s], dtype=torch.float64) / max(self._timed, 1)
        rows = self.channel.all_gather(mine, "stage times")
        blocks = [float(rows[s][i]) for s, r in enumerate(self.ranges) for i in r]
        extras = [float(row[-2]) for row in rows]
        waits = [float(row[-1]) for row in rows]
        self._block_s = [0.0] * self.net.num_layers
        self._extra_s = self._wait_s = 0.0
        self._timed = 0
        return blocks, extras, waits

    def _rebalance(self, f: int) -> None:
        blocks, extras, waits = self._gather_times()
        before = stage_times(self.ranges, blocks, extras)
        if self.plan.rebalance == "forced":
            new = ranges_from_bounds(list(self.plan.rebalance_to), self.net.num_layers)
        else:
            new = balance(blocks, extras)
        if len(new) != self.world:
            raise ValueError(f"rebalance_to gives {len(new)} stages for {self.world} ranks")
        predicted = stage_times(new, blocks, extras)
        self._move_layers(new)
        step = {
            "forward": f,
            "blocks_before": [[r.start, r.stop] for r in self.ranges],
            "blocks_after": [[r.start, r.stop] for r in new],
            "ms_before": [1e3 * t for t in before],
            "ms_predicted": [1e3 * t for t in predicted],
            "ms_wait_before": [1e3 * t for t in waits],
        }
        # The report: the first round's "before", the latest round's outcome, and every round apart.
        rounds = self.report.get("rounds", [])
        first = rounds[0] if rounds else step
        self.report = {**step, **{k: v for k, v in first.items() if k.endswith("before")}, "rounds": [*rounds, step]}
        self.ranges = new
        self._place_blocks()  # first: the text K/V of a block it gains come from that block's weights
        self.text = self.net.text_kv(self.embeds, self.layers)
        if self.first:
            log.info(
                "rebalance after forward %d: blocks %s -> %s; stage ms/forward measured %s (slowest %.1f), "
                "predicted %s (slowest %.1f)",
                f,
                step["blocks_before"],
                step["blocks_after"],
                _fmt(step["ms_before"]),
                max(step["ms_before"]),
                _fmt(step["ms_predicted"]),
                max(step["ms_predicted"]),
            )

    def _report_after(self) -> None:
        blocks, extras, waits = self._gather_times()
        self.report["ms_after"] = [1e3 * t for t in stage_times(self.ranges, blocks, extras)]
        self.report["ms_wait_after"] = [1e3 * t for t in waits]
        if self.first:
            log.info(
                "stage ms/forward after the rebalance %s (slowest %.1f; before %.1f)",
                _fmt(self.report["ms_after"]),
                max(self.report["ms_after"]),
                max(self.report["ms_before"]),
            )

    def _move_layers(self, new: list[range]) -> None:
        """Send the K/V of blocks this rank loses to their new owners; receive those it gains."""
        owner_old = {i: s for s, r in enumerate(self.ranges) for i in r}
        owner_new = {i: s for s, r in enumerate(new) for i in r}
        k, v = dict(self.cache.k), dict(self.cache.v)
        for i in self.layers:
            if owner_new[i] != self.rank:
                self.channel.send(owner_new[i], {"layer": i}, [k.pop(i), v.pop(i)], TAG_LAYERS)
        for i in new[self.rank]:
            if owner_old[i] != self.rank:
                meta, (ki, vi) = self.channel.recv(owner_old[i], TAG_LAYERS, f"the cache of block {i}")
                if meta["layer"] != i:
                    raise RuntimeError(f"rank {self.rank}: expected the cache of block {i}, got {meta['layer']}")
                k[i], v[i] = ki.to(self.pipe.device), vi.to(self.pipe.device)
        self.cache.set_layers(new[self.rank], k, v)

    def _place_blocks(self) -> None:
        """On a GPU keep only this stage's blocks in device memory (the rest wait on the host for a rebalance)."""
        if self.pipe.device.type != "cuda":
            return
        for i, block in enumerate(self.net.wan.blocks):
            block.to(self.pipe.device if i in self.layers else "cpu")


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"
