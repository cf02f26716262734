"""DecodeAhead: denoising ahead of decoding gives the frames of session.next_chunk (fp32 CPU, tiny model)."""

import numpy as np
import pytest

from stream_runtime import StreamPipeline
from stream_runtime.pipelines.wan.decode_ahead import DecodeAhead


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random()


def test_frames_equal_next_chunk(pipe):
    with pipe.session("a red fox", seed=4) as s:
        ref = [s.next_chunk() for _ in range(5)]
    with pipe.session("a red fox", seed=4) as s, DecodeAhead(s, depth=2) as ahead:
        got = [next(ahead) for _ in range(5)]
        infos = s.last_chunk
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    assert infos.index == 4 and infos.first_frame == sum(len(r) for r in ref[:4])


def test_a_switch_lands_where_it_says(pipe):
    """The switch applies before chunk switched_at[0]: a plain session switched there gives the same frames."""
    with pipe.session("a red fox", seed=5) as s, DecodeAhead(s) as ahead:
        got = [next(ahead)]
        ahead.set_prompt("a blue cat")
        got += [next(ahead) for _ in range(5)]
        where = ahead.switched_at
    assert len(where) == 1 and 1 <= where[0] <= 3
    with pipe.session("a red fox", seed=5) as s:
        ref = []
        for i in range(6):
            if i == where[0]:
                s.set_prompt("a blue cat")
            ref.append(s.next_chunk())
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_producer_errors_reach_the_consumer(pipe, monkeypatch):
    with pipe.session("a red fox", seed=0) as s:
        calls = []
        original = s._generate_latents

        def failing():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory")
            return original()

        monkeypatch.setattr(s, "_generate_latents", failing)
        with DecodeAhead(s) as ahead:
            assert next(ahead).shape[0] > 0
            with pytest.raises(RuntimeError, match="out of memory"):
                next(ahead)


def test_video_to_video_reads_its_input_as_chunks_need_it(pipe):
    """frames= for v2v: the producer pushes what each chunk needs; the output is next_chunk's, and the runner
    ends when the input does."""
    h, w = pipe.default_resolution
    frames = np.random.default_rng(0).integers(0, 256, (21, h, w, 3), dtype=np.uint8)  # 1 + 4 * 5: six chunks
    with pipe.session("a red fox", mode="v2v", seed=3, chunk_frames=1) as s:
        s.push_frames(frames)
        ref = [s.next_chunk() for _ in range(6)]
        assert s.next_chunk() is None
    pulled = []

    def reading():
        for frame in frames:
            pulled.append(1)
            yield frame

    with pipe.session("a red fox", mode="v2v", seed=3, chunk_frames=1) as s, DecodeAhead(s, frames=reading()) as ahead:
        got = list(ahead)
    assert len(got) == 6 and len(pulled) == 21
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_frames_only_for_video_to_video(pipe):
    with pipe.session("a red fox", mode="v2v") as s, pytest.raises(ValueError, match="frames="):
        DecodeAhead(s)
    with pipe.session("a red fox") as s, pytest.raises(ValueError, match="frames="):
        DecodeAhead(s, frames=[])
