"""Streaming ingest: sources, exact keyframe-parallel decode, frame sampling, bounded prefetch.

Every source iterates ``(timestamp_seconds, frame uint8 [H, W, 3] RGB)``; the decoders yield
``DecodedFrame(pts, time, image)``. Errors on bad input are ``IngestError`` (a ``ValueError``).
"""

from .container import DecodedFrame, open_video
from .decode import decode_sequential
from .errors import IngestError
from .index import Interval, StreamIndex, plan_intervals, scan_stream
from .ordered import ordered_map
from .parallel import decode_parallel, default_workers
from .prefetch import Prefetcher, prefetch
from .sampling import Resize, Sampling
from .sources import FileSource, FrameSource, PushSource, WebcamSource, open_source

__all__ = [
    "DecodedFrame",
    "FileSource",
    "FrameSource",
    "IngestError",
    "Interval",
    "Prefetcher",
    "PushSource",
    "Resize",
    "Sampling",
    "StreamIndex",
    "WebcamSource",
    "decode_parallel",
    "decode_sequential",
    "default_workers",
    "open_source",
    "open_video",
    "ordered_map",
    "plan_intervals",
    "prefetch",
    "scan_stream",
]
