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
# Datagrams taken per readiness callback: one event-loop round trip per burst, not per
# datagram (the same pattern as the relay server's hot path), bounded for fairness.
BATCH = 64
MAX_DATAGRAM = 65535


class LoopbackProxy:
    def __init__(self, allocation: RelayAllocation, peer: Address, wg_port: int,
                 sock: socket.socket) -> None:
        self.allocation = allocation
        self.peer = peer
        self.wg_port = wg_port
        self.to_peer = 0
        self.to_wireguard = 0
        self.dropped = 0
        self._sock: socket.socket | None = sock
        self._wg_address = ("127.0.0.1", wg_port)

    @classmethod
    async def open(cls, allocation: RelayAllocation, peer: Address,
                   wg_port: int) -> LoopbackProxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.bind(("127.0.0.1", 0))
        except BaseException:
            sock.close()
            raise
        proxy = cls(allocation, peer, wg_port, sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), proxy._readable)
        return proxy

    @property
    def endpoint(self) -> str:
        """What WireGuard is given as the peer's endpoint."""
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        recv, send, peer, wg_port = sock.recvfrom, self.allocation.send, self.peer, self.wg_port
        for _ in range(BATCH):
            try:
                data, addr = recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. ECONNREFUSED from an earlier send
                log.debug("loopback proxy for %s:%d: %s", *peer, exc)
                return
            if addr[1] == wg_port:
                self.to_peer += 1
                send(data, peer)

    def from_relay(self, data: bytes) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(data, self._wg_address)
        except OSError:  # full buffer: dropped, as the network would
            self.dropped += 1
            return
        self.to_wireguard += 1

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
