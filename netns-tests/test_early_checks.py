"""Early checks (issue 13 part 2): with a slow chat, two devices started together find
their path from each other's announcement (and published candidates) alone, before
any offer could have been answered, and traffic flows over it.

The chat delay is long (2 s) so that the order is plain in the logs: an offer is sent
only once its sender has read the peer's announcement, so it arrives one delay after
the announcements crossed, and its answer another delay later. Bounds are generous.
"""

from __future__ import annotations

import json
import re

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, Node, World
from kbwg_world.stunserver import StunServer
from kbwg_world.team import AgentProcess, Team

pytestmark = pytest.mark.netns

ALICE = ("alice", "laptop", "100.64.0.1")
BOB = ("bob", "desk", "100.64.0.2")
DELAY_MS = 2000
EARLY = "early check, before the answer"


def ping_ok(src: Node, dest: str) -> bool:
    return src.ping(dest, count=1, timeout=1.0).ok


def first_path_line(log: str, peer: str) -> int:
    """Where the agent first set a path to `peer`: peer_sync's first "PEER: why" line
    (a chosen path, or the announced endpoint taken for want of one)."""
    match = re.search(rf"kbwg\.agent\.peer_sync: {re.escape(peer)}: ", log)
    assert match is not None, log[-6000:]
    return match.start()


def negotiation_line(log: str, peer: str) -> int:
    """Where the first offer or answer of `peer` was taken (-1: none yet)."""
    match = re.search(rf"(offer|answer|restart) from {re.escape(peer)}\b", log)
    return -1 if match is None else match.start()


def start_pair(world: World, a: Node, b: Node, team: Team) -> tuple[AgentProcess, AgentProcess]:
    alice = team.start_agent(a, *ALICE[:2])
    bob = team.start_agent(b, *BOB[:2])
    for agent in (alice, bob):
        team.wait_running(agent, timeout=120)
    return alice, bob


@pytest.mark.parametrize("shape", ["lan", "two-nats"])
def test_a_path_before_any_offer_is_answered(world: World, shape: str) -> None:
    inet = world.internet()
    team = Team(world, delay_ms=DELAY_MS)
    team.write_peers([ALICE, BOB])
    server = StunServer.start(world.server("stun", inet, ips=["203.0.113.2"]))
    team.write_file("kbwg.json", json.dumps({"stun": [server.address]}))
    if shape == "lan":
        # Announced endpoints are the router's public mappings: the LAN path comes from
        # the published host candidates (CANDIDATES lines).
        home = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
        a, b = world.host("a", lans=[home.lan]), world.host("b", lans=[home.lan])
    else:
        r1 = world.router("r1", wan=inet, nat=NatMode.MASQUERADE)
        r2 = world.router("r2", wan=inet, nat=NatMode.MASQUERADE)
        a, b = world.host("a", lans=[r1.lan]), world.host("b", lans=[r2.lan])
    alice, bob = start_pair(world, a, b, team)

    for agent, peer in ((alice, "bob/desk"), (bob, "alice/laptop")):
        wait_until(lambda agent=agent, peer=peer: EARLY in agent.log(400_000)
                   and f"peer_sync: {peer}: " in agent.log(400_000),
                   timeout=60, what=f"{agent.name} to choose an early path")  # fmt: skip
    wait_until(lambda: ping_ok(a, BOB[2]) and ping_ok(b, ALICE[2]), timeout=30,
               what="pings both ways")
    for agent, peer in ((alice, "bob/desk"), (bob, "alice/laptop")):
        log = agent.log(400_000)
        chosen = first_path_line(log, peer)
        line = log[chosen:log.index("\n", chosen)]
        assert EARLY in line, f"{agent.name}'s first path was not an early one: {line}"
        negotiated = negotiation_line(log, peer)
        assert negotiated == -1 or chosen < negotiated, (
            f"{agent.name} chose its path only after negotiating:\n{log[-8000:]}")
        if shape == "lan":
            # The LAN path itself, early too (the first may be through the router, if
            # the peer's CANDIDATES line came a moment after its ANNOUNCE).
            lan = re.search(rf"peer_sync: {re.escape(peer)}: .*same LAN.*{EARLY}", log)
            assert lan is not None, log[-8000:]
            assert negotiated == -1 or lan.start() < negotiated, log[-8000:]

    # The negotiated session confirms the choice and takes over; status says what the
    # early checks did.
    for agent, device in ((alice, "desk"), (bob, "laptop")):
        peer = agent.wait_path(device, timeout=60)
        assert peer["path"] == ("direct-lan" if shape == "lan" else "direct"), peer
        status = agent.status()
        entry = next(p for p in status["peers"] if p["device"] == device)
        assert entry["early_checks"]["state"] in ("checking", "connected", "resting"), entry
        assert isinstance(entry["early_checks"]["ufrag"], str)
