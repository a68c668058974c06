import asyncio
import struct
import time

import pytest
from aioice import stun
from stun_test_server import Address, StunTestServer

from kbwg.negotiation.stun_client import (
    StunClient,
    StunCounters,
    StunErrorResponse,
    StunTimeout,
    bind_udp,
    open_udp_client,
)


def _answer(request: stun.Message, mapped: Address, *, txid: bytes | None = None,
            cls: stun.Class = stun.Class.RESPONSE, fingerprint: bool = True,
            **extra: object) -> bytes:
    message = stun.Message(stun.Method.BINDING, cls,
                           transaction_id=txid or request.transaction_id)
    message.attributes["XOR-MAPPED-ADDRESS"] = mapped
    message.attributes.update(extra)
    if fingerprint:
        message.add_fingerprint()
    return bytes(message)


async def test_binding_answers_with_mapped_address_and_rtt() -> None:
    async with StunTestServer() as server, open_udp_client("127.0.0.1") as (client, udp):
        result = await client.binding(server.address, timeout=2)
        port = udp.local_address[1]
    assert result.mapped == ("127.0.0.1", port)
    assert result.source == server.address
    assert result.other_address == ("127.0.0.2", server.alt_port)
    assert result.response_origin == server.address
    assert result.attempts == 1
    assert 0 <= result.rtt_ms < 1000
    assert client.counters.requests == 1 and client.counters.responses == 1
    assert client.counters.ignored == 0


async def test_retransmits_after_a_dropped_request() -> None:
    async with StunTestServer(drop_first=1) as server, \
            open_udp_client("127.0.0.1") as (client, _):
        result = await client.binding(server.address, timeout=3, rto=0.1)
    assert server.state.dropped == 1
    assert result.attempts == 2
    assert client.counters.retransmits == 1
    # RTT is timed from the retransmit that was answered, not from the first send.
    assert result.rtt_ms < 100


async def test_timeout_is_bounded_with_doubling_rto() -> None:
    async with StunTestServer(silent=True) as server, \
            open_udp_client("127.0.0.1") as (client, _):
        started = time.monotonic()
        with pytest.raises(StunTimeout, match=r"no answer from 127\.0\.0\.1"):
            await client.binding(server.address, timeout=0.5, rto=0.1)
        elapsed = time.monotonic() - started
    # Sends at 0, 0.1 and 0.3 s; the next would be at 0.7 s, past the 0.5 s bound.
    assert len(server.state.requests) == 3
    assert 0.45 <= elapsed < 1.0
    assert client.counters.timeouts == 1 and client.counters.retransmits == 2


async def test_bad_answers_are_ignored_and_counted_and_the_good_one_accepted() -> None:
    def bad_then_good(request: stun.Message, client: Address, _local: Address) -> list[bytes]:
        good = _answer(request, client)
        oversized = _answer(request, client, DATA=bytes(1600))
        bad_fingerprint = bytearray(good)
        bad_fingerprint[-1] ^= 0xFF
        garbage_attr = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                                    transaction_id=request.transaction_id)
        garbage = bytearray(bytes(garbage_attr))
        # A LIFETIME attribute of 2 bytes: aioice's unpack cannot decode it.
        garbage += struct.pack("!HH", 0x000D, 2) + b"\x00\x01\x00\x00"
        garbage[2:4] = struct.pack("!H", len(garbage) - 20)
        no_address = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                                  transaction_id=request.transaction_id)
        wrong_method = stun.Message(stun.Method.ALLOCATE, stun.Class.RESPONSE,
                                    transaction_id=request.transaction_id)
        return [
            good[:12],                               # truncated header
            good[:-4],                               # truncated body
            oversized,
            b"\x01\x02" + good[2:4] + b"\x00" * 4 + good[8:],  # no magic cookie
            bytes(bad_fingerprint),
            bytes(garbage),
            _answer(request, client, txid=b"\x01" * 12),      # wrong transaction id
            _answer(request, client, cls=stun.Class.REQUEST),  # wrong class
            _answer(request, client, cls=stun.Class.INDICATION),
            bytes(no_address),
            bytes(wrong_method),
            good,
        ]

    async with StunTestServer(override=bad_then_good) as server, \
            open_udp_client("127.0.0.1") as (client, udp):
        result = await client.binding(server.address, timeout=2, rto=1.0)
        counters = client.counters
        port = udp.local_address[1]
    assert result.mapped == ("127.0.0.1", port)
    assert result.attempts == 1
    assert (counters.truncated, counters.oversized, counters.not_stun) == (2, 1, 1)
    assert (counters.bad_fingerprint, counters.undecodable) == (1, 1)
    assert (counters.unknown_transaction, counters.wrong_class) == (1, 2)
    assert (counters.no_address, counters.wrong_method) == (1, 1)
    assert counters.ignored == 11 and counters.responses == 1


async def test_error_response_is_raised_with_its_code() -> None:
    def refuse(request: stun.Message, _client: Address, _local: Address) -> list[bytes]:
        error = stun.Message(stun.Method.BINDING, stun.Class.ERROR,
                             transaction_id=request.transaction_id,
                             attributes={"ERROR-CODE": (420, "Unknown Attribute")})
        return [bytes(error)]

    async with StunTestServer(override=refuse) as server, \
            open_udp_client("127.0.0.1") as (client, _):
        with pytest.raises(StunErrorResponse, match="420") as info:
            await client.binding(server.address, change_ip=True, timeout=1)
    assert info.value.code == 420


class MemoryTransport:
    """What the device owner's raw sockets will look like to the client."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Address]] = []

    def send(self, data: bytes, addr: Address) -> None:
        self.sent.append((data, addr))


async def test_client_works_over_any_transport_and_survives_any_input() -> None:
    transport = MemoryTransport()
    client = StunClient(transport, StunCounters())
    task = asyncio.create_task(client.binding(("192.0.2.1", 3478), timeout=2, rto=0.5))
    await asyncio.sleep(0.01)
    data, addr = transport.sent[0]
    assert addr == ("192.0.2.1", 3478)
    request = stun.parse_message(data)
    assert request.message_class == stun.Class.REQUEST
    assert "FINGERPRINT" in request.attributes
    # Random junk never raises out of the receive path.
    for junk in (b"", b"\x00" * 19, b"\xff" * 40, bytes(range(256)) * 3, data):
        assert client.datagram_received(junk, addr) is False
    assert client.datagram_received(_answer(request, ("198.51.100.7", 40000)), addr) is True
    result = await task
    assert result.mapped == ("198.51.100.7", 40000)


async def test_hairpin_sees_its_own_request() -> None:
    client, udp = await bind_udp("127.0.0.1")
    try:
        assert await client.hairpin(udp.local_address, timeout=0.5) is True
        assert await client.hairpin(("127.0.0.1", 9), timeout=0.3) is False
    finally:
        udp.close()
    assert client.counters.timeouts == 0
