"""Zero-wait paths (issue 13): no waiting for servers that do not answer, the right
uplink at the first choice, and repair within seconds when a NAT changes under a path.

Bounds are generous (this machine is shared); each test also checks the behaviour that
makes it fast, so that it fails when that behaviour is missing rather than only when
the machine is quick.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from kbwg.negotiation.early import EARLY_REASON
from kbwg_standin.store import hold_sends, release_held
from kbwg_testing import wait_until
from kbwg_world import NatMode, Node, World
from kbwg_world.multihomed import multi_homed
from kbwg_world.natchange import forget_mappings
from kbwg_world.team import AgentProcess
from kbwg_world.two_nats import (
    ALICE,
    BOB,
    connected,
    nat_moves_under_traffic,
    one_nat,
    start_pair,
    team_servers,
    two_nats,
)
from kbwg_world.world import Router

pytestmark = pytest.mark.netns

# kbwg.json naming a STUN and a relay server at addresses where nothing answers.
SILENT_SERVERS = {"stun": ["203.0.113.2:3478"],
                  "relays": [{"url": "turn:203.0.113.3:3478", "secret": "nobody-answers"}]}
# Start-up is Python importing, on shared cores: a bound for a machine other work keeps busy.
START_TIMEOUT = 120


def test_a_lan_peer_does_not_wait_for_a_stun_server_that_does_not_answer(
        world: World) -> None:
    servers = team_servers(world, stun_ips=(), delay_ms=300, config=SILENT_SERVERS)
    lan = one_nat(world, servers.inet)
    a, b = lan.a, lan.b
    alice, bob = start_pair(servers.team, a, b, timeout=START_TIMEOUT)

    alice.wait_path("desk", timeout=60, path="direct-lan")
    wait_until(lambda: a.ping_ok(BOB[2]), timeout=10, what="ping over the overlay")
    # The offer and the answer carried the host candidates at once and said more may
    # follow (the relay's allocation was still being tried, the STUN server silent).
    # Early checks may have found the path before either arrived.
    wait_until(lambda: re.search(r"(offer|answer) from \S+: \d+ candidates, more to come",
                                 alice.log(200_000) + bob.log(200_000)),
               timeout=15, what="an offer or answer with more candidates to come")
    # ... and the path was up before the gathering gave up on the dead servers.
    for agent in (alice, bob):
        log = agent.log(200_000)
        chosen = log.find(": path host ")
        assert chosen != -1, log[-4000:]
        gathered = log.find("local candidates:")
        assert gathered == -1 or chosen < gathered, f"path only after gathering:\n{log[-4000:]}"


def test_a_nat_changing_its_public_address_is_followed_both_ways(world: World) -> None:
    net = two_nats(world, delay_ms=300)
    alice, bob = connected(net)
    # Traffic both ways through the change; alice's host sees no network change: the lost
    # path itself must send her back to STUN, which finds the new address.
    nat_moves_under_traffic(net, alice, bob)


def test_a_nat_forgetting_its_mappings_recovers_with_only_the_far_side_sending(
        world: World) -> None:
    net = two_nats(world, delay_ms=300)
    _, bob = connected(net)
    a, b, r1 = net.a, net.b, net.r1
    # Consent follows the RTT: on this path (a few ms) alice checks it several times a
    # second, which is what reopens her NAT when only bob sends (RFC 7675's 5 s, or
    # the former 2 s, would leave bob's traffic dropped that long).
    before = a.link_stats("eth0").tx_packets
    wait_until(lambda: a.link_stats("eth0").tx_packets - before >= 8, timeout=3.0,
               what="alice's consent checks (8 packets within 3 s, while idle)")

    b.popen(["ping", "-q", "-n", "-i", "0.05", ALICE[2]])
    forget_mappings(r1)
    wait_until(lambda: b.ping_ok(ALICE[2]), timeout=10, what="bob's pings answered again")
    assert bob.negotiated("laptop") is not None


def test_a_device_moving_to_another_network_is_followed_before_its_news_crosses_the_chat(
        world: World) -> None:
    """A laptop leaves one NAT's network for another's; its peer is public (a server, or
    a forwarded port). Its restart offers and new announcement need the chat; its checks
    from the new address, with the credentials of the session it had, need nothing: the
    old session's checkers on both sides go on until a new session chooses, and carry
    the path meanwhile. Here alice's chat is cut as she moves, so nothing else can. Her
    relay allocation, known to the relay by her old address, is made again at once."""
    servers = team_servers(world, delay_ms=300, relays=[("kbwg", "203.0.113.5")])
    r1 = world.router("r1", wan=servers.inet, nat=NatMode.MASQUERADE)
    r3 = world.router("r3", wan=servers.inet, nat=NatMode.MASQUERADE)
    a = world.host("a", lans=[r1.lan])
    b = world.host("b", lans=[servers.inet])
    alice, bob = start_pair(servers.team, a, b, timeout=START_TIMEOUT)
    try:
        alice.wait_path("desk", timeout=60)
        bob.wait_path("laptop", timeout=60)
        wait_until(lambda: a.ping_ok(BOB[2]) and b.ping_ok(ALICE[2]), timeout=30,
                   what="pings both ways")
        # The sessions, not only the early checks, carry the path: theirs are the
        # checkers that must outlive the move.
        wait_until(lambda: all((v := agent.peer_view(peer)) is not None
                               and EARLY_REASON not in v["reason"]
                               for agent, peer in ((alice, "desk"), (bob, "laptop"))),
                   timeout=30, what="the negotiated sessions to carry the path")
        hold_sends(servers.team.home, ALICE[0])
        for src, dest in ((a, BOB[2]), (b, ALICE[2])):
            src.popen(["ping", "-q", "-n", "-i", "0.1", dest])
        # As a Wi-Fi switch: the old interface loses its address and goes down, a new
        # one comes up on the other network.
        a.ip_batch(["addr flush dev eth0", "link set eth0 down"])
        world.attach(a, r3.lan, "eth1")
        a.ip_batch([f"route replace default via {r3.lan.gateway} dev eth1"])

        wait_until(lambda: (x := bob.peer_view("laptop")) is not None
                   and x["endpoint"].startswith(f"{r3.wan_ip}:"),
                   timeout=30, what="bob to follow alice to her new network")
        wait_until(lambda: a.ping_ok(BOB[2]) and b.ping_ok(ALICE[2]), timeout=15,
                   what="pings both ways again")
        assert "(previous session): path" in alice.log(1 << 22) + bob.log(1 << 22)
        assert re.search(r"network change|candidates now", alice.log(1 << 22)), alice.log()
        # Her relay allocation was known by the address she left: replaced at once.
        wait_until(lambda: "which this host no longer has: allocating again" in alice.log(
            1 << 22), timeout=10, what="alice's allocation made again")
        assert release_held(servers.team.home, ALICE[0]) > 0, "alice's news crossed"
    finally:
        keep_logs(alice, bob)


def test_a_multi_homed_host_chooses_the_fast_uplink_first(world: World) -> None:
    servers = team_servers(world, delay_ms=300)
    shape = multi_homed(world, servers.inet)  # eth0 the slow default route, eth1 fast
    alice, bob = start_pair(servers.team, shape.m, shape.p, timeout=START_TIMEOUT)
    try:
        _first_choices_are_the_fast_uplink(shape.m, alice, bob, shape.slow, shape.fast)
    finally:
        keep_logs(alice, bob)


def keep_logs(*agents: AgentProcess) -> None:
    """Diagnostics: with KBWG_KEEP_LOGS=DIR, each agent's log is copied there."""
    keep = os.environ.get("KBWG_KEEP_LOGS")
    if not keep:
        return
    Path(keep).mkdir(parents=True, exist_ok=True)
    for agent in agents:
        shutil.copy(agent.log_path, Path(keep) / f"{agent.username}-{agent.device}.log")


