"""A device owner killed outright on a multi-homed host: its host routes go with it.

The host route that pins a peer to the fast uplink goes through that uplink, not the
WireGuard device, so only the owner's route reaper (owner/route_reaper.py) can take it
away when the owner gets no chance to.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from kbwg_testing import wait_until
from kbwg_world import Node, World
from kbwg_world.multihomed import multi_homed
from kbwg_world.netns import namespace_pids
from kbwg_world.stunserver import StunServer
from kbwg_world.team import ALICE, BOB, Team

pytestmark = pytest.mark.netns



def routes(host: Node) -> str:
    return host.run(["ip", "route", "show", "table", "all"]).stdout


def owner_pid(host: Node) -> int | None:
    for pid in namespace_pids(host.ns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a == b"kbwg.owner" or a.endswith(b"kbwg-owner") for a in argv):
            return pid
    return None


def test_a_killed_owners_host_route_is_removed(world: World) -> None:
    inet = world.internet()
    stun = StunServer.start(world.server("stun", inet, ips=["203.0.113.2"]))
    team = Team(world)
    team.write_peers([ALICE, BOB])
    team.write_file("kbwg.json", json.dumps({"stun": [stun.address]}))
    shape = multi_homed(world, inet)
    m, p = shape.m, shape.p
    before = routes(m)
    alice, _bob = team.start_running((m, *ALICE[:2]), (p, *BOB[:2]))

    route = f"{p.ip} via {shape.fast.lan.gateway} dev eth1"
    wait_until(lambda: route in routes(m), timeout=60, what="alice's host route on eth1")
    pid = owner_pid(m)
    assert pid is not None

    os.kill(pid, signal.SIGKILL)
    alice.proc.wait(timeout=60)
    wait_until(lambda: route not in routes(m), timeout=30,
               what=f"the host route to go\n{alice.log()}")
    assert routes(m) == before
    assert "removed it" in alice.log(), alice.log()
