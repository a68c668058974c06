"""The agent's side of a relay: one TURN allocation, made with aioice's TURN client.

aioice does the protocol (Allocate with TURN REST credentials, refreshes, permissions
and channel binds). Data takes a fast path beside it, because aioice would start one
task per datagram sent and wake the event loop once per datagram received, which a
WireGuard stream cannot afford: once a channel to a peer is bound, data goes out as
ChannelData straight from the socket, and received datagrams are drained in batches,
ChannelData handled here and everything else (STUN answers, Data indications) handed
to aioice. The allocation lives on a UDP socket of its own (not the WireGuard port),
with socket buffers sized for bulk traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from aioice import stun
from aioice.turn import TurnClientUdpProtocol

from kbwg.relay.credentials import rest_password, rest_username

log = logging.getLogger(__name__)

Address = tuple[str, int]
Receiver = Callable[[bytes, Address], None]

SOCKET_BUFFER = 4 * 1024 * 1024
CREDENTIAL_TTL_S = 24 * 3600
LIFETIME_S = 600
CHANNEL_REFRESH_S = 300
# Datagrams taken per readiness callback (bounded, so other work gets its turn).
BATCH = 64
MAX_DATAGRAM = 65535
# How often the allocation is confirmed with a Refresh, and how long the answer may take.
# aioice only refreshes at 5/6 of the lifetime: a relay that restarted, or dropped the
# allocation (coturn does on a failed send), would go unnoticed for minutes.
WATCH_INTERVAL_S = 15.0
WATCH_TIMEOUT_S = 10.0


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
        self._watch: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def open(cls, url: str, server: Address, user: str, secret: str,
                   timeout: float = 3.0, watch_interval: float = WATCH_INTERVAL_S,
                   watch_timeout: float = WATCH_TIMEOUT_S) -> RelayAllocation:
        """Allocate on `server` with TURN REST credentials for `user`; the allocation is
        then confirmed every `watch_interval` seconds and reported lost when it is gone."""
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
        allocation._take_over_reading(loop)
        allocation._watch = asyncio.create_task(
            allocation._confirm_every(watch_interval, watch_timeout))
        log.info("relay %s: allocation %s:%d (%.1f ms)", url, *relayed, rtt_ms)
        return allocation

    def _take_over_reading(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the allocation's socket ourselves (see the module docstring), through a
        duplicate of its descriptor while the transport's own reading is paused. The
        socket stays the transport's: it closes it; we only close our duplicate."""
        transport = self._protocol.transport
        pause = getattr(transport, "pause_reading", None)
        if pause is None:
            return  # not a selector transport: aioice keeps reading, only slower
        fd = transport.get_extra_info("socket").fileno()
        self._sock = socket.socket(fileno=os.dup(fd))
        self._loop = loop
        pause()
        loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        recv, protocol = sock.recvfrom, self._protocol
        channels = protocol.channel_to_peer
        for _ in range(BATCH):
            try:
                data, addr = recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP errors of earlier sends surface here
                log.debug("relay %s: %s", self.url, exc)
                return
            if len(data) >= 4 and 0x40 <= data[0] < 0x80:  # ChannelData (RFC 8656 12.4)
                channel, length = struct.unpack_from("!HH", data)
                peer = channels.get(channel)
                if peer is not None and len(data) >= 4 + length:
                    self.counters.received += 1
                    self.receiver(data[4:4 + length], peer)
            else:
                protocol.datagram_received(data, addr)

    async def _confirm_every(self, interval: float, timeout: float) -> None:
        """A Refresh now and then: 437 (no such allocation) or silence means it is gone."""
        while not self.closed:
            await asyncio.sleep(interval)
            request = stun.Message(stun.Method.REFRESH, stun.Class.REQUEST)
            request.attributes["LIFETIME"] = LIFETIME_S
            try:
                await asyncio.wait_for(self._protocol.request_with_retry(request),
                                       timeout)
            except (stun.TransactionError, ConnectionError, OSError, TimeoutError) as exc:
                if isinstance(exc, stun.TransactionFailed):
                    reason = f"refresh refused: {exc.response.error_code}"
                else:
                    reason = f"refresh unanswered: {type(exc).__name__}"
                self.lost(ConnectionError(reason))
                self._protocol.transport.close()  # stops aioice's own refresh task too
                return

    def send(self, data: bytes, peer: Address) -> None:
        """To `peer` through the relay: ChannelData once bound, else bind first."""
        if self.closed:
            return
        channel = self._protocol.peer_to_channel.get(peer)
        if channel is not None and self._sock is not None:
            try:
                self._sock.send(struct.pack("!HH", channel, len(data)) + data)
            except OSError:  # a full buffer drops, as the network would
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

    def _close_socket(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()  # our duplicate only; the transport closes the original
            self._sock = None

    def lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._close_socket()
        log.warning("relay %s: allocation %s:%d lost%s", self.url, *self.relayed,
                    f" ({exc})" if exc else "")
        if self.on_lost is not None:
            self.on_lost(self)

    async def close(self) -> None:
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
        for task in list(self._binding.values()):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._protocol.delete(), 2.0)
        self._protocol.transport.close()
        self._close_socket()
