"""Devices missing from peers.json: self-assigned addresses and the team's policy.

Two listed servers and five unlisted clients, all on one LAN behind a home router, start
within the same second. The clients share KBWG_DYNAMIC_SEED, so they all draw the same
first address of a small dynamic range: conflicts are certain, and every loser must
notice, pick again and re-claim until each client holds its own address. Then every
client reaches both servers over the overlay; whether clients reach each other is the
policy's call (`servers`: no, `mesh`: yes). A restarted client gets its address back.
"""

from __future__ import annotations

import itertools
import json
import signal
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, World
from kbwg_world.team import AgentProcess, Team

pytestmark = pytest.mark.netns

RANGE = IPv4Network("100.64.128.0/29")  # six host addresses for five clients
SEED = "kbwg-netns"
SERVERS = [("ops", "server1", "100.64.0.1"), ("ops", "server2", "100.64.0.2")]
CLIENTS = [(f"user{i}", "laptop") for i in range(5)]


def in_parallel(jobs: list[tuple[AgentProcess, str]], timeout: float) -> list[bool]:
    """Whether each (agent, overlay ip) ping works, waiting up to `timeout` for it."""

    def job(agent: AgentProcess, dest: str) -> bool:
        try:
            wait_until(lambda: agent.ping_ok(dest), timeout=timeout,
                       what=f"{agent.name} to ping {dest}")  # fmt: skip
        except AssertionError:
            return False
        return True

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda j: job(*j), jobs))


def settled(servers: list[AgentProcess], clients: list[AgentProcess]) -> dict[str, Any] | None:
    """Client name -> status once every client has its own address and both servers have
    every client as a dynamic peer at that address with its current key."""
    statuses = {c.name: c.quick_status(timeout=5.0) for c in clients}
    if any(s is None for s in statuses.values()):
        return None
    ips = {name: s["overlay_ip"] for name, s in statuses.items() if s is not None}
    if len(set(ips.values())) != len(clients):
        return None
    for server in servers:
        status = server.quick_status(timeout=5.0)
        if status is None:
            return None
        peers = {f"{p['username']}/{p['device']}": p for p in status["peers"]}
        for name, client in statuses.items():
            peer = peers.get(name)
            if (peer is None or peer["overlay_ip"] != ips[name] or not peer["dynamic"]
                    or client is None or peer["public_key"] != client["public_key"]):
                return None
    return statuses


def start_team(world: World, policy: str) -> tuple[Team, list[AgentProcess], list[AgentProcess]]:
    inet = world.internet()
    home = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    hosts = [world.host(f"h{i}", lans=[home.lan]) for i in range(len(SERVERS) + len(CLIENTS))]
    team = Team(world)
    team.write_peers(SERVERS)
    team.write_file("kbwg.json", json.dumps({"dynamic_range": str(RANGE), "policy": policy}))
    # All seven within the same second: Popen returns at once, nothing waits in between.
    servers = [team.start_agent(h, u, d) for h, (u, d, _) in zip(hosts, SERVERS, strict=False)]
    clients = [team.start_agent(h, u, d, env={"KBWG_DYNAMIC_SEED": SEED})
               for h, (u, d) in zip(hosts[len(SERVERS):], CLIENTS, strict=True)]
    for agent in [*servers, *clients]:
        team.wait_running(agent)
    return team, servers, clients


def full_log(agent: AgentProcess) -> str:
    return agent.log_path.read_text(errors="replace")


def logs(agents: list[AgentProcess], last: int = 3000) -> str:
    """The agents' logs without pyroute2's netlink chatter (-vv), the last `last` chars."""

    def quiet(agent: AgentProcess) -> str:
        lines = full_log(agent).splitlines()
        return "\n".join(line for line in lines if " pyroute2" not in line)[-last:]

    return "\n".join(f"--- log of {a.name}:\n{quiet(a)}" for a in agents)


