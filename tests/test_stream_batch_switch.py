"""Switching a live session between sequential and stream-batch denoising (what the SLO scheduler does).

fp32, the tiny random model: a drained stream batch gives exactly the chunks the undrained one gives, a batch
turned on before the first chunk equals a session opened with ``stream_batch=True``, and a session goes on with
continuous chunk indices across switches.
"""

import numpy as np
import pytest
from conftest import assert_close

from stream_runtime.config import StreamConfig
from stream_runtime.pipelines.wan.pipeline import StreamPipeline

SIZE = 32
CONFIG = StreamConfig(chunk_frames=1, sink_frames=1, window_frames=3, timesteps=(1000, 750, 500))
PASSES = len(CONFIG.timesteps) + 1  # the context pass


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(seed=0, height=SIZE, width=SIZE)


def test_turning_the_batch_on_before_the_first_chunk_equals_a_stream_batch_session(pipe):
    with pipe.session("a red fox", seed=2, height=SIZE, width=SIZE, config=CONFIG) as s:
        s.set_stream_batch(True)
        assert s.stream_batching and s.config.stream_batch
        got = [s.generate_latents() for _ in range(4)]
    with pipe.session("a red fox", seed=2, height=SIZE, width=SIZE, config=CONFIG.replace(stream_batch=True)) as s:
        ref = [s.generate_latents() for _ in range(4)]
    for a, b in zip(got, ref, strict=True):
        assert_close(a, b)


def test_a_drain_gives_the_chunks_in_flight_unchanged_then_the_session_goes_on_sequentially(pipe):
    batched = CONFIG.replace(stream_batch=True)
    with pipe.session("a red fox", seed=4, height=SIZE, width=SIZE, config=batched) as s:
        ref = [s.generate_latents() for _ in range(6)]
    with pipe.session("a red fox", seed=4, height=SIZE, width=SIZE, config=batched) as s:
        got = [s.generate_latents() for _ in range(2)]
        assert s.chunks_in_flight == PASSES - 1
        s.set_stream_batch(False)
        assert not s.stream_batching and s.chunks_in_flight == PASSES - 1
        with pytest.raises(ValueError, match="drain"):
            s.set_stream_batch(True)
        # Chunks in one batch never see one another, so no longer admitting new ones changes none in flight.
        for expected_in_flight in range(PASSES - 2, -1, -1):
            got.append(s.generate_latents())
            assert s.chunks_in_flight == expected_in_flight
        assert not s.config.stream_batch and s.chunk_index == 2 + PASSES - 1
        sequential = s.next_chunk()  # after the drain: one chunk, all of its passes, at once
        assert sequential.shape[1:] == (SIZE, SIZE, 3) and s.chunk_index == 2 + PASSES
        s.set_stream_batch(True)  # on again after the drain: a new batch from the next chunk
        s.generate_latents()
        assert s.chunk_index == 2 + PASSES + 1 and s.chunks_in_flight == PASSES - 1
    for a, b in zip(got, ref[: len(got)], strict=True):
        assert_close(a, b)


def test_batch_after_sequential_chunks_continues_the_stream(pipe):
    with pipe.session("a red fox", seed=1, height=SIZE, width=SIZE, config=CONFIG) as s:
        s.next_chunk()
        s.set_stream_batch(True)
        s.set_stream_batch(True)  # idempotent
        frames = s.next_chunk()  # the warm-up: PASSES forwards until chunk 1 leaves
        assert s.last_chunk.index == 1 and frames.shape[1:] == (SIZE, SIZE, 3)
        assert s.chunks_in_flight == PASSES - 1
        s.set_stream_batch(False)
        s.set_stream_batch(False)  # idempotent
    with pipe.session("a cat", mode="v2v", height=SIZE, width=SIZE, config=CONFIG.replace(context_pass=False)) as s:
        s.push_frames(np.zeros((1 + 4 * 6, SIZE, SIZE, 3), np.uint8))
        s.next_chunk()
        s.set_stream_batch(True)  # video-to-video joins the batch too: its chunks enter with their input
        assert s.next_chunk() is not None and s.last_chunk.index == 1
        in_flight = s.chunks_in_flight
        s.set_stream_batch(False)
        assert in_flight > 0 and s.frames_needed() == 0  # a drain takes no new input
        s._inputs.clear()
        for _ in range(in_flight):
            assert s.next_chunk() is not None  # the chunks in flight come out without more input
        assert s.chunks_in_flight == 0 and s.next_chunk() is None  # sequential again, waiting for input
    with pipe.session("a cat", height=SIZE, width=SIZE, config=CONFIG.replace(attention_reuse=1)) as s:
        with pytest.raises(ValueError, match="attention_reuse"):
            s.set_stream_batch(True)


def test_turning_the_batch_off_before_any_forward_leaves_the_session_sequential(pipe):
    with pipe.session("a red fox", seed=2, height=SIZE, width=SIZE, config=CONFIG) as s:
        s.set_stream_batch(True)
        s.set_stream_batch(False)
        assert s.chunks_in_flight == 0 and not s.config.stream_batch
        s.generate_latents()
        assert s.chunk_index == 1
