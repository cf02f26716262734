"""Writing streamed frames to H.264 MP4 with PyAV as they arrive.

The file is a fragmented MP4 (a fragment per keyframe interval): if the process dies mid-stream, what was
written up to the last fragment still plays; a normal close or Ctrl-C finishes the file completely.
"""

from __future__ import annotations

import pathlib
from fractions import Fraction

import av
import numpy as np


class VideoWriter:
    """Append uint8 RGB frames ``[T, H, W, 3]`` to an H.264 MP4.

    Example::

        with VideoWriter("clip.mp4", fps=16) as out:
            for frames in session:
                out.write(frames)
    """

    def __init__(
        self,
        path: str | pathlib.Path,
        fps: float = 16.0,
        crf: int = 18,
        keyframe_interval: int | None = None,
        codec: str = "libx264",
    ) -> None:
        self.path = pathlib.Path(path)
        if self.path.suffix.lower() not in (".mp4", ".m4v", ".mov"):
            raise ValueError(f"path must end in .mp4, .m4v or .mov, got {str(self.path)!r}")
        if not self.path.parent.exists():
            raise ValueError(f"the folder of path does not exist: {str(self.path.parent)!r}")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.keyframe_interval = keyframe_interval or max(1, round(float(fps)))
        self.codec = codec
        self.frames_written = 0
        self._container = None
        self._stream = None

    def _open(self, height: int, width: int) -> None:
        # Fragmented MP4: the header goes first and each keyframe starts a fragment, so a killed process
        # leaves a playable file.
        self._container = av.open(
            str(self.path), mode="w", options={"movflags": "frag_keyframe+empty_moov+default_base_moof"}
        )
        stream = self._container.add_stream(self.codec, rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        options = {"crf": str(self.crf), "g": str(self.keyframe_interval), "preset": "veryfast"}
        if self.codec == "libx264":
            # No rate-control lookahead: with it, x264 gave other bytes for the same frames in 1 to 4 runs of 12
            # (tests/test_cli.py), and it holds frames back; without it each frame is muxed as it comes.
            options["x264-params"] = "rc-lookahead=0:sync-lookahead=0"
        stream.options = options
        self._stream = stream

    def write(self, frames: np.ndarray) -> None:
        """Append frames: uint8 ``[T, H, W, 3]`` or one ``[H, W, 3]``; the first call fixes the size."""
        arr = np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {arr.dtype} {list(arr.shape)}")
        if arr.shape[1] % 2 or arr.shape[2] % 2:
            raise ValueError(f"frame height and width must be even for H.264 (yuv420p), got {arr.shape[1:3]}")
        if self._container is None:
            self._open(arr.shape[1], arr.shape[2])
        elif (arr.shape[1], arr.shape[2]) != (self._stream.height, self._stream.width):
            raise ValueError(
                f"frames must keep the size of the first write {(self._stream.height, self._stream.width)}, "
                f"got {arr.shape[1:3]}"
            )
        for frame in arr:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
        self.frames_written += len(arr)

    def close(self) -> None:
        """Flush the encoder and finish the file (safe to call twice)."""
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_video(path: str | pathlib.Path) -> np.ndarray:
    """All frames of a video file as uint8 ``[T, H, W, 3]`` (for tests and small clips)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
