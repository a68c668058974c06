"""Telling datagrams apart on a shared port: STUN messages (RFC 8489's header with the
magic cookie) and TURN ChannelData (RFC 8656 channel numbers 0x4000-0x7FFF). Every
demultiplexer in kbwg asks these two, so they agree on what is what."""

from __future__ import annotations

import struct

STUN_COOKIE = 0x2112A442
STUN_HEADER = 20
CHANNEL_HEADER = 4
# RFC 8489: at most 548 bytes is safe, but STUN over a 1500-byte path fits in 1500.
MAX_STUN_MESSAGE = 1500


def is_stun(data: bytes | bytearray | memoryview) -> bool:
    """A STUN header: top two bits 0, the magic cookie, a length that matches the
    datagram (and is a multiple of 4)."""
    size = len(data)
    if size < STUN_HEADER or size > MAX_STUN_MESSAGE:
        return False
    msg_type, length, cookie = struct.unpack_from("!HHI", data)
    return (not msg_type & 0xC000 and cookie == STUN_COOKIE and not length & 3
            and STUN_HEADER + length == size)


def is_channel_data(data: bytes | bytearray | memoryview) -> bool:
    """A ChannelData header: a channel number 0x4000-0x7FFF and room for its length."""
    return len(data) >= CHANNEL_HEADER and 0x40 <= data[0] <= 0x7F
