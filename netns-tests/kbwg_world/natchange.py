"""What a NAT router does to its mappings in real life: forget them (a conntrack flush,
as after a reboot or a timeout) or move to a new public address (a new DHCP lease)."""

from __future__ import annotations

import sys
from ipaddress import IPv4Address

from kbwg_world.world import Router

_FLUSH = "from pyroute2 import Conntrack; Conntrack().flush()"


def forget_mappings(router: Router) -> None:
    """Every conntrack entry of the router goes: its NAT mappings and the firewall's
    "established" state with them."""
    router.run([sys.executable, "-c", _FLUSH])


def new_public_address(router: Router) -> str:
    """Move the router's WAN to a free address of its segment (the old one goes, and
    every mapping with it); returns the new address."""
    assert router.wan is not None
    iface = router.interfaces[0]
    old = iface.addresses[0]
    new = router.wan.allocate()
    prefix = router.wan.subnet_of(old).prefixlen
    # The new address joins the old one's subnet as a secondary: promoted when the old
    # one goes, instead of going with it.
    router.run(["sysctl", "-q", "-w", f"net.ipv4.conf.{iface.name}.promote_secondaries=1"])
    router.run(["sh", "-c", f"ip addr add {new}/{prefix} dev {iface.name} && "
                f"ip addr del {old}/{prefix} dev {iface.name}"])  # fmt: skip
    iface.addresses[0] = IPv4Address(new)
    forget_mappings(router)
    return str(new)
