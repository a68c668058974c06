"""The agent's side of a relay: one TURN allocation, made with aioice's TURN client.

aioice does the protocol (Allocate with TURN REST credentials, refreshes, permissions
and channel binds). Once a channel to a peer is bound, data goes out as ChannelData
straight from here: aioice would start one task per datagram, which a WireGuard stream
cannot afford. The allocation lives on a UDP socket of its own (not the WireGuard port),
with socket buffers sized for bulk traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from aioice.turn import TurnClientUdpProtocol

from kbwg.relay.credentials import rest_password, rest_username

log = logging.getLogger(__name__)

Address = tuple[str, int]
Receiver = Callable[[bytes, Address], None]

SOCKET_BUFFER = 4 * 1024 * 1024
CREDENTIAL_TTL_S = 24 * 3600
LIFETIME_S = 600
CHANNEL_REFRESH_S = 300


@dataclass
class RelayCounters:
    sent: int = 0
    received: int = 0
    send_errors: int = 0


class _Receiver(asyncio.DatagramProtocol):
    """What aioice hands datagrams from peers (and connection loss) to."""

    def __init__(self, allocation: RelayAllocation) -> None:
        self._allocation = allocation

    def datagram_received(self, data: bytes | str, addr: Address) -> None:
        if isinstance(data, bytes):
            self._allocation.counters.received += 1
            self._allocation.receiver(data, addr)

    def connection_lost(self, exc: Exception | None) -> None:
        self._allocation.lost(exc)


class RelayAllocation:
    def __init__(self, url: str, server: Address, protocol: TurnClientUdpProtocol,
                 relayed: Address, mapped: Address | None, rtt_ms: float) -> None:
        self.url = url
        self.server = server
        self.relayed = relayed
        self.mapped = mapped
        self.rtt_ms = rtt_ms
        self.counters = RelayCounters()
        self.receiver: Receiver = lambda data, addr: None
        self.on_lost: Callable[[RelayAllocation], None] | None = None
        self.closed = False
        self._protocol = protocol
        self._binding: dict[Address, asyncio.Task[None]] = {}

    @classmethod
    async def open(cls, url: str, server: Address, user: str, secret: str,
                   timeout: float = 3.0) -> RelayAllocation:
        """Allocate on `server` with TURN REST credentials for `user`."""
        username = rest_username(user, CREDENTIAL_TTL_S)
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: TurnClientUdpProtocol(server, username, rest_password(secret, username),
                                          LIFETIME_S, CHANNEL_REFRESH_S),
            remote_addr=server,
        )
        sock = protocol.transport.get_extra_info("socket")
        if sock is not None:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        started = time.monotonic()
        try:
            relayed = await asyncio.wait_for(protocol.connect(), timeout)
        except BaseException:
            protocol.transport.close()
            raise
        rtt_ms = (time.monotonic() - started) * 1000
        allocation = cls(url, server, protocol, relayed, protocol.mapped_address, rtt_ms)
        protocol.receiver = _Receiver(allocation)
        log.info("relay %s: allocation %s:%d (%.1f ms)", url, *relayed, rtt_ms)
        return allocation

    def send(self, data: bytes, peer: Address) -> None:
        """To `peer` through the relay: ChannelData once bound, else bind first."""
        if self.closed:
            return
        channel = self._protocol.peer_to_channel.get(peer)
        if channel is not None:
            try:
                self._protocol._send(struct.pack("!HH", channel, len(data)) + data)
            except OSError:
                self.counters.send_errors += 1
                return
            self.counters.sent += 1
            return
        if peer in self._binding:
            return  # the first datagrams to a new peer are lost while its channel binds
        task = asyncio.ensure_future(self._bind_and_send(data, peer))
        self._binding[peer] = task
        task.add_done_callback(lambda _t: self._binding.pop(peer, None))

    async def _bind_and_send(self, data: bytes, peer: Address) -> None:
        try:
            await self._protocol.send_data(data, peer)
            self.counters.sent += 1
        except Exception as exc:
            self.counters.send_errors += 1
            log.info("relay %s: cannot reach %s:%d: %s", self.url, *peer, exc)

    def lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        log.warning("relay %s: allocation %s:%d lost%s", self.url, *self.relayed,
                    f" ({exc})" if exc else "")
        if self.on_lost is not None:
            self.on_lost(self)

    async def close(self) -> None:
        self.closed = True
        for task in list(self._binding.values()):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._protocol.delete(), 2.0)
        self._protocol.transport.close()
