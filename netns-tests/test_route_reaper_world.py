"""A device owner killed outright on a multi-homed host: its host routes go with it.

The host route that pins a peer to the fast uplink goes through that uplink, not the
WireGuard device, so only the owner's route reaper (owner/route_reaper.py) can take it
away when the owner gets no chance to. The same reaper removes a kernel WireGuard
device, which (unlike wireguard-go's) is no process that dies with the owner; with no
WireGuard module here, its removal is shown on veth devices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def link_index(host: Node, ifname: str) -> int | None:
    out = host.run(["ip", "-j", "link", "show", ifname], check=False)
    return int(json.loads(out.stdout)[0]["ifindex"]) if out.returncode == 0 else None


def test_the_reaper_removes_a_listed_device_but_not_one_made_since_under_its_name(
        world: World) -> None:
    host = world.host("h", [world.internet()])
    for name in ("kbreap0", "kbreap2"):
        host.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"])
    listed = {name: link_index(host, name) for name in ("kbreap0", "kbreap2")}
    reaper = host.popen([sys.executable, "-I", "-m", "kbwg.owner.route_reaper"],
                        stdin=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert reaper.stdin is not None and reaper.stderr is not None
    for name, index in listed.items():
        reaper.stdin.write(json.dumps({"op": "link", "ifname": name, "index": index})
                           .encode() + b"\n")  # fmt: skip
    reaper.stdin.flush()
    # kbreap2 is removed and made again (another index) before the owner ends.
    host.run(["ip", "link", "del", "kbreap2"])
    host.run(["ip", "link", "add", "kbreap2", "type", "veth", "peer", "name", "kbreap2p"])
    remade = link_index(host, "kbreap2")
    assert remade is not None and remade != listed["kbreap2"]

    reaper.stdin.close()  # the owner's end of the pipe closes: it ended
    assert reaper.wait(timeout=30) == 0
    log = reaper.stderr.read().decode()
    assert link_index(host, "kbreap0") is None, log
    assert link_index(host, "kbreap2") == remade, log
    assert "without removing device kbreap0: removed it" in log, log
