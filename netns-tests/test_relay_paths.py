"""Relayed paths: peers that cannot go direct connect through a relay the team runs."""

from __future__ import annotations

import itertools
import re
import subprocess
import time
from typing import Any

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, World
from kbwg_world.iperf import iperf_mbits
from kbwg_world.team import AgentProcess
from kbwg_world.turnserver import TurnServer, start_relay
from kbwg_world.two_nats import ALICE, BOB, TwoNats, pings_both_ways, start_pair, two_nats

pytestmark = pytest.mark.netns

SYMMETRIC = (NatMode.FULLY_RANDOM, NatMode.FULLY_RANDOM)


def relay_world(world: World, relays: list[tuple[str, str]],
                nats: tuple[NatMode, NatMode] = SYMMETRIC,
                router_names: tuple[str, str] = ("r1", "r2")) -> TwoNats:
    """Two NATs on an internet with a STUN server and relays [(kind, ip)], and a team
    using them."""
    return two_nats(world, nats=nats, router_names=router_names, relays=relays,
                    delay_ms=300)  # fmt: skip


def wait_relayed(agent: AgentProcess, device: str, timeout: float = 20.0) -> dict[str, Any]:
    def relayed() -> dict[str, Any] | None:
        peer = agent.peer_view(device)
        return peer if peer and peer["path"] == "relay" else None

    try:
        return wait_until(relayed, timeout=timeout, what=f"{agent.name}: relayed path")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{agent.log(6000)}") from None


@pytest.mark.parametrize("kind", ["kbwg", "coturn"])
def test_symmetric_nats_connect_through_the_relay(world: World, kind: str) -> None:
    net = relay_world(world, [(kind, "203.0.113.5")])
    (relay,), a, b = net.relays, net.a, net.b
    alice, bob = start_pair(net.team, a, b)

    peer = wait_relayed(alice, "desk")
    assert "relay" in peer["local_candidate"] or "relay" in peer["remote_candidate"], peer
    assert peer["reason"], peer
    wait_relayed(bob, "laptop")
    wait_until(lambda: a.ping_ok(BOB[2]), timeout=15, what="ping alice -> bob")
    wait_until(lambda: b.ping_ok(ALICE[2]), timeout=15, what="ping bob -> alice")
    status = alice.status()
    assert any(r["url"] == relay.url and r["alive"] for r in status["relays"])
    switched = [switches(alice), switches(bob)]
    mbits = iperf_mbits(a, b, BOB[2])
    # The transfer's own queue in the proxy makes the path look slower than the idle
    # pair through the other end's allocation; moving to it stalled TCP for seconds.
    assert [switches(alice), switches(bob)] == switched, (
        f"the path moved during the transfer\n{alice.log(3000)}\n{bob.log(3000)}")
    assert mbits > 5, f"relayed iperf3 only {mbits:.1f} Mbit/s"


def switches(agent: AgentProcess) -> int:
    """How often the agent's choice has moved a path so far (its log says each time)."""
    return agent.log(1 << 30).count(": switched from ")


def test_dead_relay_is_replaced_by_the_second_one(world: World) -> None:
    net = relay_world(world, [("kbwg", "203.0.113.5"), ("kbwg", "203.0.113.6")])
    relays, a, b = net.relays, net.a, net.b
    alice, _ = start_pair(net.team, a, b)
    wait_relayed(alice, "desk")
    wait_until(lambda: a.ping_ok(BOB[2]), timeout=15, what="first ping")

    def relay_in_use() -> TurnServer:
        peer = alice.peer_view("desk")
        assert peer is not None
        text = f"{peer['local_candidate']} {peer['remote_candidate']}"
        return next(r for r in relays if r.ip in text)

    used = relay_in_use()
    used.kill()
    killed_at = time.monotonic()
    wait_until(lambda: a.ping_ok(BOB[2]), timeout=15, what="ping after the relay died")
    resumed = time.monotonic() - killed_at
    assert resumed < 10.0, f"traffic resumed only after {resumed:.1f}s"
    assert relay_in_use() is not used


@pytest.mark.parametrize("kind", ["kbwg", "coturn"])
def test_relayed_path_comes_back_after_the_relay_restarts(world: World, kind: str) -> None:
    net = relay_world(world, [(kind, "203.0.113.5")])
    (relay,), a, b = net.relays, net.a, net.b
    alice, _ = start_pair(net.team, a, b)
    before = wait_relayed(alice, "desk")
    wait_until(lambda: a.ping_ok(BOB[2]), timeout=15, what="first ping")

    # A restarted relay has forgotten every allocation: the agents must notice (their
    # Refresh gets 437), allocate again and renegotiate, with no network change to say so.
    # The pings keep the path active, so its silence is noticed within seconds, and
    # the allocation confirmed then, not at the next 15 s watch.
    relay.kill()
    start_relay(relay.node, relay.ip, kind=kind)
    restarted = time.monotonic()
    wait_until(lambda: a.ping_ok(BOB[2]), timeout=45, what="ping after the relay restarted")
    assert time.monotonic() - restarted < 10, alice.log(8000)
    after = wait_relayed(alice, "desk")
    assert (after["local_candidate"], after["remote_candidate"]) != (
        before["local_candidate"], before["remote_candidate"]), after
    status = alice.status()
    assert [r["alive"] for r in status["relays"] if r["url"] == relay.url] == [True], status


