"""The host's interface addresses and default IPv4 gateway, read for the agent.

The agent gathers host candidates from these and maps its port on this gateway; it
asks the owner (ops `interfaces`, `default_gateway`) so that it never loads pyroute2,
which the owner has loaded anyway. Read-only rtnetlink: any user may read the same.

IPv6 addresses that are still tentative (duplicate address detection), failed it, or
are deprecated are left out: the kernel will not send from them, or not for long.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kbwg.core.interface_address import InterfaceAddress
from kbwg.owner.netconfig import MAIN_TABLE

_IFF_UP = 0x1
_AF_INET = 2
AF_INET6 = 10
# linux/if_addr.h: an IPv6 address the kernel cannot (or soon will not) send from.
IFA_F_UNUSABLE = 0x40 | 0x20 | 0x08  # tentative, deprecated, dadfailed


@dataclass(frozen=True)
class GatewayRecord:
    """The default IPv4 gateway and our address on its network (mappings name it)."""

    address: str
    local_ip: str
    interface: str | None

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "local_ip": self.local_ip,
                "interface": self.interface}  # fmt: skip


def address_flags(msg: Any) -> int:
    """An address message's flags: IFA_FLAGS (32 bits) when present, else the header's 8."""
    get_attr = getattr(msg, "get_attr", None)
    flags = get_attr("IFA_FLAGS") if callable(get_attr) else None
    if flags is None:
        flags = msg.get("flags")
    return flags if isinstance(flags, int) else 0


async def interface_addresses() -> list[InterfaceAddress]:
    """Every IPv4 and usable IPv6 address on this host with its interface."""
    from pyroute2.iproute.linux import AsyncIPRoute

    result = []
    async with AsyncIPRoute() as ipr:
        links = {link["index"]: link async for link in await ipr.get_links()}
        for family in (_AF_INET, AF_INET6):
            # "Default route" per family: an IPv6 default route says nothing of IPv4's.
            default_oifs = {
                route.get("oif")
                async for route in await ipr.get_routes(family=family, table=MAIN_TABLE)
                if route["dst_len"] == 0
            }
            async for msg in await ipr.get_addr(family=family):
                link = links.get(msg["index"])
                if link is None or (family == AF_INET6 and address_flags(msg) & IFA_F_UNUSABLE):
                    continue
                address = msg.get("address")
                if not address:
                    continue
                result.append(InterfaceAddress(
                    interface=str(link.get("ifname")),
                    index=int(msg["index"]),
                    address=str(address),
                    prefixlen=int(msg["prefixlen"]),
                    up=bool(link["flags"] & _IFF_UP),
                    default_route=msg["index"] in default_oifs,
                ))  # fmt: skip
    return result


async def default_gateway() -> GatewayRecord | None:
    """The main table's default IPv4 gateway of lowest metric that has a source address
    towards it, or None."""
    from pyroute2.iproute.linux import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        routes = [r async for r in await ipr.get_routes(family=_AF_INET, table=MAIN_TABLE)
                  if r["dst_len"] == 0 and r.get("gateway")]
        routes.sort(key=lambda r: r.get("priority") or 0)
        for route in routes:
            gateway = str(route.get("gateway"))
            # A list, unlike the dumps above.
            answer = list(await ipr.route("get", dst=gateway))
            source = answer[0].get("prefsrc") if answer else None
            if not source:
                continue
            oif = route.get("oif")
            links = [link async for link in await ipr.get_links(oif)] if oif else []
            name = links[0].get("ifname") if links else None
            return GatewayRecord(gateway, str(source), str(name) if name else None)
    return None
