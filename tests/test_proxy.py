"""The loopback proxy takes datagrams from WireGuard's socket only: whatever reaches it
goes out through our relay allocation, so no other local process may use it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from kbwg.agent.relay_paths import RelayPaths
from kbwg.agent.relay_proxy import LoopbackProxy, ProxyCounters
from kbwg.negotiation.candidates import Candidate

Address = tuple[str, int]
PEER: Address = ("198.51.100.7", 51820)
RELAYED: Address = ("203.0.113.5", 49152)


@dataclass
class AllocationCounters:
    sent: int = 0
    received: int = 0
    send_errors: int = 0


@dataclass
class FakeAllocation:
    """What the proxy and RelayPaths use of a RelayAllocation; sends land in a queue."""

    url: str = "turn:test"
    relayed: Address = RELAYED
    closed: bool = False
    rtt_ms: float = 1.0
    unhandled: int = 0
    transport: str = "udp"
    transport_reason: str = "udp: first choice"
    counters: AllocationCounters = field(default_factory=AllocationCounters)
    sent: asyncio.Queue[tuple[bytes, Address]] = field(default_factory=asyncio.Queue)

    def send(self, data: bytes, peer: Address) -> None:
        self.sent.put_nowait((data, peer))


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def wireguard() -> Iterator[socket.socket]:
    """Stands in for WireGuard's listening socket."""
    with _udp() as sock:
        yield sock


@pytest.fixture
async def proxy(wireguard: socket.socket) -> AsyncIterator[tuple[LoopbackProxy, FakeAllocation]]:
    allocation = FakeAllocation()
    proxy = await LoopbackProxy.open(cast(Any, allocation), PEER, wireguard.getsockname()[1])
    try:
        yield proxy, allocation
    finally:
        proxy.close()


def _endpoint(proxy: LoopbackProxy) -> Address:
    host, port = proxy.endpoint.split(":")
    return host, int(port)


async def test_wireguard_datagrams_go_to_the_peer_and_back(
    proxy: tuple[LoopbackProxy, FakeAllocation], wireguard: socket.socket
) -> None:
    p, allocation = proxy
    assert p.endpoint.startswith("127.0.0.1:")
    wireguard.sendto(b"handshake", _endpoint(p))
    assert await asyncio.wait_for(allocation.sent.get(), 2) == (b"handshake", PEER)
    p.from_relay(b"response")
    wireguard.settimeout(2)
    assert wireguard.recvfrom(100) == (b"response", _endpoint(p))
    assert (p.counters.to_peer, p.counters.to_wireguard) == (1, 1)


async def test_another_local_socket_is_refused(
    proxy: tuple[LoopbackProxy, FakeAllocation], wireguard: socket.socket
) -> None:
    p, allocation = proxy
    with _udp() as intruder:
        intruder.connect(_endpoint(p))
        intruder.send(b"through your relay, please")
        # The kernel refuses it (ICMP port unreachable) instead of queueing it for us.
        intruder.settimeout(2)
        with pytest.raises(ConnectionRefusedError):
            intruder.recv(100)
    wireguard.sendto(b"wireguard", _endpoint(p))
    assert await asyncio.wait_for(allocation.sent.get(), 2) == (b"wireguard", PEER)
    assert allocation.sent.empty()
    assert p.counters.to_peer == 1


async def test_foreign_datagram_reaching_the_proxy_is_dropped_and_counted(
    wireguard: socket.socket,
) -> None:
    # A datagram queued before the socket was connected (or on a socket that is not)
    # still reaches Python: the proxy checks the source itself.
    allocation = FakeAllocation()
    counters = ProxyCounters()
    sock = _udp()
    sock.setblocking(False)
    p = LoopbackProxy(cast(Any, allocation), PEER, wireguard.getsockname()[1], sock, counters)
    asyncio.get_running_loop().add_reader(sock.fileno(), p._readable)
    try:
        with _udp() as intruder:
            intruder.sendto(b"foreign", _endpoint(p))
        wireguard.sendto(b"wireguard", _endpoint(p))
        assert await asyncio.wait_for(allocation.sent.get(), 2) == (b"wireguard", PEER)
        assert allocation.sent.empty()
        assert (counters.foreign, counters.to_peer) == (1, 1)
    finally:
        p.close()


