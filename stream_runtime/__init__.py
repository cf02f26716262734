"""stream-runtime: generate and understand video as a live stream.

Example::

    from stream_runtime import StreamPipeline
    pipe = StreamPipeline.from_pretrained(path, device="cuda")
    with pipe.session(prompt="a fox running in snow", seed=0) as s:
        for frames in s:   # uint8 [T, H, W, 3] per chunk
            ...
"""

from stream_runtime.config import StreamConfig, text_to_video_config, video_to_video_config

__version__ = "0.1.0"
__all__ = ["StreamConfig", "StreamPipeline", "StreamSession", "text_to_video_config", "video_to_video_config"]


def __getattr__(name: str):
    # The pipeline pulls in diffusers and transformers; import it only when asked for.
    if name == "StreamPipeline":
        from stream_runtime.pipelines.wan.pipeline import StreamPipeline

        return StreamPipeline
    if name == "StreamSession":
        from stream_runtime.pipelines.wan.session import StreamSession

        return StreamSession
    raise AttributeError(f"module 'stream_runtime' has no attribute {name!r}")
