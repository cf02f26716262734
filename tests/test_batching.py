"""Sessions sharing a forward (``batching.next_chunks``) against each session stepping alone."""

import numpy as np
import pytest
from conftest import assert_close

from stream_runtime import StreamPipeline
from stream_runtime.pipelines.wan import batching

pytestmark = pytest.mark.usefixtures("one_thread")

STREAM = dict(chunk_frames=1, sink_frames=1, window_frames=3, timesteps=(1000.0, 600.0, 300.0), shift=1.0)


@pytest.fixture(scope="module")
def pipe():
    return StreamPipeline.tiny_random(seed=0, height=32, width=32)


def open_streams(pipe, position_mode):
    """Three different streams: other prompts and seeds, one with guidance."""
    return [
        pipe.session("a red fox in snow", seed=1, position_mode=position_mode, **STREAM),
        pipe.session("a blue cat", seed=2, position_mode=position_mode, guidance_scale=3.0, **STREAM),
        pipe.session("a green dog on the sea", seed=3, position_mode=position_mode, **STREAM),
    ]


def script(streams, step):
    """Streams joining at different times (so their caches fill differently), a switch with recache mid-way;
    ``step(list_of_sessions)`` runs one chunk of each. Returns every session's chunks."""
    a, b, c = streams
    out = {id(s): [] for s in streams}

    def run(group):
        for s, frames in zip(group, step(group), strict=True):
            out[id(s)].append(frames)

    for _ in range(2):
        run([a])
    for _ in range(2):
        run([a, b])
    b.set_prompt("a white cat")  # recache under the new prompt
    for _ in range(3):
        run([a, b, c])
    return [out[id(s)] for s in streams]


@pytest.mark.parametrize("position_mode", ["absolute", "bounded"])
def test_shared_forwards_equal_each_session_alone(pipe, position_mode):
    alone_streams, shared_streams = open_streams(pipe, position_mode), open_streams(pipe, position_mode)
    alone = script(alone_streams, lambda group: [s.next_chunk() for s in group])
    shared = script(shared_streams, batching.next_chunks)
    for frames_alone, frames_shared in zip(alone, shared, strict=True):
        assert len(frames_alone) == len(frames_shared) > 0
        for x, y in zip(frames_alone, frames_shared, strict=True):
            assert x.shape == y.shape
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # batched matmuls: float rounding only
    # The caches (every kept frame's clean latents) match too, at fp32 tolerance.
    for ref, s in zip(alone_streams, shared_streams, strict=True):
        ref_frames, ref_latents = ref.cache.kept_latents()
        frames, latents = s.cache.kept_latents()
        assert frames == ref_frames
        assert_close(latents, ref_latents)


def test_video_to_video_sessions_share_and_one_without_input_waits(pipe):
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)

    def open_pair():
        a = pipe.session("a red fox", seed=4, mode="v2v", **STREAM)
        b = pipe.session("a blue cat", seed=5, mode="v2v", **STREAM)
        return a, b

    a, b = open_pair()
    a.push_frames(clip)
    b.push_frames(clip[:1])  # enough for its first chunk only
    shared = [batching.next_chunks([a, b]) for _ in range(3)]
    assert [f is None for f in shared[1]] == [False, True] and shared[2][1] is None

    ra, rb = open_pair()
    ra.push_frames(clip)
    rb.push_frames(clip[:1])
    for i in range(3):
        x = ra.next_chunk()
        assert np.abs(x.astype(int) - shared[i][0].astype(int)).max() <= 1
    assert np.abs(rb.next_chunk().astype(int) - shared[0][1].astype(int)).max() <= 1


def test_groups_split_by_what_a_forward_shares(pipe):
    a = pipe.session("a red fox", **STREAM)
    b = pipe.session("a blue cat", guidance_scale=2.0, **STREAM)  # guidance is per session: shares
    c = pipe.session("a red fox", **{**STREAM, "timesteps": (1000.0, 500.0)})  # other noise levels
    d = pipe.session("a red fox", attention_reuse=1, **STREAM)  # per-session attention state
    e = pipe.session("a red fox", stream_batch=True, **{**STREAM, "window_frames": 3})
    f = pipe.session("a green dog", **STREAM)
    assert [len(g) for g in batching.groups([a, b, c, d, e, f])] == [3, 1, 1, 1]
    assert batching.groups([a, b, c, d, e, f])[0] == [a, b, f]
    assert [len(g) for g in batching.groups([a, b, f], limit=2)] == [2, 1]
    with pytest.raises(ValueError, match="cannot share forwards"):
        batching.next_chunks([a, c])
    with pytest.raises(ValueError, match="cannot share forwards"):
        batching.next_chunks([a, a])
    assert batching.next_chunks([]) == []


def test_benchmark_script_reports_both_schedules(tmp_path):
    """``bench/bench_shared_forwards.py`` runs on the shipped model and writes its rows (figures not checked)."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    command = [sys.executable, "bench/bench_shared_forwards.py", "--sessions", "1,2", "--rounds", "1"]
    subprocess.run([*command, "--threads", "1", "--out", str(tmp_path)], cwd=root, check=True, capture_output=True)
    (result,) = tmp_path.glob("shared_forwards_*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["streams"] for r in rows] == [1, 2]
    assert all(r["round_s_in_turn"] > 0 and r["round_s_shared"] > 0 for r in rows)
