"""STUN from the WireGuard port itself, through the device owner's raw socket.

The agent never holds the raw socket: it asks the owner to send (`stun_send`) and gets
what arrives as `stun` events. So a `StunClient` on this transport sees the NAT mapping
WireGuard's own packets get.

    transport = await OwnerStunTransport.open(owner)
    client = StunClient(transport)
    transport.receiver = client.datagram_received
    result = await client.binding(server)
    # checks from one particular local address (multi-homed hosts):
    bound = transport.from_source("198.18.1.10")
    lan_client = StunClient(bound)
    bound.receiver = lan_client.datagram_received

Answers (STUN success or error responses) go to the receiver of the transport that sent
the request, matched by transaction id; everything else (requests, indications, answers
to unknown transactions) goes to `transport.receiver`. `open` takes over the owner's
`events` queue: any event other than `stun` goes to `on_other_event`.

The owner budgets what reaches us (kbwg.owner.stunfilter): answers to our own requests
and checks for a ufrag we declared each have reserved budgets, so a STUN flood from
strangers cannot starve them. Declare the ufrags of the current checks with
`add_ufrag`/`remove_ufrag` (or `set_ufrags` for the whole set); the owner learns them in
the background, the latest set winning. Without them, checks share the strangers' budgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from kbwg.agent.owner_client import DeviceOwner
from kbwg.core.addresses import Address
from kbwg.owner.protocol import (
    EVENT_STUN,
    OP_STATS,
    OP_STUN_OPEN,
    OP_STUN_SEND,
    OP_STUN_UFRAGS,
    ProtocolError,
    format_endpoint,
    parse_endpoint,
)

logger = logging.getLogger(__name__)

Receiver = Callable[[bytes, Address], object]
LocalReceiver = Callable[[bytes, Address, str], object]
EventCallback = Callable[[dict[str, Any]], object]

# Sends are fire-and-forget; past this many unanswered ones the owner is not keeping up
# and a send fails at once (StunClient treats that like a lost datagram and retransmits).
MAX_IN_FLIGHT = 256
STUN_HEADER_LEN = 20
# Transaction ids remembered for routing answers; far more than are ever outstanding.
MAX_ORIGINS = 4096


@dataclass
class OwnerStunCounters:
    sent: int = 0
    send_failed: int = 0
    received: int = 0
    bad_events: int = 0
    ufrag_updates: int = 0
    ufrag_update_failed: int = 0


class OwnerStunTransport:
    """A `DatagramTransport` (negotiation.stun_client) whose socket is the WireGuard port."""

    def __init__(self, owner: DeviceOwner, port: int) -> None:
        self.owner = owner
        self.port = port
        self.receiver: Receiver | None = None
        # Takes, when set, what `receiver` would: with the local address it arrived at.
        self.local_receiver: LocalReceiver | None = None
        self.on_other_event: EventCallback | None = None
        self.counters = OwnerStunCounters()
        self._bound: dict[str, SourceBound] = {}
        self._origins: OrderedDict[bytes, SourceBound | None] = OrderedDict()
        self._sends: set[asyncio.Task[None]] = set()
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self._ufrags: frozenset[str] = frozenset()
        self._ufrag_push: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, owner: DeviceOwner, receiver: Receiver | None = None
    ) -> OwnerStunTransport:
        """Have the owner open its raw socket (after `create`) and start taking events."""
        reply = await owner.request(OP_STUN_OPEN)
        transport = cls(owner, int(reply["port"]))
        transport.receiver = receiver
        transport._pump = asyncio.create_task(transport._pump_events())
        return transport

    def from_source(self, source: str) -> SourceBound:
        """A transport sending from `source` (a local address) over the same port."""
        bound = self._bound.get(source)
        if bound is None:
            bound = self._bound[source] = SourceBound(self, source)
        return bound

    def send(
        self, data: bytes, addr: Address, source: str | None = None,
        origin: SourceBound | None = None,
    ) -> None:
        if self._closed:
            raise OSError("shared-port transport is closed")
        if len(self._sends) >= MAX_IN_FLIGHT:
            self.counters.send_failed += 1
            raise OSError(f"{len(self._sends)} STUN sends waiting for the device owner")
        # Answers go back to whoever asked, whatever local address they arrive at.
        self._origins[data[8:20]] = origin
        while len(self._origins) > MAX_ORIGINS:
            self._origins.popitem(last=False)
        task = asyncio.create_task(self._send(data, addr, source))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, data: bytes, addr: Address, source: str | None) -> None:
        args: dict[str, Any] = {"dest": format_endpoint(addr), "data": data}
        if source is not None:
            args["source"] = source
        try:
            await self.owner.request(OP_STUN_SEND, **args)
        except Exception as exc:  # the retransmit timer copes; say why in the log
            self.counters.send_failed += 1
            logger.debug("stun_send to %s failed: %s", format_endpoint(addr), exc)
        else:
            self.counters.sent += 1

    # -- the ufrags the owner's filter reserves budgets for ---------------------------------

    @property
    def ufrags(self) -> frozenset[str]:
        return self._ufrags

    def set_ufrags(self, ufrags: Iterable[str]) -> None:
        """The local ufrags of all current checks (replacing the previous set); the owner
        learns them in the background."""
        new = frozenset(ufrags)
        if new == self._ufrags or self._closed:
            return
        self._ufrags = new
        if self._ufrag_push is None or self._ufrag_push.done():
            self._ufrag_push = asyncio.create_task(self._push_ufrags(), name="stun-ufrags")

    def add_ufrag(self, ufrag: str) -> None:
        self.set_ufrags(self._ufrags | {ufrag})

    def remove_ufrag(self, ufrag: str) -> None:
        self.set_ufrags(self._ufrags - {ufrag})

    async def ufrags_declared(self) -> None:
        """Wait until the owner has the latest set (or the push failed, logged)."""
        if self._ufrag_push is not None:
            await asyncio.shield(self._ufrag_push)

    async def _push_ufrags(self) -> None:
        # One request at a time, always with the newest set: requests are answered in
        # order, so the last one the owner gets is the current set.
        while True:
            pushing = self._ufrags
            try:
                await self.owner.request(OP_STUN_UFRAGS, ufrags=sorted(pushing))
            except Exception as exc:
                # Checks then share the strangers' budgets: slower under a flood, not lost.
                self.counters.ufrag_update_failed += 1
                logger.warning("could not declare %d ICE ufrags to the device owner: %s",
                               len(pushing), exc)
                return
            self.counters.ufrag_updates += 1
            if self._ufrags == pushing:
                return

    async def filter_report(self) -> dict[str, Any]:
        """What the owner's shared-port filter passed and dropped (its `stun_filter`
        counters), with this transport's own counters; {} when the owner cannot say."""
        try:
            stats = await self.owner.request(OP_STATS)
        except Exception as exc:
            logger.debug("device owner stats failed: %s", exc)
            return {}
        owner_side = stats.get("stun_filter")
        return {
            "owner": dict(owner_side) if isinstance(owner_side, dict) else {},
            "agent": asdict(self.counters),
            "ufrags": len(self._ufrags),
        }

    def handle_event(self, event: dict[str, Any]) -> bool:
        """Deliver a `stun` event to `receiver`; False for any other event."""
        if event.get("event") != EVENT_STUN:
            return False
        data, src, dst = event.get("data"), event.get("src"), event.get("dst")
        try:
            if not isinstance(data, bytes) or not isinstance(src, str) or not isinstance(dst, str):
                raise ProtocolError("stun event without bytes 'data', 'src' and 'dst'")
            if len(data) < STUN_HEADER_LEN:  # routing below reads the header
                raise ProtocolError(f"stun event of {len(data)} bytes, shorter than a header")
            addr = parse_endpoint(src, "src")
            local_ip, _ = parse_endpoint(dst, "dst")
        except ProtocolError as exc:
            self.counters.bad_events += 1
            logger.warning("bad stun event from the device owner: %s", exc)
            return True
        self.counters.received += 1
        # Response classes (success, error) have the C1 class bit, 0x0100, set.
        origin = self._origins.get(data[8:20]) if data[0] & 0x01 else None
        try:
            if origin is not None and origin.receiver is not None:
                origin.receiver(data, addr)
            elif self.local_receiver is not None:
                self.local_receiver(data, addr, local_ip)
            elif self.receiver is not None:
                self.receiver(data, addr)
        except Exception:
            logger.exception("STUN receiver failed")
        return True

    async def _pump_events(self) -> None:
        while True:
            event = await self.owner.events.get()
            if self.handle_event(event) or self.on_other_event is None:
                continue
            try:
                self.on_other_event(event)
            except Exception:
                logger.exception("device owner event callback failed")

    async def close(self) -> None:
        """Stop taking events and wait for sends in flight (the owner's socket stays)."""
        self._closed = True
        if self._ufrag_push is not None:
            self._ufrag_push.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ufrag_push
            self._ufrag_push = None
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=5.0)


class SourceBound:
    """The shared port seen from one local address: a `DatagramTransport` too."""

    def __init__(self, shared: OwnerStunTransport, source: str) -> None:
        self.shared = shared
        self.source = source
        self.receiver: Receiver | None = None

    def send(self, data: bytes, addr: Address) -> None:
        self.shared.send(data, addr, self.source, origin=self)
