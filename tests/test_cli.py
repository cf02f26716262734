"""The command line and MP4 writing."""

import numpy as np
import pytest

from stream_runtime.apps import cli
from stream_runtime.video_io import VideoWriter, read_video


@pytest.fixture(autouse=True)
def random_default_model(monkeypatch):
    """These tests are about the command, not the model: without --model they get the tiny random-weights model
    (open vocabulary, 3-frame chunks) whether or not assets/tinyworld ships (tests/test_tinyworld_shipped.py runs
    the command on that one)."""
    from stream_runtime.pipelines.tinyworld import model

    monkeypatch.setattr(model, "shipped_model_path", lambda: None)


def test_generate_writes_the_requested_frames(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code = cli.main(
        [
            "generate",
            "--prompt",
            "a red fox",
            "--seconds",
            "1.5",
            "--out",
            str(out),
            "--height",
            "32",
            "--width",
            "32",
            "--switch",
            "0.5:a blue cat",
        ]
    )
    assert code == 0
    video = read_video(out)
    assert video.shape == (24, 32, 32, 3)
    assert "wrote 24 frames" in capsys.readouterr().out


def test_generate_text_encoder_device_is_passed_on(tmp_path, monkeypatch):
    """--text-encoder-device reaches StreamPipeline.to (on this CPU-only machine both devices are the CPU)."""
    from stream_runtime.pipelines.wan.pipeline import StreamPipeline

    seen = []
    to = StreamPipeline.to

    def spy(self, device, text_encoder_device=None):
        seen.append((str(device), text_encoder_device))
        return to(self, device, text_encoder_device)

    monkeypatch.setattr(StreamPipeline, "to", spy)
    out = tmp_path / "clip.mp4"
    argv = ["generate", "--tiny-random", "--text-encoder-device", "cpu", "--prompt", "a red fox", "--seconds", "0.5"]
    assert cli.main([*argv, "--out", str(out), "--height", "32", "--width", "32", "--device", "cpu"]) == 0
    assert seen[-1] == ("cpu", "cpu") and read_video(out).shape[0] == 8


def test_interrupted_run_leaves_a_playable_file(tmp_path, monkeypatch):
    from stream_runtime.pipelines.wan.session import StreamSession

    real = StreamSession.next_chunk
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(StreamSession, "next_chunk", flaky)
    out = tmp_path / "stopped.mp4"
    code = cli.main(
        ["generate", "--prompt", "a fox", "--seconds", "10", "--out", str(out), "--height", "32", "--width", "32"]
    )
    assert code == 130
    assert read_video(out).shape[0] == 9 + 12  # the two chunks made before Ctrl-C


@pytest.mark.parametrize("extra", [[], ["--stream-batch", "--strength", "0.7"]])
def test_generate_from_an_input_video_restyles_it_to_its_end(tmp_path, capsys, extra):
    from helpers import write_clip

    frames = np.zeros((23, 32, 32, 3), np.uint8)
    for i, frame in enumerate(frames):
        frame[:, i : i + 6] = 255  # a bar moving right
    clip = write_clip(tmp_path / "in.mp4", frames, fps=16)
    out = tmp_path / "out.mp4"
    argv = ["generate", "--input", str(clip), "--prompt", "a red fox", "--seconds", "10", "--out", str(out)]
    assert cli.main(argv + ["--height", "32", "--width", "32", *extra]) == 0
    # 1 + 4 + 4 + ... frames per chunk: 21 of the 23 (the last 2 do not fill a chunk); a stream batch is drained.
    assert read_video(out).shape == (21, 32, 32, 3)
    assert "wrote 21 frames" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--input", "/nonexistent/in.mp4"], "cannot ingest"),
        (["--seconds", "0"], "--seconds must be > 0"),
        (["--height", "30"], "height must be a positive multiple of 16"),
        (["--checkpoint", "x.pt"], "--checkpoint needs --model"),
        (["--model", "/nonexistent/folder"], "path must be a model folder"),
        (["--switch", "soon:a cat"], "--switch must look like SECONDS:PROMPT"),
        (["--out", "/nonexistent/dir/clip.mp4"], "folder of path does not exist"),
        (["--tiny-random", "--device", "cpu", "--cuda-graphs"], "CUDA graphs need the pipeline on a CUDA device"),
    ],
)
def test_generate_bad_arguments_exit_2(argv, message, tmp_path, capsys):
    base = ["generate", "--prompt", "a fox", "--seconds", "1", "--out", str(tmp_path / "c.mp4")]
    assert cli.main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_video_writer_round_trip_and_checks(tmp_path):
    frames = np.zeros((5, 16, 32, 3), np.uint8)
    frames[:, :, :16] = 255
    with VideoWriter(tmp_path / "a.mp4", fps=16) as w:
        w.write(frames[:2])
        w.write(frames[2:])
        with pytest.raises(ValueError, match="keep the size"):
            w.write(np.zeros((1, 32, 32, 3), np.uint8))
    back = read_video(tmp_path / "a.mp4")
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 3
    with pytest.raises(ValueError, match="must end in .mp4"):
        VideoWriter(tmp_path / "a.avi")
    with pytest.raises(ValueError, match="uint8"):
        VideoWriter(tmp_path / "b.mp4").write(np.zeros((1, 16, 16, 3), np.float32))


