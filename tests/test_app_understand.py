"""The Understand tab of the Gradio app (Starlette's TestClient for the page, the tab's handlers called as Gradio
calls them): captions of a file, of webcam frames, and the errors for bad input."""

import pytest
from starlette.testclient import TestClient

gr = pytest.importorskip("gradio", reason="the app needs gradio (pip install gradio==6.31.0)")

from helpers import write_clip  # noqa: E402

from stream_runtime.apps.gradio_app import mount  # noqa: E402
from stream_runtime.apps.understand_tab import MAX_LINES, caption_source, caption_webcam  # noqa: E402
from stream_runtime.pipelines.tinyworld.spec import WORLD_FPS  # noqa: E402
from stream_runtime.pipelines.tinyworld.world import held_out_seeds, render, sample_spec  # noqa: E402
from stream_runtime.pipelines.wan.pipeline import StreamPipeline  # noqa: E402
from stream_runtime.serving import Engine  # noqa: E402
from stream_runtime.serving.server import build_app  # noqa: E402

SEED = held_out_seeds()[3]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("app_understand") / "world.mp4", render(sample_spec(SEED), 32), WORLD_FPS)


def components(client) -> dict[str, dict]:
    config = client.get("/config").json()
    return {c["props"].get("elem_id"): c for c in config["components"] if c["props"].get("elem_id")}


@pytest.mark.parametrize("named_sources", [True, False])
def test_the_page_has_an_understand_tab(named_sources):
    pipe = StreamPipeline.tiny_random(height=32, width=32)
    app = build_app(Engine(pipe), extra_mount=mount, named_sources=named_sources)
    with TestClient(app) as client:
        found = components(client)
    assert {"sr-tab-generate", "sr-tab-understand"} <= set(found)
    assert {"sr-und-file", "sr-und-url", "sr-und-run", "sr-und-stop", "sr-und-webcam", "sr-und-text"} <= set(found)
    assert found["sr-und-webcam"]["props"]["streaming"] is True
    assert found["sr-und-url"]["props"]["visible"] is named_sources  # no server-side fetches beyond loopback
    assert "sr-start" in found  # the generation tab is still there


def test_file_captions_stream_in_and_bad_input_is_an_error(clip, tmp_path):
    shown = list(caption_source(str(clip), None))
    assert [len(text.splitlines()) for text in shown] == [1, 2]  # one more line per caption, as they come
    assert shown[-1].splitlines()[0].startswith("[0.00-1.50] a ")
    with pytest.raises(gr.Error, match="Upload a video file or enter a URL"):
        list(caption_source(None, " "))
    with pytest.raises(gr.Error, match="not both"):
        list(caption_source(str(clip), "http://x"))
    with pytest.raises(gr.Error, match="does not open URLs"):
        list(caption_source(None, "http://127.0.0.1:9/x.mp4", named_sources=False))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(gr.Error, match="broken.mp4"):
        list(caption_source(str(broken), None))


def test_webcam_frames_give_captions_once_a_window_is_in():
    frames = render(sample_spec(SEED), 33, 120, 160)  # a webcam's size: resized to the captioner's
    state, texts = None, []
    for frame in frames:
        text, state = caption_webcam(frame, state)
        texts.append(text)
    assert texts[22] == "" and len(texts[23].splitlines()) == 1 and len(texts[-1].splitlines()) == 2
    assert texts[-1].splitlines()[-1].endswith(" background")
    assert caption_webcam(None, state)[0] == texts[-1]  # a frame-less tick keeps the transcript
    assert MAX_LINES >= 2