def _first_choices_are_the_fast_uplink(m: Node, alice: AgentProcess, bob: AgentProcess,
                                       slow: Router, fast: Router) -> None:
    peer = wait_until(
        lambda: (x := alice.negotiated("desk")) and x["host_route"] and x,
        timeout=60, what="alice to settle on a pinned uplink")  # fmt: skip
    assert peer["interface"] == "eth1", peer
    # Every choice either side made for this peer, in order: the first one was eth1's
    # (its LAN address on alice's side, its NAT's public address on bob's).
    eth1 = m.address_on(fast.lan)
    eth0 = m.address_on(slow.lan)
    firsts = {
        # Early checks (before the answer) choose too: "bob/desk (early): path ...".
        "alice": re.findall(r"bob/desk(?: \(early\))?: path (\S+ \S+) ->",
                            alice.log(400_000)),
        "bob": re.findall(r"alice/laptop(?: \(early\))?: path \S+ \S+ -> (\S+ \S+)",
                          bob.log(400_000)),
    }
    assert firsts["alice"] and firsts["bob"], firsts
    assert eth0 not in firsts["alice"][0] and slow.wan_ip not in firsts["alice"][0], firsts
    assert slow.wan_ip not in firsts["bob"][0] and eth0 not in firsts["bob"][0], firsts
    assert eth1 in " ".join(firsts["alice"]) or fast.wan_ip in " ".join(firsts["alice"])
