"""The agent's side of a relay: one TURN allocation, made with aioice's TURN client,
over UDP, TCP or TLS (RFC 8656 3.1: STUN messages and ChannelData on a stream, ChannelData
padded to 4 bytes; aioice's TurnClientTcpProtocol frames both, see kbwg.turn.stream).

aioice does the protocol (Allocate with TURN REST credentials, refreshes, permissions
and channel binds). Data takes a fast path beside it, because aioice would start one
task per datagram sent and wake the event loop once per datagram received, which a
WireGuard stream cannot afford: aioice runs on our own transport (udp_transport.py),
which reads in batches; once a channel to a peer is bound, data goes out as ChannelData
straight from the socket, and received ChannelData is handled here, everything else
(STUN answers, Data indications) by aioice. The allocation lives on a UDP socket of
its own (not the WireGuard port), with socket buffers sized for bulk traffic. Over a
stream aioice's protocol reads the frames and hands ChannelData to us without a task
per datagram; sending takes the same fast path, framed by aioice.

Upkeep is ours too, every `AllocationTimers.watch_interval`:
- a Refresh confirms the allocation, and is the only one sent: aioice only refreshes at
  5/6 of its lifetime, so a relay that restarted, or dropped the allocation (coturn does
  on a failed send), would go unnoticed for minutes; its loop is stopped. A refused
  permission or channel bind confirms it at once (at most every `doubt_gap`), unless the
  refusal is about the peer (403, 443, 508): a coturn that dropped the allocation (a
  failed send closed its relay socket) answered the next bind 438 with a new nonce,
  then every bind 400, and only a Refresh 437 (seen in netns worlds; coturn issue 688
  shows the same pattern); a 437 to any request is the loss itself. So does a path
  through it that went quiet (`confirm_soon`): a restarted relay drops ChannelData
  without a word;
- channel bindings in use are bound again before the peer's permission (300 s, which a
  ChannelBind refreshes) runs out: ChannelData refreshes neither, and aioice refreshes
  only inside its own send path, which the fast path bypasses. A binding left unused
  is forgotten once the server has surely dropped it, so the next send binds afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aioice import stun
from aioice.turn import TurnClientProtocol, TurnClientUdpProtocol

from kbwg.core.addresses import Address
from kbwg.core.loglimit import LimitedLog
from kbwg.core.printable import PrintableReason, printable
from kbwg.core.stun import is_channel_data
from kbwg.core.turnrest import rest_password, rest_username
from kbwg.turn.family import allocate
from kbwg.turn.stream import open_stream
from kbwg.turn.transport import ConnectedUdpTransport

log = logging.getLogger(__name__)

Receiver = Callable[[bytes, Address], None]

SOCKET_BUFFER = 4 * 1024 * 1024
CREDENTIAL_TTL_S = 24 * 3600
LIFETIME_S = 600
# Refused peers remembered so that a refusal is logged once (oldest forgotten first).
MAX_REFUSED = 256
# Characters of a refusal kept and logged: its reason phrase is the relay's to choose,
# up to a datagram long, control characters included (made printable).
MAX_WHY = 200
# Refusals about the peer, not the allocation (RFC 8656: 403 Forbidden, 443 Peer Address
# Family Mismatch, 508 Insufficient Capacity): no sign that the allocation is gone.
POLICY_REFUSALS = frozenset({403, 443, 508})
ALLOCATION_MISMATCH = 437


class RelayRefused(PrintableReason, stun.TransactionFailed):
    """aioice's TransactionFailed, saying the relay's reason phrase printable and cut
    short: it reaches log lines, `status` and `diag` (the allocation's failure)."""

    reason_limit = MAX_WHY


@dataclass(frozen=True)
class AllocationTimers:
    """Seconds; tests shrink them."""

    watch_interval: float = 15.0  # how often the upkeep runs
    watch_timeout: float = 10.0  # a Refresh unanswered by then: the allocation is gone
    # A refusal confirms the allocation early, but not sooner than this after the last
    # confirmation (a relay refusing every bind must not be refreshed per check).
    doubt_gap: float = 1.0
    # A binding in use is bound again this long after the last bind: before the peer's
    # permission (RFC 8656: 300 s) expires, with a watch interval to spare.
    channel_refresh: float = 240.0
    # An unused binding is forgotten this long after the last bind: the server dropped it
    # at 600 s (RFC 8656); a minute more, so that it surely has before we bind the peer
    # again under a new number (a peer bound to two numbers is refused with 400).
    channel_lifetime: float = 660.0


@dataclass
class RelayCounters:
    sent: int = 0
    received: int = 0
    send_errors: int = 0


class Link(Protocol):
    """How an allocation reaches its relay: a connected UDP socket or a stream."""

    unhandled: int

    def send(self, data: bytes) -> bool: ...

    def local_ip(self) -> str | None:
        """The host address the link leaves from (None: unknown, or closed)."""

    def close(self) -> None: ...


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
    def __init__(self, url: str, server: Address, protocol: TurnClientProtocol,
                 transport: Link, relayed: Address, mapped: Address | None,
                 rtt_ms: float, transport_name: str = "udp") -> None:
        self.url = url
        self.server = server
        self.transport = transport_name  # udp, tcp or tls
        # Why this transport (set by whoever chose it; status and diag show it).
        self.transport_reason = ""
        self.relayed = relayed
        self.mapped = mapped
        self.rtt_ms = rtt_ms
        self.counters = RelayCounters()
        self.receiver: Receiver = lambda data, addr: None
        self.on_lost: Callable[[RelayAllocation], None] | None = None
        self.closed = False
        self._protocol = protocol
        self._transport = transport
        self._binding: dict[Address, asyncio.Task[None]] = {}
        self._upkeep: asyncio.Task[None] | None = None
        # Per bound channel: when it was last bound (loop time), and which were used since.
        self._bound_at: dict[int, float] = {}
        self._used: set[int] = set()
        # Peers the relay refused, with why: said once at INFO, not at every check's
        # retransmit (a relay refuses another allocation on itself each time).
        self._refused: dict[Address, str] = {}
        # A relay can change its reason each time, so that each is new: still limited.
        self._notes = LimitedLog(log)
        # Set when the allocation may be gone (a refusal, a quiet path): confirmed early.
        self._doubted = asyncio.Event()

    @classmethod
    async def open(cls, url: str, server: Address, user: str, secret: str,
                   timeout: float = 3.0,
                   timers: AllocationTimers = AllocationTimers(), *,
                   transport: str = "udp", tls: ssl.SSLContext | None = None,
                   server_hostname: str | None = None,
                   ipv6: bool = False) -> RelayAllocation:
        """Allocate on `server` with TURN REST credentials for `user`, over `transport`
        (udp, tcp, or tls with the context `tls`, checking `server_hostname`); the
        allocation is then kept up (see the module docstring) and reported lost when it
        is gone. `timeout` bounds connecting and allocating together. `ipv6` asks for an
        IPv6 relayed address (kbwg.turn.family), whatever the family of `server`."""
        username = rest_username(user, CREDENTIAL_TTL_S)
        password = rest_password(secret, username)
        started = time.monotonic()
        link: Link
        protocol: TurnClientProtocol
        if transport == "udp":
            # aioice's own channel refresh never runs (see the module docstring).
            udp = TurnClientUdpProtocol(server, username, password, LIFETIME_S,
                                        int(timers.channel_refresh))
            link = udp_link = ConnectedUdpTransport.open(server, udp, SOCKET_BUFFER)
            protocol = udp
        elif transport in ("tcp", "tls"):
            if transport == "tls" and tls is None:
                tls = ssl.create_default_context()
            link, protocol = await asyncio.wait_for(open_stream(
                server, username, password, LIFETIME_S, int(timers.channel_refresh),
                tls if transport == "tls" else None, server_hostname), timeout)
        else:
            raise ValueError(f"unknown TURN transport {transport!r}")
        try:
            left = max(0.1, timeout - (time.monotonic() - started))
            relayed = await asyncio.wait_for(allocate(protocol, ipv6), left)
        except stun.TransactionFailed as exc:
            link.close()
            raise RelayRefused(exc.response) from None
        except BaseException:
            link.close()
            raise
        rtt_ms = (time.monotonic() - started) * 1000
        allocation = cls(url, server, protocol, link, relayed, protocol.mapped_address,
                         rtt_ms, transport)
        # The upkeep's Refresh every watch interval keeps the allocation; aioice's own
        # loop sleeps 5/6 of whatever LIFETIME the relay answers, so a relay answering 0
        # would have it refresh as fast as the relay answers, for ever.
        if protocol.refresh_task is not None:
            protocol.refresh_task.cancel()
            protocol.refresh_task = None
        protocol.receiver = _Receiver(allocation)
        if transport == "udp":
            udp_link.handler = allocation._received
        allocation._upkeep = asyncio.create_task(allocation._keep_up(timers))
        log.info("relay %s: allocation %s:%d over %s (%.1f ms)", url, *relayed, transport,
                 rtt_ms)
        return allocation

    @property
    def unhandled(self) -> int:
        """Datagrams from the relay that could not be handled: malformed ones (aioice's
        parser lets some raise more than ValueError), or a bug."""
        return self._transport.unhandled

    def _received(self, data: bytes, addr: Address) -> None:
        if is_channel_data(data):  # RFC 8656 12.4
            channel, length = struct.unpack_from("!HH", data)
            peer = self._protocol.channel_to_peer.get(channel)
            if peer is not None and len(data) >= 4 + length:
                self.counters.received += 1
                self.receiver(data[4:4 + length], peer)
        else:
            self._protocol.datagram_received(data, addr)

    async def _keep_up(self, timers: AllocationTimers) -> None:
        loop = asyncio.get_running_loop()
        confirmed_at = loop.time()
        while not self.closed:
            try:
                await asyncio.wait_for(self._doubted.wait(), timers.watch_interval)
            except TimeoutError:
                pass
            else:  # woken early: still at most one early Refresh per doubt_gap
                await asyncio.sleep(confirmed_at + timers.doubt_gap - loop.time())
            self._doubted.clear()
            if not await self._confirm(timers.watch_timeout):
                return
            confirmed_at = loop.time()
            await self._keep_channels(timers)

    async def _confirm(self, timeout: float) -> bool:
        """A Refresh: 437 (no such allocation) or silence means it is gone."""
        request = stun.Message(stun.Method.REFRESH, stun.Class.REQUEST)
        request.attributes["LIFETIME"] = LIFETIME_S
        try:
            await asyncio.wait_for(self._protocol.request_with_retry(request), timeout)
        except (stun.TransactionError, ConnectionError, OSError, TimeoutError) as exc:
            if isinstance(exc, stun.TransactionFailed):
                self._gone(f"refresh refused: {exc.response.error_code}")
            else:
                self._gone(f"refresh unanswered: {type(exc).__name__}")
            return False
        return True

    @property
    def local_ip(self) -> str | None:
        """The host address this allocation's link leaves from: the relay knows the
        allocation by it, so once the host lost it (another network) the allocation is
        out of reach."""
        return self._transport.local_ip()

    def _gone(self, reason: str) -> None:
        self.lost(ConnectionError(reason))
        self._transport.close()  # stops aioice's own refresh task too

    def _doubt(self, refusal: Exception) -> None:
        """A request failed: a 437 is the allocation's loss, a refusal other than the
        relay's policy a reason to confirm it now rather than at the next watch."""
        code = (refusal.response.error_code if isinstance(refusal, stun.TransactionFailed)
                else None)
        if code == ALLOCATION_MISMATCH:
            self._gone(f"channel bind refused: {code}")
        elif code not in POLICY_REFUSALS:
            self.confirm_soon()

    def confirm_soon(self) -> None:
        """Refresh now (at most once per `doubt_gap`), not at the next watch: a path
        through the allocation went quiet, or a request was refused. A relay that
        restarted drops ChannelData silently; only a Refresh tells."""
        self._doubted.set()

    async def _keep_channels(self, timers: AllocationTimers) -> None:
        loop = asyncio.get_running_loop()
        protocol = self._protocol
        for channel, bound_at in list(self._bound_at.items()):
            peer = protocol.channel_to_peer.get(channel)
            age = loop.time() - bound_at
            if peer is None or (channel not in self._used and age >= timers.channel_lifetime):
                self._forget(channel)
            elif channel in self._used and age >= timers.channel_refresh:
                try:
                    await protocol.channel_bind(channel, peer)
                except (stun.TransactionError, ConnectionError, OSError) as exc:
                    # Not fatal yet: the next round tries again, the permission lasts.
                    self._notes.log(logging.INFO, "relay %s: channel to %s:%d not "
                                    "refreshed: %s", self.url, *peer, printable(exc, MAX_WHY))
                    self._doubt(exc)
                    if self.closed:
                        return
                    continue
                self._bound_at[channel] = loop.time()
                self._used.discard(channel)

    def _forget(self, channel: int) -> None:
        protocol = self._protocol
        peer = protocol.channel_to_peer.pop(channel, None)
        if peer is not None:
            protocol.peer_to_channel.pop(peer, None)
        protocol.channel_refresh_at.pop(channel, None)
        self._bound_at.pop(channel, None)
        self._used.discard(channel)

    def send(self, data: bytes, peer: Address) -> None:
        """To `peer` through the relay: ChannelData once bound, else bind first."""
        if self.closed:
            return
        channel = self._protocol.peer_to_channel.get(peer)
        if channel is not None:
            self._used.add(channel)
            if self._transport.send(struct.pack("!HH", channel, len(data)) + data):
                self.counters.sent += 1
            else:  # a full buffer drops, as the network would
                self.counters.send_errors += 1
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
            channel = self._protocol.peer_to_channel.get(peer)
            if channel is not None and channel not in self._bound_at:
                self._bound_at[channel] = asyncio.get_running_loop().time()
        except Exception as exc:
            self.counters.send_errors += 1
            self._doubt(exc)
            why = printable(exc, MAX_WHY)
            if self._refused.get(peer) == why:
                log.debug("relay %s: cannot reach %s:%d: %s", self.url, *peer, why)
            else:
                self._notes.log(logging.INFO, "relay %s: cannot reach %s:%d: %s",
                                self.url, *peer, why)
                while len(self._refused) >= MAX_REFUSED:
                    del self._refused[next(iter(self._refused))]
                self._refused[peer] = why
        else:
            self._refused.pop(peer, None)

    def lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        log.warning("relay %s: allocation %s:%d lost%s", self.url, *self.relayed,
                    f" ({printable(exc, MAX_WHY)})" if exc else "")
        if self.on_lost is not None:
            self.on_lost(self)

    async def close(self) -> None:
        self.closed = True
        if self._upkeep is not None:
            self._upkeep.cancel()
        for task in list(self._binding.values()):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._protocol.delete(), 2.0)
        self._transport.close()