async def test_relay_paths_report_the_proxy_counters(wireguard: socket.socket) -> None:
    allocation = FakeAllocation()
    paths = RelayPaths("alice", wireguard.getsockname()[1], lambda *_: None, lambda _: None)
    paths.allocations[allocation.url] = cast(Any, allocation)
    local = Candidate(type="relay", address=RELAYED[0], port=RELAYED[1], interface=None,
                      priority=1, source="relay turn:test")
    try:
        endpoint = await paths.route("bob", local, PEER)
        assert endpoint is not None
        host, port = endpoint.split(":")
        wireguard.sendto(b"wireguard", (host, int(port)))
        assert await asyncio.wait_for(allocation.sent.get(), 2) == (b"wireguard", PEER)
        paths.drop("bob")  # the counts outlive the proxy
        [relay] = paths.to_json()
        assert relay["proxy_to_peer"] == 1
        assert relay["proxy_foreign"] == 0 and relay["proxy_dropped"] == 0
        assert relay["proxy_to_wireguard"] == 0
    finally:
        for proxy in paths.proxies.values():
            proxy.close()


def _initiation(tag: int) -> bytes:
    """A WireGuard handshake initiation's shape: type 1, 148 bytes."""
    return bytes([1, 0, 0, 0, tag]) + bytes(143)


async def test_an_initiation_that_came_before_the_proxy_is_passed_to_wireguard(
    wireguard: socket.socket, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The peer chose the relayed path first and its WireGuard's first initiation came
    through our allocation before our own choice opened the proxy: the newest one is
    handed to WireGuard when the proxy opens, so the first handshake need not wait for
    WireGuard's 5 s retry. Other data, and initiations kept too long, are not."""
    import kbwg.agent.relay_paths as relay_paths

    clock = [100.0]
    monkeypatch.setattr(relay_paths.time, "monotonic", lambda: clock[0])
    allocation = FakeAllocation()
    paths = RelayPaths("alice", wireguard.getsockname()[1], lambda *_: None, lambda _: None)
    paths.allocations[allocation.url] = cast(Any, allocation)
    local = Candidate(type="relay", address=RELAYED[0], port=RELAYED[1], interface=None,
                      priority=1, source="relay turn:test")
    other_peer = ("198.51.100.8", 51820)
    paths._received(cast(Any, allocation), _initiation(1), PEER)
    paths._received(cast(Any, allocation), b"\x04 transport data", PEER)  # not kept
    paths._received(cast(Any, allocation), _initiation(2), (PEER[0], 40000))  # NAT port
    # Not initiations, so not kept (or they, coming last, would be passed on).
    paths._received(cast(Any, allocation), _initiation(9)[:100], PEER)
    paths._received(cast(Any, allocation), _initiation(9) + b"x", PEER)
    paths._received(cast(Any, allocation), _initiation(3), other_peer)
    clock[0] += relay_paths.EARLY_INITIATION_S / 2
    wireguard.settimeout(2)
    try:
        assert await paths.route("bob", local, PEER) is not None
        data, _ = await asyncio.to_thread(wireguard.recvfrom, 2048)
        assert data == _initiation(2)  # the newest from the peer's address
        assert list(paths._early) == [(RELAYED, other_peer)]
        clock[0] += relay_paths.EARLY_INITIATION_S  # carol's is too old by now
        assert await paths.route("carol", local, other_peer) is not None
        wireguard.settimeout(0.2)
        with pytest.raises(TimeoutError):
            wireguard.recvfrom(2048)
        assert paths._early == {}
    finally:
        for proxy in paths.proxies.values():
            proxy.close()


def test_initiations_are_kept_for_a_bounded_number_of_routes() -> None:
    import kbwg.agent.relay_paths as relay_paths

    allocation = FakeAllocation()
    paths = RelayPaths("alice", 51820, lambda *_: None, lambda _: None)
    bound = relay_paths.EARLY_INITIATION_ROUTES
    for i in range(bound + 10):
        paths._received(cast(Any, allocation), _initiation(1), ("198.51.100.9", 1000 + i))
    assert len(paths._early) == bound
    assert (RELAYED, ("198.51.100.9", 1000)) not in paths._early  # the oldest went
    assert (RELAYED, ("198.51.100.9", 1000 + bound + 9)) in paths._early
