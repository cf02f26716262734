"""stream_runtime.pacing.Paced: frames on a clock, generation ahead in a thread, bounded queue."""

import threading

import numpy as np
import pytest

from stream_runtime.pacing import Paced


class FakeClock:
    """A clock that only moves when the consumer sleeps: intervals are exact, no real waiting."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def chunks(n, frames=3, start=0):
    for c in range(n):
        yield np.arange(start + c * frames, start + (c + 1) * frames).reshape(frames, 1, 1, 1)


def test_frames_come_out_in_order_one_period_apart():
    clock = FakeClock()
    # The buffer holds the whole source (12 frames at 10 fps), so the clock starts only once the producer thread
    # has queued everything: with a fake clock the consumer never waits, and a shorter buffer would make this
    # test race the thread (an underrun whenever the machine is busy).
    with Paced(chunks(4), fps=10, buffer_s=1.2, clock=clock, sleep=clock.sleep) as paced:
        out = [int(f.ravel()[0]) for f in paced]
    assert out == list(range(12))
    stats = paced.stats()
    assert stats.frames == 12 and stats.underruns == 0
    assert stats.interval_p50_s == pytest.approx(0.1) and stats.jitter_max_s == pytest.approx(0.0, abs=1e-12)


def test_underrun_waits_for_the_next_chunk_and_restarts_the_clock():
    """The source stalls after its first chunk: the consumer runs dry, counts an underrun, loses no frame, and the
    interval across the stall does not count as jitter."""
    release = threading.Event()

    def stalling():
        yield np.zeros((2, 1, 1, 1))
        release.wait(timeout=10)
        yield np.ones((2, 1, 1, 1))

    clock = FakeClock()
    underruns = []

    def on_underrun(n):  # the consumer ran dry: now let the source go on
        underruns.append(n)
        release.set()

    with Paced(stalling(), fps=10, buffer_s=0.1, on_underrun=on_underrun, clock=clock, sleep=clock.sleep) as paced:
        out = [int(f.ravel()[0]) for f in paced]
    assert out == [0, 0, 1, 1]
    stats = paced.stats()
    assert stats.underruns == 1 and stats.frames == 4 and underruns == [1]
    assert stats.jitter_max_s == pytest.approx(0.0, abs=1e-12)


def test_source_errors_reach_the_consumer_after_the_frames_before_them():
    def failing():
        yield np.zeros((2, 1, 1, 1))
        raise RuntimeError("decode failed")

    clock = FakeClock()
    got = []
    with pytest.raises(RuntimeError, match="decode failed"):
        with Paced(failing(), fps=10, buffer_s=0, clock=clock, sleep=clock.sleep) as paced:
            for frame in paced:
                got.append(frame)
    assert len(got) == 2


def test_none_and_empty_chunks_are_skipped():
    items = [None, np.zeros((0, 1, 1, 1)), np.full((2, 1, 1, 1), 7)]
    clock = FakeClock()
    with Paced(items, fps=10, buffer_s=0, clock=clock, sleep=clock.sleep) as paced:
        assert [int(f.ravel()[0]) for f in paced] == [7, 7]


def test_the_queue_bounds_how_far_generation_runs_ahead():
    pulled = []
    full = threading.Event()

    def counting():
        for c in range(100):
            pulled.append(c)
            if len(pulled) == 3:  # two chunks queued, this third one waits in put
                full.set()
            yield np.zeros((1, 1, 1, 1))

    paced = Paced(counting(), fps=10, max_chunks=2)
    assert full.wait(timeout=10)
    paced.close()  # nobody read a frame: the producer gives up its pending put and pulls nothing more
    assert len(pulled) == 3 and paced._producer.queued() == 2
    assert not paced._producer.alive


@pytest.mark.parametrize(
    "kwargs, message",
    [({"fps": 0}, "fps must be > 0"), ({"fps": 10, "buffer_s": -1}, "buffer_s"), ({"fps": 10, "max_chunks": 0}, "max")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Paced([], **kwargs)


def test_producer_hands_items_in_order_then_end_then_its_error():
    from stream_runtime.producer import END, Producer

    def work(producer):
        for i in range(3):
            producer.put(i)
        raise KeyError("lost")

    producer = Producer(work, maxsize=1, name="test")
    items = []
    while (item := producer.get()) is not END:
        items.append(item)
    assert items == [0, 1, 2]
    with pytest.raises(KeyError, match="lost"):
        producer.raise_error()
    producer.close()
    with pytest.raises(ValueError, match="maxsize"):
        Producer(work, maxsize=0, name="test")
