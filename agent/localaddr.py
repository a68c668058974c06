"""Which local address to announce when the user does not give one.

The prototype announced one endpoint; until negotiation exists, the address of the
interface carrying the default route is the one most peers can reach.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from pyroute2 import AsyncIPRoute

# Interfaces that never carry a peer's traffic to us.
_VIRTUAL_PREFIXES = ("lo", "wg", "kbwg", "tun", "tap", "docker", "veth", "virbr")


def _usable(ip: str) -> bool:
    addr = ipaddress.IPv4Address(ip)
    return not (addr.is_loopback or addr.is_link_local or addr.is_multicast)


async def pick_announce_address(exclude_ifnames: Iterable[str] = ()) -> str | None:
    excluded = set(exclude_ifnames)
    async with AsyncIPRoute() as ipr:
        names = {link["index"]: link.get("ifname") async for link in await ipr.get_links()}
        addresses: dict[int, list[str]] = {}
        async for msg in await ipr.get_addr(family=2):
            addresses.setdefault(msg["index"], []).append(msg.get("address"))
        routes = [r async for r in await ipr.get_routes(family=2, table=254)]
    for route in routes:
        if route["dst_len"] != 0:
            continue
        prefsrc = route.get("prefsrc")
        if prefsrc and _usable(prefsrc):
            return str(prefsrc)
        oif = route.get("oif")
        for ip in addresses.get(oif, []):
            if _usable(ip) and names.get(oif) not in excluded:
                return str(ip)
    for index, ips in sorted(addresses.items()):
        name = names.get(index) or ""
        if name in excluded or name.startswith(_VIRTUAL_PREFIXES):
            continue
        for ip in ips:
            if _usable(ip):
                return str(ip)
    return None
