"""One world shape several scenarios share: a host with two uplinks, the default one slow.

`m` has eth0 behind router `slow` (the default route, 80 ms away) and eth1 behind router
`fast` (5 ms, a backup default route with a higher metric, as NetworkManager gives a
second uplink); `p` is a public host on the internet segment.
"""

from __future__ import annotations

from dataclasses import dataclass

from kbwg_world.nat import NatMode
from kbwg_world.world import Host, Router, Segment, World


@dataclass(frozen=True)
class MultiHomed:
    m: Host
    p: Host
    slow: Router
    fast: Router


def multi_homed(world: World, inet: Segment) -> MultiHomed:
    slow = world.router("slow", wan=inet, nat=NatMode.MASQUERADE)
    fast = world.router("fast", wan=inet, nat=NatMode.MASQUERADE)
    m = world.host("m", lans=[slow.lan, fast.lan], delay_ms={"eth0": 80, "eth1": 5})
    m.run(["ip", "route", "add", "default", "via", str(fast.lan.gateway), "dev", "eth1",
           "metric", "200"])  # fmt: skip
    p = world.host("p", lans=[inet])
    return MultiHomed(m, p, slow, fast)
