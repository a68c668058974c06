"""Consent checks slow down on an idle path (issue 15: RTT-paced checks of idle peers
were most of an idle host's CPU) without losing issue 13's repairs once traffic flows:
a path idle for longer than the active window is checked every ~5 s; traffic on it is
noticed within about a second (the WireGuard interface's counters, then the device's
per-peer ones) and brings back the RTT pace at once, so a NAT that forgets its mappings
or moves to a new address under fresh traffic is repaired as on a busy path.

test_zero_wait.py covers the same repairs on a path just made (active from its
selection); these start from an idle one.
"""

from __future__ import annotations

import time

import pytest

from kbwg_testing import wait_until
from kbwg_world import Node, World
from kbwg_world.natchange import forget_mappings
from kbwg_world.team import AgentProcess
from kbwg_world.two_nats import TwoNats, connected, nat_moves_under_traffic, two_nats

pytestmark = pytest.mark.netns

ALICE_IP = "100.64.0.1"
# CheckTimers.active_window is 30 s after the last traffic; status goes through a CLI
# start on a loaded machine, so the wait is generous.
IDLE_WAIT_S = 90


def pace(agent: AgentProcess, device: str) -> str | None:
    peer = agent.negotiated(device)
    return None if peer is None else peer.get("consent_pace")


def idle_pair(world: World) -> tuple[TwoNats, AgentProcess, AgentProcess]:
    """A connected pair (as test_zero_wait.py's) whose path carried no traffic for the
    active window: both at the idle pace."""
    net = two_nats(world, delay_ms=300)
    alice, bob = connected(net)
    wait_until(lambda: pace(alice, "desk") == "idle" and pace(bob, "laptop") == "idle",
               timeout=IDLE_WAIT_S, what="both sides' consent at the idle pace")
    return net, alice, bob


def packets_in(node: Node, seconds: float) -> int:
    before = node.link_stats("eth0").tx_packets
    time.sleep(seconds)  # a rate over a fixed window: the measurement itself
    return node.link_stats("eth0").tx_packets - before


def test_an_idle_path_is_checked_every_few_seconds_and_traffic_speeds_it_up(
        world: World) -> None:
    net, alice, _ = idle_pair(world)
    a, b = net.a, net.b
    # Idle: alice's consent every ~5 s, her answers to bob's, a WireGuard keepalive
    # every 25 s; at the RTT pace (0.25 s here) it would be ~80 in these 10 s.
    idle = packets_in(a, 10.0)
    assert idle <= 20, idle

    b.popen(["ping", "-q", "-n", "-i", "0.2", ALICE_IP])
    wait_until(lambda: pace(alice, "desk") == "active", timeout=15,
               what="alice's consent back at the RTT pace once bob sends")
    busy = packets_in(a, 5.0)
    assert busy >= 20, (idle, busy)
    log = alice.log(400_000)
    assert "bob/desk: traffic: consent at RTT pace, checking now" in log, log[-4000:]


def test_an_idle_nat_forgetting_its_mappings_under_fresh_traffic_from_the_far_side(
        world: World) -> None:
    """Bob starts sending to an idle path; alice receives it, so her checks speed up
    and reopen her NAT's mapping within about a second of it being forgotten."""
    net, alice, bob = idle_pair(world)
    b, r1 = net.b, net.r1
    b.popen(["ping", "-q", "-n", "-i", "0.05", ALICE_IP])
    wait_until(lambda: pace(alice, "desk") == "active", timeout=15,
               what="alice's consent at the RTT pace once bob's traffic arrives")
    forget_mappings(r1)
    wait_until(lambda: b.ping_ok(ALICE_IP), timeout=10, what="bob's pings answered again")
    assert bob.negotiated("laptop") is not None


def test_an_idle_nat_moving_to_a_new_address_as_traffic_starts(world: World) -> None:
    net, alice, bob = idle_pair(world)
    nat_moves_under_traffic(net, alice, bob)
