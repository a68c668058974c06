"""The relay and the agent's TURN client against hostile input (second round): streams
full of tiny frames, stream clients that never allocate, NAT64 forms of forbidden
peers, reservations as a way around the quotas, and a relay answering LIFETIME 0."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import cast

import fuzzing
import pytest
from aioice import stun
from aioice.turn import UDP_TRANSPORT, TurnClientTcpProtocol
from hypothesis import given
from hypothesis import strategies as st
from test_relay_client import allocation_on
from test_relay_protocol import (
    SECRET,
    Client,
    Endpoint,
    _config,
    _Queue,
    client_for,
    running,
)
from test_turn_stream import FakeStreamTransport, stream_connection

from kbwg.agent.teamconfig import RelayConfig, tls_context
from kbwg.relay import wire
from kbwg.relay.allocation import Allocation, Refusal
from kbwg.relay.config import Lifetimes
from kbwg.relay.limits import PeerPolicy, client_key, parse_networks
from kbwg.relay.server import RelayServer
from kbwg.relay.streams import MAX_FRAMES_UNALLOCATED, StreamConnection
from kbwg.turn.client import RelayAllocation
from kbwg.turn.stream import TurnStreamProtocol
from kbwg_testing import wait_for
from kbwg_testing.certs import RelayCertificates, make_certificates

Address = tuple[str, int]

# 16 MiB of small frames, as a client (or relay) that was not read for a while leaves
# them. Splitting them costs time linear in the frames (a fraction of a second here);
# copying the rest of the buffer after each frame, as aioice's TurnStreamMixin does,
# costs frames x bytes (here tens of seconds, during which nothing else runs).
_FRAMES = 65536
_FRAME_PAYLOAD = 252
_SPLIT_BOUND_S = 5.0
# The hand-driven streams' client.
CLIENT = ("192.0.2.9", 40000)


def _tiny_frames() -> bytes:
    return (struct.pack("!HH", 0x4000, _FRAME_PAYLOAD) + bytes(_FRAME_PAYLOAD)) * _FRAMES




def test_a_stream_full_of_tiny_frames_costs_the_relay_time_linear_in_them() -> None:
    server, _streams, connection, _transport = stream_connection(CLIENT)
    # As if it had allocated (a connection without one may send few frames at all).
    server.table.allocations[connection.client] = cast(
        Allocation, SimpleNamespace(stream=connection))
    data = _tiny_frames()
    started = time.monotonic()
    connection.data_received(data[:100])  # a frame cut in two reads still frames
    connection.data_received(data[100:])
    elapsed = time.monotonic() - started
    assert server.counters.no_channel == _FRAMES  # every frame split, none lost
    assert not connection.buffer and not connection.closed
    assert elapsed < _SPLIT_BOUND_S, f"{elapsed:.1f} s for {len(data)} bytes"
    del server.table.allocations[connection.client]
    connection.connection_lost(None)
    server.close()


def test_a_relay_sending_tiny_frames_costs_the_agent_time_linear_in_them() -> None:
    received: list[bytes] = []

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes | str, addr: Address) -> None:
            received.append(cast(bytes, data))

    protocol = TurnStreamProtocol(("192.0.2.9", 3478), "u", "p", 600, 240)
    protocol.connection_made(cast(asyncio.Transport, FakeStreamTransport(CLIENT)))
    protocol.receiver = Receiver()
    protocol.channel_to_peer[0x4000] = ("192.0.2.1", 9)
    data = _tiny_frames()
    started = time.monotonic()
    protocol.data_received(data[:100])
    protocol.data_received(data[100:])
    elapsed = time.monotonic() - started
    assert len(received) == _FRAMES and received[0] == bytes(_FRAME_PAYLOAD)
    assert not protocol.buffer
    assert elapsed < _SPLIT_BOUND_S, f"{elapsed:.1f} s for {len(data)} bytes"


async def test_bindings_do_not_keep_a_stream_without_an_allocation_open() -> None:
    config = _config(tcp_listen=("127.0.0.1", 0), sweep_interval=0.05,
                     stream_idle_timeout=0.5)
    async with RelayServer(config) as server:
        assert server.streams is not None
        reader, writer = await asyncio.open_connection(*server.streams.addresses["tcp"])
        deadline = time.monotonic() + 5.0
        closed = False
        try:
            # A Binding every 0.1 s: frames, but never an allocation.
            while not closed and time.monotonic() < deadline:
                writer.write(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)))
                with contextlib.suppress(TimeoutError):
                    closed = await asyncio.wait_for(reader.read(4096), 0.1) == b""
        finally:
            writer.close()
        assert closed, "the relay kept a connection that never allocated"
        assert server.counters.stream_idle == 1
        assert server.counters.binding_responses >= 3  # it was served meanwhile


def test_nat64_forms_of_forbidden_ipv4_peers_are_refused() -> None:
    policy = PeerPolicy(own=frozenset({"198.51.100.7"}))
    for peer in ("64:ff9b::10.0.0.1", "64:ff9b::127.0.0.1", "64:ff9b::169.254.169.254",
                 "64:ff9b::100.64.0.1", "64:ff9b::198.51.100.7"):
        assert policy.refusal(peer) is not None, peer
    # A NAT64 form of an address the relay may reach stays relayable.
    assert policy.refusal("64:ff9b::192.0.2.1") is None
    assert policy.refusal("64:ff9b::198.51.100.8") is None


async def _allocate_reserving(client: Client) -> stun.Message:
    """Allocate with EVEN-PORT's R bit (no aioice encoder for it)."""
    base = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST, attributes={
        "REQUESTED-TRANSPORT": UDP_TRANSPORT, "USERNAME": client.username,
        "REALM": "kbwg", "NONCE": client.nonce})
    client.send(wire.encode_with(base, struct.pack("!HHB3x", 0x0018, 1, 0x80), client.key),
                client.server)
    while True:
        data, _ = await client.receive()
        reply = stun.parse_message(data)
        if reply.transaction_id == base.transaction_id:
            return reply


