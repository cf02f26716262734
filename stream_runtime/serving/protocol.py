"""The websocket wire format, ``stream-runtime/1`` (docs/protocol.md is the reference for client authors).

Control messages are JSON text; frames are binary messages of a fixed 28-byte little-endian header and a payload
(JPEG bytes, or raw RGB / RGBA rows). This module is pure: parsing, validation and frame encoding, no I/O, so the
server, the Python client and the tests share one definition.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_runtime.serving.api import SessionRequest, SessionUpdate

PROTOCOL = "stream-runtime/1"
MAGIC = b"SRTM"
VERSION = 1

HEADER = struct.Struct("<4sBBBBIIIHHHH")
"""magic, version, kind, format, flags, session, chunk, frame, index, count, width, height (28 bytes)."""
HEADER_SIZE = HEADER.size

KIND_OUTPUT = 1
"""Server -> client: a generated frame."""
KIND_INPUT = 2
"""Client -> server: an input frame of a video-to-video session."""

FORMATS = {"raw": 0, "jpeg": 1, "rgba": 2}
"""Frame payload formats by name and header code. ``raw`` is RGB24 rows; ``rgba`` fits ``ImageData`` as is."""
FORMAT_NAMES = {code: name for name, code in FORMATS.items()}
FLAG_LAST_IN_CHUNK = 1
"""Header flag bit 0: the frame is the last of its chunk."""

DEFAULT_FORMAT = "jpeg"
DEFAULT_QUALITY = 80
MAX_PROMPT_CHARS = 2000

CLIENT_TYPES = ("open", "update", "pause", "resume", "close")
_UPDATE_FIELDS = ("prompt", "blend_chunks", "steps", "timesteps", "strength", "guidance_scale")
SLO_FIELDS = ("slo_ttff_s", "slo_fps")
"""Optional per-session targets of an ``open`` (used by a server whose engine runs the SLO scheduler)."""
UNDERSTAND_ONLY_FIELDS = ("source", "fps", "stride_frames")
"""Fields of an ``open`` with ``mode: "understand"`` only (see :mod:`stream_runtime.serving.understand`)."""
FIELDS = {
    "open": frozenset(
        ("type", "protocol", "seed", "mode", "height", "width", "motion_aware", "early_first_frame", "format")
        + ("quality", "record")
        + _UPDATE_FIELDS
        + SLO_FIELDS
        + UNDERSTAND_ONLY_FIELDS
    ),
    "update": frozenset(("type",) + _UPDATE_FIELDS),
    "pause": frozenset(("type",)),
    "resume": frozenset(("type",)),
    "close": frozenset(("type",)),
}
"""The fields each client message may have; any other is a ``bad_params`` error (it is most likely a typo)."""


class ProtocolError(ValueError):
    """A client message the server cannot act on; becomes an ``error`` event with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FrameHeader:
    """The fixed header in front of every binary frame message."""

    kind: int
    """KIND_OUTPUT (server -> client) or KIND_INPUT (client -> server)."""
    format: str
    """Payload format: ``jpeg``, ``raw`` (RGB24) or ``rgba``."""
    session: int
    chunk: int
    """Chunk index within the session (input frames: the client's own counter, ignored by the server)."""
    frame: int
    """Frame number in the stream (the chunk's first frame plus ``index``)."""
    index: int
    """Frame index within its chunk."""
    count: int
    """Frames in the chunk."""
    width: int
    height: int
    flags: int = 0


@dataclass(frozen=True)
class OutputFormat:
    """How a connection wants its frames encoded."""

    format: str = DEFAULT_FORMAT
    quality: int = DEFAULT_QUALITY
    """JPEG quality 1..100 (ignored for raw formats)."""


# -- binary frames


def pack_frame(header: FrameHeader, payload: bytes) -> bytes:
    """Header plus payload as one binary websocket message."""
    return (
        HEADER.pack(
            MAGIC,
            VERSION,
            header.kind,
            FORMATS[header.format],
            header.flags,
            header.session,
            header.chunk,
            header.frame,
            header.index,
            header.count,
            header.width,
            header.height,
        )
        + payload
    )


