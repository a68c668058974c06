"""TURN over TCP and TLS (RFC 8656 3.1): the relay's stream clients.

A stream carries the same STUN messages and ChannelData as UDP, each framed by its own
length (ChannelData padded to 4 bytes); aioice's TurnStreamMixin splits them. Every
frame goes to the same control plane and allocation table as a UDP datagram, so the
quotas, rate limits and peer policy are the UDP path's. An allocation made over a stream
belongs to that connection (its channel routes are apart from the UDP ones), relays to
its peers over UDP, and sends what they answer back on the stream; closing the
connection deletes it.

Streams are where slow and hostile clients can hold the relay's memory and sockets,
so: a frame that is neither STUN nor ChannelData (the framing is lost), a frame left
half sent for `stream_frame_timeout`, a connection without an allocation after
`stream_idle_timeout` or after `MAX_FRAMES_UNALLOCATED` frames closes the connection
with a log line; connections are capped per client IP and in total like allocations,
TLS ones from their TCP accept on (not once their handshake is done); and past
`MAX_QUEUED` bytes waiting for a slow reader, datagrams for it are dropped instead of
queued. The log lines about connections are limited (`LimitedLog`), the counters not.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any, cast

from aioice import stun
from aioice.turn import TurnStreamMixin

from kbwg.core.addresses import Address
from kbwg.core.loglimit import LimitedLog
from kbwg.relay.allocation import Allocation, AllocationTable
from kbwg.relay.config import ServerConfig
from kbwg.relay.control import ControlPlane
from kbwg.relay.limits import Counters, client_key

log = logging.getLogger(__name__)

MAX_QUEUED = 512 * 1024
# Frames a connection may send while it holds no allocation: a client needs three
# (Allocate, its 401, Allocate again) and a few more for a Binding or a retry. Without a
# cap one read of 256 KiB carries 65,536 frames, each parsed and counted, for anyone
# who can open a connection.
MAX_FRAMES_UNALLOCATED = 64
_MAX_DATAGRAM = 65536
_CHANNEL_HEADER = struct.Struct("!HH")
_STUN_HEADER = struct.Struct("!HHI")
_LENGTH = struct.Struct("!H")


def frame_problem(head: bytes) -> str | None:
    """Why the frame starting `head` cannot be STUN or ChannelData, or None (yet)."""
    if not head or 0x40 <= head[0] <= 0x7F:  # ChannelData: any length is framed
        return None
    if head[0] & 0xC0:
        return "neither STUN nor ChannelData"
    if len(head) < 8:
        return None
    _, length, cookie = _STUN_HEADER.unpack_from(head)
    if cookie != stun.COOKIE:
        return "no STUN magic cookie"
    if length % 4:
        return "STUN length not a multiple of 4"
    return None


class StreamConnection(TurnStreamMixin, asyncio.Protocol):
    """One TCP or TLS client."""

    transport: asyncio.Transport

    def __init__(self, streams: StreamListeners, kind: str,
                 tls: ssl.SSLContext | None = None) -> None:
        self.streams = streams
        self.kind = kind  # tcp or tls
        # TLS starts on the accepted TCP connection (see `connection_made`); until its
        # handshake is done nothing is read as frames and nothing is sent.
        self._tls = tls
        self.handshaking = False
        self._handshake: asyncio.Task[None] | None = None
        self._early = b""  # decrypted before the handshake task resumed
        self.buffer = b""  # TurnStreamMixin's
        self.client: Address = ("", 0)
        self.opened = time.monotonic()
        self.last_frame = self.opened  # when the frame now in the buffer began, at most
        # When it last held an allocation (seen by the sweep): frames do not count, or
        # a Binding every few seconds would keep a connection open without credentials.
        self.allocated_at = self.opened
        self.unallocated_frames = 0
        self.closed = False

    def __repr__(self) -> str:
        return f"{self.kind} client {self.client[0]}:{self.client[1]}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream's, by create_server
        peer = transport.get_extra_info("peername")
        self.client = (str(peer[0]), int(peer[1]))
        self.streams.accepted(self)
        if self._tls is not None and not self.closed:
            # Counted and capped from the TCP accept on, not from the end of the TLS
            # handshake (asyncio's ssl= server calls connection_made only then): a
            # connection that never says hello holds a socket until it times out.
            self.handshaking = True
            self.transport.pause_reading()  # start_tls takes the reading over
            self._handshake = asyncio.get_running_loop().create_task(
                self._start_tls(self._tls))

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport, self, context, server_side=True,
                ssl_handshake_timeout=self.streams.config.tls_handshake_timeout)
        except (Exception, asyncio.CancelledError) as exc:
            # ssl.SSLError, a timeout, a reset, or close(): the client goes. asyncio
            # tells the protocol of no loss during a handshake, so it is said here.
            log.debug("%s: TLS handshake failed: %r", self, exc)
            self._handshake = None  # done: nothing for close() to cancel
            self.close()
            self.streams.lost(self)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.transport = cast(asyncio.Transport, transport)
        self.handshaking = False
        if self.closed:
            self.transport.close()
            return
        early, self._early = self._early, b""
        if early:
            self.data_received(early)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.buffer = b""
        self.streams.lost(self)

    def data_received(self, data: bytes) -> None:
        """Frames as aioice's TurnStreamMixin splits them, in one pass: the mixin
        copies what is left of its buffer after each frame, so one read full of tiny
        frames (256 KiB of 4-byte ChannelData) cost the whole relay seconds."""
        if self.closed:
            return
        if self.handshaking:
            self._early += data
            return
        buffer = self.buffer = self.buffer + data if self.buffer else bytes(data)
        end, pos = len(buffer), 0
        while end - pos >= 4 and not self.closed:
            (length,) = _LENGTH.unpack_from(buffer, pos + 2)
            length += stun.padding_length(length)
            size = 4 + length if 0x40 <= buffer[pos] <= 0x7F else 20 + length
            if end - pos < size:
                break
            self.datagram_received(buffer[pos:pos + size], self.client)
            pos += size
        if self.closed:
            return
        self.buffer = buffer[pos:] if pos else buffer
        problem = frame_problem(self.buffer[:8])
        if problem is not None:
            self.fail(problem)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        """One whole frame (TurnStreamMixin), with its padding."""
        if self.closed or not isinstance(data, bytes):
            return
        streams = self.streams
        allocation = streams.table.allocations.get(self.client)
        if allocation is None or allocation.stream is not self:
            self.unallocated_frames += 1
            if self.unallocated_frames > MAX_FRAMES_UNALLOCATED:
                self.fail(f"over {MAX_FRAMES_UNALLOCATED} frames without an allocation")
                return
        self.last_frame = now = time.monotonic()
        if 0x40 <= data[0] <= 0x7F:
            streams.channel_data(self, data, now)
            return
        problem = frame_problem(data[:8])
        if problem is not None:
            self.fail(problem)
            return
        # The padding the mixin took along is not STUN's (STUN lengths are multiples
        # of 4 already, so there is none).
        streams.control.datagram_received(data, self.client, streams.main, self)

    def send(self, data: bytes) -> bool:
        """A STUN message or ChannelData to the client, padded; False when dropped."""
        transport = self.transport
        if self.closed or self.handshaking or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > MAX_QUEUED:
            self.streams.counters.stream_dropped += 1
            return False
        transport.write(self._padded(data))
        return True

    def fail(self, why: str) -> None:
        """Bad input: the framing cannot be trusted any more, so the connection goes."""
        self.streams.counters.stream_bad_input += 1
        self.streams.notes.log(logging.WARNING, "%s closed: %s", self, why)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.buffer = b""
            self.transport.close()
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            handshake.cancel()


class StreamListeners:
    """The TCP and TLS listeners and their connections."""

    def __init__(self, config: ServerConfig, table: AllocationTable, counters: Counters,
                 control: ControlPlane, main: Address) -> None:
        self.config = config
        self.table = table
        self.counters = counters
        self.control = control
        self.main = main  # what stream requests name as their local address
        self.connections: set[StreamConnection] = set()
        # Anyone can connect, over and over: the lines about connections are limited.
        self.notes = LimitedLog(log)
        self._per_ip: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self.addresses: dict[str, Address] = {}  # tcp/tls -> where it listens

    async def start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        listeners: list[tuple[str, Address, ssl.SSLContext | None]] = []
        if config.tcp_listen is not None:
            listeners.append(("tcp", config.tcp_listen, None))
        if config.tls_listen is not None:
            listeners.append(("tls", config.tls_listen, server_tls_context(config)))
        for kind, address, tls in listeners:
            # TLS is started per connection, once it is counted (StreamConnection).
            server = await loop.create_server(
                self._factory(kind, tls), address[0], address[1], reuse_address=True)
            self._servers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            self.addresses[kind] = (str(host), int(port))
        if self.addresses:
            log.info("TURN over %s", ", ".join(f"{kind} on {h}:{p}"
                                              for kind, (h, p) in self.addresses.items()))

    def _factory(self, kind: str, tls: ssl.SSLContext | None,
                 ) -> Callable[[], StreamConnection]:
        return lambda: StreamConnection(self, kind, tls)

    def accepted(self, connection: StreamConnection) -> None:
        quotas = self.config.quotas
        ip = client_key(connection.client[0])
        clash = any(c.client == connection.client for c in self.connections)
        if (len(self.connections) >= quotas.allocations
                or self._per_ip.get(ip, 0) >= quotas.allocations_per_address or clash):
            self.counters.stream_refused += 1
            self.notes.log(logging.INFO, "%s refused: %s", connection,
                           "address and port already connected" if clash
                           else "too many connections")
            connection.closed = True
            connection.transport.abort()
            return
        self.counters.stream_connections += 1
        self.connections.add(connection)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        log.debug("%s connected", connection)

    def lost(self, connection: StreamConnection) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        ip = client_key(connection.client[0])
        left = self._per_ip.get(ip, 1) - 1
        if left:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)
        allocation = self.table.get(connection.client)
        if allocation is not None and allocation.stream is connection:
            self.table.remove(allocation, "closed with its connection")
        log.debug("%s gone", connection)

    def channel_data(self, connection: StreamConnection, frame: bytes, now: float) -> None:
        counters = self.counters
        counters.channel_data_in += 1
        if len(frame) < 4:
            counters.truncated_channel_data += 1
            return
        channel, length = _CHANNEL_HEADER.unpack_from(frame)
        route = self.table.stream_routes.get((connection.client, channel))
        if route is None:
            counters.no_channel += 1
            return
        sendto, peer, limiter = route
        if limiter is not None and not limiter.allow(now, length):
            counters.rate_limited += 1
            return
        try:
            sendto(memoryview(frame)[4:4 + length], peer)
        except OSError:
            counters.send_errors += 1
            return
        counters.to_peer_packets += 1
        counters.to_peer_bytes += length

    def sweep(self, now: float) -> None:
        """Close connections with no allocation in time or a stalled frame."""
        config = self.config
        for connection in list(self.connections):
            if connection.closed:
                continue
            if connection.buffer and now - connection.last_frame > config.stream_frame_timeout:
                connection.fail(f"a frame left unfinished for over "
                                f"{config.stream_frame_timeout:g} s")
                continue
            allocation = self.table.get(connection.client)
            if allocation is not None and allocation.stream is connection:
                connection.allocated_at = now
                continue
            if now - connection.allocated_at > config.stream_idle_timeout:
                self.counters.stream_idle += 1
                self.notes.log(logging.INFO, "%s closed: no allocation after %g s",
                               connection, config.stream_idle_timeout)
                connection.close()

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        for connection in list(self.connections):
            connection.close()


def server_tls_context(config: ServerConfig) -> ssl.SSLContext:
    """Raises OSError or ValueError naming the file and what to do."""
    if not config.cert_file or not config.key_file:
        raise ValueError("--tls-listen needs --cert FILE and --key FILE (PEM)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        detail = getattr(exc, "strerror", None) or str(exc)
        raise ValueError(f"cannot use --cert {config.cert_file} with --key "
                         f"{config.key_file}: {detail}; give the certificate chain and "
                         "its private key as PEM files") from exc
    return context


def peer_to_stream(allocation: Allocation, control: ControlPlane, counters: Counters,
                   batch: int) -> None:
    """Readiness of a stream allocation's relayed socket: what peers send, to the
    client's connection (ChannelData when bound, else a Data indication)."""
    stream = allocation.stream
    if stream is None:
        return
    recv = allocation.sock.recvfrom
    channels = allocation.peer_channels
    limiter = allocation.limiter
    pack = _CHANNEL_HEADER.pack
    now = time.monotonic()
    for _ in range(batch):
        try:
            data, source = recv(_MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # closed under us when the allocation went away
            counters.receive_errors += 1
            return
        counters.peer_datagrams_in += 1
        # An IPv6 socket's source has flow info and scope too: channels are keyed by
        # (host, port).
        peer = source if len(source) == 2 else (source[0], source[1])
        channel = channels.get(peer)
        if channel is None and not allocation.permitted(peer[0], now):
            counters.no_permission_in += 1
            continue
        if limiter is not None and not limiter.allow(now, len(data)):
            counters.rate_limited += 1
            continue
        if channel is not None:
            frame = pack(channel, len(data)) + data
        else:
            frame = control.data_indication(allocation, (str(peer[0]), int(peer[1])), data)
        if stream.send(frame):
            counters.to_client_packets += 1
            counters.to_client_bytes += len(data)
