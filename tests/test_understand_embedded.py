"""understand(source) without a model: the embedded captioner over files, iterables and the CLI, and bad input."""

from pathlib import Path

import pytest
from helpers import write_clip

from stream_runtime.apps import cli
from stream_runtime.ingest import IngestError
from stream_runtime.pipelines.tinyworld.captions import parse_caption
from stream_runtime.pipelines.tinyworld.spec import WORLD_FPS, describe
from stream_runtime.pipelines.tinyworld.world import held_out_seeds, render, sample_spec
from stream_runtime.understanding import understand

SEED = held_out_seeds()[1]
FRAMES = 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("embedded") / "world.mp4", render(sample_spec(SEED), FRAMES), WORLD_FPS)


def test_frames_iterable_gives_timestamped_window_captions():
    frames = render(sample_spec(SEED), FRAMES)
    events = list(understand([(i / WORLD_FPS, f) for i, f in enumerate(frames)]))
    # Windows of 24 frames every 8: frames 0-23, 8-31, 16-39; then nothing new to flush.
    assert [(e.start_s, e.end_s, e.step) for e in events] == [(0.0, 1.5, 0), (0.5, 2.0, 1), (1.0, 2.5, 2)]
    for event in events:
        assert parse_caption(event.text) is not None
    truth = describe(sample_spec(SEED))
    said = parse_caption(events[0].text)
    assert set(said.objects) == set(truth.objects) and said.background == truth.background


def test_file_source_and_stride_option(clip):
    events = list(understand(clip, frames_per_step=12))
    assert [e.start_s for e in events] == [0.0, 0.75, 1.0]  # strides of 12, then the 4 frames left flushed
    assert events[-1].end_s == FRAMES / WORLD_FPS
    with pytest.raises(ValueError, match="prompt: the embedded captioner takes no prompt"):
        understand(clip, prompt="describe it")
    with pytest.raises(ValueError, match="codec: the embedded captioner takes none"):
        understand(clip, codec=object())


def test_bad_input_raises_after_what_was_understood(tmp_path, clip):
    with pytest.raises(IngestError):
        understand(tmp_path / "missing.mp4")
    with pytest.raises(IngestError, match="no frames"):
        list(understand([]))
    frames = render(sample_spec(SEED), 30)

    def failing():
        for i, frame in enumerate(frames):
            yield i / WORLD_FPS, frame
        raise IngestError("camera", "the device went away")

    events = []
    with pytest.raises(IngestError, match="the device went away"):
        for event in understand(failing()):
            events.append(event)
    # The full window (frames 0-23), then the frames since (the last window, 6-29) before the error.
    assert [(e.start_s, e.end_s) for e in events] == [(0.0, 1.5), (6 / WORLD_FPS, 30 / WORLD_FPS)]


def test_cli_prints_captions_and_exits_2_on_bad_input(clip, tmp_path, capsys):
    assert cli.main(["understand", str(clip)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("[0.00-1.50] a ") and lines[0].endswith(" background")
    assert cli.main(["understand", str(tmp_path / "missing.mp4")]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.main(["understand", str(clip), "--prompt", "hi"]) == 2
    assert "--prompt is for a VLM" in capsys.readouterr().err
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert cli.main(["understand", str(empty)]) == 2
