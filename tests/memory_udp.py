"""Datagrams between in-process endpoints, delivered by loop timers instead of sockets.

With the virtual clock (virtual_clock.py) a real socket is a race: the clock may jump
past a timeout before the kernel hands over a datagram. Here a datagram is a
`call_later(delay)`, so it takes exactly `delay` of loop time and nothing is ever late.
Sending to an address nobody has bound is a silent drop, as UDP would be.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stun_test_server import StunTestServer, _Socket

from kbwg.negotiation.stun_client import StunClient, StunCounters

Address = tuple[str, int]
Receiver = Callable[[bytes, Address], object]


@dataclass
class MemoryNet:
    delay: float = 0.0  # one way, every datagram
    endpoints: dict[Address, MemoryEndpoint] = field(default_factory=dict)
    sent: list[tuple[float, Address, Address]] = field(default_factory=list)  # time, src, dest
    dropped: int = 0

    def bind(self, address: Address, on_datagram: Receiver) -> MemoryEndpoint:
        if address in self.endpoints:
            raise OSError(f"{address[0]}:{address[1]} is already bound")
        endpoint = MemoryEndpoint(self, address, on_datagram)
        self.endpoints[address] = endpoint
        return endpoint

    def deliver(self, data: bytes, src: Address, dest: Address) -> None:
        loop = asyncio.get_running_loop()
        self.sent.append((loop.time(), src, dest))
        target = self.endpoints.get(dest)
        if target is None:
            self.dropped += 1
            return
        target.queue(loop, data, src, loop.time() + self.delay)

    def sent_from(self, src: Address) -> list[float]:
        """When `src` sent each of its datagrams."""
        return [when for when, s, _ in self.sent if s == src]


@dataclass(eq=False)
class MemoryEndpoint:
    """Both a StunClient `DatagramTransport` and an asyncio-style `sendto` transport."""

    net: MemoryNet
    local_address: Address
    on_datagram: Receiver
    closed: bool = False
    # In flight to here, in send order: loop timers of equal time run in no fixed order.
    inbound: deque[tuple[float, bytes, Address]] = field(default_factory=deque)

    def send(self, data: bytes, addr: Address) -> None:
        if self.closed:
            raise OSError("endpoint is closed")
        self.net.deliver(bytes(data), self.local_address, addr)

    sendto = send

    def queue(self, loop: asyncio.AbstractEventLoop, data: bytes, src: Address,
              arrival: float) -> None:
        self.inbound.append((arrival, data, src))
        loop.call_at(arrival, self._arrive)

    def _arrive(self) -> None:
        now = asyncio.get_running_loop().time()
        while self.inbound and self.inbound[0][0] <= now:
            _, data, src = self.inbound.popleft()
            if not self.closed:
                self.on_datagram(data, src)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.net.endpoints.pop(self.local_address, None)


def memory_client(net: MemoryNet, address: Address,
                  counters: StunCounters | None = None) -> tuple[StunClient, MemoryEndpoint]:
    """A StunClient on `address` of `net`. Close the endpoint when done."""
    holder: list[StunClient] = []
    endpoint = net.bind(address, lambda data, src: holder[0].datagram_received(data, src))
    holder.append(StunClient(endpoint, counters))
    return holder[0], endpoint


def serve_in_memory(server: StunTestServer, net: MemoryNet, port: int = 3478) -> StunTestServer:
    """`server` listening on `net` (its IPs, `port` and `port + 1`) instead of loopback."""
    server.port, server.alt_port = port, port + 1
    ips = [server.ip] + ([server.alt_ip] if server.alt_ip else [])
    for local in [(ip, p) for ip in ips for p in (port, port + 1)]:
        sock = _Socket(server, local)
        sock.transport = net.bind(local, functools.partial(_receive, server, sock))
        server.sockets[local] = sock
    return server


def _receive(server: StunTestServer, sock: _Socket, data: bytes, src: Address) -> None:
    server.handle(sock, data, src)
