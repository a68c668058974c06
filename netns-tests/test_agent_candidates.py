"""A running agent's candidates come from its WireGuard port (the shared port), and
`diag --state-dir` reports them with the NAT behaviour seen from that port."""

from __future__ import annotations

import json
import subprocess

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, World
from kbwg_world.stunserver import StunServer
from kbwg_world.team import AGENT, Team

pytestmark = pytest.mark.netns

DEVICES = [("alice", "laptop", "100.64.0.1"), ("bob", "desk", "100.64.0.2")]


def test_agent_gathers_srflx_from_the_wireguard_port_and_diag_reports_it(
    world: World,
) -> None:
    inet = world.internet(extra_subnets=["198.51.100.0/24"])
    stun = StunServer.start(world.server("stun", inet, ips=["203.0.113.2", "198.51.100.2"]))
    home = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    office = world.router("office", wan=inet, nat=NatMode.FULLY_RANDOM)
    alice_host = world.host("alice", lans=[home.lan])
    bob_host = world.host("bob", lans=[office.lan])
    team = Team(world)
    team.write_peers(DEVICES)
    team.write_file("kbwg.json", json.dumps({"stun": [stun.address]}))
    alice = team.start_agent(alice_host, "alice", "laptop", "--port", "51820")
    bob = team.start_agent(bob_host, "bob", "desk", "--port", "51820")
    team.wait_running(alice)
    team.wait_running(bob)

    def srflx(agent_status: dict[str, object]) -> list[str]:
        cands = agent_status["candidates"]
        assert isinstance(cands, list)
        return [f"{c['address']}:{c['port']}" for c in cands if c["type"] == "srflx"]

    # Port-preserving NAT: the WireGuard port's mapping keeps 51820.
    assert wait_until(lambda: srflx(alice.status()), what="alice's srflx candidate") == [
        f"{home.wan_ip}:51820"
    ]
    bob_srflx = wait_until(lambda: srflx(bob.status()), what="bob's srflx candidate")
    assert bob_srflx[0].startswith(f"{office.wan_ip}:")

    out = subprocess.run(
        [*AGENT, "diag", "--json", "--timeout", "3", "--state-dir", str(alice.state_dir)],
        capture_output=True, text=True, timeout=40,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["mode"] == "agent" and report["local_port"] == 51820
    assert report["mapping"] == "endpoint-independent"
    assert report["mapped"] == f"{home.wan_ip}:51820"
    assert {(c["type"], c["address"]) for c in report["candidates"]} >= {
        ("host", alice_host.ip), ("srflx", home.wan_ip)}
    peers = {p["device"]: p for p in report["peers"]}
    assert set(peers) == {"desk"}
    wait_until(lambda: any(p["announced_endpoint"] for p in alice.status()["peers"]),
               what="bob's announcement at alice")  # fmt: skip

    human = subprocess.run(
        [*AGENT, "diag", "--timeout", "3", "--state-dir", str(bob.state_dir)],
        capture_output=True, text=True, timeout=40,
    )  # fmt: skip
    assert human.returncode == 0, human.stderr
    assert "kbwg-agent diag (agent, UDP port 51820" in human.stdout
    assert "symmetric NAT" in human.stdout
    assert "alice/laptop (100.64.0.1)" in human.stdout


def test_a_stun_server_that_answers_only_after_the_gathering_is_asked_again(
    world: World,
) -> None:
    # At boot the address often comes up before DNS: the first gathering gets no STUN
    # answer. Here the server is simply not running yet when the agent gathers.
    inet = world.internet()
    stun_node = world.server("stun", inet, ips=["203.0.113.2"])
    home = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    alice_host = world.host("alice", lans=[home.lan])
    team = Team(world)
    team.write_peers(DEVICES)
    team.write_file("kbwg.json", json.dumps({"stun": ["203.0.113.2:3478"]}))
    alice = team.start_agent(alice_host, "alice", "laptop", "--port", "51820")
    team.wait_running(alice)
    wait_until(lambda: "local candidates: host" in alice.log(200_000), timeout=30,
               what="the first gathering's end")
    first = alice.status()
    assert not [c for c in first["candidates"] if c["type"] == "srflx"], first["candidates"]
    assert first["endpoint"] == f"{alice_host.ip}:51820"

    StunServer.start(stun_node)
    # Asked again within seconds (2 s, doubling), with no network change to prompt it;
    # the public endpoint is then announced.
    wait_until(lambda: alice.status()["endpoint"] == f"{home.wan_ip}:51820", timeout=30,
               what="the NAT's public endpoint announced")
    assert "no STUN server answered the last gathering" in alice.log(200_000)
