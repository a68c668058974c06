"""What the owner reads of the host's network on the agent's behalf: its addresses, its
default gateway, its routes and their changes (the read-only ops of kbwg.owner.protocol).

A collaborator of kbwg.owner.server.OwnerServer, like NetConfig: `NetlinkHostNetwork`
reads rtnetlink through pyroute2 (which the agent then never loads); tests pass their
own. Nothing here changes the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from ipaddress import IPv4Network
from typing import Protocol

from kbwg.core.interface_address import InterfaceAddress
from kbwg.owner.interfaces import GatewayRecord, default_gateway, interface_addresses
from kbwg.owner.netconfig import (
    Egress,
    IPAddress,
    IPNetwork,
    choose_egress,
    host_route_destinations,
    main_table_routes,
)
from kbwg.owner.netlink_watch import NetworkChange, keep_watching

_AF_INET6 = 10
_AF_INET = 2


class HostNetwork(Protocol):

    async def interfaces(self) -> list[InterfaceAddress]:
        ...

    async def default_gateway(self) -> GatewayRecord | None:
        ...

    async def route_destinations(self, exclude_ifname: str) -> list[IPv4Network]:
        ...

    async def egress(self, dst: IPAddress, via_ifname: str | None,
                     ignore: Iterable[IPNetwork]) -> Egress | None:
        ...

    async def watch(self, on_change: Callable[[NetworkChange], None],
                    own_ifname: Callable[[], str | None]) -> None:
        """Report changes until cancelled."""
        ...


class NetlinkHostNetwork:
    """The host itself, through rtnetlink (one short-lived socket per read)."""

    async def interfaces(self) -> list[InterfaceAddress]:
        return await interface_addresses()

    async def default_gateway(self) -> GatewayRecord | None:
        return await default_gateway()

    async def route_destinations(self, exclude_ifname: str) -> list[IPv4Network]:
        return await host_route_destinations(exclude_ifname)

    async def egress(self, dst: IPAddress, via_ifname: str | None,
                     ignore: Iterable[IPNetwork]) -> Egress | None:
        routes = await main_table_routes(_AF_INET6 if dst.version == 6 else _AF_INET)
        return choose_egress(routes, dst, via_ifname, ignore)

    async def watch(self, on_change: Callable[[NetworkChange], None],
                    own_ifname: Callable[[], str | None]) -> None:
        await keep_watching(on_change, own_ifname)