async def test_reservations_count_against_the_quota_of_the_address() -> None:
    config = _config()
    config = replace(config, quotas=replace(config.quotas, allocations_per_address=3))
    async with running(config) as server:
        client = await client_for(server, allocate=False)
        await client.login()
        codes = []
        try:
            for _ in range(6):
                # Allocate with a reservation, then delete: the reserved port stays.
                reply = await _allocate_reserving(client)
                codes.append(reply.error_code)
                if reply.error_code is None:
                    deleted = await client.turn(stun.Method.REFRESH, LIFETIME=0)
                    assert deleted.message_class == stun.Class.RESPONSE
        finally:
            client.close()
        assert codes[:3] == [None, None, None] and set(codes[3:]) == {486}, codes
        assert len(server.table.reservations) == 3
        assert server.counters.quota_address == 3


async def test_a_relay_answering_lifetime_0_is_not_refreshed_in_a_loop() -> None:
    # Granting 0 s is what a broken or hostile relay may answer; ours, told to, does.
    config = _config(lifetimes=Lifetimes(allocation_default=0, allocation_max=0),
                     sweep_interval=60.0)
    async with RelayServer(config) as server, allocation_on(server, watch_interval=60.0):
        before = server.counters.stun_requests
        await asyncio.sleep(0.5)  # what the agent does unprompted: nothing to await
        assert server.counters.stun_requests - before <= 1


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> RelayCertificates:
    return make_certificates(tmp_path_factory.mktemp("certs"), "127.0.0.1")