def unpack_frame(data: bytes) -> tuple[FrameHeader, bytes]:
    """Split a binary message into its header and payload; a ProtocolError (``bad_frame``) if malformed."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError("bad_frame", f"a binary message needs a {HEADER_SIZE}-byte header, got {len(data)} bytes")
    magic, version, kind, fmt, flags, session, chunk, frame, index, count, width, height = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("bad_frame", f"binary messages must start with {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise ProtocolError("bad_frame", f"frame header version must be {VERSION}, got {version}")
    if fmt not in FORMAT_NAMES:
        raise ProtocolError("bad_frame", f"frame format code must be one of {sorted(FORMAT_NAMES)}, got {fmt}")
    header = FrameHeader(kind, FORMAT_NAMES[fmt], session, chunk, frame, index, count, width, height, flags)
    return header, data[HEADER_SIZE:]


def encode_frame(frame: np.ndarray, fmt: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """Payload of one uint8 ``[H, W, 3]`` RGB frame in ``fmt``."""
    if fmt == "raw":
        return np.ascontiguousarray(frame).tobytes()
    if fmt == "rgba":
        out = np.full((*frame.shape[:2], 4), 255, dtype=np.uint8)
        out[..., :3] = frame
        return out.tobytes()
    from PIL import Image  # Pillow comes with diffusers

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_chunk(session: int, chunk, output: OutputFormat) -> list[bytes]:
    """Binary messages for every frame of a :class:`~stream_runtime.serving.engine.ChunkOutput`."""
    frames = chunk.frames
    count, height, width = frames.shape[:3]
    messages = []
    for i, frame in enumerate(frames):
        header = FrameHeader(
            KIND_OUTPUT,
            output.format,
            session,
            chunk.index,
            chunk.first_frame + i,
            i,
            count,
            width,
            height,
            FLAG_LAST_IN_CHUNK if i == count - 1 else 0,
        )
        messages.append(pack_frame(header, encode_frame(frame, output.format, output.quality)))
    return messages


def decode_frame(header: FrameHeader, payload: bytes) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB from a frame payload; a ProtocolError (``bad_frame``) if it does not decode."""
    h, w = header.height, header.width
    if header.format in ("raw", "rgba"):
        channels = 3 if header.format == "raw" else 4
        if len(payload) != h * w * channels:
            raise ProtocolError(
                "bad_frame",
                f"a {header.format} {w}x{h} frame needs {h * w * channels} payload bytes, got {len(payload)}",
            )
        return np.frombuffer(payload, dtype=np.uint8).reshape(h, w, channels)[..., :3].copy()
    from PIL import Image

    try:
        # JPEG only: Image.open would otherwise try every format Pillow knows (EPS runs Ghostscript).
        with Image.open(io.BytesIO(payload), formats=["JPEG"]) as image:
            # The size comes from the JPEG header; check it before decoding, so a small file cannot make the server
            # decode a huge image.
            if image.size != (w, h):
                raise ProtocolError(
                    "bad_frame", f"the header says {w}x{h} but the JPEG is {image.size[0]}x{image.size[1]}"
                )
            return np.asarray(image.convert("RGB"))
    except ProtocolError:
        raise
    except Exception as exc:  # Pillow raises several types for corrupt data
        raise ProtocolError("bad_frame", f"the JPEG payload does not decode: {exc}") from exc


# -- JSON control messages


def parse_message(text: str) -> dict[str, Any]:
    """A client text message as a dict with a known ``type``; ProtocolError ``bad_json`` / ``bad_message``."""
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"text messages must be JSON objects: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", f"text messages must be JSON objects, got {type(msg).__name__}")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in CLIENT_TYPES:
        raise ProtocolError("bad_message", f"type must be one of {list(CLIENT_TYPES)}, got {kind!r}")
    unknown = sorted(set(msg) - FIELDS[kind])
    if unknown:
        raise ProtocolError(
            "bad_params", f"unknown field(s) {unknown} in {kind!r}; it takes {sorted(FIELDS[kind] - {'type'})}"
        )
    return msg


