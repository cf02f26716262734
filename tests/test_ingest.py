"""Ingest: exact keyframe-parallel decode, sampling, bad input. Clips are generated with PyAV into tmp dirs."""

import dataclasses
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from stream_runtime.ingest import (
    FileSource,
    IngestError,
    Resize,
    Sampling,
    decode_parallel,
    decode_sequential,
    ordered_map,
    plan_intervals,
    scan_stream,
)
from stream_runtime.ingest.decode import decode_interval

WIDTH, HEIGHT, FPS = 64, 48, 24
SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"  # ../shared beside the checkout


def make_clip(
    path: Path,
    *,
    frames: int = 60,
    gop: int = 8,
    bframes: int = 3,
    open_gop: bool = False,
    container_options: dict[str, str] | None = None,
) -> Path:
    """H.264 clip of a moving pattern (every frame differs) with a keyframe every ``gop`` frames."""
    params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:open-gop={int(open_gop)}"
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.options = {"x264-params": params}
        for index in range(frames):
            image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            image[..., 0] = (np.arange(WIDTH) * 4 + index * 9) % 256
            image[..., 1] = (np.arange(HEIGHT)[:, None] * 5 + index * 3) % 256
            image[(index * 2) % HEIGHT, :, 2] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {
        "bframes": make_clip(root / "bframes.mp4"),
        "open_gop": make_clip(root / "open_gop.mkv", frames=50, gop=10, open_gop=True),
        "single_keyframe": make_clip(root / "single_keyframe.mp4", frames=40, gop=1000),
        "faststart": make_clip(root / "faststart.mp4", frames=80, container_options={"movflags": "faststart"}),
    }


