"""The address and route side of the device, apart from WireGuard itself, and the facts
about the host's routing the owner judges requests against (kbwg.owner.guard)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Protocol

from kbwg.owner.wg_backend import BackendError

logger = logging.getLogger(__name__)

MAIN_TABLE = 254
RTN_UNICAST = 1
IFF_LOOPBACK = 0x8

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
_AF_INET = 2
_AF_INET6 = 10


@dataclass(frozen=True)
class HostRoute:
    destination: str
    # Worked out by the owner from the host's own routes, never taken from the agent.
    via: str | None
    ifname: str


@dataclass(frozen=True)
class Egress:
    ifname: str
    gateway: str | None


class NetConfig(Protocol):
    async def set_mtu(self, ifname: str, mtu: int) -> None: ...

    async def add_address(self, ifname: str, address: IPInterface) -> None: ...

    async def set_up(self, ifname: str) -> None: ...

    async def remove_address(self, ifname: str, address: IPInterface) -> None: ...

    async def add_route(self, route: HostRoute, replace: bool) -> None: ...

    async def remove_route(self, route: HostRoute) -> None: ...

    async def route_destinations(self, exclude_ifname: str | None) -> list[IPv4Network]:
        """The destinations of the host's IPv4 routes in every table, apart from default
        routes and routes through `exclude_ifname` (our own interface)."""
        ...

    async def egress(self, dst: IPAddress, ifname: str) -> Egress | None:
        """How the main table reaches `dst` (IPv4 or IPv6) through `ifname` only, or None."""
        ...

    async def is_loopback(self, ifname: str) -> bool: ...

    async def reap_link(self, ifname: str) -> None:
        """`ifname` is removed even if the owner is killed before it removes it."""
        ...

    def link_removed(self, ifname: str) -> None:
        """The owner removed `ifname` itself (after `reap_link`)."""
        ...


@dataclass(frozen=True)
class MainRoute:
    """One route of the main table, as far as egress choice cares."""

    network: IPNetwork
    ifname: str | None
    gateway: str | None
    metric: int
    unicast: bool


async def host_route_destinations(exclude_ifname: str | None) -> list[IPv4Network]:
    """The destinations of the host's IPv4 routes in every table, apart from default
    routes and routes through `exclude_ifname` (read-only netlink; no privileges needed).

    Every table, not only main: an address of another VPN (its local route) or a
    policy-routing table counts as the host's too."""
    from pyroute2.iproute.linux import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        names = {link["index"]: link.get("ifname") async for link in await ipr.get_links()}
        raw = [r async for r in await ipr.get_routes(family=2)]
    found = []
    for route in raw:
        length = int(route.get("dst_len") or 0)
        dst = route.get("dst")
        if length == 0 or not dst:
            continue
        if exclude_ifname is not None and names.get(route.get("oif")) == exclude_ifname:
            continue
        found.append(IPv4Network(f"{dst}/{length}", strict=False))
    return found


async def main_table_routes(family: int = _AF_INET) -> list[MainRoute]:
    """The main table's routes of one family, IPv4 unless `family` is 10 (AF_INET6)
    (read-only netlink; no privileges needed)."""
    from pyroute2.iproute.linux import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        names = {link["index"]: link.get("ifname") async for link in await ipr.get_links()}
        raw = [r async for r in await ipr.get_routes(family=family, table=MAIN_TABLE)]
    routes = []
    for route in raw:
        dst = route.get("dst") or ("::" if family == _AF_INET6 else "0.0.0.0")
        routes.append(MainRoute(
            network=ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False),
            ifname=names.get(route.get("oif")),
            gateway=route.get("gateway"),
            metric=int(route.get("priority") or 0),
            unicast=route["type"] == RTN_UNICAST,
        ))  # fmt: skip
    return routes


def choose_egress(routes: Iterable[MainRoute], dst: IPAddress, via_ifname: str | None = None,
                  ignore: Iterable[IPNetwork] = ()) -> Egress | None:
    """The route the kernel would pick for `dst` (longest prefix, then lowest metric),
    optionally only among those through `via_ifname` and leaving out `ignore` (routes
    of our own)."""
    skipped = set(ignore)
    best: tuple[int, int] | None = None
    found: Egress | None = None
    for route in routes:
        if not route.unicast or route.ifname is None or route.network in skipped:
            continue
        if via_ifname is not None and route.ifname != via_ifname:
            continue
        if dst not in route.network:
            continue
        rank = (-route.network.prefixlen, route.metric)
        if best is None or rank < best:
            best, found = rank, Egress(route.ifname, route.gateway)
    return found


