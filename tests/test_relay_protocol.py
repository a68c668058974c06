"""The relay server on loopback: TURN methods, authentication, limits, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from ipaddress import ip_address
from types import SimpleNamespace

import pytest
from aioice import stun
from aioice.turn import UDP_TRANSPORT, make_integrity_key

from kbwg.core.turnrest import rest_password, rest_username
from kbwg.negotiation.stun_client import open_udp_client
from kbwg.relay import credentials, wire
from kbwg.relay.config import Lifetimes, ServerConfig
from kbwg.relay.control import ControlPlane
from kbwg.relay.limits import Counters, Quotas, parse_networks
from kbwg.relay.server import RelayServer
from kbwg_testing import wait_for

Address = tuple[str, int]
SECRET = "team-relay-secret"
REALM = "kbwg"


def _config(**overrides: object) -> ServerConfig:
    base = ServerConfig(listen=("127.0.0.1", 0), secret=SECRET, realm=REALM,
                       allow_peers=parse_networks(["127.0.0.0/8"]))
    return replace(base, **overrides)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(config: ServerConfig | None = None) -> AsyncIterator[RelayServer]:
    server = RelayServer(config or _config())
    await server.start()
    try:
        yield server
    finally:
        server.close()


class _Queue(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, (addr[0], addr[1])))


class Endpoint:
    """A UDP socket on loopback that sees every datagram it receives."""

    def __init__(self, transport: asyncio.DatagramTransport, protocol: _Queue) -> None:
        self.transport = transport
        self.protocol = protocol

    @classmethod
    async def open(cls, host: str = "127.0.0.1") -> Endpoint:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            _Queue, local_addr=(host, 0), family=socket.AF_INET)
        return cls(transport, protocol)

    @property
    def address(self) -> Address:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (host, port)

    def send(self, data: bytes, to: Address) -> None:
        self.transport.sendto(data, to)

    async def receive(self, timeout: float = 2.0) -> tuple[bytes, Address]:
        return await asyncio.wait_for(self.protocol.queue.get(), timeout)

    async def silent(self, timeout: float = 0.3) -> bool:
        try:
            await self.receive(timeout)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.transport.close()


class Client(Endpoint):
    """A hand-driven TURN client, so tests can send anything, right or wrong."""

    server: Address
    username: str = ""
    key: bytes = b""
    nonce: bytes = b""

    async def request(self, message: stun.Message, *, sign: bool = True,
                      timeout: float = 2.0) -> stun.Message:
        if sign and self.key:
            message.attributes.update(USERNAME=self.username, REALM=REALM, NONCE=self.nonce)
            message.add_message_integrity(self.key)
        self.send(bytes(message), self.server)
        deadline = time.monotonic() + timeout
        while True:
            data, _ = await self.receive(max(0.01, deadline - time.monotonic()))
            if data and 0x40 <= data[0] <= 0x7F:  # ChannelData, not an answer
                continue
            reply = stun.parse_message(data)
            if reply.transaction_id == message.transaction_id:
                return reply

    async def login(self, username: str | None = None, password: str | None = None) -> None:
        """Fetch realm and nonce with an unauthenticated request, then use credentials."""
        challenge = await self.request(
            stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST,
                         attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT}), sign=False)
        assert challenge.error_code == 401
        self.nonce = challenge.attributes["NONCE"]
        self.username = username or rest_username("alice", 600)
        password = password if password is not None else rest_password(SECRET, self.username)
        self.key = make_integrity_key(self.username, REALM, password)

    async def allocate(self, **attributes: object) -> stun.Message:
        attributes.setdefault("REQUESTED-TRANSPORT", UDP_TRANSPORT)
        return await self.request(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST,
                                               attributes=attributes))

    async def turn(self, method: stun.Method, **attributes: object) -> stun.Message:
        return await self.request(stun.Message(method, stun.Class.REQUEST,
                                               attributes=attributes))


async def client_for(server: RelayServer, user: str = "alice",
                     allocate: bool = True) -> Client:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _Queue, local_addr=("127.0.0.1", 0), family=socket.AF_INET)
    client = Client(transport, protocol)
    client.server = server.address
    if allocate:
        await client.login(rest_username(user, 600))
        answer = await client.allocate()
        assert answer.message_class == stun.Class.RESPONSE, answer
    return client


def _counters(server: RelayServer) -> Counters:
    return server.counters


def _code(message: stun.Message) -> int | None:
    return message.error_code


# --- STUN Binding ---

async def test_binding_needs_no_credentials() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        answer = await client.request(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))
        client.close()
    assert answer.message_class == stun.Class.RESPONSE
    assert answer.attributes["XOR-MAPPED-ADDRESS"] == client.address
    assert "OTHER-ADDRESS" not in answer.attributes
    assert server.counters.binding_responses == 1


async def test_change_request_without_alternate_is_an_unknown_attribute() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        answer = await client.request(stun.Message(
            stun.Method.BINDING, stun.Class.REQUEST, attributes={"CHANGE-REQUEST": 6}))
        client.close()
    assert _code(answer) == 420
    assert server.counters.unknown_attribute == 1


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def test_rfc5780_other_address_and_change_request() -> None:
    port, alt_port = _free_port("127.0.0.1"), _free_port("127.0.0.2")
    config = _config(listen=("127.0.0.1", port), alt_address=("127.0.0.2", alt_port))
    async with running(config) as server, open_udp_client("127.0.0.1") as (stun_client, _):
        plain = await stun_client.binding(server.address, timeout=2)
        both = await stun_client.binding(server.address, change_ip=True, change_port=True,
                                         timeout=2)
        port_only = await stun_client.binding(server.address, change_port=True, timeout=2)
        ip_only = await stun_client.binding(server.address, change_ip=True, timeout=2)
        on_alt = await stun_client.binding(("127.0.0.2", alt_port), timeout=2)
    assert plain.other_address == ("127.0.0.2", alt_port)
    assert plain.source == plain.response_origin == ("127.0.0.1", port)
    assert both.source == both.response_origin == ("127.0.0.2", alt_port)
    assert port_only.source == ("127.0.0.1", alt_port)
    assert ip_only.source == ("127.0.0.2", port)
    assert on_alt.other_address == ("127.0.0.1", port)
    assert server.counters.change_request_responses == 3


# --- authentication ---

async def test_allocate_without_credentials_is_challenged() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        answer = await client.request(stun.Message(
            stun.Method.ALLOCATE, stun.Class.REQUEST,
            attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT}), sign=False)
        client.close()
    assert _code(answer) == 401
    assert answer.attributes["REALM"] == REALM and answer.attributes["NONCE"]
    assert server.counters.unauthenticated == 1


async def test_good_rest_credentials_allocate() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        await client.login()
        answer = await client.allocate(LIFETIME=1200)
        assert answer.message_class == stun.Class.RESPONSE
        assert answer.check_message_integrity(client.key)
        relayed = answer.attributes["XOR-RELAYED-ADDRESS"]
        assert relayed[0] == "127.0.0.1" and relayed[1] > 0
        assert answer.attributes["XOR-MAPPED-ADDRESS"] == client.address
        assert answer.attributes["LIFETIME"] == 1200
        assert server.table.counts()["allocations"] == 1
        client.close()


async def test_wrong_password_is_refused_and_counted() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        await client.login(password="not-the-password")
        answer = await client.allocate()
        client.close()
    assert _code(answer) == 401 and "NONCE" in answer.attributes
    assert server.counters.bad_credentials == 1
    assert server.counters.allocations_created == 0


async def test_expired_username_is_refused_and_counted() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        await client.login(rest_username("alice", -10))
        answer = await client.allocate()
        client.close()
    assert _code(answer) == 401
    assert server.counters.expired_username == 1


async def test_username_without_expiry_is_refused() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        await client.login("alice")
        answer = await client.allocate()
        client.close()
    assert _code(answer) == 401
    assert server.counters.expired_username == 1


async def test_forged_and_stale_nonces_get_438(monkeypatch: pytest.MonkeyPatch) -> None:
    # The nonces' wall clock, stopped: a nonce lives for `lifetime` whole seconds of
    # issue time, so on a real clock a fresh one could go stale before its first use
    # (issued at x.999 s) and "stale" would need a real sleep past the lifetime.
    clock = [float(int(time.time())) + 0.5]
    monkeypatch.setattr(credentials, "time", SimpleNamespace(time=lambda: clock[0]))
    lifetimes = Lifetimes(nonce=1)
    async with running(_config(lifetimes=lifetimes)) as server:
        client = await client_for(server, allocate=False)
        await client.login()
        good_nonce = client.nonce
        client.nonce = b"5f000000-00000000000000000000"
        forged = await client.allocate()
        assert _code(forged) == 438 and forged.attributes["NONCE"] != client.nonce
        client.nonce = good_nonce
        clock[0] += 0.4
        assert _code(await client.allocate()) != 438, "still fresh before its lifetime"
        await client.turn(stun.Method.REFRESH, LIFETIME=0)
        clock[0] += 0.7
        stale = await client.allocate()
        assert _code(stale) == 438
        # The 438 carries a fresh nonce, which works (aioice's retry does exactly this).
        client.nonce = stale.attributes["NONCE"]
        fresh = await client.allocate()
        client.close()
    assert fresh.message_class == stun.Class.RESPONSE
    assert server.counters.stale_nonce == 2


async def test_another_users_credentials_on_an_allocation_get_441() -> None:
    async with running() as server:
        client = await client_for(server, user="alice")
        client.username = rest_username("mallory", 600)
        client.key = make_integrity_key(client.username, REALM,
                                        rest_password(SECRET, client.username))
        answer = await client.turn(stun.Method.REFRESH, LIFETIME=600)
        client.close()
    assert _code(answer) == 441
    assert server.counters.wrong_credentials == 1


# --- allocations ---

async def test_second_allocate_on_the_same_five_tuple_is_437_but_retransmit_is_answered(
) -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        await client.login()
        request = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST,
                               attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT})
        first = await client.request(request)
        # The same bytes again: a retransmission gets the same answer.
        client.send(bytes(request), client.server)
        again, _ = await client.receive()
        other = await client.allocate()
        client.close()
    assert first.message_class == stun.Class.RESPONSE
    assert stun.parse_message(again).attributes["XOR-RELAYED-ADDRESS"] == \
        first.attributes["XOR-RELAYED-ADDRESS"]
    assert _code(other) == 437
    assert server.counters.allocation_mismatch == 1
    assert server.counters.allocations_created == 1


async def test_unsupported_transport_and_family() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        await client.login()
        tcp = await client.allocate(**{"REQUESTED-TRANSPORT": 6 << 24})
        missing = await client.request(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST))
        client.close()
    assert _code(tcp) == 442 and _code(missing) == 400
    assert server.counters.unsupported_transport == 1


async def test_refresh_and_lifetime_zero_deletes() -> None:
    async with running() as server:
        client = await client_for(server)
        refreshed = await client.turn(stun.Method.REFRESH, LIFETIME=99999)
        assert refreshed.attributes["LIFETIME"] == 3600  # capped at the maximum
        deleted = await client.turn(stun.Method.REFRESH, LIFETIME=0)
        assert deleted.message_class == stun.Class.RESPONSE
        assert deleted.attributes["LIFETIME"] == 0
        assert server.table.counts()["allocations"] == 0
        gone = await client.turn(stun.Method.REFRESH, LIFETIME=600)
        client.close()
    assert _code(gone) == 437
    assert server.counters.allocations_deleted == 1


async def test_allocations_expire() -> None:
    lifetimes = Lifetimes(allocation_default=1, allocation_max=1)
    async with running(_config(lifetimes=lifetimes, sweep_interval=0.2)) as server:
        client = await client_for(server)
        assert server.table.counts()["allocations"] == 1
        await wait_for(lambda: server.table.counts()["allocations"] == 0,
                       "the allocation to expire")
        client.close()
    assert server.counters.allocations_expired == 1


# --- relaying ---

async def test_send_indication_and_data_indication() -> None:
    async with running() as server:
        client = await client_for(server)
        peer = await Endpoint.open()
        granted = await client.turn(stun.Method.CREATE_PERMISSION,
                                    **{"XOR-PEER-ADDRESS": peer.address})
        assert granted.message_class == stun.Class.RESPONSE
        client.send(bytes(stun.Message(stun.Method.SEND, stun.Class.INDICATION, attributes={
            "XOR-PEER-ADDRESS": peer.address, "DATA": b"hello peer"})), client.server)
        data, relayed = await peer.receive()
        assert data == b"hello peer"
        peer.send(b"hello client", relayed)
        raw, _ = await client.receive()
        indication = stun.parse_message(raw)
        client.close()
        peer.close()
    assert indication.message_method == stun.Method.DATA
    assert indication.message_class == stun.Class.INDICATION
    assert indication.attributes["DATA"] == b"hello client"
    assert indication.attributes["XOR-PEER-ADDRESS"] == peer.address


async def test_channel_data_both_ways() -> None:
    async with running() as server:
        client = await client_for(server)
        peer = await Endpoint.open()
        bound = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": peer.address})
        assert bound.message_class == stun.Class.RESPONSE
        client.send(struct.pack("!HH", 0x4001, 5) + b"wg-in" + b"\0\0\0", client.server)
        data, relayed = await peer.receive()
        assert data == b"wg-in"
        peer.send(b"wg-reply", relayed)
        raw, _ = await client.receive()
        client.close()
        peer.close()
    assert raw == struct.pack("!HH", 0x4001, 8) + b"wg-reply"
    assert server.counters.to_peer_packets == 1 and server.counters.to_client_packets == 1


async def test_channel_number_reuse_and_invalid_numbers_get_400() -> None:
    async with running() as server:
        client = await client_for(server)
        peer, other = await Endpoint.open(), await Endpoint.open()
        first = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": peer.address})
        again = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": peer.address})
        reuse = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": other.address})
        second_number = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4002, "XOR-PEER-ADDRESS": peer.address})
        too_low = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x3FFF, "XOR-PEER-ADDRESS": other.address})
        too_high = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x7FFF, "XOR-PEER-ADDRESS": other.address})
        missing = await client.turn(stun.Method.CHANNEL_BIND, **{
            "XOR-PEER-ADDRESS": other.address})
        for endpoint in (client, peer, other):
            endpoint.close()
    assert first.message_class == again.message_class == stun.Class.RESPONSE
    assert [_code(m) for m in (reuse, second_number, too_low, too_high, missing)] == \
        [400] * 5
    assert server.counters.channel_conflict == 2
    assert server.counters.bad_channel_number == 2


async def test_sends_without_permission_are_dropped_and_counted() -> None:
    async with running() as server:
        client = await client_for(server)
        peer = await Endpoint.open()
        client.send(bytes(stun.Message(stun.Method.SEND, stun.Class.INDICATION, attributes={
            "XOR-PEER-ADDRESS": peer.address, "DATA": b"x"})), client.server)
        client.send(struct.pack("!HH", 0x4000, 1) + b"x", client.server)
        assert await peer.silent()
        # The peer cannot reach the client either, without a permission for its IP.
        granted = await client.turn(stun.Method.CREATE_PERMISSION,
                                    **{"XOR-PEER-ADDRESS": ("127.0.0.9", 9)})
        assert granted.message_class == stun.Class.RESPONSE
        relayed = server.table.get(client.address)
        assert relayed is not None
        peer.send(b"unsolicited", relayed.relayed)
        assert await client.silent()
        client.close()
        peer.close()
    assert server.counters.no_permission == 1
    assert server.counters.no_channel == 1
    assert server.counters.no_permission_in == 1


async def test_loopback_and_private_peers_are_refused_by_default() -> None:
    # Finding 1: 10.0.0.2, 172.17.0.1, 192.168.1.1 and 100.64.0.1 were relayable.
    async with running(_config(allow_peers=parse_networks(["198.19.0.0/24"]))) as server:
        client = await client_for(server)
        loopback = await client.turn(stun.Method.CREATE_PERMISSION,
                                     **{"XOR-PEER-ADDRESS": ("127.0.0.1", 9)})
        multicast = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": ("224.0.0.1", 9)})
        link_local = await client.turn(stun.Method.CREATE_PERMISSION,
                                       **{"XOR-PEER-ADDRESS": ("169.254.1.1", 9)})
        private = [await client.turn(stun.Method.CREATE_PERMISSION,
                                     **{"XOR-PEER-ADDRESS": (ip, 9)})
                   for ip in ("10.0.0.2", "172.17.0.1", "192.168.1.1", "100.64.0.1",
                              "198.18.0.1")]
        bound = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": ("192.168.1.1", 9)})
        # --allow-peer opens a range that is denied by default.
        fine = await client.turn(stun.Method.CREATE_PERMISSION,
                                 **{"XOR-PEER-ADDRESS": ("198.19.0.1", 9)})
        client.close()
    refused = [loopback, multicast, link_local, *private, bound]
    assert [_code(m) for m in refused] == [403] * len(refused)
    assert fine.message_class == stun.Class.RESPONSE
    assert server.counters.peer_forbidden == len(refused) == 9
    # The host's own addresses were read (from this namespace) for the checks.
    assert server.table.host is not None and server.table.host.reads >= 1
    assert any(ip_address("127.0.0.1") in net for net in server.table.host.networks)


async def test_two_clients_of_the_relay_reach_each_other_but_never_its_own_sockets() -> None:
    """Two hosts that reach the relay only over TCP have one path: from one allocation
    to the other. The relay's address is its own, refused as a peer but for the relayed
    ports of live allocations; its listening port stays out of reach even with a
    permission for that address, and a channel to an allocation that went goes too."""
    async with running(_config(allow_peers=())) as server:
        alice, bob = await client_for(server, "alice"), await client_for(server, "bob")
        a_entry, b_entry = server.table.get(alice.address), server.table.get(bob.address)
        assert a_entry is not None and b_entry is not None
        listening = server.address
        to_own = await alice.turn(stun.Method.CREATE_PERMISSION,
                                  **{"XOR-PEER-ADDRESS": listening})
        assert _code(to_own) == 403
        bound = await alice.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": b_entry.relayed})
        permitted = await bob.turn(stun.Method.CREATE_PERMISSION,
                                   **{"XOR-PEER-ADDRESS": a_entry.relayed})
        assert bound.message_class == permitted.message_class == stun.Class.RESPONSE
        alice.send(struct.pack("!HH", 0x4000, 5) + b"hello", alice.server)
        raw, _ = await bob.receive()
        indication = stun.parse_message(raw)
        assert indication.attributes["XOR-PEER-ADDRESS"] == a_entry.relayed
        assert indication.attributes["DATA"] == b"hello"
        # A permission is by IP: alice holds one for the relay's own, yet a Send to
        # its listening port is dropped.
        before = server.counters.stun_requests
        alice.send(bytes(stun.Message(stun.Method.SEND, stun.Class.INDICATION, attributes={
            "XOR-PEER-ADDRESS": listening, "DATA": bytes(stun.Message(
                stun.Method.BINDING, stun.Class.REQUEST))})), alice.server)
        assert await alice.silent()
        assert server.counters.no_permission == 1
        assert server.counters.stun_requests == before
        # Bob's allocation goes: alice's channel to its port goes with it.
        gone = await bob.turn(stun.Method.REFRESH, LIFETIME=0)
        assert gone.message_class == stun.Class.RESPONSE
        assert b_entry.relayed not in a_entry.peer_channel
        alice.send(struct.pack("!HH", 0x4000, 5) + b"again", alice.server)
        assert await alice.silent()
        assert server.counters.no_channel == 1
        alice.close()
        bob.close()


async def test_a_relay_on_a_denied_network_says_so_at_start(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kbwg.relay.server"):
        async with running(_config(allow_peers=())):
            pass
        assert "peers on its network are refused unless --allow-peer" in caplog.text
        caplog.clear()
        async with running():  # --allow-peer 127.0.0.0/8
            pass
    assert "--allow-peer): 127.0.0.0/8" in caplog.text
    assert "peers on its network are refused" not in caplog.text


async def test_attributes_after_message_integrity_are_ignored() -> None:
    # Finding 2: a second XOR-PEER-ADDRESS appended after MESSAGE-INTEGRITY was honoured.
    async with running() as server:
        client = await client_for(server)
        message = stun.Message(stun.Method.CREATE_PERMISSION, stun.Class.REQUEST,
                               attributes={"XOR-PEER-ADDRESS": ("127.0.0.5", 9),
                                           "USERNAME": client.username, "REALM": REALM,
                                           "NONCE": client.nonce})
        message.add_message_integrity(client.key)
        signed = bytes(message)[:-8]  # without FINGERPRINT
        appended = struct.pack("!HH", wire.XOR_PEER_ADDRESS, 8) + stun.pack_xor_address(
            ("127.0.0.6", 9), message.transaction_id)
        data = bytearray(signed + appended)
        data[2:4] = struct.pack("!H", len(data) - 20)
        data += struct.pack("!HHI", wire.FINGERPRINT, 4, stun.message_fingerprint(
            bytes(stun.set_body_length(bytes(data), len(data) - 20 + 8))))
        data[2:4] = struct.pack("!H", len(data) - 20)
        client.send(bytes(data), client.server)
        reply, _ = await client.receive()
        allocation = server.table.get(client.address)
        assert allocation is not None
        permitted = set(allocation.permissions)
        client.close()
    assert stun.parse_message(reply).message_class == stun.Class.RESPONSE
    assert permitted == {"127.0.0.5"}
    assert server.counters.handler_errors == 0


# --- quotas and rates ---

async def test_far_expiry_is_refused() -> None:
    # Finding 4: a username expiring at 999999999999 was accepted.
    async with running() as server:
        client = await client_for(server, allocate=False)
        await client.login("999999999999:alice")
        answer = await client.allocate()
        client.close()
    assert _code(answer) == 401 and "NONCE" in answer.attributes
    assert server.counters.expiry_too_far == 1
    assert server.counters.allocations_created == 0


async def test_allocations_per_client_address_whatever_the_user_names() -> None:
    # Finding 4: 25 user names gave 25 allocations past the per-user limit of 10.
    config = _config(quotas=Quotas(allocations_per_address=10,
                                   unauthenticated_per_source=0))
    async with running(config) as server:
        clients = [await client_for(server, user=f"user{i}", allocate=False)
                   for i in range(25)]
        answers = []
        for i, client in enumerate(clients):
            await client.login(rest_username(f"user{i}", 600))
            answers.append(await client.allocate())
        for client in clients:
            client.close()
    assert [a.message_class for a in answers[:10]] == [stun.Class.RESPONSE] * 10
    assert [_code(a) for a in answers[10:]] == [486] * 15
    assert server.counters.quota_address == 15
    assert server.counters.allocations_created == 10


def _bare_allocate() -> bytes:
    return bytes(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST))


async def test_unauthenticated_answers_are_small_and_limited_per_source() -> None:
    # Finding 3: a 20-byte Allocate earned a 92-byte 401, every time.
    async with running() as server:
        client = await client_for(server, allocate=False)
        for _ in range(100):
            client.send(_bare_allocate(), client.server)
        answered = 0
        while not await client.silent(0.3):
            answered += 1
        client.close()
    assert server.counters.unauthenticated == 100
    # A 2-second burst, plus what refills while the 100 datagrams are handled.
    assert 20 <= answered <= 25
    assert server.counters.unauthenticated_limited_source == 100 - answered
    sizes = set()
    async with running() as server:
        client = await client_for(server, allocate=False)
        client.send(_bare_allocate(), client.server)
        reply, _ = await client.receive()
        sizes.add(len(reply))
        binding = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
        client.send(bytes(binding), client.server)
        reply, _ = await client.receive()
        sizes.add(len(reply))
        client.close()
    # 401: ERROR-CODE, REALM and a 16-character NONCE; Binding: XOR-MAPPED-ADDRESS.
    # No SOFTWARE, and no FINGERPRINT as the requests had none.
    assert sizes == {68, 32}


def test_spoofed_sources_are_limited_in_total() -> None:
    # Finding 3: 1000 of 1000 spoofed sources were answered.
    server = RelayServer(_config())
    sent: list[tuple[bytes, Address]] = []
    control = ControlPlane(server.config, server.table, server.counters,
                           lambda data, to, local: sent.append((data, to)),
                           ("127.0.0.1", 3478), {})
    for i in range(1000):
        control.datagram_received(_bare_allocate(), (f"198.18.{i // 200}.{i % 200}", 4000),
                                  ("127.0.0.1", 3478))
    # One second's burst, and what trickles in while the loop runs.
    assert Quotas().unauthenticated_total <= len(sent) < 300
    assert server.counters.unauthenticated_limited_total == 1000 - len(sent)
    assert max(len(data) for data, _ in sent) <= 68

async def test_allocation_quotas() -> None:
    config = _config(quotas=Quotas(allocations=3, allocations_per_user=2))
    async with running(config) as server:
        clients = [await client_for(server, user="alice") for _ in range(2)]
        third = await client_for(server, user="alice", allocate=False)
        await third.login(rest_username("alice", 600))
        refused = await third.allocate()
        clients.append(await client_for(server, user="bob"))
        fourth = await client_for(server, user="carol", allocate=False)
        await fourth.login(rest_username("carol", 600))
        full = await fourth.allocate()
        for client in [*clients, third, fourth]:
            client.close()
    assert _code(refused) == 486 and _code(full) == 508
    assert server.counters.quota_user == 1 and server.counters.quota_total == 1


async def test_permission_and_channel_quotas() -> None:
    config = _config(quotas=Quotas(permissions_per_allocation=2, channels_per_allocation=1))
    async with running(config) as server:
        client = await client_for(server)
        two = await client.turn(stun.Method.CREATE_PERMISSION,
                                **{"XOR-PEER-ADDRESS": ("127.0.0.5", 1)})
        three = await client.turn(stun.Method.CREATE_PERMISSION, **{
            "XOR-PEER-ADDRESS": ("127.0.0.6", 1)})
        await client.turn(stun.Method.CREATE_PERMISSION,
                          **{"XOR-PEER-ADDRESS": ("127.0.0.6", 1)})
        full = await client.turn(stun.Method.CREATE_PERMISSION,
                                 **{"XOR-PEER-ADDRESS": ("127.0.0.7", 1)})
        channel = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": ("127.0.0.5", 1)})
        channels_full = await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": ("127.0.0.6", 1)})
        client.close()
    assert two.message_class == three.message_class == stun.Class.RESPONSE
    assert channel.message_class == stun.Class.RESPONSE
    assert _code(full) == 508 and _code(channels_full) == 508
    assert server.counters.quota_permissions == 1 and server.counters.quota_channels == 1


async def test_packet_rate_limit_per_allocation() -> None:
    config = _config(quotas=Quotas(packets_per_second=20, burst_seconds=0.5))
    async with running(config) as server:
        client = await client_for(server)
        peer = await Endpoint.open()
        await client.turn(stun.Method.CHANNEL_BIND, **{
            "CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": peer.address})
        for _ in range(100):
            client.send(struct.pack("!HH", 0x4000, 4) + b"ping", client.server)
        counters = server.counters
        await wait_for(lambda: counters.rate_limited + counters.to_peer_packets == 100,
                       "the relay to pass or drop all 100")
        await wait_for(lambda: peer.protocol.queue.qsize() == counters.to_peer_packets,
                       "the passed ones at the peer")
        delivered = peer.protocol.queue.qsize()
        client.close()
        peer.close()
    assert 5 <= delivered <= 20
    assert server.counters.rate_limited == 100 - delivered


# --- bad input ---

def _signed_binding() -> bytes:
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    message.add_fingerprint()
    return bytes(message)


async def test_bad_input_is_counted_and_the_relay_keeps_serving() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        good = _signed_binding()
        bad_fingerprint = good[:-1] + bytes([good[-1] ^ 1])
        overrun = bytearray(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST,
                                               attributes={"SOFTWARE": "abcd"})))
        overrun[22:24] = struct.pack("!H", 40)  # SOFTWARE claims more than is there
        bad_address = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)
        bad_address_bytes = bytearray(bytes(bad_address))
        bad_address_bytes += struct.pack("!HHBB", 0x0012, 4, 0, 7) + b"\0\0"
        bad_address_bytes[2:4] = struct.pack("!H", 8)
        unknown_method = bytearray(good[:20])
        unknown_method[0:4] = struct.pack("!HH", 0x0FFF & 0x3EEF, 0)
        datagrams = [
            b"\x00\x01\x00",  # truncated header
            good[:12],  # truncated header
            good[:-4],  # shorter than its length
            good[:2] + b"\x00\x00" + b"\x21\x12\xa4\x43" + good[8:20],  # wrong cookie
            b"\xff" * 64,  # garbage
            b"\x12\x34" * 150,  # garbage without the magic cookie
            bad_fingerprint,
            bytes(overrun),
            bytes(unknown_method),
            b"\x40",  # truncated ChannelData
            struct.pack("!HH", 0x4000, 100) + b"short",  # ChannelData shorter than length
        ]
        for datagram in datagrams:
            client.send(datagram, client.server)
        client.send(bytes(bad_address_bytes), client.server)
        reply, _ = await client.receive()
        assert stun.parse_message(reply).error_code == 400  # framed request, bad value
        assert await client.silent()
        answer = await client.request(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))
        client.close()
    assert answer.message_class == stun.Class.RESPONSE
    counters = server.counters
    assert counters.truncated == 3  # two short headers, a short body
    assert counters.not_stun >= 2 and counters.bad_fingerprint == 1
    assert counters.malformed == 3 and counters.unknown_method == 1
    assert counters.truncated_channel_data == 2
    assert counters.handler_errors == 0


async def test_unknown_comprehension_required_attribute_gets_420() -> None:
    async with running() as server:
        client = await client_for(server, allocate=False)
        request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
        data = bytearray(bytes(request)) + struct.pack("!HH", 0x0042, 4) + b"abcd"
        data[2:4] = struct.pack("!H", 8)
        client.send(bytes(data), client.server)
        raw, _ = await client.receive()
        answer = stun.parse_message(raw)
        client.close()
    assert answer.error_code == 420
    assert struct.pack("!HHH", 0x000A, 2, 0x0042) in raw  # UNKNOWN-ATTRIBUTES
    assert server.counters.unknown_attribute == 1


async def test_even_port_reservation_round_trip() -> None:
    async with running() as server:
        first = await client_for(server, allocate=False)
        await first.login()
        # EVEN-PORT with its R bit and RESERVATION-TOKEN have no aioice encoder.
        extra = struct.pack("!HHB3x", 0x0018, 1, 0x80)
        base = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST, attributes={
            "REQUESTED-TRANSPORT": UDP_TRANSPORT, "USERNAME": first.username,
            "REALM": REALM, "NONCE": first.nonce})
        first.send(wire.encode_with(base, extra, first.key), first.server)
        reply, _ = await first.receive()
        assert b"\x00\x22\x00\x08" in reply  # RESERVATION-TOKEN
        token = reply[reply.index(b"\x00\x22\x00\x08") + 4:][:8]
        relayed = stun.parse_message(reply).attributes["XOR-RELAYED-ADDRESS"]
        assert relayed[1] % 2 == 0
        second = await client_for(server, allocate=False)
        await second.login()
        base = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST, attributes={
            "REQUESTED-TRANSPORT": UDP_TRANSPORT, "USERNAME": second.username,
            "REALM": REALM, "NONCE": second.nonce})
        second.send(wire.encode_with(base, struct.pack("!HH", 0x0022, 8) + token,
                                     second.key), second.server)
        reply, _ = await second.receive()
        paired = stun.parse_message(reply).attributes["XOR-RELAYED-ADDRESS"]
        first.close()
        second.close()
    assert paired[1] == relayed[1] + 1


# --- aioice's TURN client, as the agent will use it ---

class _Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))


async def test_aioice_turn_client_against_our_relay() -> None:
    from aioice.turn import create_turn_endpoint

    async with running() as server:
        username = rest_username("agent", 600)
        transport, protocol = await create_turn_endpoint(
            _Collect, server.address, username, rest_password(SECRET, username))
        peer = await Endpoint.open()
        try:
            relayed = transport.get_extra_info("sockname")
            transport.sendto(b"handshake initiation", peer.address)
            data, source = await peer.receive()
            assert data == b"handshake initiation" and source == relayed
            peer.send(b"handshake response", source)
            reply, sender = await asyncio.wait_for(protocol.received.get(), 2)
            assert reply == b"handshake response" and sender == peer.address
        finally:
            transport.close()
            peer.close()
            # aioice deletes the allocation in a task.
            await wait_for(lambda: not server.table.allocations, "the allocation's deletion")
        assert server.counters.allocations_deleted == 1
