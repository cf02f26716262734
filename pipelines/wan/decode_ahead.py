"""Decode ahead: the next chunk's denoising overlaps this chunk's VAE decode.

A session's ``next_chunk`` denoises a chunk, then decodes it, then starts the next one, so the GPU runs the
transformer and the VAE one after the other. :class:`DecodeAhead` runs the denoising in a producer thread (on the
stream the session was built on) up to ``depth`` chunks ahead, while the caller's thread decodes each finished
chunk on a side CUDA stream, so the two can share the GPU. The frames are those ``next_chunk`` gives; what changes
is when a prompt switch lands: :meth:`DecodeAhead.set_prompt` applies before the next chunk the producer starts,
which may be up to ``depth + 1`` chunks after the last one handed out (:attr:`DecodeAhead.switched_at` records
where each switch applied).

For video-to-video, give the input as an iterable of frames: the producer pulls what each chunk needs (encode
included), so the input is read no faster than it is used, and the runner ends once the input has ended and the
last chunk is out.

Example::

    with pipe.session("a fox running in snow", seed=0) as s, DecodeAhead(s) as ahead:
        for i, frames in enumerate(ahead):  # uint8 [T, H, W, 3] per chunk
            if i == 10:
                ahead.set_prompt("a fox running in a desert")

    with pipe.session("a watercolor painting", mode="v2v") as s, DecodeAhead(s, frames=webcam_frames) as ahead:
        for frames in ahead:  # ends when webcam_frames does
            ...

``StreamConfig.early_first_frame`` does not apply here: the runner hands out whole chunks.

Do not call the session itself while a :class:`DecodeAhead` runs on it; close the runner first. The session
is then ahead of what was handed out by the chunks the runner generated but did not hand out.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Iterable

import numpy as np
import torch

from stream_runtime.producer import END, Producer


class DecodeAhead:
    """Iterate ``session``'s chunks with denoising ``depth`` chunks ahead of decoding; ``frames`` (uint8
    ``[H, W, 3]`` each, at the session's size) is the input of a video-to-video session."""

    def __init__(self, session, depth: int = 1, frames: Iterable[np.ndarray] | None = None) -> None:
        if (session.mode == "v2v") != (frames is not None):
            raise ValueError(
                "give frames= (an iterable of input frames) for a video-to-video session, and only for one; "
                f"got mode {session.mode!r} with frames={'set' if frames is not None else None}"
            )
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.session = session
        self._frames = None if frames is None else iter(frames)
        device = session.pipe.device
        # The side stream is what lets the decode run beside the next chunk's kernels.
        self._side = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = False
        self.switched_at: list[int] = []
        """Chunk numbers before which each :meth:`set_prompt` took effect, in order."""
        self._producer = Producer(self._produce, maxsize=depth, name="decode-ahead")

    # -- producer

    def _produce(self, producer: Producer) -> None:
        with torch.no_grad():  # grad mode is per thread
            while not producer.closed:
                self._run_commands()
                if self._frames is not None and not self._feed():
                    return  # the input ended and every chunk is out
                start = time.perf_counter()
                x0 = self.session._generate_latents()  # its context pass runs at the start of the next chunk
                if x0 is None:  # a stream batch still filling: feed it more
                    continue
                event = None
                if self._side is not None:
                    event = torch.cuda.Event()
                    event.record()
                if not producer.put((x0, event, self.session.chunk_index - 1, start)):
                    return

    def _feed(self) -> bool:
        """Push the input frames the next chunk needs; False once the input has ended with nothing in flight (a
        stream batch is drained first, so its last chunks come out too)."""
        session = self.session
        need = session.frames_needed()
        batch = list(itertools.islice(self._frames, need))
        if batch:
            session.push_frames(np.stack(batch))
        if len(batch) < need:
            if not session.chunks_in_flight:
                return False
            session.set_stream_batch(False)
        return True

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    # -- consumer

    def set_prompt(self, prompt: str, blend_chunks: int | None = None) -> None:
        """Switch the prompt before the next chunk the producer starts (see the module doc)."""

        def switch():
            self.switched_at.append(self.session.chunk_index)
            self.session.set_prompt(prompt, blend_chunks)

        self._commands.put(switch)

    def next_chunk(self) -> np.ndarray:
        """The next chunk's frames, uint8 ``[T, H, W, 3]`` (what ``session.next_chunk()`` gives)."""
        item = END if self._ended else self._producer.get()
        if item is END:
            self._ended = True  # later calls end the same way
            self._producer.raise_error()
            raise StopIteration
        x0, event, index, start = item
        with torch.no_grad():
            if self._side is None:
                return self.session._emit(x0, start, index)
            self._side.wait_event(event)
            x0.record_stream(self._side)  # the producer's allocator must not reuse it before the decode is done
            with torch.cuda.stream(self._side):
                return self.session._emit(x0, start, index)

    def __iter__(self) -> DecodeAhead:
        return self

    def __next__(self) -> np.ndarray:
        return self.next_chunk()

    def __enter__(self) -> DecodeAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the producer after the chunk it is denoising, and wait for it."""
        self._producer.close()
