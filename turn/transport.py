"""A connected UDP socket as the asyncio transport of aioice's TURN client, read in
batches by us.

asyncio's own datagram transport wakes the event loop once per datagram and cannot
be told, on every Python 3.11 release, to stop reading while someone else does. This
one reads up to `BATCH` datagrams per readiness callback and hands each to `handler`
(by default the protocol's `datagram_received`); the allocation swaps in its fast path
for ChannelData. Sending never blocks: a full socket buffer drops the datagram, as the
network would (STUN retransmits, WireGuard copes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from kbwg.core.addresses import Address

log = logging.getLogger(__name__)

Handler = Callable[[bytes, Address], None]

# Datagrams taken per readiness callback (bounded, so other work gets its turn).
BATCH = 64
MAX_DATAGRAM = 65535


class ConnectedUdpTransport(asyncio.DatagramTransport):
    def __init__(self, sock: socket.socket, protocol: asyncio.DatagramProtocol,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._sock = sock
        self._protocol = protocol
        self._loop = loop
        self._closing = False
        self.handler: Handler = protocol.datagram_received
        self.unhandled = 0  # datagrams whose handler raised

    @classmethod
    def open(cls, server: Address, protocol: asyncio.DatagramProtocol,
             buffer_size: int) -> ConnectedUdpTransport:
        """A socket connected to `server`, with `buffer_size` socket buffers, reading."""
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, buffer_size)
            sock.connect(server)
        except BaseException:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        transport = cls(sock, protocol, loop)
        protocol.connection_made(transport)
        loop.add_reader(sock.fileno(), transport._readable)
        return transport

    def _readable(self) -> None:
        recv, handler = self._sock.recvfrom, self.handler
        for _ in range(BATCH):
            try:
                data, addr = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors of earlier sends surface here
                self._protocol.error_received(exc)
                return
            try:
                handler(data, addr)
            except Exception as exc:  # a datagram must never stop the reading
                self.unhandled += 1
                log.debug("datagram from %s ignored: %r", addr, exc)

    def send(self, data: bytes) -> bool:
        """To the connected peer; False when it was dropped."""
        if self._closing:
            return False
        try:
            self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._protocol.error_received(exc)
            return False
        return True

    def sendto(self, data: bytes | bytearray | memoryview,
               addr: Any = None) -> None:
        self.send(bytes(data))

    def local_ip(self) -> str | None:
        try:
            return str(self._sock.getsockname()[0])
        except OSError:
            return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sock.getsockname()
        if name == "peername":
            return self._sock.getpeername()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
            self._loop.call_soon(self._finish)
        else:
            self._sock.close()

    def abort(self) -> None:
        self.close()

    def _finish(self) -> None:
        self._sock.close()
        self._protocol.connection_lost(None)
