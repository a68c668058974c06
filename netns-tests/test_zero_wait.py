"""Zero-wait paths (issue 13): no waiting for servers that do not answer, the right
uplink at the first choice, and repair within seconds when a NAT changes under a path.

Bounds are generous (this machine is shared); each test also checks the behaviour that
makes it fast, so that it fails when that behaviour is missing rather than only when
the machine is quick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, Node, Segment, World
from kbwg_world.multihomed import multi_homed
from kbwg_world.natchange import forget_mappings, new_public_address
from kbwg_world.stunserver import StunServer
from kbwg_world.team import AgentProcess, Team
from kbwg_world.world import Router

pytestmark = pytest.mark.netns

ALICE = ("alice", "laptop", "100.64.0.1")
BOB = ("bob", "desk", "100.64.0.2")


def team_with(world: World, inet: Segment, stun: bool = True) -> Team:
    """A team of alice and bob; kbwg.json names a STUN server (coturn), or a STUN and a
    relay server at addresses where nothing answers."""
    team = Team(world, delay_ms=300)
    team.write_peers([ALICE, BOB])
    if stun:
        server = StunServer.start(world.server("stun", inet, ips=["203.0.113.2"]))
        config: dict[str, object] = {"stun": [server.address]}
    else:
        config = {"stun": ["203.0.113.2:3478"],
                  "relays": [{"url": "turn:203.0.113.3:3478", "secret": "nobody-answers"}]}
    team.write_file("kbwg.json", json.dumps(config))
    return team


def start(team: Team, *devices: tuple[Node, str, str]) -> list[AgentProcess]:
    """Agents started at once, each waited for with a bound for a machine other work
    keeps busy (start-up is Python importing, on shared cores)."""
    agents = [team.start_agent(host, username, device) for host, username, device in devices]
    for agent in agents:
        team.wait_running(agent, timeout=120)
    return agents


def ping_ok(src: Node, dest: str) -> bool:
    return src.ping(dest, count=1, timeout=1.0).ok


def connected_pair(world: World) -> tuple[AgentProcess, AgentProcess, list[Node], list[Node]]:
    """alice and bob each behind a port-preserving NAT, with a path both ways."""
    inet = world.internet()
    team = team_with(world, inet)
    r1 = world.router("r1", wan=inet, nat=NatMode.MASQUERADE)
    r2 = world.router("r2", wan=inet, nat=NatMode.MASQUERADE)
    a, b = world.host("a", lans=[r1.lan]), world.host("b", lans=[r2.lan])
    alice, bob = start(team, (a, *ALICE[:2]), (b, *BOB[:2]))
    alice.wait_path("desk", timeout=60)
    bob.wait_path("laptop", timeout=60)
    wait_until(lambda: ping_ok(a, BOB[2]) and ping_ok(b, ALICE[2]), timeout=30,
               what="pings both ways")
    return alice, bob, [a, b], [r1, r2]


def test_a_lan_peer_does_not_wait_for_a_stun_server_that_does_not_answer(
        world: World) -> None:
    inet = world.internet()
    team = team_with(world, inet, stun=False)
    home = world.router("home", wan=inet, nat=NatMode.MASQUERADE)
    a, b = world.host("a", lans=[home.lan]), world.host("b", lans=[home.lan])
    alice, bob = start(team, (a, *ALICE[:2]), (b, *BOB[:2]))

    peer = alice.wait_path("desk", timeout=60)
    assert peer["path"] == "direct-lan", peer
    wait_until(lambda: ping_ok(a, BOB[2]), timeout=10, what="ping over the overlay")
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
    alice, bob, (a, b), (r1, _) = connected_pair(world)
    # Traffic both ways through the change.
    for src, dest in ((a, BOB[2]), (b, ALICE[2])):
        src.popen(["ping", "-q", "-n", "-i", "0.1", dest])

    new = new_public_address(r1)

    peer = wait_until(
        lambda: (x := bob.negotiated("laptop")) and x["endpoint"] == f"{new}:51820" and x,
        timeout=30, what="bob to follow alice's NAT to its new address")  # fmt: skip
    assert peer["path"] == "direct", peer
    wait_until(lambda: ping_ok(a, BOB[2]) and ping_ok(b, ALICE[2]), timeout=15,
               what="pings both ways after the change")  # fmt: skip
    # Alice's host saw no network change: the lost path itself sent her back to STUN,
    # which found the new address and renegotiated.
    log = alice.log(400_000)
    assert re.search(rf"path to bob/desk lost: candidates now .*srflx {re.escape(new)}:", log), \
        log[-6000:]


def test_a_nat_forgetting_its_mappings_recovers_with_only_the_far_side_sending(
        world: World) -> None:
    _, bob, (a, b), (r1, _) = connected_pair(world)
    # Consent follows the RTT: on this path (a few ms) alice checks it several times a
    # second, which is what reopens her NAT when only bob sends (RFC 7675's 5 s, or
    # the former 2 s, would leave bob's traffic dropped that long).
    before = a.link_stats("eth0").tx_packets
    wait_until(lambda: a.link_stats("eth0").tx_packets - before >= 8, timeout=3.0,
               what="alice's consent checks (8 packets within 3 s, while idle)")

    b.popen(["ping", "-q", "-n", "-i", "0.05", ALICE[2]])
    forget_mappings(r1)
    wait_until(lambda: ping_ok(b, ALICE[2]), timeout=10, what="bob's pings answered again")
    assert bob.negotiated("laptop") is not None


def test_a_multi_homed_host_chooses_the_fast_uplink_first(world: World) -> None:
    inet = world.internet()
    team = team_with(world, inet)
    shape = multi_homed(world, inet)  # eth0 the slow default route, eth1 fast
    alice, bob = start(team, (shape.m, *ALICE[:2]), (shape.p, *BOB[:2]))
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
