"""NAT types and the nftables rule set a router namespace loads."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class NatMode(enum.Enum):
    """How a router maps its LAN onto its WAN address.

    Measured behaviour on this kernel (see DESIGN): plain `masquerade` keeps the source port
    and maps endpoint-independently; `random` and `fully-random` choose a port per
    destination (symmetric NAT).
    """

    NONE = "none"  # plain routing: the LAN is announced to the WAN segment as a route
    MASQUERADE = "masquerade"  # port-preserving, endpoint-independent mapping
    MASQUERADE_RANDOM = "masquerade random"  # symmetric
    FULLY_RANDOM = "masquerade fully-random"  # symmetric
    STATIC_DNAT = "static dnat"  # masquerade plus UDP port forwards


@dataclass(frozen=True)
class PortForward:
    """UDP traffic to the router's WAN on `wan_port` goes to `host_ip:host_port`."""

    wan_port: int
    host_ip: str
    host_port: int


@dataclass
class RouterRules:
    """Everything that decides a router's nftables rule set."""

    wan_if: str
    lan_if: str
    nat: NatMode
    firewall: bool
    forwards: list[PortForward] = field(default_factory=list)
    # The LAN has global IPv6: routed, never NATed, but behind the same firewall.
    ipv6: bool = False

    def render(self) -> str:
        """The rule set, replacing the router's tables atomically (`nft -f`)."""
        lines: list[str] = []
        # Declaring then deleting makes the load idempotent without failing on a first load.
        for table in ("kbwg_nat", "kbwg_fw"):
            lines += [f"table ip {table} {{}}", f"delete table ip {table}"]
        if self.nat is not NatMode.NONE:
            lines += self._nat_table()
        if self.firewall:
            lines += self._firewall_table()
        if self.ipv6:
            lines += ["table ip6 kbwg_fw6 {}", "delete table ip6 kbwg_fw6"]
            if self.firewall:
                lines += self._firewall6_table()
        return "\n".join(lines) + "\n"

    def _nat_table(self) -> list[str]:
        masq = {
            NatMode.MASQUERADE: "masquerade",
            NatMode.STATIC_DNAT: "masquerade",
            NatMode.MASQUERADE_RANDOM: "masquerade random",
            NatMode.FULLY_RANDOM: "masquerade fully-random",
        }[self.nat]
        dnat = [
            f'    iifname "{self.wan_if}" udp dport {fw.wan_port} '
            f"dnat to {fw.host_ip}:{fw.host_port}"
            for fw in self.forwards
        ]
        return [
            "table ip kbwg_nat {",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            *dnat,
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f'    oifname "{self.wan_if}" {masq}',
            "  }",
            "}",
        ]

    def _firewall6_table(self) -> list[str]:
        # IPv6 is routed, so no mapping to keep: only the home router's stateful filter
        # (RFC 6092), under which peers must punch as through a port-restricted NAT.
        # ICMPv6 always passes: neighbour discovery and path MTU discovery need it.
        return [
            "table ip6 kbwg_fw6 {",
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            "    meta l4proto ipv6-icmp accept",
            f'    iifname "{self.wan_if}" ct state established,related accept',
            f'    iifname "{self.wan_if}" drop',
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy drop;",
            "    meta l4proto ipv6-icmp accept",
            "    ct state established,related accept",
            f'    iifname "{self.lan_if}" oifname "{self.wan_if}" accept',
            "  }",
            "}",
        ]

    def _firewall_table(self) -> list[str]:
        # Home-router behaviour: without the drop of unsolicited inbound, an early packet from
        # a peer creates a conntrack entry and the NAT remaps the later outbound flow to another
        # port, which real routers don't do (DESIGN, "NAT routers also run a stateful firewall").
        # A packet to an unmapped WAN port is for the router itself, so the drop that matters
        # for that is in `input`: dropped before confirmation, it leaves no conntrack entry.
        return [
            "table ip kbwg_fw {",
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            f'    iifname "{self.wan_if}" ct state established,related accept',
            f'    iifname "{self.wan_if}" icmp type echo-request accept',
            f'    iifname "{self.wan_if}" drop',
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy drop;",
            "    ct state established,related accept",
            "    ct status dnat accept",
            f'    iifname "{self.lan_if}" oifname "{self.wan_if}" accept',
            "  }",
            "}",
        ]
