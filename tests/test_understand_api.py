"""understand(source, model): events from files and iterables on a tiny random Qwen2-VL, errors, load_vlm, the CLI."""

import dataclasses
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration

from stream_runtime.apps import cli
from stream_runtime.ingest import IngestError
from stream_runtime.understanding import StreamingVLMConfig, StreamingVLMRunner, load_vlm, understand
from stream_runtime.understanding.api import fit_size
from stream_runtime.understanding.tiny import TINY_SPECIAL_IDS, TINY_WORDS, tiny_qwen2_vl_config

WIDTH, HEIGHT, FPS, SECONDS = 64, 48, 24, 2  # 64 x 48: multiples of the tiny model's 8-pixel factor
SPECIAL_NAMES = {
    "bos_token_id": "<|bos|>",
    "eos_token_id": "<|endoftext|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_clip(path: Path, frames: int = FPS * SECONDS, options: dict[str, str] | None = None) -> Path:
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.options = {"x264-params": "keyint=8:min-keyint=8:scenecut=0"}
        for index in range(frames):
            image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            image[..., 0] = (np.arange(WIDTH) * 4 + index * 9) % 256
            image[(index * 2) % HEIGHT, :, 2] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def tiny_model(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config()).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny vocabulary: ``w0`` .. ``w57``, then the special tokens at their ids."""
    vocab = {f"w{i}": i for i in range(TINY_WORDS)}
    vocab.update({SPECIAL_NAMES[key]: token_id for key, token_id in TINY_SPECIAL_IDS.items()})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="w0", eos_token="<|endoftext|>", bos_token="<|bos|>"
    )


def runner(fps: float, **config) -> StreamingVLMRunner:
    config = StreamingVLMConfig(frames_per_second=fps, **config)
    return StreamingVLMRunner(tiny_model(), config, codec=tiny_tokenizer())


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("understand") / "clip.mp4")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_vlm")
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def assert_events_cover(events, steps: int, first: float, last: float) -> None:
    assert [e.step for e in events] == list(range(steps))
    assert all(isinstance(e.text, str) for e in events)
    assert events[0].start_s == pytest.approx(first)
    assert events[-1].end_s == pytest.approx(last)
    for event, following in zip(events, events[1:], strict=False):
        assert event.start_s < event.end_s <= following.start_s + 1e-9


def test_file_source_yields_one_event_per_step_covering_the_clip(clip):
    fps, per_step = 4.0, 2
    vlm = runner(fps, sink_tokens=8, vision_window_frames=2, text_window_tokens=8, max_new_tokens=3)
    seen = []
    for event in understand(clip, vlm, fps=fps, frames_per_step=per_step, workers=2):
        seen.append((event, vlm.cache.get_seq_length()))
    events = [e for e, _ in seen]
    assert_events_cover(events, steps=SECONDS * int(fps) // per_step, first=0.0, last=SECONDS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        events[0].text = "x"
    # The cache stays bounded: sinks + one chunk (64 x 48 -> 8 x 6 LLM tokens + 2 markers) + the text window.
    lengths = [length for _, length in seen]
    assert max(lengths) <= 8 + (WIDTH // 8) * (HEIGHT // 8) + 2 + 8, lengths
    assert len(set(lengths[1:])) == 1, lengths


def test_iterable_source_is_sampled_resized_and_ends_with_a_partial_step():
    rng = np.random.default_rng(0)
    frames = [(i / 10, rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)) for i in range(25)]  # 2.5 s at 10 fps
    vlm = runner(2.0, max_new_tokens=2)
    events = list(understand(frames, vlm, fps=2.0, frames_per_step=2))
    # 5 frames kept (0, 0.5, ..., 2.0) -> steps of 2, 2, 1; frames fitted to 48 x 32 (multiples of 8).
    assert_events_cover(events, steps=3, first=0.0, last=2.5)
    assert [e.start_s for e in events] == [0.0, 1.0, 2.0]


def test_model_with_codec_and_explicit_size():
    frames = ((i / 2, np.full((20, 20, 3), i * 10, np.uint8)) for i in range(4))
    events = list(understand(frames, tiny_model(), codec=tiny_tokenizer(), fps=2.0, size=(16, 16)))
    assert_events_cover(events, steps=2, first=0.0, last=2.0)


def test_fit_size_keeps_aspect_within_the_budget():
    assert fit_size(1920, 1080, 28, 256 * 28**2) == (588, 336)
    assert fit_size(64, 48, 8, 256 * 8**2) == (64, 48)
    assert fit_size(3, 5, 8, 1000) == (8, 8)


def test_empty_stream_raises_a_clear_error():
    with pytest.raises(IngestError, match="no frames"):
        list(understand([], runner(1.0)))


def test_missing_file_raises_before_iterating(tmp_path):
    with pytest.raises(IngestError, match="file not found"):
        understand(tmp_path / "missing.mp4", runner(1.0))


@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("truncated")
    whole = make_clip(root / "whole.mp4", frames=80, options={"movflags": "faststart"}).read_bytes()
    path = root / "truncated.mp4"
    path.write_bytes(whole[: len(whole) * 6 // 10])  # moov first (faststart), so the index survives the cut
    return path


def test_truncated_file_yields_events_then_raises(truncated):
    delivered = []
    with pytest.raises(IngestError, match="decoding failed"):
        for event in understand(truncated, runner(float(FPS), max_new_tokens=1), fps=FPS, frames_per_step=4):
            delivered.append(event)
    assert len(delivered) >= 2
    assert [e.step for e in delivered] == list(range(len(delivered)))


def test_bad_arguments_name_the_argument(clip):
    vlm = runner(1.0)
    with pytest.raises(ValueError, match="frames_per_step"):
        understand(clip, vlm, frames_per_step=17)
    with pytest.raises(ValueError, match="size"):
        understand(clip, vlm, size=(20, 16))
    with pytest.raises(ValueError, match="fps"):
        understand(clip, vlm, fps=2.0)  # the runner was built for 1 fps
    with pytest.raises(ValueError, match="codec"):
        understand(clip, tiny_model())  # a text prompt without a codec


def test_load_vlm_round_trips_a_saved_folder(model_dir):
    model, tokenizer = load_vlm(model_dir, device="cpu")
    assert isinstance(model, Qwen2VLForConditionalGeneration) and not model.training
    reference = tiny_model()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert tokenizer.encode("w3 w7") == [3, 7]
    with pytest.raises(FileNotFoundError, match="model folder"):
        load_vlm(model_dir / "nope")


def test_cli_prints_one_line_per_event(clip, model_dir, capsys):
    code = cli.main(["understand", str(clip), "--model", str(model_dir), "--fps", "1", "--max-new-tokens", "2"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert len(out) == 1 and out[0].startswith("[0.00-2.00] ")


def test_cli_truncated_file_prints_the_events_then_the_error(truncated, model_dir, capsys):
    argv = ["understand", str(truncated), "--model", str(model_dir), "--fps", "24", "--max-new-tokens", "1"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) >= 2 and captured.out.startswith("[0.00-")
    assert "error: cannot ingest" in captured.err and "decoding failed" in captured.err


def test_cli_bad_input_exits_2(tmp_path, model_dir, capsys):
    assert cli.main(["understand", str(tmp_path / "missing.mp4"), "--model", str(model_dir)]) == 2
    assert "error: cannot ingest" in capsys.readouterr().err
    assert cli.main(["understand", str(tmp_path / "missing.mp4")]) == 2  # the embedded captioner: same error
    assert "error: cannot ingest" in capsys.readouterr().err
