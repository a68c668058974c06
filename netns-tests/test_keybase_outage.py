"""Drill (issue 15): Keybase stopped for 60 s under running agents.

Alice and bob are joined and pinging each other over the overlay; then their Keybase
services are stopped (`kbwg-keybase-standin ctl stop`, as `keybase ctl stop` on each
machine) for 60 s. Meanwhile the pings keep passing, both agents' `status --json` says
Keybase is away (and their human `status` too), and carol, whose Keybase works, joins
the team. When the services start again the agents reconnect on their own, say so once,
and pick up what happened meanwhile: both reach carol over the overlay.
"""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, World
from kbwg_world.team import AGENT, STANDIN, AgentProcess, Team

pytestmark = pytest.mark.netns

ALICE = ("alice", "laptop", "100.64.0.1")
BOB = ("bob", "desk", "100.64.0.2")
CAROL = ("carol", "nas", "100.64.0.3")
OUTAGE_S = 60.0
PING_INTERVAL_S = 0.5


def service(team: Team, agent: AgentProcess, action: str) -> None:
    """`keybase ctl stop|start` on that agent's machine."""
    env = {**os.environ, **team.keybase_env(agent.username, agent.device)}
    subprocess.run([str(STANDIN), "ctl", action], env=env, check=True, timeout=30)


def keybase_state(agent: AgentProcess) -> dict[str, object] | None:
    status = agent.try_status()
    return status.get("keybase") if status is not None else None


def ping_ok(agent: AgentProcess, dest: str) -> bool:
    return agent.host.ping(dest, count=1, timeout=1.0).ok


def test_tunnels_survive_a_keybase_outage_and_the_agents_catch_up(world: World) -> None:
    inet = world.internet()
    router = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    hosts = [world.host(f"h{i}", lans=[router.lan]) for i in range(3)]
    team = Team(world)
    team.write_peers([ALICE, BOB, CAROL])
    alice = team.start_agent(hosts[0], *ALICE[:2])
    bob = team.start_agent(hosts[1], *BOB[:2])
    for agent in (alice, bob):
        team.wait_running(agent, timeout=90)  # generous: a loaded machine starts slowly
    for a, b in ((alice, BOB[2]), (bob, ALICE[2])):
        wait_until(lambda a=a, b=b: ping_ok(a, b), timeout=60,
                   what=f"{a.name} to ping {b} over the overlay")
    assert (keybase_state(alice) or {}).get("connected") is True

    count = int((OUTAGE_S + 20) / PING_INTERVAL_S)
    with ThreadPoolExecutor(2) as pool:
        # Both ways, all through the outage and a little beyond.
        pings = [pool.submit(a.host.ping, dest, count=count, timeout=3.0,
                             interval=PING_INTERVAL_S)
                 for a, dest in ((alice, BOB[2]), (bob, ALICE[2]))]
        time.sleep(5)
        stopped_at = time.monotonic()
        for agent in (alice, bob):
            service(team, agent, "stop")
        for agent in (alice, bob):
            wait_until(lambda agent=agent: (keybase_state(agent) or {}).get("connected")
                       is False, timeout=30, what=f"{agent.name}'s status to say Keybase is away")
        status = alice.status()
        assert status["keybase"]["down_since"] is not None
        assert {p["device"] for p in status["peers"] if p["public_key"]} == {"desk"}
        human = subprocess.run([*AGENT, "status", "--state-dir", str(alice.state_dir)],
                               capture_output=True, text=True, timeout=30, check=True).stdout
        assert "Keybase unreachable" in human

        # News while they cannot hear it: carol joins (her Keybase works) and announces.
        carol = team.start_agent(hosts[2], *CAROL[:2])
        team.wait_running(carol, timeout=90)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
        for agent in (alice, bob):
            assert (keybase_state(agent) or {}).get("connected") is False
            service(team, agent, "start")

        # Back on their own: connected (within the 30 s backoff ceiling and a refresh),
        # and carol reachable from both.
        for agent in (alice, bob):
            wait_until(lambda agent=agent: (keybase_state(agent) or {}).get("connected")
                       is True, timeout=90, what=f"{agent.name} to reconnect to Keybase")
        for agent in (alice, bob):
            wait_until(lambda agent=agent: ping_ok(agent, CAROL[2]), timeout=90,
                       what=f"{agent.name} to reach carol, who joined during the outage")
        results = [p.result(timeout=count * PING_INTERVAL_S + 60) for p in pings]

    for agent, result in zip((alice, bob), results, strict=True):
        # Generous: a loaded machine may lose a reply or two, never the tunnel.
        assert result.received >= result.sent - 3, (agent.name, result)
        log = agent.log(200_000)
        assert log.count("Keybase is unreachable") == 1, log[-4000:]
        assert log.count("Keybase is back after") == 1, log[-4000:]
        assert (keybase_state(agent) or {}).get("reconnects", 0) >= 1
        # Nothing about the peers was torn down while Keybase was away.
        assert "no longer a peer" not in log and "old peer entry removed" not in log
