"""STUN Binding transactions (RFC 5389/8489) over a pluggable datagram transport.

The client never owns a socket. It sends through a `DatagramTransport` and is fed every
received datagram through `StunClient.datagram_received`. Today that is a plain UDP
socket (`bind_udp`); in the agent it will be the device owner's raw sockets on the
WireGuard port, so that STUN sees the same NAT mapping as WireGuard's own packets.

Anything received that is not a valid answer to one of our transactions is counted and
dropped: the receive path must survive whatever the network (or an attacker) sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol, cast

from aioice import stun

from kbwg.core.addresses import Address
from kbwg.core.printable import printable

log = logging.getLogger(__name__)


# A STUN answer never needs more than one Ethernet MTU; bigger datagrams are not ours.
MAX_DATAGRAM = 1500
CHANGE_IP = 0x4
CHANGE_PORT = 0x2
_FINGERPRINT_TYPE = 0x8028


class DatagramTransport(Protocol):
    """Where STUN requests leave from: a UDP socket or the device owner's raw socket."""

    def send(self, data: bytes, addr: Address) -> None: ...


@dataclass
class StunCounters:
    """Outcomes of everything sent and received; bad answers are counted, never raised."""

    requests: int = 0
    retransmits: int = 0
    responses: int = 0
    error_responses: int = 0
    timeouts: int = 0
    oversized: int = 0
    truncated: int = 0
    not_stun: int = 0
    bad_fingerprint: int = 0
    undecodable: int = 0
    unknown_transaction: int = 0
    wrong_class: int = 0
    wrong_method: int = 0
    no_address: int = 0

    @property
    def ignored(self) -> int:
        return (
            self.oversized + self.truncated + self.not_stun + self.bad_fingerprint
            + self.undecodable + self.unknown_transaction + self.wrong_class
            + self.wrong_method + self.no_address
        )

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "ignored": self.ignored}


@dataclass(frozen=True)
class BindingResult:
    server: Address
    # Where the answer actually came from: differs from `server` after a CHANGE-REQUEST.
    source: Address
    mapped: Address
    rtt_ms: float
    attempts: int
    other_address: Address | None = None
    response_origin: Address | None = None


class StunError(Exception):
    """A Binding transaction that gave no usable answer."""


class StunTimeout(StunError):
    def __init__(self, server: Address, attempts: int, timeout: float) -> None:
        super().__init__(f"no answer from {format_address(server)} after {attempts} "
                         f"requests in {timeout:g}s")
        self.server = server


class StunErrorResponse(StunError):
    def __init__(self, server: Address, code: int | None, reason: str) -> None:
        # The reason phrase is the server's to choose: no terminal controls, cut short.
        super().__init__(f"{format_address(server)} answered error {code} "
                         f"{printable(reason)}".rstrip())
        self.server = server
        self.code = code


@dataclass
class _Pending:
    server: Address
    future: asyncio.Future[tuple[stun.Message, Address, float]]
    expect_request: bool = False
    sent_at: list[float] = field(default_factory=list)


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _fingerprint_ok(data: bytes) -> bool:
    """Verify FINGERPRINT where present. aioice also checks it, but only raises a
    ValueError indistinguishable from other decoding errors, and we count them apart."""
    pos = stun.HEADER_LENGTH
    while pos + 4 <= len(data):
        attr_type, attr_len = struct.unpack_from("!HH", data, pos)
        if attr_type == _FINGERPRINT_TYPE:
            if attr_len != 4 or pos + 8 > len(data):
                return False
            (value,) = struct.unpack_from("!I", data, pos + 4)
            return bool(value == stun.message_fingerprint(data[:pos]))
        pos += 4 + attr_len + stun.padding_length(attr_len)
    return True