async def test_tls_connections_still_in_their_handshake_count_against_the_caps(
        certificates: RelayCertificates) -> None:
    """Connections that never start TLS hold a socket each until the handshake times
    out: per client IP they are capped like the others, not without bound."""
    config = _config(tls_listen=("127.0.0.1", 0), cert_file=str(certificates.cert),
                     key_file=str(certificates.key), sweep_interval=0.05,
                     tls_handshake_timeout=1.0)
    config = replace(config, quotas=replace(config.quotas, allocations_per_address=2))
    async with RelayServer(config) as server:
        assert server.streams is not None
        address = server.streams.addresses["tls"]
        silent = [await asyncio.open_connection(*address) for _ in range(4)]
        try:
            # Beyond the cap the relay hangs up at once, not when the handshake times out.
            for reader, _ in silent[2:]:
                assert await asyncio.wait_for(reader.read(), 0.8) == b""
            assert server.counters.stream_refused == 2
            # Within it, when the handshake times out.
            for reader, _ in silent[:2]:
                assert await asyncio.wait_for(reader.read(), 5.0) == b""
        finally:
            for _, writer in silent:
                writer.close()
        await wait_for(lambda: not server.streams.connections, "the connections to go")
        # And a client that does speak TLS is served as before.
        relay = RelayConfig("turns:127.0.0.1", "127.0.0.1", 0, SECRET, "tls",
                            ca_file=str(certificates.ca))
        alloc = await RelayAllocation.open("turns:test", address, "alice", SECRET,
                                           transport="tls", tls=tls_context(relay))
        try:
            assert alloc.transport == "tls" and len(server.table.allocations) == 1
            peer = await Endpoint.open()
            try:
                alloc.send(b"through tls", peer.address)
                assert await peer.receive() == (b"through tls", alloc.relayed)
            finally:
                peer.close()
        finally:
            await alloc.close()
        await wait_for(lambda: not server.table.allocations, "the allocation to go")


def _binding_with(attributes: int) -> bytes:
    """A Binding request carrying `attributes` empty comprehension-optional ones."""
    body = struct.pack("!HH", 0x8030, 0) * attributes
    return struct.pack("!HHI", 0x0001, len(body), stun.COOKIE) + bytes(12) + body


async def test_a_datagram_stuffed_with_attributes_is_dropped_unwalked() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        try:
            # 16,000 empty attributes: 70 ms of parsing each, for anyone who sends them.
            client.send(_binding_with((65507 - 20) // 4), client.server)
            assert await client.silent()
            assert server.counters.malformed == 1
            assert server.counters.binding_responses == 0
            # A message with a plausible number of them is served as before.
            client.send(_binding_with(100), client.server)
            answer, _ = await client.receive()
            assert stun.parse_message(answer).message_class == stun.Class.RESPONSE
        finally:
            client.close()


async def test_an_ipv6_peer_of_a_stream_allocation_comes_back_as_channel_data() -> None:
    # An IPv6 relayed socket names its senders with flow info and scope: the peer's
    # channel must still be found, not every datagram sent as a Data indication.
    config = _config(tcp_listen=("127.0.0.1", 0), relay_ip6="::1",
                     allow_peers=parse_networks(["127.0.0.0/8", "::1/128"]))
    async with RelayServer(config) as server:
        assert server.streams is not None
        alloc = await RelayAllocation.open("turn:test?transport=tcp",
                                           server.streams.addresses["tcp"], "alice",
                                           SECRET, transport="tcp", ipv6=True)
        got: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
        alloc.receiver = lambda data, peer: got.put_nowait((data, peer))
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            _Queue, local_addr=("::1", 0), family=socket.AF_INET6)
        peer = Endpoint(transport, protocol)
        try:
            assert alloc.relayed[0] == "::1"
            alloc.send(b"out", peer.address)  # binds a channel to the peer
            assert await peer.receive() == (b"out", alloc.relayed)
            peer.send(b"back", alloc.relayed)
            assert await asyncio.wait_for(got.get(), 2.0) == (b"back", peer.address)
            assert server.counters.data_indications_out == 0
        finally:
            peer.close()
            await alloc.close()


async def test_a_stream_without_an_allocation_may_send_few_frames() -> None:
    async with RelayServer(_config(tcp_listen=("127.0.0.1", 0))) as server:
        assert server.streams is not None
        address = server.streams.addresses["tcp"]
        reader, writer = await asyncio.open_connection(*address)
        try:
            # Tiny frames by the thousand, no credentials: each would be parsed.
            writer.write(struct.pack("!HH", 0x4000, 0) * 5000)
            await asyncio.wait_for(reader.read(), 3.0)  # up to EOF: closed
        finally:
            writer.close()
        assert server.counters.stream_bad_input == 1
        assert server.counters.no_channel == MAX_FRAMES_UNALLOCATED
        # A client that allocates is not in the way of the cap, however much it sends.
        alloc = await RelayAllocation.open("turn:test?transport=tcp", address, "alice",
                                           SECRET, transport="tcp")
        peer = await Endpoint.open()
        try:
            for number in range(3 * MAX_FRAMES_UNALLOCATED):
                alloc.send(b"%d" % number, peer.address)
                if number == 0:  # the first binds the channel
                    assert await peer.receive() == (b"0", alloc.relayed)
            for number in range(1, 3 * MAX_FRAMES_UNALLOCATED):
                assert await peer.receive() == (b"%d" % number, alloc.relayed)
            assert not alloc.closed and server.counters.stream_bad_input == 1
        finally:
            peer.close()
            await alloc.close()


def _frames_split_by(protocol_class: type[TurnClientTcpProtocol], data: bytes,
                     cuts: list[int]) -> tuple[list[bytes], bytes]:
    frames: list[bytes] = []

    class Recording(protocol_class):  # type: ignore[misc, valid-type]
        def datagram_received(self, data: bytes | str, addr: Address) -> None:
            frames.append(cast(bytes, data))

    protocol = Recording(("192.0.2.9", 3478), "u", "p", 600, 240)
    protocol.connection_made(cast(asyncio.Transport, FakeStreamTransport(CLIENT)))
    edges = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for start, end in itertools.pairwise(edges):
        protocol.data_received(data[start:end])
    return frames, bytes(getattr(protocol, "buffer", b""))


# Runs of short length-prefixed pieces, so that many frames complete, and the pieces'
# lengths (ChannelData's padding, STUN's 16 more header bytes) often disagree.
_PIECES = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=12).map(
    lambda pieces: b"".join(bytes([first, 0]) + struct.pack("!H", len(rest)) + rest
                            for first, rest in pieces))


