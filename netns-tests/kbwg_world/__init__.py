"""kbwg_world: a throw-away network of Linux namespaces for scenario tests, demo and benchmarks.

A `World` builds an "internet" (an L2 switch in its own namespace), routers with a NAT
type and a stateful firewall, hosts (possibly multi-homed) and servers, and shapes links
with delay (NFQUEUE + a userspace delayer, since this kernel has no netem) and loss
(an nftables rule). Everything it creates carries its run id and is removed when the
world closes, on every exit path; `sweep` removes what a crashed run left behind.

Only documentation address space is used: 203.0.113.0/24, 198.51.100.0/24 and
192.0.2.0/24 for the internet, 198.18.0.0/15 for LANs (100.64.0.0/10 stays free for the
WireGuard overlay).
"""

from kbwg_testing import WaitTimeout, wait_until
from kbwg_world.nat import NatMode
from kbwg_world.netns import sweep
from kbwg_world.shaping import Direction
from kbwg_world.udp import Datagram, UdpPeer
from kbwg_world.world import Host, Node, Router, Segment, World, WorldError

__all__ = [
    "Datagram",
    "Direction",
    "Host",
    "NatMode",
    "Node",
    "Router",
    "Segment",
    "UdpPeer",
    "WaitTimeout",
    "World",
    "WorldError",
    "sweep",
    "wait_until",
]