def _get(msg: dict, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = msg.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ProtocolError("bad_params", f"{name} must be {what}, got {value!r}")
    return value


def _int(msg: dict, name: str, what: str, default: int | None = None) -> int | None:
    value = _get(msg, name, (int, float), what, default)
    if value is None:
        return None
    if isinstance(value, float) and not value.is_integer():
        raise ProtocolError("bad_params", f"{name} must be {what}, got {value!r}")
    return int(value)


def _prompt(msg: dict, required: bool) -> str | None:
    prompt = _get(msg, "prompt", (str,), "a non-empty string")
    if prompt is None and required:
        raise ProtocolError("bad_params", "open needs a prompt (a non-empty string)")
    if prompt is not None and (not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS):
        raise ProtocolError("bad_params", f"prompt must be 1..{MAX_PROMPT_CHARS} characters, got {len(prompt)}")
    return prompt


def _timesteps(msg: dict) -> tuple[float, ...] | None:
    value = _get(msg, "timesteps", (list,), "a list of numbers")
    if value is None:
        return None
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in value):
        raise ProtocolError("bad_params", f"timesteps must be a list of numbers, got {value!r}")
    return tuple(float(t) for t in value)


def _strength(msg: dict) -> float | None:
    value = _get(msg, "strength", (int, float), "a number in (0, 1]")
    return None if value is None else float(value)


def _guidance(msg: dict) -> float | None:
    value = _get(msg, "guidance_scale", (int, float), "a number >= 1 (1: no guidance)")
    return None if value is None else float(value)


def _positive(msg: dict, name: str) -> float | None:
    value = _get(msg, name, (int, float), "a number of seconds or frames per second > 0")
    if value is None:
        return None
    if not 0 < value < float("inf"):
        raise ProtocolError("bad_params", f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def parse_open(msg: dict) -> tuple[SessionRequest, OutputFormat]:
    """The engine request and the output format of an ``open`` message."""
    protocol = msg.get("protocol", PROTOCOL)
    if protocol != PROTOCOL:
        raise ProtocolError("protocol_version", f"this server speaks {PROTOCOL!r}, the client asked for {protocol!r}")
    misplaced = sorted(set(msg) & set(UNDERSTAND_ONLY_FIELDS))
    if misplaced:
        raise ProtocolError("bad_params", f"field(s) {misplaced} are for mode 'understand' only")
    fmt = _get(msg, "format", (str,), f"one of {list(FORMATS)}", DEFAULT_FORMAT)
    if fmt not in FORMATS:
        raise ProtocolError("bad_params", f"format must be one of {list(FORMATS)}, got {fmt!r}")
    quality = _int(msg, "quality", "an integer in 1..100", DEFAULT_QUALITY)
    if not 1 <= quality <= 100:
        raise ProtocolError("bad_params", f"quality must be an integer in 1..100, got {quality}")
    mode = _get(msg, "mode", (str,), "'t2v' or 'v2v'", "t2v")
    request = SessionRequest(
        prompt=_prompt(msg, required=True),
        seed=_int(msg, "seed", "an integer >= 0", 0),
        mode=mode,
        height=_int(msg, "height", "a positive integer"),
        width=_int(msg, "width", "a positive integer"),
        steps=_int(msg, "steps", "a positive integer"),
        timesteps=_timesteps(msg),
        strength=_strength(msg),
        blend_chunks=_int(msg, "blend_chunks", "an integer >= 0"),
        motion_aware=_get(msg, "motion_aware", (bool,), "true or false"),
        early_first_frame=_get(msg, "early_first_frame", (bool,), "true or false"),
        guidance_scale=_guidance(msg),
        **{name: _positive(msg, name) for name in SLO_FIELDS},
    )
    return request, OutputFormat(fmt, quality)


def parse_update(msg: dict) -> SessionUpdate:
    """The engine update of an ``update`` message."""
    return SessionUpdate(
        prompt=_prompt(msg, required=False),
        blend_chunks=_int(msg, "blend_chunks", "an integer >= 0"),
        steps=_int(msg, "steps", "a positive integer"),
        timesteps=_timesteps(msg),
        strength=_strength(msg),
        guidance_scale=_guidance(msg),
    )
