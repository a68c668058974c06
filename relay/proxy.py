"""WireGuard's endpoint for a peer reached through our relay allocation.

WireGuard cannot speak TURN, so a relayed peer's endpoint is a loopback port of the
agent: what WireGuard sends there goes out through the allocation's channel to the
peer, and what the peer sends through the relay comes back from that same loopback
port, so WireGuard sees one stable endpoint. Only traffic of a peer whose chosen pair
starts at our relay candidate passes here; everything direct bypasses Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from kbwg.relay.client import Address, RelayAllocation

log = logging.getLogger(__name__)

SOCKET_BUFFER = 4 * 1024 * 1024


class _Loopback(asyncio.DatagramProtocol):
    def __init__(self, proxy: LoopbackProxy) -> None:
        self._proxy = proxy

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if addr[1] == self._proxy.wg_port:
            self._proxy.from_wireguard(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("loopback proxy: %s", exc)


class LoopbackProxy:
    def __init__(self, allocation: RelayAllocation, peer: Address, wg_port: int) -> None:
        self.allocation = allocation
        self.peer = peer
        self.wg_port = wg_port
        self.to_peer = 0
        self.to_wireguard = 0
        self._transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, allocation: RelayAllocation, peer: Address,
                   wg_port: int) -> LoopbackProxy:
        proxy = cls(allocation, peer, wg_port)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Loopback(proxy), local_addr=("127.0.0.1", 0))
        sock = transport.get_extra_info("socket")
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        proxy._transport = transport
        return proxy

    @property
    def endpoint(self) -> str:
        """What WireGuard is given as the peer's endpoint."""
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    def from_wireguard(self, data: bytes) -> None:
        self.to_peer += 1
        self.allocation.send(data, self.peer)

    def from_relay(self, data: bytes) -> None:
        if self._transport is not None:
            self.to_wireguard += 1
            self._transport.sendto(data, ("127.0.0.1", self.wg_port))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
