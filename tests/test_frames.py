"""Length-prefixed msgpack frames: encoder, incremental decoder, stream reader."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack
import pytest

from kbwg.owner.frames import (
    MAX_FRAME,
    FrameBodyError,
    FrameDecoder,
    FrameError,
    encode_frame,
    read_frame,
    write_frame,
)

SAMPLE = {"id": 7, "op": "set_peer", "key": b"\x00\x01" * 16, "ips": ["100.64.0.2/32"], "n": None}


def _raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_round_trip_preserves_types() -> None:
    frame = encode_frame(SAMPLE)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert FrameDecoder().feed(frame) == [SAMPLE]


def test_many_frames_in_one_chunk() -> None:
    frames = [{"id": i, "op": "stats"} for i in range(50)]
    data = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    assert decoder.feed(data) == frames
    assert decoder.pending == 0


def test_frame_split_byte_by_byte() -> None:
    data = encode_frame(SAMPLE) + encode_frame({"id": 8})
    decoder = FrameDecoder()
    out: list[dict[str, object]] = []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i : i + 1]))
    assert out == [SAMPLE, {"id": 8}]


def test_oversized_length_rejected() -> None:
    with pytest.raises(FrameError, match="exceeds"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(FrameError, match="exceeds"):
        encode_frame({"blob": b"x" * (MAX_FRAME + 1)})


def test_frame_of_exactly_max_size_accepted() -> None:
    overhead = len(msgpack.packb({"b": b""}, use_bin_type=True))
    # A bin 32 header is 5 bytes against bin 8's 2.
    blob = b"x" * (MAX_FRAME - overhead - 3)
    frame = encode_frame({"b": blob})
    assert len(frame) == 4 + MAX_FRAME
    assert FrameDecoder().feed(frame) == [{"b": blob}]


def test_undecodable_body_keeps_stream_in_sync() -> None:
    good = encode_frame({"id": 1})
    decoder = FrameDecoder()
    with pytest.raises(FrameBodyError, match="undecodable") as info:
        decoder.feed(good + _raw(b"\xc1\xc1\xc1") + encode_frame({"id": 2}))
    assert info.value.frames == [{"id": 1}]
    assert decoder.feed(b"") == [{"id": 2}]


def test_non_map_body_rejected() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameBodyError, match="not a map"):
        decoder.feed(_raw(msgpack.packb([1, 2, 3])))
    with pytest.raises(FrameBodyError):
        decoder.feed(_raw(b""))


def test_encode_refuses_non_dict() -> None:
    not_a_map: Any = [1, 2]
    with pytest.raises(TypeError):
        encode_frame(not_a_map)


async def test_read_frame_sequence_then_clean_eof() -> None:
    reader = _reader(encode_frame({"id": 1}) + encode_frame({"id": 2}))
    assert await read_frame(reader) == {"id": 1}
    assert await read_frame(reader) == {"id": 2}
    assert await read_frame(reader) is None


async def test_read_frame_clean_eof_on_empty_stream() -> None:
    assert await read_frame(_reader(b"")) is None


@pytest.mark.parametrize("cut", [1, 3, 4, 6])
async def test_read_frame_truncated(cut: int) -> None:
    data = encode_frame({"id": 1, "op": "stats"})
    with pytest.raises(FrameError, match="truncated frame"):
        await read_frame(_reader(data[:cut]))


async def test_read_frame_oversized_and_bad_bodies() -> None:
    with pytest.raises(FrameError, match="exceeds"):
        await read_frame(_reader(struct.pack(">I", MAX_FRAME + 1)))
    reader = _reader(_raw(b"\xc1") + _raw(msgpack.packb("x")) + encode_frame({"id": 3}))
    with pytest.raises(FrameBodyError):
        await read_frame(reader)
    with pytest.raises(FrameBodyError):
        await read_frame(reader)
    assert await read_frame(reader) == {"id": 3}


async def test_write_frame_through_a_socket_pair() -> None:
    server_got: list[dict[str, object] | None] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_got.append(await read_frame(reader))
        server_got.append(await read_frame(reader))
        writer.close()

    import socket

    left, right = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=left)
    reader2, writer2 = await asyncio.open_connection(sock=right)
    task = asyncio.create_task(serve(reader2, writer2))
    await write_frame(writer, SAMPLE)
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(task, 5)
    assert server_got == [SAMPLE, None]
