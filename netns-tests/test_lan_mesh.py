"""Foundation scenario: three devices on one LAN form a mesh through #announce."""

from __future__ import annotations

import itertools
import signal

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, World
from kbwg_world.netns import namespace_pids
from kbwg_world.team import AgentProcess, Team

pytestmark = pytest.mark.netns

DEVICES = [("alice", "laptop", "100.64.0.1"), ("bob", "desk", "100.64.0.2"),
           ("carol", "nas", "100.64.0.3")]  # fmt: skip


def _links(agent: AgentProcess) -> list[str]:
    out = agent.host.run(["ip", "-o", "link", "show"]).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def _wait_mesh(agents: list[AgentProcess], timeout: float = 30.0) -> None:
    for a, b in itertools.permutations(agents, 2):
        wait_until(
            lambda a=a, b=b: a.ping_ok(b.status()["overlay_ip"]),
            timeout=timeout,
            what=f"{a.name} to ping {b.name} over the overlay",
        )


def test_three_hosts_on_one_lan_form_a_mesh(world: World) -> None:
    inet = world.internet()
    router = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    hosts = [world.host(f"h{i}", lans=[router.lan]) for i in range(3)]
    team = Team(world)
    team.write_peers(DEVICES)
    agents = [team.start_agent(h, u, d) for h, (u, d, _) in zip(hosts, DEVICES, strict=True)]
    for agent in agents:
        team.wait_running(agent)
    _wait_mesh(agents)

    status = agents[0].status()
    assert status["overlay_ip"] == "100.64.0.1"
    assert status["endpoint"] == f"{hosts[0].ip}:51820"
    peers = {p["device"]: p for p in status["peers"]}
    assert set(peers) == {"desk", "nas"}
    assert peers["desk"]["endpoint"] == f"{hosts[1].ip}:51820"
    assert peers["desk"]["public_key"] == agents[1].status()["public_key"]
    wait_until(lambda: all(p["last_handshake"] and p["rx_bytes"] > 0
                           for p in agents[0].status()["peers"]),
               what="handshake and traffic counters in alice's status")

    # INT removes the device and everything the agent started, and nothing else.
    old_key = agents[0].status()["public_key"]
    assert "kbwg0" in _links(agents[0])
    assert agents[0].stop(signal.SIGINT) == 0
    assert "kbwg0" not in _links(agents[0])
    assert namespace_pids(hosts[0].ns) == [], "processes left in alice's namespace"
    assert not (agents[0].state_dir / "control.sock").exists()
    assert "kbwg0" in _links(agents[1]), "stopping alice must not touch bob"

    # A restart makes a new key; the others replace alice's peer entry and reconnect.
    again = team.start_agent(hosts[0], "alice", "laptop")
    new_key = team.wait_running(again)["public_key"]
    assert new_key != old_key
    _wait_mesh([again, *agents[1:]])
    bob_view = {p["device"]: p for p in agents[1].status()["peers"]}
    assert bob_view["laptop"]["public_key"] == new_key


def test_device_not_in_peers_json_is_refused(world: World) -> None:
    inet = world.internet()
    host = world.host("lone", lans=[inet])
    team = Team(world)
    team.write_peers(DEVICES[1:])
    agent = team.start_agent(host, "alice", "laptop")
    assert agent.proc.wait(timeout=30) != 0
    assert "alice/laptop) is not listed in /keybase/team/demo-team/peers.json" in agent.log()
    assert "kbwg0" not in _links(agent)
