"""Ingest sources (file, OpenCV, push), bounded prefetch, resize. No sleeps: threads sync on conditions."""

import threading

import numpy as np
import pytest
from test_ingest import HEIGHT, WIDTH, make_clip

from stream_runtime.ingest import (
    FileSource,
    IngestError,
    PushSource,
    Resize,
    Sampling,
    WebcamSource,
    decode_sequential,
    open_source,
    prefetch,
)

# Only guards against a deadlock turning into a hung test run; no test waits this long when it passes.
DEADLOCK_GUARD_S = 10.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=40)


def image(value: int, height: int = 6, width: int = 8) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


# --- prefetch --------------------------------------------------------------------------------------------


def test_prefetch_producer_blocks_when_the_buffer_is_full():
    maxsize, total = 3, 20
    state = {"produced": 0, "consumed": 0, "max_ahead": 0}
    changed = threading.Condition()

    def produce():
        for item in range(total):
            with changed:
                state["produced"] += 1
                state["max_ahead"] = max(state["max_ahead"], state["produced"] - state["consumed"])
                changed.notify_all()
            yield item

    with prefetch(produce(), maxsize) as items:
        for expected in range(total):
            with changed:
                # The producer runs ahead until blocked: `maxsize` items buffered plus the one it is handing over.
                at_rest = lambda: state["produced"] == min(total, state["consumed"] + maxsize + 1)
                assert changed.wait_for(at_rest, timeout=DEADLOCK_GUARD_S)
                state["consumed"] += 1
            assert next(items) == expected
        with pytest.raises(StopIteration):
            next(items)
    assert state["max_ahead"] == maxsize + 1


def test_prefetch_raises_the_producer_error_after_its_items():
    def produce():
        yield "a"
        yield "b"
        raise KeyError("decoder broke")

    items = prefetch(produce(), maxsize=1)
    assert next(items) == "a" and next(items) == "b"
    with pytest.raises(KeyError, match="decoder broke"):
        next(items)


def test_prefetch_close_stops_the_producer_and_closes_its_iterator():
    finished = threading.Event()

    def endless():
        try:
            count = 0
            while True:
                yield count
                count += 1
        finally:
            finished.set()

    items = prefetch(endless(), maxsize=2)
    assert [next(items), next(items)] == [0, 1]
    items.close()
    assert items.join(timeout=DEADLOCK_GUARD_S)
    assert finished.is_set()
    with pytest.raises(StopIteration):
        next(items)


def test_prefetch_rejects_a_bad_maxsize():
    with pytest.raises(ValueError, match="maxsize"):
        prefetch([], maxsize=0)


# --- PushSource ------------------------------------------------------------------------------------------


def test_push_source_yields_pushed_frames_in_order_then_ends():
    source = PushSource(maxsize=4)
    for index in range(3):
        assert source.push(image(index), timestamp=index / 10)
    source.close()
    got = list(source)
    assert [t for t, _ in got] == [0.0, 0.1, 0.2]
    assert [int(frame[0, 0, 0]) for _, frame in got] == [0, 1, 2]


def test_push_source_blocks_when_full_and_a_consumer_drains_it():
    source = PushSource(maxsize=2)
    assert source.push(image(0)) and source.push(image(1))
    assert not source.push(image(2), timeout=0)  # full: "block" gives up at once with timeout=0
    assert source.qsize() == 2

    def producer():
        for index in range(2, 10):
            source.push(image(index), timestamp=float(index))
        source.close()

    thread = threading.Thread(target=producer)
    thread.start()
    values = [int(frame[0, 0, 0]) for _, frame in source]
    thread.join(DEADLOCK_GUARD_S)
    assert values == list(range(10))


def test_push_source_drop_oldest_keeps_the_newest_frames():
    source = PushSource(maxsize=2, policy="drop_oldest")
    for index in range(5):
        source.push(image(index), timestamp=float(index))
    source.close()
    assert [t for t, _ in source] == [3.0, 4.0]
    assert source.dropped == 3


def test_push_source_close_with_error_raises_after_the_queued_frames():
    source = PushSource(maxsize=4)
    source.push(image(7), timestamp=0.0)
    source.close(ConnectionError("websocket closed"))
    got = []
    with pytest.raises(ConnectionError, match="websocket closed"):
        for item in source:
            got.append(item)
    assert len(got) == 1


def test_push_source_samples_and_resizes():
    source = PushSource(maxsize=8, sampling=Sampling(every=2), resize=Resize(width=4, height=4, keep_aspect=False))
    for index in range(6):
        source.push(image(index), timestamp=float(index))
    source.close()
    got = list(source)
    assert [t for t, _ in got] == [0.0, 2.0, 4.0]
    assert all(frame.shape == (4, 4, 3) and frame.dtype == np.uint8 for _, frame in got)


def test_push_source_rejects_bad_frames_and_arguments():
    source = PushSource(maxsize=1)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        source.push(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        source.push(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        source.push([[0, 0, 0]])
    source.close()
    with pytest.raises(ValueError, match="closed"):
        source.push(image(0))
    with pytest.raises(ValueError, match="maxsize"):
        PushSource(maxsize=0)
    with pytest.raises(ValueError, match="policy"):
        PushSource(maxsize=1, policy="drop_newest")


# --- FileSource / WebcamSource ---------------------------------------------------------------------------


def test_file_source_parallel_equals_sequential(clip):
    sequential = FileSource(clip, sampling=Sampling(fps=12), resize=Resize(width=32, height=32))
    parallel = FileSource(clip, sampling=Sampling(fps=12), resize=Resize(width=32, height=32), workers=2)
    assert (sequential.width, sequential.height, sequential.fps) == (WIDTH, HEIGHT, 24.0)
    first, second = list(sequential), list(parallel)
    assert len(first) == 20 and [t for t, _ in first] == [t for t, _ in second]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(first, second, strict=True))
    assert first[0][1].shape == (24, 32, 3)  # fits in 32x32 keeping 4:3
    assert np.all(np.diff([t for t, _ in first]) > 0)


def test_open_source_dispatches_on_the_type(clip):
    with open_source(str(clip)) as source:
        assert isinstance(source, FileSource)
    with pytest.raises(TypeError, match="source"):
        open_source(True)


def test_webcam_source_reads_a_file_through_opencv_in_rgb(clip):
    reference = [frame.image for frame in decode_sequential(clip)]
    with WebcamSource(str(clip)) as source:
        got = list(source)
    assert len(got) == len(reference)
    timestamp, frame = got[5]
    assert frame.dtype == np.uint8 and frame.shape == (HEIGHT, WIDTH, 3)
    # OpenCV's own YUV->RGB differs by rounding only; swapped channels would differ by far more.
    assert np.abs(frame.astype(int) - reference[5].astype(int)).mean() < 3
    assert timestamp > 0


def test_webcam_source_that_cannot_open_raises(tmp_path):
    with pytest.raises(IngestError, match="could not open"):
        WebcamSource(str(tmp_path / "missing.mp4"))


def test_resize_keeps_aspect_or_is_exact():
    wide = np.zeros((720, 1440, 3), np.uint8)
    assert Resize(width=640, height=360)(wide).shape == (320, 640, 3)
    assert Resize(height=360)(wide).shape == (360, 720, 3)
    assert Resize(width=100, height=100, keep_aspect=False)(wide).shape == (100, 100, 3)
    same = Resize(width=1440)
    assert same(wide) is wide