@fuzzing.FUZZ
@given(data=st.one_of(st.binary(max_size=400), _PIECES),
       cuts=st.lists(st.integers(0, 400), max_size=6))
def test_the_agents_stream_framing_is_aioices(data: bytes, cuts: list[int]) -> None:
    """The one-pass split gives the frames, and keeps the rest, as aioice's mixin."""
    assert (_frames_split_by(TurnStreamProtocol, data, cuts)
            == _frames_split_by(TurnClientTcpProtocol, data, cuts))


@pytest.mark.parametrize(("ip", "key"), [
    ("203.0.113.9", "203.0.113.9"),
    ("::ffff:203.0.113.9", "203.0.113.9"),  # the same client, written IPv4-mapped
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
])
def test_quotas_count_an_ipv6_client_by_its_64(ip: str, key: str) -> None:
    assert client_key(ip) == key


def test_stream_connections_from_one_ipv6_64_share_its_cap() -> None:
    """One IPv6 host holds a whole /64: counted per address, its connections (and
    allocations, and unauthenticated answers) would have no cap at all."""
    first = stream_connection(("2001:db8:1:2::1", 40000))
    streams, cap = first.streams, first.server.config.quotas.allocations_per_address
    made = [first.connection]
    for i in range(2, cap + 3):
        connection = StreamConnection(streams, "tcp")
        connection.connection_made(cast(asyncio.Transport, FakeStreamTransport(
            (f"2001:db8:1:2::{i:x}", 40000))))
        made.append(connection)
    other = StreamConnection(streams, "tcp")
    other.connection_made(cast(asyncio.Transport, FakeStreamTransport(("2001:db8:9::1", 1))))
    try:
        assert len([c for c in made if c in streams.connections]) == cap
        assert first.server.counters.stream_refused == 2
        assert other in streams.connections  # another /64 is another client
    finally:
        first.server.close()


def test_allocations_from_one_ipv6_64_share_its_quota() -> None:
    config = _config()
    config = replace(config, quotas=replace(config.quotas, allocations_per_address=2))
    server = RelayServer(config)
    table = server.table
    try:
        for i in (1, 2):
            table.create((f"2001:db8:1:2::{i}", 40000), "u", "u", b"k", None, 0.0)
        with pytest.raises(Refusal, match="2001:db8:1:2::/64 has too many allocations"):
            table.create(("2001:db8:1:2::3", 40000), "u", "u", b"k", None, 0.0)
        table.create(("2001:db8:1:3::1", 40000), "u", "u", b"k", None, 0.0)  # another /64
        table.remove(table.allocations[("2001:db8:1:2::1", 40000)], "test")
        table.create(("2001:db8:1:2::3", 40000), "u", "u", b"k", None, 0.0)  # room again
    finally:
        server.close()
