"""The Understand tab of the Gradio app: captions of an uploaded file, a URL or the webcam, as they are made.

Unlike the generation tab (a JavaScript player on the websocket), this tab runs through Gradio's own queue:
captions are a few short lines a second, which Gradio streams well. A file or URL goes through
:func:`~stream_runtime.understanding.understand` with the embedded captioner in a generator that yields the
growing transcript; the webcam streams frames to :func:`caption_webcam`, which keeps a
:class:`~stream_runtime.pipelines.captioner.stream.CaptionStream` per browser session. Bad input (an unreadable
file, a dead URL, an empty stream) ends with an error message after the captions made so far.
"""

from __future__ import annotations

import time

import gradio as gr
import numpy as np

MAX_LINES = 200
"""Transcript lines kept on screen (the newest): the page never grows without bound on a long stream."""
WEBCAM_STREAM_EVERY_S = 1 / 16
"""How often the browser sends a webcam frame: the world's 16 fps, which the captioner's window is defined at."""
WEBCAM_TIME_LIMIT_S = 600
"""A webcam stream stops after this long (Gradio's per-stream limit; press record again to go on)."""


def _line(start_s: float, end_s: float, text: str) -> str:
    return f"[{start_s:.2f}-{end_s:.2f}] {text}"


def _shown(lines: list[str]) -> str:
    return "\n".join(lines[-MAX_LINES:])


def caption_source(upload: str | None, url: str | None, named_sources: bool = True):
    """Generator of the transcript (one line per caption) of an uploaded file path or a URL; raises ``gr.Error``
    with the reason for bad input, after the lines made so far have been shown."""
    from stream_runtime.serving.understand import shared_captioner
    from stream_runtime.understanding import understand

    url = (url or "").strip()
    if upload and url:
        raise gr.Error("Give a file or a URL, not both")
    if not upload and not url:
        raise gr.Error("Upload a video file or enter a URL first")
    if url and not named_sources:
        raise gr.Error("This server does not open URLs (it listens beyond loopback); upload the file instead")
    lines: list[str] = []
    try:
        for event in understand(upload or url, shared_captioner()):
            lines.append(_line(event.start_s, event.end_s, event.text))
            yield _shown(lines)
    except ValueError as exc:  # IngestError and bad arguments: the reason, after what was captioned
        raise gr.Error(f"{exc}", duration=None) from exc
    if not lines:
        raise gr.Error("The video had no frames to caption")


def caption_webcam(frame: np.ndarray | None, state: dict | None) -> tuple[str, dict | None]:
    """One webcam frame (uint8 ``[H, W, 3]`` RGB) into the session's caption stream; returns the transcript and
    the state (``{"stream", "start", "lines", "times"}``)."""
    import cv2

    from stream_runtime.pipelines.captioner.stream import CaptionStream
    from stream_runtime.serving.understand import shared_captioner

    if frame is None:
        return (_shown(state["lines"]) if state else ""), state
    if state is None:
        state = {"stream": CaptionStream(shared_captioner()), "start": time.monotonic(), "lines": [], "times": []}
    stream: CaptionStream = state["stream"]
    size = stream.model.config.size
    small = cv2.resize(np.ascontiguousarray(frame[..., :3]), (size, size), interpolation=cv2.INTER_AREA)
    times = state["times"]
    times.append(time.monotonic() - state["start"])
    del times[: max(0, len(times) - stream.window_frames)]
    for window in stream.push(small[None]):
        first = times[max(0, len(times) - (window.last_frame - window.first_frame + 1))]
        state["lines"].append(_line(first, times[-1], window.caption))
        del state["lines"][: max(0, len(state["lines"]) - MAX_LINES)]
    return _shown(state["lines"]), state


def understand_tab(named_sources: bool = True) -> None:
    """The tab's components and events (call inside a ``gr.Blocks``/``gr.Tab`` context)."""
    gr.Markdown(
        "## Understand a video\n"
        "The embedded tiny-world captioner describes the last 1.5 s of video every half second. Upload a file, "
        "give a URL, or use the webcam; captions appear as they are made."
    )
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Video file", file_types=["video"], type="filepath", elem_id="sr-und-file")
            url = gr.Textbox(
                label="URL",
                placeholder="https://... or rtsp://...",
                visible=named_sources,
                elem_id="sr-und-url",
            )
            with gr.Row():
                run = gr.Button("Caption", variant="primary", elem_id="sr-und-run")
                stop = gr.Button("Stop", variant="stop", elem_id="sr-und-stop")
            webcam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam", elem_id="sr-und-webcam")
        with gr.Column(scale=3):
            transcript = gr.Textbox(
                label="Captions", lines=16, max_lines=16, autoscroll=True, interactive=False, elem_id="sr-und-text"
            )
    state = gr.State(None)

    def from_source(upload_path, url_text):
        yield from caption_source(upload_path, url_text, named_sources)

    running = run.click(from_source, [upload, url], [transcript], concurrency_limit=None)
    stop.click(None, None, None, cancels=[running])
    webcam.stream(
        caption_webcam,
        [webcam, state],
        [transcript, state],
        stream_every=WEBCAM_STREAM_EVERY_S,
        time_limit=WEBCAM_TIME_LIMIT_S,
        concurrency_limit=None,
    )
