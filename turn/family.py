"""Allocating an IPv6 relayed address: REQUESTED-ADDRESS-FAMILY (RFC 8656 7.1, 14.1).

aioice's TURN client knows neither the attribute nor a way to add one to its Allocate,
so the request is built here, as aioice's `connect` builds it, with the attribute
encoded by hand: `RawMessage` puts attributes aioice cannot encode before the ones it
can, so the MESSAGE-INTEGRITY and FINGERPRINT aioice adds over `bytes(message)` cover
them. Without the attribute a relay gives an IPv4 relayed address whatever the family
of the path to it; a relay without IPv6 answers 440.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from aioice import stun
from aioice.turn import UDP_TRANSPORT, TurnClientProtocol

from kbwg.core.addresses import Address

REQUESTED_ADDRESS_FAMILY = 0x0017
IPV4 = 0x01
IPV6 = 0x02


def raw_attribute(attr_type: int, value: bytes) -> bytes:
    return (struct.pack("!HH", attr_type, len(value)) + value
            + bytes(stun.padding_length(len(value))))


def family_attribute(family: int) -> bytes:
    """REQUESTED-ADDRESS-FAMILY: the family, then three reserved zero bytes."""
    return raw_attribute(REQUESTED_ADDRESS_FAMILY, bytes((family, 0, 0, 0)))


class RawMessage(stun.Message):
    """An aioice message with already encoded attributes (`raw`) first."""

    def __init__(self, *args: Any, raw: bytes = b"", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw = raw

    def __bytes__(self) -> bytes:
        data = super().__bytes__()
        body = self.raw + data[stun.HEADER_LENGTH:]
        return stun.set_body_length(data[:stun.HEADER_LENGTH] + body, len(body))


async def allocate(protocol: TurnClientProtocol, ipv6: bool) -> Address:
    """The relayed address of a new allocation on `protocol`: IPv6 when `ipv6` (raises
    stun.TransactionFailed with 440 from a relay that has none), else aioice's own
    Allocate. Leaves `protocol` as aioice's `connect` does, refreshing on its own."""
    if not ipv6:
        relayed = await protocol.connect()
        return (str(relayed[0]), int(relayed[1]))
    request = RawMessage(stun.Method.ALLOCATE, stun.Class.REQUEST,
                         raw=family_attribute(IPV6))
    request.attributes["LIFETIME"] = protocol.lifetime
    request.attributes["REQUESTED-TRANSPORT"] = UDP_TRANSPORT
    response, _ = await protocol.request_with_retry(request)
    for name in ("LIFETIME", "XOR-MAPPED-ADDRESS", "XOR-RELAYED-ADDRESS"):
        if name not in response.attributes:
            raise ConnectionError(f"TURN allocation response is missing {name}")
    relayed = response.attributes["XOR-RELAYED-ADDRESS"]
    if ":" not in str(relayed[0]):
        raise ConnectionError(f"asked for IPv6, the relay gave {relayed[0]}")
    protocol.relayed_address = relayed
    protocol.mapped_address = response.attributes["XOR-MAPPED-ADDRESS"]
    protocol.refresh_task = asyncio.create_task(
        protocol.refresh(response.attributes["LIFETIME"]))
    return (str(relayed[0]), int(relayed[1]))