def _family(dst: IPAddress) -> int:
    return _AF_INET6 if dst.version == 6 else _AF_INET


async def egress_for(dst: str, via_ifname: str | None = None,
                     ignore: Iterable[IPNetwork] = ()) -> Egress | None:
    """How the main table reaches `dst` (IPv4 or IPv6), optionally only through
    `via_ifname`."""
    address = ipaddress.ip_address(dst)
    return choose_egress(await main_table_routes(_family(address)), address, via_ifname, ignore)


class NetlinkNetConfig:
    """NetConfig through pyroute2's rtnetlink, one short-lived socket per call."""

    async def _index(self, ipr: Any, ifname: str) -> int:
        indexes = await ipr.link_lookup(ifname=ifname)
        if not indexes:
            raise BackendError(f"no interface named {ifname}")
        return int(indexes[0])

    async def set_mtu(self, ifname: str, mtu: int) -> None:
        from pyroute2.iproute.linux import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            await ipr.link("set", index=await self._index(ipr, ifname), mtu=mtu)

    async def add_address(self, ifname: str, address: IPInterface) -> None:
        from pyroute2.iproute.linux import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            await ipr.addr(
                "add",
                index=await self._index(ipr, ifname),
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
            )

    async def set_up(self, ifname: str) -> None:
        from pyroute2.iproute.linux import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            await ipr.link("set", index=await self._index(ipr, ifname), state="up")

    async def remove_address(self, ifname: str, address: IPInterface) -> None:
        from pyroute2.iproute.linux import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            indexes = await ipr.link_lookup(ifname=ifname)
            if not indexes:
                # The address went with its link.
                return
            await ipr.addr(
                "del", index=indexes[0], address=str(address.ip),
                prefixlen=address.network.prefixlen,
            )  # fmt: skip

    def _route_args(self, index: int, route: HostRoute) -> dict[str, Any]:
        network = ipaddress.ip_network(route.destination)
        args: dict[str, Any] = {
            "dst": str(network.network_address),
            "dst_len": network.prefixlen,
            "oif": index,
            "family": 10 if network.version == 6 else 2,
        }
        if route.via is not None:
            args["gateway"] = route.via
        return args

    async def add_route(self, route: HostRoute, replace: bool) -> None:
        from pyroute2.iproute.linux import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            index = await self._index(ipr, route.ifname)
            await ipr.route("replace" if replace else "add", **self._route_args(index, route))

    async def remove_route(self, route: HostRoute) -> None:
        from pyroute2.iproute.linux import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            indexes = await ipr.link_lookup(ifname=route.ifname)
            if not indexes:
                return
            await ipr.route("del", **self._route_args(indexes[0], route))

    async def route_destinations(self, exclude_ifname: str | None) -> list[IPv4Network]:
        return await host_route_destinations(exclude_ifname)

    async def egress(self, dst: IPAddress, ifname: str) -> Egress | None:
        return choose_egress(await main_table_routes(_family(dst)), dst, via_ifname=ifname)

    async def is_loopback(self, ifname: str) -> bool:
        from pyroute2.iproute.linux import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            index = await self._index(ipr, ifname)
            links = [link async for link in await ipr.get_links(index)]
        return any(int(link["flags"]) & IFF_LOOPBACK for link in links)

    async def reap_link(self, ifname: str) -> None:
        pass  # no reaper here: ReapedNetConfig has one

    def link_removed(self, ifname: str) -> None:
        pass

    async def link_index(self, ifname: str) -> int:
        from pyroute2.iproute.linux import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            return await self._index(ipr, ifname)

    async def remove_link(self, ifname: str, index: int) -> bool:
        """Remove the link `index` if it is still named `ifname` (a link made since
        under that name has another index); whether it was there to remove."""
        from pyroute2.iproute.linux import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            if index not in await ipr.link_lookup(ifname=ifname):
                return False
            await ipr.link("del", index=index)
        return True
