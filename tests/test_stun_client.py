"""StunClient: retransmits, timeouts and bad input, on a virtual clock.

The timing tests talk to the STUN test server over an in-memory network
(memory_udp.py) whose datagrams take an exact loop time, so RTTs and timeouts are
asserted exactly. One test keeps a real loopback socket for `bind_udp`/`open_udp_client`.
"""

import asyncio
import struct

import pytest
from aioice import stun
from memory_udp import MemoryNet, memory_client, serve_in_memory
from stun_test_server import Address, StunTestServer
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK, advance_until, now

from kbwg.negotiation.stun_client import (
    StunClient,
    StunCounters,
    StunErrorResponse,
    StunTimeout,
    bind_udp,
    open_udp_client,
)

pytestmark = VIRTUAL_CLOCK
CLIENT = ("192.0.2.10", 40000)


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


@REAL_CLOCK
async def test_binding_over_a_real_udp_socket() -> None:
    async with StunTestServer() as server, open_udp_client("127.0.0.1") as (client, udp):
        # rto as long as the timeout: one request, however slow the machine.
        result = await client.binding(server.address, timeout=30, rto=30)
        port = udp.local_address[1]
    assert result.mapped == ("127.0.0.1", port)
    assert result.source == server.address
    assert result.other_address == ("127.0.0.2", server.alt_port)
    assert result.attempts == 1 and result.rtt_ms >= 0
    assert client.counters.requests == 1 and client.counters.responses == 1


async def test_binding_answers_with_mapped_address_and_rtt() -> None:
    net = MemoryNet(delay=0.005)
    server = serve_in_memory(StunTestServer(), net)
    client, _ = memory_client(net, CLIENT)
    result = await client.binding(server.address, timeout=2)
    assert result.mapped == CLIENT
    assert result.source == server.address
    assert result.other_address == ("127.0.0.2", server.alt_port)
    assert result.response_origin == server.address
    assert result.attempts == 1
    assert result.rtt_ms == pytest.approx(10.0)  # 5 ms each way
    assert client.counters.requests == 1 and client.counters.responses == 1
    assert client.counters.ignored == 0


async def test_retransmits_after_a_dropped_request() -> None:
    net = MemoryNet(delay=0.010)
    server = serve_in_memory(StunTestServer(drop_first=1), net)
    client, _ = memory_client(net, CLIENT)
    start = now()
    result = await client.binding(server.address, timeout=3, rto=0.1)
    assert server.state.dropped == 1
    assert result.attempts == 2
    assert client.counters.retransmits == 1
    assert [t - start for t in net.sent_from(CLIENT)] == pytest.approx([0.0, 0.1])
    # RTT is timed from the retransmit that was answered, not from the first send.
    assert result.rtt_ms == pytest.approx(20.0)


async def test_timeout_is_bounded_with_doubling_rto() -> None:
    net = MemoryNet(delay=0.010)
    server = serve_in_memory(StunTestServer(silent=True), net)
    client, _ = memory_client(net, CLIENT)
    start = now()
    with pytest.raises(StunTimeout, match=r"no answer from 127\.0\.0\.1"):
        await client.binding(server.address, timeout=0.5, rto=0.1)
    elapsed = now() - start
    # Sends at 0, 0.1 and 0.3 s; the next would be at 0.7 s, past the 0.5 s bound.
    assert len(server.state.requests) == 3
    assert [t - start for t in net.sent_from(CLIENT)] == pytest.approx([0.0, 0.1, 0.3])
    assert elapsed == pytest.approx(0.5)
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

    net = MemoryNet()
    server = serve_in_memory(StunTestServer(override=bad_then_good), net)
    client, _ = memory_client(net, CLIENT)
    result = await client.binding(server.address, timeout=2, rto=1.0)
    counters = client.counters
    assert result.mapped == CLIENT
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

    net = MemoryNet()
    server = serve_in_memory(StunTestServer(override=refuse), net)
    client, _ = memory_client(net, CLIENT)
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
    await advance_until(lambda: transport.sent)
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


@REAL_CLOCK
async def test_hairpin_sees_its_own_request_over_a_real_socket() -> None:
    client, udp = await bind_udp("127.0.0.1")
    try:
        assert await client.hairpin(udp.local_address, timeout=30, rto=30) is True
    finally:
        udp.close()
    assert client.counters.timeouts == 0


async def test_hairpin_is_true_when_looped_back_and_false_after_the_timeout() -> None:
    net = MemoryNet(delay=0.002)
    client, _ = memory_client(net, CLIENT)
    assert await client.hairpin(CLIENT, timeout=0.5) is True
    start = now()
    assert await client.hairpin(("192.0.2.99", 9), timeout=0.3) is False
    assert now() - start == pytest.approx(0.3)  # silence, waited for exactly the timeout
    assert client.counters.timeouts == 0