class StunClient:
    def __init__(self, transport: DatagramTransport, counters: StunCounters | None = None,
                 software: str | None = None) -> None:
        self.transport = transport
        self.counters = counters if counters is not None else StunCounters()
        self.software = software
        self._pending: dict[bytes, _Pending] = {}

    def datagram_received(self, data: bytes, addr: Address) -> bool:
        """Feed one received datagram; True when it answered one of our transactions.

        Never raises: a transport calls this for every datagram it gets.
        """
        try:
            return self._receive(data, addr)
        except Exception:  # the receive path must outlive any bug or hostile input
            self.counters.undecodable += 1
            log.debug("unexpected error decoding a datagram from %s", addr, exc_info=True)
            return False

    def _receive(self, data: bytes, addr: Address) -> bool:
        counters = self.counters
        if len(data) > MAX_DATAGRAM:
            counters.oversized += 1
            return False
        if len(data) < stun.HEADER_LENGTH:
            counters.truncated += 1
            return False
        msg_type, length, cookie = struct.unpack_from("!HHI", data)
        if msg_type & 0xC000 or cookie != stun.COOKIE:
            counters.not_stun += 1
            return False
        if len(data) < stun.HEADER_LENGTH + length:
            counters.truncated += 1
            return False
        if len(data) > stun.HEADER_LENGTH + length or length % 4:
            counters.undecodable += 1
            return False
        if not _fingerprint_ok(data):
            counters.bad_fingerprint += 1
            return False
        try:
            message = stun.parse_message(data)
        except (ValueError, struct.error):
            counters.undecodable += 1
            return False
        pending = self._pending.get(message.transaction_id)
        if pending is None or pending.future.done():
            counters.unknown_transaction += 1
            return False
        if message.message_method != stun.Method.BINDING:
            counters.wrong_method += 1
            return False
        # Loop time, the clock of the retransmit timers (virtual in tests).
        received_at = pending.future.get_loop().time()
        if pending.expect_request:
            # A hairpin probe: our own request, looped back by the NAT.
            if message.message_class != stun.Class.REQUEST:
                counters.wrong_class += 1
                return False
            pending.future.set_result((message, addr, received_at))
            return True
        if message.message_class == stun.Class.RESPONSE:
            attrs = message.attributes
            if "XOR-MAPPED-ADDRESS" not in attrs and "MAPPED-ADDRESS" not in attrs:
                counters.no_address += 1
                return False
            counters.responses += 1
        elif message.message_class == stun.Class.ERROR:
            counters.error_responses += 1
        else:
            counters.wrong_class += 1
            return False
        pending.future.set_result((message, addr, received_at))
        return True

    def _request(self, attributes: dict[str, object] | None = None) -> stun.Message:
        message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST,
                               attributes=dict(attributes or {}))
        if self.software:
            message.attributes["SOFTWARE"] = self.software
        message.add_fingerprint()
        return message

    async def _transact(self, server: Address, request: stun.Message, timeout: float,
                        rto: float, expect_request: bool = False,
                        ) -> tuple[stun.Message, Address, float, int, float]:
        """Send with RTO doubling until an answer or `timeout` seconds in total."""
        loop = asyncio.get_running_loop()
        pending = _Pending(server, loop.create_future(), expect_request)
        self._pending[request.transaction_id] = pending
        data = bytes(request)
        deadline = loop.time() + timeout
        delay = rto
        try:
            while True:
                if pending.sent_at:
                    self.counters.retransmits += 1
                else:
                    self.counters.requests += 1
                pending.sent_at.append(loop.time())
                try:
                    self.transport.send(data, server)
                except OSError as exc:
                    # An unreachable network answers at once; retrying is still right,
                    # the route may be coming up, but say why in the log.
                    log.debug("sending to %s failed: %s", format_address(server), exc)
                wait = min(delay, deadline - loop.time())
                if wait <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    message, source, received_at = await asyncio.wait_for(
                        asyncio.shield(pending.future), wait)
                    # After retransmits the answer may be to any copy (Karn); timing it
                    # from the last one never overestimates the path.
                    rtt = received_at - pending.sent_at[-1]
                    return message, source, received_at, len(pending.sent_at), rtt
                delay *= 2
                if loop.time() >= deadline:
                    break
        finally:
            del self._pending[request.transaction_id]
            if not pending.future.done():
                pending.future.cancel()
        self.counters.timeouts += 1
        raise StunTimeout(server, len(pending.sent_at), timeout)

    async def binding(self, server: Address, *, change_ip: bool = False,
                      change_port: bool = False, timeout: float = 3.0,
                      rto: float = 0.5) -> BindingResult:
        """One Binding transaction; raises StunTimeout or StunErrorResponse."""
        attributes: dict[str, object] = {}
        if change_ip or change_port:
            attributes["CHANGE-REQUEST"] = (CHANGE_IP if change_ip else 0) | (
                CHANGE_PORT if change_port else 0)
        request = self._request(attributes)
        message, source, _received, attempts, rtt = await self._transact(
            server, request, timeout, rto)
        attrs = message.attributes
        if message.message_class == stun.Class.ERROR:
            code, reason = attrs.get("ERROR-CODE", (None, ""))
            raise StunErrorResponse(server, code, reason)
        mapped = attrs.get("XOR-MAPPED-ADDRESS") or attrs["MAPPED-ADDRESS"]
        return BindingResult(
            server=server, source=source, mapped=(str(mapped[0]), int(mapped[1])),
            rtt_ms=round(rtt * 1000, 3), attempts=attempts,
            other_address=attrs.get("OTHER-ADDRESS"),
            response_origin=attrs.get("RESPONSE-ORIGIN"),
        )

    async def hairpin(self, target: Address, *, timeout: float = 1.0,
                      rto: float = 0.25) -> bool:
        """Send a Binding request to our own mapped address: True when it comes back.

        Nobody answers it; the NAT either loops it back to us or drops it.
        """
        try:
            await self._transact(target, self._request(), timeout, rto, expect_request=True)
        except StunTimeout:
            self.counters.timeouts -= 1  # silence is the expected "no hairpin" answer
            return False
        return True


