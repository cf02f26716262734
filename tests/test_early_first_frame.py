"""StreamConfig.early_first_frame: the first latent frame comes out alone, the stream's frames are unchanged."""

import numpy as np
import pytest

from stream_runtime import StreamPipeline
from stream_runtime.pipelines.wan.batching import next_chunks


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random()


def chunks(session, n):
    return [session.next_chunk() for _ in range(n)]


@pytest.mark.parametrize("stream_batch", [False, True])
def test_first_chunk_comes_in_two_parts_with_the_same_frames(pipe, stream_batch):
    with pipe.session("a red fox", seed=2, stream_batch=stream_batch) as s:
        ref = chunks(s, 3)
    with pipe.session("a red fox", seed=2, stream_batch=stream_batch, early_first_frame=True) as s:
        got = chunks(s, 4)
        assert s.last_chunk.index == 2
    assert [len(c) for c in ref] == [9, 12, 12]
    assert [len(c) for c in got] == [1, 8, 12, 12]
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(ref))


def test_one_latent_frame_chunks_are_not_split(pipe):
    with pipe.session("a red fox", seed=1, chunk_frames=1, early_first_frame=True) as s:
        assert [len(c) for c in chunks(s, 3)] == [1, 4, 4]


def test_the_rest_of_the_first_chunk_counts_as_in_flight(pipe):
    """A caller that stops when nothing is in flight (generate --input at the end of its input) still gets it."""
    with pipe.session("a red fox", seed=1, early_first_frame=True) as s:
        s.next_chunk()
        assert s.chunks_in_flight == 1
        assert len(s.next_chunk()) == 8 and s.chunks_in_flight == 0


def test_shared_forwards_wait_until_the_first_chunk_is_out(pipe):
    a = pipe.session("a red fox", seed=1, early_first_frame=True)
    b = pipe.session("a blue cat", seed=2, early_first_frame=True)
    ra = pipe.session("a red fox", seed=1)
    rb = pipe.session("a blue cat", seed=2)
    with a, b, ra, rb:
        with pytest.raises(ValueError, match="early_first_frame"):
            next_chunks([a, b])
        for s in (a, b):
            chunks(s, 2)  # the two parts of the first chunk, alone
        got = next_chunks([a, b])  # now they share forwards
        ref = [np.concatenate(chunks(r, 2)[1:]) for r in (ra, rb)]
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        assert np.abs(g.astype(int) - r.astype(int)).max() <= 1  # batched matmuls: float rounding only