def assert_reached(jobs: list[tuple[AgentProcess, str]], reached: list[bool], servers:
                   list[AgentProcess], want: bool = True) -> None:
    failed = [(a, ip) for (a, ip), ok in zip(jobs, reached, strict=True) if ok != want]
    if failed:
        who = sorted({a.name: a for a, _ in failed}.values(), key=lambda a: a.name)
        raise AssertionError(
            f"pings {'failed' if want else 'got through'}: "
            f"{[(a.name, ip) for a, ip in failed]}\n{logs([*who, *servers], 12000)}")


def wait_settled(servers: list[AgentProcess], clients: list[AgentProcess]) -> dict[str, Any]:
    try:
        return wait_until(lambda: settled(servers, clients), timeout=30,
                          what="unique client addresses, known to both servers")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs([*servers, *clients])}") from None


@pytest.mark.parametrize("policy", ["servers", "mesh"])
def test_unlisted_clients_claim_unique_addresses_and_follow_the_policy(
    world: World, policy: str
) -> None:
    team, servers, clients = start_team(world, policy)
    statuses = wait_settled(servers, clients)

    ips = {name: IPv4Address(s["overlay_ip"]) for name, s in statuses.items()}
    assert len(set(ips.values())) == len(CLIENTS)
    for name, status in statuses.items():
        assert status["dynamic"] is True and status["policy"] == policy, name
        assert ips[name] in RANGE and ips[name] not in (RANGE.network_address,
                                                        RANGE.broadcast_address)
    # The shared seed made every first pick the same: conflicts happened and were resolved.
    moves = [line for c in clients for line in full_log(c).splitlines()
             if "also claimed" in line and "moving to" in line]
    assert len(moves) >= len(CLIENTS) - 1, moves
    # The servers see each client's claim as the owner of its address.
    for server in servers:
        status = server.status()
        assert status["dynamic"] is False
        owners = {f"{c['username']}/{c['device']}": c["ip"]
                  for c in status["claims"] if c["owner"]}
        assert owners == {name: str(ip) for name, ip in ips.items()}

    # Every client reaches both servers over the overlay.
    to_servers = [(c, ip) for c in clients for _, _, ip in SERVERS]
    assert_reached(to_servers, in_parallel(to_servers, timeout=20), servers)

    # Clients reach each other only under `mesh`.
    pairs = [(a, str(ips[b.name])) for a, b in itertools.permutations(clients, 2)]
    for client in clients:
        peers = {f"{p['username']}/{p['device']}" for p in client.status()["peers"]}
        others = {c.name for c in clients} - {client.name}
        expected = {f"{u}/{d}" for u, d, _ in SERVERS}
        if policy == "mesh":
            expected |= others
        assert peers == expected, (client.name, peers)
    if policy == "mesh":
        assert_reached(pairs, in_parallel(pairs, timeout=20), servers)
    else:
        # One ping each (a timeout shorter than a ping): the servers answered at once.
        assert_reached(pairs, in_parallel(pairs, timeout=0.1), servers, want=False)

    # A client that had to move restarts and reclaims its address (kept in its state
    # dir), though the shared seed would draw another one first.
    mover = next(c for c in clients if "moving to" in full_log(c))
    before = ips[mover.name]
    assert mover.stop(signal.SIGINT) == 0
    again = team.start_agent(mover.host, mover.username, mover.device,
                             env={"KBWG_DYNAMIC_SEED": SEED}, state_dir=mover.state_dir)
    restarted = team.wait_running(again)
    assert restarted["overlay_ip"] == str(before)
    assert "also claimed" not in full_log(again)
    rest = [again if c is mover else c for c in clients]
    after = wait_settled(servers, rest)
    assert {name: s["overlay_ip"] for name, s in after.items()} == {
        name: str(ip) for name, ip in ips.items()}
    back = [(again, ip) for _, _, ip in SERVERS]
    assert_reached(back, in_parallel(back, timeout=20), servers)
