"""The default IPv4 gateway and the local address that reaches it (netlink, pyroute2).

`join` asks the device owner instead (PortMapper's `find_gateway`), so that the agent
never loads pyroute2; `diag`, which runs without an owner, reads netlink itself."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

_AF_INET = 2
_MAIN_TABLE = 254


@dataclass(frozen=True)
class Gateway:
    address: str
    local_ip: str  # our address on the gateway's network: mappings name it
    interface: str | None = None


def find_default_gateway() -> Gateway | None:
    """Blocking (pyroute2 refuses a thread with a running loop): use `default_gateway()`."""
    from pyroute2 import IPRoute  # a fifth of a second to import: only when needed

    with IPRoute() as ipr:
        defaults = sorted(
            (r for r in ipr.get_routes(family=_AF_INET, table=_MAIN_TABLE)
             if r["dst_len"] == 0 and r.get_attr("RTA_GATEWAY")),
            key=lambda r: r.get_attr("RTA_PRIORITY") or 0)
        for route in defaults:
            gateway = str(route.get_attr("RTA_GATEWAY"))
            answer = ipr.route("get", dst=gateway)
            source = answer[0].get_attr("RTA_PREFSRC") if answer else None
            if not source:
                continue
            oif = route.get_attr("RTA_OIF")
            links = ipr.get_links(oif) if oif else []
            name = links[0].get_attr("IFLA_IFNAME") if links else None
            return Gateway(gateway, str(source), str(name) if name else None)
    return None


async def default_gateway() -> Gateway | None:
    try:
        return await asyncio.to_thread(find_default_gateway)
    except Exception as exc:  # netlink trouble must not stop the agent: no mapping then
        log.info("cannot read the default gateway: %s", exc)
        return None
