"""The Gradio app of ``stream-runtime serve``: live-stream controls beside a canvas player, and a tab that
captions a video (``understand_tab.py``).

Gradio carries only the controls. Every control runs a JavaScript hook (``js=`` with ``fn=None``: no round trip
to the server, nothing in Gradio's queue) that calls ``window.streamPlayer`` from ``apps/web/player.js``. The
player opens the websocket itself (``/ws``, docs/protocol.md), draws the JPEG frames on a ``<canvas>`` paced at
the stream's fps by a jitter buffer keyed on the frame number, shows FPS / latency / drops, sends webcam frames
for video-to-video, and offers the session's MP4 (recorded by the server) for download after Stop.

Example::

    from stream_runtime.apps.gradio_app import mount
    from stream_runtime.serving.server import serve

    serve(StreamPipeline.tiny_random(), extra_mount=mount, app_path="/")   # the app at http://127.0.0.1:7860/
"""

from __future__ import annotations

import html
import json
import pathlib

import gradio as gr
from fastapi import FastAPI

from stream_runtime.apps.understand_tab import understand_tab

WEB = pathlib.Path(__file__).resolve().parent / "web"
"""The player's static files (installed as package data)."""

MAX_BLEND_CHUNKS = 16
"""Largest prompt-transition length the slider offers, in chunks (the protocol itself has no limit)."""

THEME_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
"""System fonts: the default theme would fetch Google Fonts, which an offline server cannot reach."""


def player_html(ws_path: str = "/ws", height: int = 64, width: int = 64, token: str | None = None) -> str:
    """The player's elements; ``player.js`` finds them by id and reads the websocket path from ``data-ws-path`` and
    the server's token, if it has one, from ``data-token`` (it adds it to the websocket URL: browsers send no
    headers there). Only clients that hold the token can load the page's config, so it tells nobody new."""
    token_attr = "" if token is None else f' data-token="{html.escape(token, quote=True)}"'
    return f"""
<div id="sr-player" data-ws-path="{html.escape(ws_path, quote=True)}"{token_attr}>
  <canvas id="sr-canvas" width="{width}" height="{height}"></canvas>
  <pre id="sr-stats">press Start to stream</pre>
  <p id="sr-status">idle</p>
  <video id="sr-webcam" muted playsinline hidden></video>
  <a id="sr-download" download hidden>Download MP4</a>
</div>
"""


def player_head() -> str:
    """``<head>`` markup with the player script inlined (one request less, and no static route to mount)."""
    script = (WEB / "player.js").read_text(encoding="utf-8")
    if "</script" in script.lower():
        raise ValueError("apps/web/player.js must not contain '</script': it is inlined in a <script> element")
    return f"<script>\n{script}\n</script>"


def build_blocks(limits: dict, ws_path: str = "/ws", token: str | None = None, named_sources: bool = True) -> gr.Blocks:
    """Two tabs: the live-generation controls and player for a server with ``limits`` (``Engine.limits()``, as in
    the ``hello`` event), and the understanding tab (:func:`~.understand_tab.understand_tab`; ``named_sources``:
    whether it may open URLs).

    Example::

        blocks = build_blocks(engine.limits())
        app = gr.mount_gradio_app(app, blocks, path="/", head=player_head(), css=player_css())
    """
    with gr.Blocks(title="stream-runtime", analytics_enabled=False) as blocks:
        with gr.Tab("Generate", elem_id="sr-tab-generate"):
            _generation_tab(limits, ws_path, token)
        with gr.Tab("Understand", elem_id="sr-tab-understand"):
            understand_tab(named_sources)
    return blocks


def _generation_tab(limits: dict, ws_path: str, token: str | None) -> None:
    """The live-generation controls and the canvas player (the first tab)."""
    default_steps = limits["default_steps"]
    gr.Markdown(
        "## stream-runtime: live video generation\n"
        "Start a stream, switch the prompt while it plays, Stop to get the recording. Frames go from the "
        "server's websocket straight to the canvas."
    )
    with gr.Row():
        with gr.Column(scale=3):
            gr.HTML(
                player_html(ws_path, limits["default_height"], limits["default_width"], token),
                js_on_load=None,
                elem_id="sr-player-block",
            )
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                label="Prompt",
                value=limits.get("example_prompt", ""),
                lines=2,
                elem_id="sr-prompt",
                info="Enter: switch the prompt of the running stream (or start one)",
            )
            mode = gr.Radio(
                list(limits["modes"]),
                value="t2v",
                label="Mode",
                info="v2v: your webcam is the input video (the browser asks for the camera)",
                elem_id="sr-mode",
            )
            with gr.Row():
                steps = gr.Slider(
                    1, limits["max_steps"], value=default_steps["t2v"], step=1, label="Steps", elem_id="sr-steps"
                )
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="sr-seed")
            blend = gr.Slider(
                0,
                MAX_BLEND_CHUNKS,
                value=2,
                step=1,
                label="Transition (chunks)",
                info="a prompt switch blends over this many chunks; 0 switches at once",
                elem_id="sr-blend",
            )
            record = gr.Checkbox(value=True, label="Record the session (MP4 download after Stop)", elem_id="sr-record")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="sr-start")
                switch = gr.Button("Switch prompt", elem_id="sr-switch")
                stop = gr.Button("Stop", variant="stop", elem_id="sr-stop")

    # Client-side only: fn=None runs the js hook in the page and never calls the server.
    start_js = (
        "(prompt, mode, steps, seed, blend, record) => { window.streamPlayer.start("
        "{prompt, mode, steps, seed, blend_chunks: blend, record}); }"
    )
    switch_js = "(prompt, blend) => { window.streamPlayer.update({prompt, blend_chunks: blend}); }"
    submit_js = (
        "(prompt, mode, steps, seed, blend, record) => { const p = window.streamPlayer;"
        " if (p.state === 'live') p.update({prompt, blend_chunks: blend});"
        " else p.start({prompt, mode, steps, seed, blend_chunks: blend, record}); }"
    )
    all_inputs = [prompt, mode, steps, seed, blend, record]
    start.click(None, all_inputs, None, js=start_js)
    switch.click(None, [prompt, blend], None, js=switch_js)
    prompt.submit(None, all_inputs, None, js=submit_js)
    stop.click(None, None, None, js="() => { window.streamPlayer.stop(); }")
    steps.release(
        None,
        [steps],
        None,
        js="(steps) => { const p = window.streamPlayer; if (p.state === 'live') p.update({steps}); }",
    )
    # Each mode has its own default step count (hello's default_steps).
    mode.change(None, [mode], [steps], js=f"(mode) => ({json.dumps(default_steps)})[mode]")


def player_css() -> str:
    return (WEB / "player.css").read_text(encoding="utf-8")


def mount(app: FastAPI, path: str = "/") -> FastAPI:
    """Mount the app on a :func:`~stream_runtime.serving.server.build_app` app (its ``/ws``, ``/metrics``,
    ``/health`` and ``/recordings/`` keep precedence); use as ``build_app(engine, extra_mount=mount)``. With a token
    (``build_app(..., token=...)``) the page is behind it too and passes it to the websocket."""
    state = app.state
    blocks = build_blocks(
        state.engine.limits(),
        ws_path="/ws",
        token=getattr(state, "token", None),
        named_sources=getattr(state, "named_sources", True),
    )
    theme = gr.themes.Default(font=THEME_FONTS, font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(
        app,
        blocks,
        path=path,
        head=player_head(),
        css=player_css(),
        theme=theme,
        footer_links=["settings"],
        run_history=False,
        ssr_mode=False,
    )
