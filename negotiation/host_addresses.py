"""The host's interface addresses as gathering sees them, and where they come from.

Gathering takes them from an `InterfaceSource`, a callable the caller passes in: the
agent's asks the device owner (which reads netlink, so the agent never loads pyroute2);
`list_interface_addresses` reads netlink itself, for `diag`, which runs without an owner.
A module of its own, light to import: the agent's owner calls build these records
before the data path's modules (aioice among them) have loaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

_IFF_UP = 0x1
_AF_INET = 2
_AF_INET6 = 10
# linux/if_addr.h: an IPv6 address the kernel cannot (or soon will not) send from.
_IFA_F_UNUSABLE = 0x40 | 0x20 | 0x08  # tentative, deprecated, dadfailed


@dataclass(frozen=True)
class InterfaceAddress:
    interface: str
    index: int
    address: str
    prefixlen: int
    up: bool
    default_route: bool


# What gathering needs of the host: its addresses, when asked.
InterfaceSource = Callable[[], Awaitable[Sequence[InterfaceAddress]]]


def list_interface_addresses() -> list[InterfaceAddress]:
    """Every IPv4 and usable IPv6 address on this host with its interface, via netlink.

    Blocking, and pyroute2 0.9's IPRoute refuses to run in a thread with a running
    event loop: from async code use `interface_addresses()`. Only `diag` reads the host
    itself this way; `join` asks the device owner.
    """
    # pyroute2 takes ~0.2 s to import: only when this is called.
    from pyroute2 import IPRoute

    result = []
    with IPRoute() as ipr:
        links = {link["index"]: link for link in ipr.get_links()}
        for family in (_AF_INET, _AF_INET6):
            # "Default route" per family: an IPv6 default route says nothing of IPv4's.
            default_oifs = {
                route.get_attr("RTA_OIF") for route in ipr.get_routes(family=family, table=254)
                if route["dst_len"] == 0
            }
            for msg in ipr.get_addr(family=family):
                link = links.get(msg["index"])
                flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
                if link is None or (family == _AF_INET6 and flags & _IFA_F_UNUSABLE):
                    continue
                result.append(InterfaceAddress(
                    interface=str(link.get_attr("IFLA_IFNAME")),
                    index=int(msg["index"]),
                    address=str(msg.get_attr("IFA_ADDRESS")),
                    prefixlen=int(msg["prefixlen"]),
                    up=bool(link["flags"] & _IFF_UP),
                    default_route=msg["index"] in default_oifs,
                ))
    return result


async def interface_addresses() -> list[InterfaceAddress]:
    """`list_interface_addresses` in a thread: an `InterfaceSource` reading the host."""
    return await asyncio.to_thread(list_interface_addresses)