def test_video_writer_is_reproducible(tmp_path):
    """The same frames give the same file bytes. With x264's rate-control lookahead on, 1 to 4 runs of 12 gave other
    bytes (at 32, 64 and 96 pixels), which put the byte-equality tests of tests/test_distributed.py at risk."""
    rng = np.random.default_rng(0)
    for size in (32, 64):
        frames = rng.integers(0, 256, (21, size // 8, size // 8, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
        files = set()
        for run in range(12):
            path = tmp_path / f"{size}_{run}.mp4"
            with VideoWriter(path, fps=16) as w:
                w.write(frames[:1])
                for start in range(1, 21, 4):
                    w.write(frames[start : start + 4])
            files.add(path.read_bytes())
        assert len(files) == 1, size


def test_console_script_is_installed():
    import shutil
    import subprocess

    exe = shutil.which("stream-runtime")
    assert exe, "the stream-runtime console script is not on PATH: is the package installed (pip install -e .)?"
    out = subprocess.run([exe, "generate", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--prompt" in out and "--seconds" in out


def test_generate_without_model_uses_the_shipped_generator_or_the_random_one(tmp_path, monkeypatch, capsys):
    from stream_runtime.pipelines.tinyworld import model
    from stream_runtime.pipelines.wan.pipeline import StreamPipeline

    argv = ["generate", "--prompt", "a red fox", "--seconds", "0.1", "--height", "32", "--width", "32"]
    monkeypatch.setattr(model, "shipped_model_path", lambda: None)
    assert cli.main([*argv, "--out", str(tmp_path / "a.mp4")]) == 0
    assert "tiny random-weights model" in capsys.readouterr().out

    shipped = tmp_path / "tinyworld"
    StreamPipeline.tiny_random(seed=1).save_pretrained(shipped)
    monkeypatch.setattr(model, "shipped_model_path", lambda: shipped)
    assert cli.main([*argv, "--out", str(tmp_path / "b.mp4")]) == 0
    assert f"embedded tiny-world model ({shipped})" in capsys.readouterr().out


def test_find_asset_looks_in_the_checkout_then_the_package(tmp_path, monkeypatch):
    from stream_runtime import assets

    monkeypatch.setattr(assets, "_REPO_ASSETS", tmp_path)
    assert assets.find_asset("thing", "marker.json") is None
    (tmp_path / "thing").mkdir()
    (tmp_path / "thing" / "marker.json").write_text("{}")
    assert assets.find_asset("thing", "marker.json") == tmp_path / "thing"
    assert assets.asset_candidates("thing")[0] == tmp_path / "thing"


def test_generate_compile_compiles_the_pipeline(tmp_path, monkeypatch, capsys):
    """--compile goes through StreamPipeline.compile (here with a trace-only backend: CPU code generation is slow),
    and the clip is still written."""
    from stream_runtime.pipelines.wan.pipeline import StreamPipeline

    calls = []
    compile_ = StreamPipeline.compile

    def traced(self, enabled=True, backend="inductor", mode=None):
        calls.append(enabled)
        compile_(self, enabled, backend="aot_eager" if enabled else backend, mode=mode)

    monkeypatch.setattr(StreamPipeline, "compile", traced)
    out = tmp_path / "clip.mp4"
    argv = ["generate", "--prompt", "a red fox", "--seconds", "0.5", "--out", str(out), "--height", "32"]
    assert cli.main([*argv, "--width", "32", "--compile"]) == 0
    assert calls == [True]
    assert read_video(out).shape[0] == 8
    assert "--compile" in capsys.readouterr().out


def written_frames(monkeypatch) -> list:
    """Every frame array generate hands its VideoWriter, recorded: the MP4 itself is not bit-reproducible (two
    encodes of the same frames by x264 differed in a few pixels here), so the tests compare what was written."""
    from stream_runtime.video_io import VideoWriter

    frames = []
    write = VideoWriter.write

    def recording(self, arr):
        frames.append(np.array(arr, copy=True))
        write(self, arr)

    monkeypatch.setattr(VideoWriter, "write", recording)
    return frames


def test_generate_decode_ahead_writes_the_same_clip(tmp_path, monkeypatch):
    """--decode-ahead (denoising ahead of decoding) writes the frames of the plain run."""
    written = written_frames(monkeypatch)
    argv = ["generate", "--prompt", "a red fox", "--seconds", "1", "--height", "32", "--width", "32"]
    assert cli.main([*argv, "--out", str(tmp_path / "plain.mp4")]) == 0
    plain = np.concatenate(written)
    written.clear()
    assert cli.main([*argv, "--out", str(tmp_path / "ahead.mp4"), "--decode-ahead"]) == 0
    np.testing.assert_array_equal(np.concatenate(written), plain)


@pytest.mark.parametrize("extra", [[], ["--stream-batch", "--strength", "0.7"]])
def test_generate_decode_ahead_from_an_input_video(tmp_path, monkeypatch, extra):
    """Video-to-video through DecodeAhead (the producer reads the input as chunks need it): the plain run's frames,
    to the input's end (a stream batch drained)."""
    from helpers import write_clip

    frames = np.zeros((23, 32, 32, 3), np.uint8)
    for i, frame in enumerate(frames):
        frame[:, i : i + 6] = 255
    clip = write_clip(tmp_path / "in.mp4", frames, fps=16)
    argv = ["generate", "--input", str(clip), "--prompt", "a red fox", "--seconds", "10", "--height", "32"]
    argv += ["--width", "32", *extra]
    written = written_frames(monkeypatch)
    assert cli.main([*argv, "--out", str(tmp_path / "plain.mp4")]) == 0
    plain = np.concatenate(written)
    written.clear()
    assert cli.main([*argv, "--out", str(tmp_path / "ahead.mp4"), "--decode-ahead"]) == 0
    assert plain.shape == (21, 32, 32, 3)
    np.testing.assert_array_equal(np.concatenate(written), plain)
