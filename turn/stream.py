"""TURN over TCP or TLS (RFC 8656 3.1): a stream to the relay, framed by aioice.

aioice's TurnClientTcpProtocol reads STUN messages and ChannelData off the stream
(its TurnStreamMixin) and pads what it sends to 4 bytes, as a stream requires. This
module opens the connection and wraps it as the allocation's link: sending never
blocks and never queues without bound. A relay that reads slower than we send would
otherwise grow the transport's buffer for ever; past `MAX_QUEUED` bytes a datagram is
dropped instead, as a full UDP socket would (WireGuard and its inner TCP cope with
loss, not with seconds of queue).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct

from aioice import stun
from aioice.turn import TurnClientTcpProtocol, is_channel_data

from kbwg.core.addresses import Address

log = logging.getLogger(__name__)

MAX_QUEUED = 256 * 1024
_LENGTH = struct.Struct("!H")


class TurnStreamProtocol(TurnClientTcpProtocol):
    """aioice's TURN client over a stream, framing each read in one pass: aioice's
    TurnStreamMixin copies what is left of its buffer after every frame, so a relay
    sending a read's worth of tiny frames (256 KiB of 4-byte ChannelData) would hold
    the agent's event loop for seconds."""

    def data_received(self, data: bytes) -> None:
        buffer: bytes = getattr(self, "buffer", b"")
        buffer = buffer + data if buffer else bytes(data)
        self.buffer = buffer
        addr = self.transport.get_extra_info("peername")
        end, pos = len(buffer), 0
        while end - pos >= 4:
            (length,) = _LENGTH.unpack_from(buffer, pos + 2)
            length += stun.padding_length(length)
            size = 4 + length if is_channel_data(buffer[pos:pos + 1]) else 20 + length
            if end - pos < size:
                break
            frame = buffer[pos:pos + size]
            pos += size
            # A frame that raises ends the connection (asyncio's fatal error), as with
            # the mixin: what is left of the buffer no longer matters then.
            self.datagram_received(frame, addr)
        self.buffer = buffer[pos:] if pos else buffer


class StreamLink:
    """aioice's stream protocol and its transport, as an allocation's link."""

    def __init__(self, transport: asyncio.Transport, protocol: TurnClientTcpProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.unhandled = 0  # the stream parser is aioice's; it drops what it cannot parse
        self.dropped = 0  # datagrams dropped on a full send queue

    def send(self, data: bytes) -> bool:
        """A STUN message or ChannelData to the relay; False when dropped."""
        transport = self._transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() > MAX_QUEUED:
            self.dropped += 1
            return False
        self._protocol._send(data)  # aioice frames it (pads ChannelData to 4 bytes)
        return True

    def local_ip(self) -> str | None:
        sockname = self._transport.get_extra_info("sockname")
        return str(sockname[0]) if sockname else None

    def close(self) -> None:
        self._transport.close()


async def open_stream(server: Address, username: str, password: str, lifetime: int,
                      channel_refresh: int, tls: ssl.SSLContext | None,
                      server_hostname: str | None,
                      ) -> tuple[StreamLink, TurnClientTcpProtocol]:
    """A TCP (or, with `tls`, TLS) connection to `server` running aioice's TURN client
    protocol. With TLS the certificate must match `server_hostname` (default: the
    server's address)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: TurnStreamProtocol(server, username=username, password=password,
                                   lifetime=lifetime,
                                   channel_refresh_time=channel_refresh),
        host=server[0], port=server[1], ssl=tls,
        server_hostname=(server_hostname or server[0]) if tls is not None else None)
    return StreamLink(transport, protocol), protocol


async def stream_binding(server: Address, tls: ssl.SSLContext | None,
                         server_hostname: str | None, timeout: float,
                         ) -> tuple[float, Address | None]:
    """A STUN Binding over TCP (or TLS) to a relay: the round trip in ms, connection
    and handshake included, and the address it saw. Raises OSError, TimeoutError or
    aioice's TransactionError."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def bind() -> tuple[float, Address | None]:
        link, protocol = await open_stream(server, "", "", 0, 0, tls, server_hostname)
        try:
            response, _ = await protocol.request(
                stun.Message(stun.Method.BINDING, stun.Class.REQUEST))
        finally:
            link.close()
        mapped = response.attributes.get("XOR-MAPPED-ADDRESS")
        return (loop.time() - started) * 1000, (
            (str(mapped[0]), int(mapped[1])) if mapped else None)

    return await asyncio.wait_for(bind(), timeout)
