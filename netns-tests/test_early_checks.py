"""Early checks (issue 13 part 2): with a slow chat, two devices started together find
their path from each other's announcement (and published candidates) alone, before
any offer could have been answered, and traffic flows over it.

The chat delay is long (2 s) so that the order is plain in the logs: an offer is sent
only once its sender has read the peer's announcement, so it arrives one delay after
the announcements crossed, and its answer another delay later. Bounds are generous.
"""

from __future__ import annotations

import re

import pytest

from kbwg_testing import wait_until
from kbwg_world import World
from kbwg_world.nat import NatMode
from kbwg_world.two_nats import (
    ALICE,
    BOB,
    PORT_PRESERVING,
    nat_pair,
    one_nat,
    start_pair,
    team_servers,
)

pytestmark = pytest.mark.netns

DELAY_MS = 2000
EARLY = "early check, before the answer"


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


@pytest.mark.parametrize("shape", ["lan", "two-nats", "symmetric"])
def test_a_path_before_any_offer_is_answered(world: World, shape: str) -> None:
    symmetric = shape == "symmetric"
    # "symmetric": no direct path; the relayed one comes from the relay candidates the
    # CANDIDATES lines publish (sent again alone once the allocation is made).
    servers = team_servers(world, delay_ms=DELAY_MS,
                           relays=[("kbwg", "203.0.113.5")] if symmetric else ())
    # "lan": announced endpoints are the router's public mappings, the LAN path comes
    # from the published host candidates (CANDIDATES lines).
    if shape == "lan":
        hosts = one_nat(world, servers.inet)
    else:
        hosts = nat_pair(world, servers.inet, (NatMode.FULLY_RANDOM,) * 2 if symmetric
                         else PORT_PRESERVING)
    a, b = hosts.a, hosts.b
    alice, bob = start_pair(servers.team, a, b, timeout=120)

    for agent, peer in ((alice, "bob/desk"), (bob, "alice/laptop")):
        wait_until(lambda agent=agent, peer=peer: EARLY in agent.log(400_000)
                   and f"peer_sync: {peer}: " in agent.log(400_000),
                   timeout=60, what=f"{agent.name} to choose an early path")  # fmt: skip
    wait_until(lambda: a.ping_ok(BOB[2]) and b.ping_ok(ALICE[2]), timeout=30,
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
        agent.wait_path(device, timeout=60, path={"lan": "direct-lan", "two-nats": "direct",
                                                  "symmetric": "relay"}[shape])
        status = agent.status()
        entry = next(p for p in status["peers"] if p["device"] == device)
        assert entry["early_checks"]["state"] in ("checking", "connected", "resting"), entry
        assert isinstance(entry["early_checks"]["ufrag"], str)
