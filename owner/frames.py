"""Length-prefixed msgpack frames, the wire format between the agent and the device owner.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
`msgpack.packb(obj, use_bin_type=True)`, where obj is a map.

Errors come in two kinds. `FrameBodyError` (an undecodable body, or a body that is not a
map) leaves the stream in sync, since the length prefix still delimited the frame, so a
reader may answer it and keep going. Any other `FrameError` (an oversized length, end of
stream inside a frame) means the stream cannot be resynchronised.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import msgpack

logger = logging.getLogger(__name__)

MAX_FRAME = 1 << 20
_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The byte stream is not a valid sequence of frames."""


class FrameBodyError(FrameError):
    """One frame's body is bad but the stream is still in sync after it."""

    def __init__(self, message: str, frames: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        # Frames decoded from the same chunk before the bad one, so a caller of
        # `FrameDecoder.feed` loses nothing when it chooses to keep going.
        self.frames: list[dict[str, Any]] = frames if frames is not None else []


def encode_frame(obj: dict[str, Any]) -> bytes:
    if not isinstance(obj, dict):
        raise TypeError(f"a frame must be a dict, not {type(obj).__name__}")
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds the maximum of {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def _check_length(length: int) -> None:
    if length > MAX_FRAME:
        raise FrameError(f"frame length {length} exceeds the maximum of {MAX_FRAME}")


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body; raises FrameBodyError if it is not a msgpack map."""
    try:
        obj = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise FrameBodyError(f"undecodable frame body: {exc!r}") from exc
    if not isinstance(obj, dict):
        raise FrameBodyError(f"frame body is a {type(obj).__name__}, not a map")
    return obj


class FrameDecoder:
    """Incremental decoder for a byte stream that arrives in arbitrary chunks."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add data and return every frame it completes.

        On a bad body, raises FrameBodyError carrying the frames decoded before it; the
        rest of the data stays buffered and `feed(b"")` continues after the bad frame.
        An oversized length raises FrameError and the decoder is unusable afterwards.
        """
        self._buffer += data
        frames: list[dict[str, Any]] = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            _check_length(length)
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            try:
                frames.append(decode_body(body))
            except FrameBodyError as exc:
                raise FrameBodyError(str(exc), frames) from exc
        return frames


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Read one frame; None on a clean end of stream between frames."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("truncated frame") from exc
    (length,) = _HEADER.unpack(header)
    _check_length(length)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameError("truncated frame") from exc
    return decode_body(body)


async def write_frame(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(encode_frame(obj))
    await writer.drain()