class DatagramReceiver(asyncio.DatagramProtocol):
    """A plain UDP socket feeding a receive callback, for standalone use (diag, tests)."""

    def __init__(self, on_datagram: Callable[[bytes, Address], object]) -> None:
        self._on_datagram = on_datagram
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) arrive here; the retransmit timer copes.
        log.debug("UDP error: %s", exc)

    def send(self, data: bytes, addr: Address) -> None:
        if self._transport is None:
            raise OSError("UDP transport is closed")
        self._transport.sendto(data, addr)

    @property
    def local_address(self) -> Address:
        if self._transport is None:
            raise OSError("UDP transport is closed")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return (str(host), int(port))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


async def bind_udp(host: str = "0.0.0.0", port: int = 0,
                   counters: StunCounters | None = None) -> tuple[StunClient, DatagramReceiver]:
    """A StunClient on its own UDP socket (IPv6 when `host` is an IPv6 address, then
    IPv6 only, so it can share a port number with an IPv4 one). Close the transport
    when done."""
    loop = asyncio.get_running_loop()
    holder: list[StunClient] = []
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if ":" in host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        _, protocol = await loop.create_datagram_endpoint(
            lambda: DatagramReceiver(lambda data, addr: holder[0].datagram_received(data, addr)),
            sock=sock,
        )
    except BaseException:
        sock.close()
        raise
    client = StunClient(protocol, counters)
    holder.append(client)
    return client, protocol


@contextlib.asynccontextmanager
async def open_udp_client(host: str = "0.0.0.0", port: int = 0,
                          counters: StunCounters | None = None,
                          ) -> AsyncIterator[tuple[StunClient, DatagramReceiver]]:
    """`bind_udp` that closes its socket on exit."""
    client, transport = await bind_udp(host, port, counters)
    try:
        yield client, transport
    finally:
        transport.close()


async def resolve(host: str, port: int, family: int = socket.AF_INET) -> Address:
    """The IPv4 (or with `family` AF_INET6, IPv6) address of a configured server (names
    are resolved by the system resolver)."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        # The resolver would look an address of the other family up as a name (a DNS
        # round trip, or its time-out, for nothing).
        if (literal.version == 6) != (family == socket.AF_INET6):
            raise OSError(f"{host} is not an {'IPv6' if family == socket.AF_INET6 else 'IPv4'}"
                          " address")
        return (str(literal), port)
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    addr = infos[0][4]
    return (str(addr[0]), int(addr[1]))