def assert_same_frames(actual: list, expected: list) -> None:
    assert [f.pts for f in actual] == [f.pts for f in expected]
    assert [f.time for f in actual] == [f.time for f in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got.image.dtype == np.uint8 and got.image.shape == want.image.shape
        assert np.array_equal(got.image, want.image), f"frame pts={got.pts} differs"


def test_clip_has_b_frames_and_many_keyframes(clips):
    index = scan_stream(clips["bframes"])
    assert len(index.keyframes) == 8 and len(index.frame_pts) == 60
    with av.open(str(clips["bframes"])) as container:
        decode_order = [p.pts for p in container.demux(video=0) if p.size]
    assert decode_order != sorted(decode_order), "no B-frames: decode order equals presentation order"


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_equals_sequential(clips, workers):
    expected = list(decode_sequential(clips["bframes"]))
    assert len(expected) == 60
    assert_same_frames(list(decode_parallel(clips["bframes"], workers=workers, max_in_flight=2)), expected)


def test_parallel_decode_stopped_early_releases_its_workers(clips):
    frames = decode_parallel(clips["bframes"], workers=2, max_in_flight=2)
    assert next(frames).pts == 0
    frames.close()
    for thread in threading.enumerate():
        if thread.name.startswith("decode"):
            thread.join(timeout=10.0)  # deadlock guard only: a worker ends after its current interval
            assert not thread.is_alive()


def test_parallel_process_backend_equals_sequential(clips):
    expected = list(decode_sequential(clips["bframes"]))
    assert_same_frames(list(decode_parallel(clips["bframes"], workers=2, backend="process")), expected)


@pytest.mark.parametrize("name", ["gradio_video_sample.mp4", "sdv2_original.mp4"])
def test_real_clip_parallel_equals_sequential(name):
    path = SHARED_MEDIA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    expected = list(decode_sequential(path, sampling=Sampling(every=2)))
    assert_same_frames(list(decode_parallel(path, workers=2, sampling=Sampling(every=2))), expected)


def test_open_gop_equals_sequential(clips):
    # Leading B-frames after an open-GOP keyframe are shown before it: they belong to the previous interval.
    assert scan_stream(clips["open_gop"]).open_gop
    expected = list(decode_sequential(clips["open_gop"]))
    assert_same_frames(list(decode_parallel(clips["open_gop"], workers=3)), expected)


def test_single_keyframe_is_one_interval(clips):
    index = scan_stream(clips["single_keyframe"])
    assert len(index.keyframes) == 1 and len(plan_intervals(index)) == 1
    expected = list(decode_sequential(clips["single_keyframe"]))
    assert len(expected) == 40
    assert_same_frames(list(decode_parallel(clips["single_keyframe"], workers=3)), expected)


def test_stream_without_timestamps_decodes_in_one_pass(tmp_path):
    raw = tmp_path / "raw.h264"  # an elementary stream: packets carry no pts, so no pts ranges to split on
    with av.open(str(raw), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.options = {"x264-params": "keyint=8:bframes=2"}
        for index in range(24):
            image = np.full((HEIGHT, WIDTH, 3), index * 10, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    assert not scan_stream(raw).splittable
    expected = list(decode_sequential(raw, sampling=Sampling(every=2)))
    assert len(expected) == 12
    assert_same_frames(list(decode_parallel(raw, workers=2, sampling=Sampling(every=2))), expected)


def test_merged_intervals_equal_sequential(clips):
    index = scan_stream(clips["bframes"])
    assert len(plan_intervals(index, min_interval_frames=20)) == 3  # GOPs of 8: 24 + 24 + 12 frames
    expected = list(decode_sequential(clips["bframes"]))
    assert_same_frames(list(decode_parallel(clips["bframes"], workers=2, min_interval_frames=20)), expected)


def test_seek_past_the_keyframe_falls_back_to_an_exact_decode(clips):
    index = scan_stream(clips["bframes"])
    interval = plan_intervals(index)[2]
    # Pretend the demuxer lands one keyframe too far: the keyframe is then missing, so decode from the start.
    wrong = dataclasses.replace(interval, seek_ts=index.keyframes[3].pts)
    assert decode_interval(index.path, wrong).decoded_pts == list(interval.expected_pts)


@pytest.mark.parametrize("sampling", [Sampling(every=3), Sampling(fps=7)], ids=["every3", "fps7"])
def test_sampling_and_resize_parallel_equals_sequential(clips, sampling):
    resize = Resize(width=32)
    expected = list(decode_sequential(clips["bframes"], sampling=sampling, resize=resize))
    actual = list(decode_parallel(clips["bframes"], workers=3, sampling=sampling, resize=resize))
    assert_same_frames(actual, expected)
    assert expected[0].image.shape == (24, 32, 3)


def test_sampling_keeps_the_documented_frames(clips):
    every = list(decode_sequential(clips["bframes"], sampling=Sampling(every=3)))
    all_pts = [f.pts for f in decode_sequential(clips["bframes"])]
    assert [f.pts for f in every] == all_pts[::3]
    rate = 8  # a 24 fps clip at 8 fps keeps one frame in three
    times = [f.time for f in decode_sequential(clips["bframes"], sampling=Sampling(fps=rate))]
    assert len(times) == 60 // (FPS // rate)
    assert min(np.diff(times)) >= 1 / rate - 1e-9


def test_ordered_map_raises_at_the_failing_position():
    from concurrent.futures import ThreadPoolExecutor

    def work(item: int) -> int:
        if item == 3:
            raise KeyError(item)
        return item * 10

    got = []
    with ThreadPoolExecutor(2) as pool, pytest.raises(KeyError):
        for result in ordered_map(work, range(6), pool, max_in_flight=2):
            got.append(result)
    assert got == [0, 10, 20]


# --- bad input -------------------------------------------------------------------------------------------


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = 1024
        for index in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * samples
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, clips) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("bad")
    noise = root / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    unknown = root / "unknown_codec.mp4"
    unknown.write_bytes(clips["bframes"].read_bytes().replace(b"avc1", b"zzz1"))
    return {
        "missing": (root / "missing.mp4", "file not found"),
        "noise": (noise, "not a readable media file"),
        "audio_only": (audio_only(root / "audio_only.m4a"), "no video stream"),
        "unknown_codec": (unknown, "unsupported video codec"),
    }


@pytest.mark.parametrize("case", ["missing", "noise", "audio_only", "unknown_codec"])
@pytest.mark.parametrize(
    "open_it",
    [
        lambda path: list(decode_sequential(path)),
        lambda path: list(decode_parallel(path, workers=2)),
        lambda path: FileSource(path),
    ],
    ids=["sequential", "parallel", "FileSource"],
)
def test_bad_input_raises_ingest_error(bad_files, case, open_it):
    path, reason = bad_files[case]
    with pytest.raises(IngestError, match=reason) as caught:
        open_it(path)
    assert isinstance(caught.value, ValueError)
    assert caught.value.path == str(path) and reason in caught.value.reason


@pytest.mark.parametrize(
    "decode", [decode_sequential, lambda path: decode_parallel(path, workers=2)], ids=["sequential", "parallel"]
)
def test_truncated_file_delivers_frames_then_raises(clips, tmp_path, decode):
    whole = clips["faststart"].read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(whole[: len(whole) * 6 // 10])  # moov first (faststart), so the index survives the cut
    delivered = []
    with pytest.raises(IngestError, match="decoding failed") as caught:
        for frame in decode(truncated):
            delivered.append(frame)
    assert caught.value.path == str(truncated)
    assert len(delivered) > 8
    assert_same_frames(delivered, list(decode_sequential(clips["faststart"]))[: len(delivered)])


def test_invalid_arguments_name_the_argument(clips):
    with pytest.raises(ValueError, match="workers"):
        decode_parallel(clips["bframes"], workers=0)
    with pytest.raises(ValueError, match="backend"):
        decode_parallel(clips["bframes"], backend="gpu")
    with pytest.raises(ValueError, match="max_in_flight"):
        decode_parallel(clips["bframes"], max_in_flight=0)
    with pytest.raises(ValueError, match="every"):
        Sampling(every=0)
    with pytest.raises(ValueError, match="fps"):
        Sampling(fps=-1.0)
    with pytest.raises(ValueError, match="either every or fps"):
        Sampling(every=2, fps=4.0)
    with pytest.raises(ValueError, match="keep_aspect=False"):
        Resize(width=8, keep_aspect=False)
