"""Host routes that make WireGuard follow a multi-homed choice.

WireGuard's packets follow the routing table. When the pair chosen for a peer leaves
from an uplink the table would not pick for that peer's address, the agent asks the
device owner for a host route to the address through that uplink. The agent names only
the uplink; the owner finds its gateway itself (that uplink's own route towards the
address, for example a higher-metric default route) and adds the route only towards
the endpoint of a current peer, so the peer's endpoint must be set first. When the
choice moves back, or the peer goes, the route goes too. What the table would do is
the owner's to read too (`egress`, which leaves its own host routes out).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import ip_network

from kbwg.agent.owner_calls import OwnerCalls
from kbwg.agent.owner_client import OwnerError

log = logging.getLogger(__name__)


@dataclass
class HostRoutes:
    """The host routes this agent asked the device owner for, one per peer at most."""

    owner: OwnerCalls
    routes: dict[str, str]  # peer key -> destination "ip/32" or "ip/128"

    @classmethod
    def new(cls, owner: OwnerCalls) -> HostRoutes:
        return cls(owner, {})

    async def follow(self, peer: str, remote_ip: str, local_ifname: str | None) -> str | None:
        """Make traffic to `remote_ip` (already the peer's WireGuard endpoint) leave
        through `local_ifname`; returns a sentence when a route was needed, None when
        the table already agrees."""
        destination = f"{remote_ip}/128" if ":" in remote_ip else f"{remote_ip}/32"
        uplink = await self._uplink_needed(destination, remote_ip, local_ifname)
        if self.routes.get(peer) != destination or uplink is None:
            await self.clear(peer)
        if uplink is None:
            return None
        if any(d == destination for p, d in self.routes.items() if p != peer):
            return f"host route {destination} already set for another peer"
        try:
            # Our own route to it, if any, is replaced by the owner.
            added = await self.owner.add_route(ip_network(destination), uplink)
        except OwnerError as exc:
            log.warning("cannot add host route %s: %s", destination, exc)
            await self.clear(peer)
            return None
        self.routes[peer] = destination
        via = f" via {added.via}" if added.via else ""
        dev = added.ifname
        log.info("host route %s%s dev %s for %s", destination, via, dev, peer)
        return f"host route {destination}{via} dev {dev}"

    async def _uplink_needed(self, destination: str, remote_ip: str,
                             local_ifname: str | None) -> str | None:
        """`local_ifname` when the table (apart from our own route to the address)
        would send traffic to `remote_ip` elsewhere and that uplink can reach it."""
        if local_ifname is None:
            return None
        try:
            default = await self.owner.egress(remote_ip)
            if default is None or default.ifname == local_ifname:
                return None
            through = await self.owner.egress(remote_ip, local_ifname)
        except OwnerError as exc:
            log.warning("cannot read the routes to %s: %s", destination, exc)
            return None
        if through is None:
            log.warning("no route to %s through %s; leaving the table's choice (%s)",
                        remote_ip, local_ifname, default.ifname)
            return None
        return local_ifname

    async def clear(self, peer: str) -> None:
        destination = self.routes.pop(peer, None)
        if destination is not None:
            try:
                await self.owner.remove_route(ip_network(destination))
            except Exception as exc:
                log.warning("removing host route %s failed: %s", destination, exc)