def test_relay_first_then_direct_once_it_works(world: World) -> None:
    net = relay_world(world, [("kbwg", "203.0.113.5")],
                      nats=(NatMode.MASQUERADE, NatMode.MASQUERADE))
    r1, r2, a, b = net.r1, net.r2, net.a, net.b
    # Port-preserving NATs would punch at once: cut the two sites off from each other
    # (not from the servers), so the relay is all that works at first.
    r1.run(["nft", "-f", "-"], input=(
        "table ip cut {\n chain forward {\n type filter hook forward priority -10;\n"
        f" ip daddr {r2.wan_ip} drop\n ip saddr {r2.wan_ip} drop\n }}\n}}\n"))
    alice, bob = start_pair(net.team, a, b)
    wait_relayed(alice, "desk")
    wait_until(lambda: a.ping_ok(BOB[2]), timeout=15, what="ping over the relay")

    # Pings every 20 ms across the move: it must not cut the overlay for long (choices
    # once reached WireGuard out of order and left a path dead for tens of seconds).
    pinger = a.popen(["ping", "-n", "-i", str(PING_INTERVAL_S), "-W", "1", BOB[2]],
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        r1.run(["nft", "delete", "table", "ip", "cut"])
        direct = wait_until(lambda: (p := alice.peer_view("desk")) and p["path"] == "direct"
                            and p, timeout=45, what="the move to the direct path")  # fmt: skip
        assert direct["remote_candidate"].startswith(("srflx", "prflx")), direct
        wait_until(lambda: (p := bob.peer_view("laptop")) and p["path"] == "direct",
                   timeout=15, what="bob on the direct path too")  # fmt: skip
        wait_until(lambda: a.ping_ok(BOB[2]), timeout=10, what="ping over the direct path")
    finally:
        pinger.terminate()
    out = pinger.communicate(timeout=10)[0]
    # About 0.04 s here (one reply lost at the switch, if any).
    assert longest_silence_s(out) < 1.0, f"{out[-3000:]}\n{alice.log(3000)}\n{bob.log(3000)}"


PING_INTERVAL_S = 0.02


def longest_silence_s(ping_output: str) -> float:
    """The longest run of unanswered echo requests in `ping -n` output, in seconds
    (from the sequence numbers of the replies, sent every PING_INTERVAL_S)."""
    seqs = [int(m) for m in re.findall(r"icmp_seq=(\d+)", ping_output)]
    assert len(seqs) > 1, ping_output[-2000:]
    return max(b - a for a, b in itertools.pairwise(seqs)) * PING_INTERVAL_S


def test_symmetric_and_port_preserving_use_what_works(world: World) -> None:
    net = relay_world(world, [("kbwg", "203.0.113.5")],
                      nats=(NatMode.FULLY_RANDOM, NatMode.MASQUERADE),
                      router_names=("sym", "cone"))
    a = net.a
    alice, _ = start_pair(net.team, a, net.b)
    wait_until(lambda: a.ping_ok(BOB[2]), timeout=20, what="ping alice -> bob")
    peer = wait_until(lambda: (p := alice.peer_view("desk")) and p["path"] != "none" and p,
                      what="a chosen path")  # fmt: skip
    # Behind a symmetric NAT facing a port-restricted one, a direct pair needs the
    # symmetric side's mapping to be guessed: expect the relay, with its reason.
    assert peer["path"] in ("relay", "direct"), peer
    assert peer["reason"]


def test_a_forwarded_port_given_as_endpoint_beats_the_relay_behind_symmetric_nats(
        world: World) -> None:
    # Both NATs symmetric, so STUN sees nothing a peer can reach; alice's router
    # forwards the WireGuard port to her, and she says so with --endpoint. The
    # negotiated checks must try it (a mapped candidate), not only the early checks of
    # her announcement: otherwise the session would settle on the relay.
    net = relay_world(world, [("kbwg", "203.0.113.5")])
    net.r1.forward_port(51820, net.a, 51820)
    alice = net.team.start_agent(net.a, *ALICE[:2], "--endpoint", f"{net.r1.wan_ip}:51820")
    bob = net.team.start_agent(net.b, *BOB[:2])
    for agent in (alice, bob):
        net.team.wait_running(agent)
    for agent, device in ((bob, "laptop"), (alice, "desk")):
        # The session's own choice, not the early checks' (which the session replaces).
        wait_until(lambda agent=agent, device=device: (
            (p := agent.negotiated(device)) and p["path"] == "direct"
            and "early check" not in p["reason"]),
            timeout=30, what=f"{agent.name}: a negotiated direct path")  # fmt: skip
    seen = bob.negotiated("laptop")
    assert seen is not None and seen["remote_candidate"] == f"mapped {net.r1.wan_ip}:51820"
    wait_until(lambda: pings_both_ways(net), timeout=15, what="pings both ways")
