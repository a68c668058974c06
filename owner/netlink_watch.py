"""The host's address, route and link changes, read from netlink for the agent
(`watch_network`), filtered and coalesced into `network` events.

A network change (a new DHCP lease, an uplink going away) makes the agent's candidates
stale: it re-gathers and renegotiates. The owner reads the changes because it has
pyroute2 loaded anyway, and the agent then never loads it. Filtered here: changes on the
owner's own WireGuard device and host routes (/32: the owner's own for multi-homed
choices, or a peer's) are not network changes, or every path switch would trigger the
next. Coalesced here: at most one event per interval goes to the agent (the latest
change, with how many it stands for), so a netlink storm (a flapping link, a routing
daemon rewriting its table) cannot flood the pipe. The agent debounces what it gets.

IPv6 is watched too (an IPv6-only network moves as an IPv4 one does), with its own
noise left out: every router advertisement refreshes the lifetimes of the addresses and
routes it made, and the kernel says so with RTM_NEWADDR and RTM_NEWROUTE for what it
already had. So IPv6 addresses and main-table routes are remembered from these messages,
and only a new one, a gone one, or an address becoming usable or unusable (duplicate
address detection done, deprecated) is a change. Nothing is dumped into that memory
when the watch opens (a change made between such a dump and the agent's first gathering
would be lost): the first refresh of what the host already had is reported instead, one
more gathering at most, once. Link-local addresses and routes (fe80::/10, multicast)
are never candidates' business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kbwg.core.addresses import parse_ip
from kbwg.owner.interfaces import AF_INET6, IFA_F_UNUSABLE, address_flags
from kbwg.owner.netconfig import MAIN_TABLE

logger = logging.getLogger(__name__)

ADDRESS_EVENTS = frozenset({"RTM_NEWADDR", "RTM_DELADDR"})
ROUTE_EVENTS = frozenset({"RTM_NEWROUTE", "RTM_DELROUTE"})
LINK_EVENTS = frozenset({"RTM_NEWLINK", "RTM_DELLINK"})
CHANGES = ADDRESS_EVENTS | ROUTE_EVENTS | LINK_EVENTS
# The agent debounces half a second: a few events a second lose it nothing.
DEFAULT_INTERVAL_S = 0.2
# A watch whose socket failed is opened again after this long.
RETRY_S = 5.0


@dataclass(frozen=True)
class NetworkChange:
    change: str  # one of CHANGES
    ifname: str | None


class NetlinkMessage(Protocol):
    """What is read of a pyroute2 message (tests pass dicts)."""

    def get(self, key: str, default: Any = None) -> Any: ...


@dataclass
class ChangeFilter:
    """Turns netlink messages into the changes the agent cares about, keeping the
    interface names current (route messages name only an index) and the IPv6 addresses
    and routes known (module docstring)."""

    names: dict[int, str | None] = field(default_factory=dict)
    # (index, address) -> whether the kernel may send from it.
    v6_addresses: dict[tuple[int, str], bool] = field(default_factory=dict)
    v6_routes: set[tuple[object, ...]] = field(default_factory=set)

    def classify(self, msg: NetlinkMessage, own_ifname: str | None) -> NetworkChange | None:
        event = msg.get("event")
        if event not in CHANGES:
            return None
        is_route = event in ROUTE_EVENTS
        index = msg.get("oif") if is_route else msg.get("index")
        if event in LINK_EVENTS and isinstance(index, int):
            name = msg.get("ifname")
            self.names[index] = name if isinstance(name, str) else None
        ifname = self.names.get(index) if isinstance(index, int) else None
        if own_ifname is not None and ifname == own_ifname:
            return None
        if is_route and msg.get("dst_len") in (32, 128):
            return None  # host routes: ours (multi-homed choices) or a peer's
        if msg.get("family") == AF_INET6 and not self._v6_changed(str(event), msg):
            return None
        return NetworkChange(str(event), ifname)

    def _v6_changed(self, event: str, msg: NetlinkMessage) -> bool:
        """Whether an IPv6 address or route message changes what is known (and learn it)."""
        if event in ADDRESS_EVENTS:
            address = msg.get("address")
            if not isinstance(address, str) or _link_scoped(address):
                return False
            index = msg.get("index")
            key = (index if isinstance(index, int) else -1, address)
            if event == "RTM_DELADDR":
                self.v6_addresses.pop(key, None)
                return True
            usable = not address_flags(msg) & IFA_F_UNUSABLE
            known = self.v6_addresses.get(key)
            self.v6_addresses[key] = usable
            return known != usable
        if event in ROUTE_EVENTS:
            dst = msg.get("dst")
            if msg.get("table") != MAIN_TABLE or (isinstance(dst, str) and _link_scoped(dst)):
                return False
            route = _route_key(msg)
            if event == "RTM_DELROUTE":
                self.v6_routes.discard(route)
                return True
            if route in self.v6_routes:
                return False
            self.v6_routes.add(route)
            return True
        return True


def _route_key(msg: NetlinkMessage) -> tuple[object, ...]:
    return (msg.get("dst"), msg.get("dst_len"), msg.get("gateway"), msg.get("oif"),
            msg.get("priority"))


def _link_scoped(address: str) -> bool:
    try:
        ip = parse_ip(address)
    except ValueError:
        return True  # nothing a candidate could be
    return ip.is_link_local or ip.is_multicast


@dataclass
class Coalescer:
    """Passes a change on at once when none went in the last `interval` seconds; else
    keeps the latest and passes it on when the interval is over. An address removed is
    kept over later changes: the agent acts on that one at once (what sends from the
    address must stop), and a burst's route removals must not hide it."""

    emit: Callable[[NetworkChange, int], None]
    interval: float = DEFAULT_INTERVAL_S
    _last_sent: float | None = None
    _pending: NetworkChange | None = None
    _count: int = 0
    _timer: asyncio.TimerHandle | None = None

    def note(self, change: NetworkChange) -> None:
        if self._pending is None or self._pending.change != "RTM_DELADDR":
            self._pending = change
        self._count += 1
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        wait = 0.0 if self._last_sent is None else self._last_sent + self.interval - loop.time()
        if wait <= 0:
            self._flush()
        else:
            self._timer = loop.call_later(wait, self._flush)

    def _flush(self) -> None:
        self._timer = None
        change, count = self._pending, self._count
        self._pending, self._count = None, 0
        if change is None:
            return
        self._last_sent = asyncio.get_running_loop().time()
        self.emit(change, count)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def watch_netlink(on_change: Callable[[NetworkChange], None],
                        own_ifname: Callable[[], str | None]) -> None:
    """Report the host's address, route and link changes until cancelled."""
    from pyroute2.iproute.linux import AsyncIPRoute
    from pyroute2.netlink.rtnl import (
        RTMGRP_IPV4_IFADDR,
        RTMGRP_IPV4_ROUTE,
        RTMGRP_IPV6_IFADDR,
        RTMGRP_IPV6_ROUTE,
        RTMGRP_LINK,
    )

    async with AsyncIPRoute() as ipr:
        await ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR
                       | RTMGRP_IPV6_ROUTE | RTMGRP_LINK)
        changes = ChangeFilter({link["index"]: link.get("ifname")
                                async for link in await ipr.get_links()})
        logger.info("watching the network for the agent")
        while True:  # get() ends after each batch of messages
            async for msg in ipr.get():
                change = changes.classify(msg, own_ifname())
                if change is not None:
                    logger.debug("network change: %s on %s", change.change, change.ifname)
                    on_change(change)


async def keep_watching(on_change: Callable[[NetworkChange], None],
                        own_ifname: Callable[[], str | None],
                        watch: Callable[..., Any] = watch_netlink,
                        retry_s: float = RETRY_S) -> None:
    """`watch` until cancelled, opened again after a failure (each failure reported to
    the agent as a change: what happened meanwhile is unknown)."""
    while True:
        try:
            await watch(on_change, own_ifname)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("watching the network failed (%s); again in %.0fs", exc, retry_s)
        await asyncio.sleep(retry_s)
        on_change(NetworkChange("RESUBSCRIBED", None))
