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
from typing import Any

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, World
from kbwg_world.team import AGENT, ALICE, BOB, STANDIN, AgentProcess, Team

pytestmark = pytest.mark.netns

CAROL = ("carol", "nas", "100.64.0.3")
OUTAGE_S = 60.0
PING_INTERVAL_S = 0.5


def service(team: Team, agent: AgentProcess, action: str) -> None:
    """`keybase ctl stop|start` on that agent's machine."""
    env = {**os.environ, **team.keybase_env(agent.username, agent.device)}
    subprocess.run([str(STANDIN), "ctl", action], env=env, check=True, timeout=30)


def status_of(agent: AgentProcess) -> dict[str, Any] | None:
    """`status --json`, or None; a generous time-out, as `kbwg-agent status` may take
    long to start on a loaded machine."""
    if agent.proc.poll() is not None:
        raise AssertionError(f"agent {agent.name} exited:\n{agent.log()}")
    try:
        return agent.status(timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError):
        return None


def wait_running(agent: AgentProcess) -> None:
    try:
        wait_until(lambda: status_of(agent), timeout=180, what=f"{agent.name} to answer status")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- log of {agent.name}:\n{agent.log()}") from None


def keybase_state(agent: AgentProcess) -> dict[str, Any] | None:
    status = status_of(agent)
    return status.get("keybase") if status is not None else None


def test_tunnels_survive_a_keybase_outage_and_the_agents_catch_up(world: World) -> None:
    inet = world.internet()
    router = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    hosts = [world.host(f"h{i}", lans=[router.lan]) for i in range(3)]
    team = Team(world)
    team.write_peers([ALICE, BOB, CAROL])
    alice = team.start_agent(hosts[0], *ALICE[:2])
    bob = team.start_agent(hosts[1], *BOB[:2])
    for agent in (alice, bob):
        wait_running(agent)
    for a, b in ((alice, BOB[2]), (bob, ALICE[2])):
        wait_until(lambda a=a, b=b: a.ping_ok(b), timeout=60,
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
        wait_running(carol)
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
            wait_until(lambda agent=agent: agent.ping_ok(CAROL[2]), timeout=90,
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


def test_dev_messages_the_listener_never_got_are_read_again(world: World) -> None:
    """Bob's listener loses the first dev-channel push (KBWG_STANDIN_DROP_PUSHES, as the
    real service loses those sent while its client reconnects): alice's answer to his
    offer. The dev channel's re-read at bob's first refresh (2 s, before his offer is
    sent again at 3 s) takes it from the history, and the negotiation completes."""
    inet = world.internet()
    router = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    hosts = [world.host(f"h{i}", lans=[router.lan]) for i in range(2)]
    team = Team(world)
    team.write_peers([ALICE, BOB])
    alice = team.start_agent(hosts[0], *ALICE[:2])
    wait_running(alice)
    bob = team.start_agent(hosts[1], *BOB[:2], env={"KBWG_STANDIN_DROP_PUSHES": "dev:1"})
    wait_running(bob)

    def connected() -> bool:
        # Bob's side of the negotiation got alice's answer.
        status = status_of(bob)
        peer = next((p for p in (status or {}).get("peers", []) if p["device"] == "laptop"),
                    None)
        return peer is not None and peer["negotiation"] == "connected" \
            and peer["endpoint_source"] == "negotiated"

    try:
        wait_until(connected, timeout=120, what="bob's negotiation with alice to complete")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- log of bob:\n{bob.log(20_000)}") from None
    wait_until(lambda: bob.ping_ok(ALICE[2]), timeout=60, what="bob to ping alice")
    log = bob.log(200_000)
    assert "was not pushed; taken from the history" in log, log[-6000:]
