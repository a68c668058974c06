"""Host routes that make WireGuard follow a multi-homed choice.

WireGuard's packets follow the routing table. When the pair chosen for a peer leaves
from an uplink the table would not pick for that peer's address, the device owner adds
a host route for the address through that uplink (its gateway is that uplink's own
route towards the address, for example a higher-metric default route); when the
choice moves back, or the peer goes, the route goes too.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from pyroute2 import AsyncIPRoute

from kbwg.agent.owner_client import DeviceOwner, OwnerError

log = logging.getLogger(__name__)

MAIN_TABLE = 254


@dataclass(frozen=True)
class Egress:
    ifname: str
    gateway: str | None


async def egress_for(dst: str, via_ifname: str | None = None) -> Egress | None:
    """How the main table reaches `dst`, optionally only through `via_ifname`."""
    address = ipaddress.IPv4Address(dst)
    async with AsyncIPRoute() as ipr:
        names = {link["index"]: link.get("ifname") async for link in await ipr.get_links()}
        routes = [r async for r in await ipr.get_routes(family=2, table=MAIN_TABLE)]
    best: tuple[int, int] | None = None
    found: Egress | None = None
    for route in routes:
        ifname = names.get(route.get("oif"))
        if ifname is None or (via_ifname is not None and ifname != via_ifname):
            continue
        dst_net = route.get("dst") or "0.0.0.0"
        network = ipaddress.IPv4Network(f"{dst_net}/{route['dst_len']}", strict=False)
        if address not in network:
            continue
        # Longest prefix first, then the lowest metric, as the kernel chooses.
        rank = (-route["dst_len"], route.get("priority") or 0)
        if best is None or rank < best:
            best, found = rank, Egress(ifname, route.get("gateway"))
    return found


@dataclass
class HostRoutes:
    """The host routes this agent asked the device owner for, one per peer at most."""

    owner: DeviceOwner
    routes: dict[str, str]  # peer key -> destination "ip/32"

    @classmethod
    def new(cls, owner: DeviceOwner) -> HostRoutes:
        return cls(owner, {})

    async def follow(self, peer: str, remote_ip: str, local_ifname: str | None) -> str | None:
        """Make traffic to `remote_ip` leave through `local_ifname`; returns a sentence
        when a route was needed, None when the table already agrees."""
        wanted: Egress | None = None
        if local_ifname is not None:
            default = await egress_for(remote_ip)
            if default is not None and default.ifname != local_ifname:
                wanted = await egress_for(remote_ip, via_ifname=local_ifname)
                if wanted is None:
                    log.warning("no route to %s through %s; leaving the table's choice (%s)",
                                remote_ip, local_ifname, default.ifname)
        await self.clear(peer)
        if wanted is None:
            return None
        destination = f"{remote_ip}/32"
        if destination in self.routes.values():
            return f"host route {destination} already set for another peer"
        try:
            await self.owner.request("add_route", destination=destination,
                                     via=wanted.gateway, ifname=wanted.ifname)
        except OwnerError as exc:
            log.warning("cannot add host route %s: %s", destination, exc)
            return None
        self.routes[peer] = destination
        via = f" via {wanted.gateway}" if wanted.gateway else ""
        log.info("host route %s%s dev %s for %s", destination, via, wanted.ifname, peer)
        return f"host route {destination}{via} dev {wanted.ifname}"

    async def clear(self, peer: str) -> None:
        destination = self.routes.pop(peer, None)
        if destination is not None:
            try:
                await self.owner.request("remove_route", destination=destination)
            except Exception as exc:
                log.warning("removing host route %s failed: %s", destination, exc)
