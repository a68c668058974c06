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
from dataclasses import dataclass

from kbwg.turn.client import Address, RelayAllocation

log = logging.getLogger(__name__)

SOCKET_BUFFER = 4 * 1024 * 1024
# Datagrams taken per readiness callback: one event-loop round trip per burst, not per
# datagram (the same pattern as the relay server's hot path), bounded for fairness.
BATCH = 64
MAX_DATAGRAM = 65535
# Where WireGuard's socket is reached and where our side of the proxy lives.
LOOPBACK = "127.0.0.1"


@dataclass
class ProxyCounters:
    """Datagrams through the loopback proxies of one allocation (status `relays[]`)."""

    to_peer: int = 0  # from WireGuard, sent through the allocation
    to_wireguard: int = 0  # from the peer through the relay, handed to WireGuard
    dropped: int = 0  # for WireGuard, lost to a full loopback buffer
    foreign: int = 0  # from anything but WireGuard's socket: dropped


class LoopbackProxy:
    def __init__(self, allocation: RelayAllocation, peer: Address, wg_port: int,
                 sock: socket.socket, counters: ProxyCounters | None = None) -> None:
        self.allocation = allocation
        self.peer = peer
        self.wg_port = wg_port
        self.counters = counters if counters is not None else ProxyCounters()
        self._sock: socket.socket | None = sock
        self._wg_address = (LOOPBACK, wg_port)

    @classmethod
    async def open(cls, allocation: RelayAllocation, peer: Address, wg_port: int,
                   counters: ProxyCounters | None = None) -> LoopbackProxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            # Whatever reaches this port goes out as our relay allocation to the peer, so
            # only WireGuard's own socket may use it: connected to WireGuard's address, the
            # socket gets nothing from any other local process (the kernel drops it). No
            # bind() first: connect() binds it to 127.0.0.1 itself, so no datagram from
            # elsewhere can be queued before the filter is in place.
            sock.connect((LOOPBACK, wg_port))
        except BaseException:
            sock.close()
            raise
        proxy = cls(allocation, peer, wg_port, sock, counters)
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
        recv, send, peer = sock.recvfrom, self.allocation.send, self.peer
        counters, wg_address = self.counters, self._wg_address
        for _ in range(BATCH):
            try:
                data, addr = recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. ECONNREFUSED: WireGuard's port was closed
                log.debug("loopback proxy for %s:%d: %s", *peer, exc)
                return
            # The kernel already filters a connected socket; this check also holds for a
            # socket that is not (and costs one tuple comparison).
            if addr != wg_address:
                counters.foreign += 1
                continue
            counters.to_peer += 1
            send(data, peer)

    def from_relay(self, data: bytes) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(data)
        except OSError:  # full buffer or WireGuard gone: dropped, as the network would
            self.counters.dropped += 1
            return
        self.counters.to_wireguard += 1

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
