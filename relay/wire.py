"""STUN/TURN wire details aioice's message code does not cover.

aioice decodes and encodes the messages; this module adds what a server needs around
it: header checks that tell garbage from truncation, a raw walk over the attributes
(aioice keeps only the last of repeated attributes and skips unknown ones, but a
server must see every XOR-PEER-ADDRESS and refuse unknown comprehension-required
attributes), the few TURN attributes aioice lacks, and error responses.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from aioice import stun

from kbwg.core.addresses import Address

# ChannelData: the first two bits are 01 (RFC 8656 12.4). RFC 8656 reserves
# 0x5000-0x7FFF, but RFC 5766 allowed up to 0x7FFE and coturn's clients still pick
# numbers there, so we accept the older range.
CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x7FFE
UDP_TRANSPORT = 17
# More attributes than any TURN request needs (a CreatePermission names one peer per
# permission, 64 by default): a 64 KiB datagram of 16,000 empty ones cost the relay
# 70 ms to walk and parse, so one sender could hold its single core at 1 MB/s.
MAX_ATTRIBUTES = 256

REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
DONT_FRAGMENT = 0x001A
RESERVATION_TOKEN = 0x0022
UNKNOWN_ATTRIBUTES = 0x000A
XOR_PEER_ADDRESS = 0x0012
CHANGE_REQUEST = 0x0003
FINGERPRINT = 0x8028
MESSAGE_INTEGRITY = 0x0008
MESSAGE_INTEGRITY_SHA256 = 0x001C
ADDRESS_FAMILY_IPV4 = 0x01
ADDRESS_FAMILY_IPV6 = 0x02
CHANGE_IP = 0x4
CHANGE_PORT = 0x2

KNOWN_ATTRIBUTES = frozenset(stun.ATTRIBUTES_BY_TYPE) | {
    REQUESTED_ADDRESS_FAMILY, EVEN_PORT, DONT_FRAGMENT, RESERVATION_TOKEN,
}

REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    508: "Insufficient Capacity",
}


class MalformedDatagram(ValueError):
    """A datagram that is not a well-formed STUN message; `reason` names the counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RawAttribute:
    type: int
    value: bytes


def check_header(data: bytes) -> None:
    """Raise MalformedDatagram unless `data` is exactly one STUN message with a sane header."""
    if len(data) < stun.HEADER_LENGTH:
        raise MalformedDatagram("truncated", "shorter than a STUN header")
    msg_type, length, cookie = struct.unpack_from("!HHI", data)
    if msg_type & 0xC000 or cookie != stun.COOKIE:
        raise MalformedDatagram("not_stun", "no STUN magic cookie")
    if len(data) < stun.HEADER_LENGTH + length:
        raise MalformedDatagram("truncated", "shorter than its header says")
    if len(data) > stun.HEADER_LENGTH + length or length % 4:
        raise MalformedDatagram("malformed", "length does not match the datagram")


def scan_attributes(data: bytes) -> list[RawAttribute]:
    """The attributes in order, FINGERPRINT verified; raises MalformedDatagram.

    Attributes after MESSAGE-INTEGRITY are walked (the framing must hold) but left
    out, except FINGERPRINT: they are not covered by the integrity check, so anyone on
    the path could have appended them (RFC 8489 14.5). aioice's parser does the same.
    """
    attributes: list[RawAttribute] = []
    pos = stun.HEADER_LENGTH
    end = len(data)
    signed = False
    count = 0
    while pos < end:
        count += 1
        if count > MAX_ATTRIBUTES:
            raise MalformedDatagram("malformed", f"more than {MAX_ATTRIBUTES} attributes")
        if pos + 4 > end:
            raise MalformedDatagram("malformed", "truncated attribute header")
        attr_type, attr_len = struct.unpack_from("!HH", data, pos)
        value_end = pos + 4 + attr_len
        if value_end > end:
            raise MalformedDatagram("malformed", f"attribute 0x{attr_type:04x} runs past the end")
        if attr_type == FINGERPRINT:
            if attr_len != 4 or value_end != end:
                raise MalformedDatagram("bad_fingerprint", "FINGERPRINT is not last")
            (value,) = struct.unpack_from("!I", data, pos + 4)
            if value != stun.message_fingerprint(data[:pos]):
                raise MalformedDatagram("bad_fingerprint", "FINGERPRINT does not match")
        if not signed or attr_type == FINGERPRINT:
            attributes.append(RawAttribute(attr_type, data[pos + 4:value_end]))
        if attr_type in (MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256):
            signed = True
        pos = value_end + stun.padding_length(attr_len)
    return attributes


def unknown_required(attributes: list[RawAttribute]) -> list[int]:
    return sorted({a.type for a in attributes if a.type < 0x8000
                   and a.type not in KNOWN_ATTRIBUTES})


def peer_addresses(attributes: list[RawAttribute], transaction_id: bytes) -> list[Address]:
    """All XOR-PEER-ADDRESS values (CreatePermission may carry several)."""
    return [stun.unpack_xor_address(a.value, transaction_id)
            for a in attributes if a.type == XOR_PEER_ADDRESS]


def find(attributes: list[RawAttribute], attr_type: int) -> bytes | None:
    for attribute in attributes:
        if attribute.type == attr_type:
            return attribute.value
    return None


def response(request: stun.Message, attributes: Mapping[str, object] | None = None,
             message_class: stun.Class = stun.Class.RESPONSE) -> stun.Message:
    return stun.Message(request.message_method, message_class, request.transaction_id,
                        dict(attributes or {}))


def error(request: stun.Message, code: int,
          attributes: Mapping[str, object] | None = None) -> stun.Message:
    # ERROR-CODE first, as RFC 8489's examples do.
    return response(request, {"ERROR-CODE": (code, REASONS.get(code, "Error")),
                              **(attributes or {})}, stun.Class.ERROR)


def encode(message: stun.Message, key: bytes | None = None, *,
           fingerprint: bool = True) -> bytes:
    """Sign with `key` when given, and end with FINGERPRINT (always when signed)."""
    if key is not None:
        message.add_message_integrity(key)
    elif fingerprint:
        message.add_fingerprint()
    return bytes(message)


def raw_attribute(attr_type: int, value: bytes) -> bytes:
    return (struct.pack("!HH", attr_type, len(value)) + value
            + bytes(stun.padding_length(len(value))))


def encode_with(message: stun.Message, extra: bytes, key: bytes | None = None, *,
                fingerprint: bool = True) -> bytes:
    """`encode` plus attributes aioice cannot encode, given already encoded in `extra`."""
    data = bytes(message) + extra
    if key is not None:
        integrity = stun.message_integrity(data, key)
        data = stun.set_body_length(data, len(data) - stun.HEADER_LENGTH)
        data += raw_attribute(MESSAGE_INTEGRITY, integrity)
    data = stun.set_body_length(data, len(data) - stun.HEADER_LENGTH)
    if key is None and not fingerprint:
        return data
    data += struct.pack("!HHI", FINGERPRINT, 4, stun.message_fingerprint(data))
    return stun.set_body_length(data, len(data) - stun.HEADER_LENGTH)


def unknown_attributes_error(request: stun.Message, types: list[int], *,
                             fingerprint: bool = True) -> bytes:
    """420 with UNKNOWN-ATTRIBUTES (RFC 8489 14.13)."""
    value = b"".join(struct.pack("!H", t) for t in types)
    return encode_with(error(request, 420), raw_attribute(UNKNOWN_ATTRIBUTES, value),
                       fingerprint=fingerprint)


def channel_header(channel: int, length: int) -> bytes:
    return struct.pack("!HH", channel, length)
