"""The world most scenarios share: two hosts, each behind its own NAT, on an internet with
a STUN server (coturn) and possibly relays, and a team of two whose kbwg.json names them.

    net = two_nats(world, nats=(NatMode.FULLY_RANDOM, NatMode.FULLY_RANDOM),
                   relays=[("kbwg", "203.0.113.5")], delay_ms=300)
    alice, bob = start_pair(net.team, net.a, net.b)

alice/laptop runs on `a` behind router `r1`, bob/desk on `b` behind `r2`. `team_servers`
makes only the internet, its servers and the team, for scenarios that put the hosts
elsewhere (`one_nat`: one LAN behind a common NAT; `multi_homed`); `nat_pair` adds the
two NATs and their hosts to such an internet. The `World` makes every node and process,
so closing it removes them all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kbwg_testing import wait_until
from kbwg_world.nat import NatMode
from kbwg_world.natchange import new_public_address
from kbwg_world.stunserver import StunServer
from kbwg_world.team import ALICE, BOB, AgentProcess, Team
from kbwg_world.turnserver import TurnServer, start_relay
from kbwg_world.world import Host, Node, Router, Segment, World

# (username, device, overlay address), as Team.write_peers takes them.
STUN_IP = "203.0.113.2"
PORT_PRESERVING = (NatMode.MASQUERADE, NatMode.MASQUERADE)


@dataclass(frozen=True)
class TeamServers:
    inet: Segment
    team: Team
    stun: StunServer | None
    relays: list[TurnServer]


@dataclass(frozen=True)
class NatPair:
    r1: Router
    r2: Router
    a: Host
    b: Host


@dataclass(frozen=True)
class OneNat:
    home: Router
    a: Host
    b: Host


@dataclass(frozen=True)
class TwoNats:
    inet: Segment
    team: Team
    stun: StunServer
    relays: list[TurnServer]
    r1: Router
    r2: Router
    a: Host
    b: Host


def team_servers(
    world: World,
    *,
    stun_ips: Sequence[str] = (STUN_IP,),
    relays: Sequence[tuple[str, str]] = (),
    delay_ms: int = 0,
    extra_subnets: Sequence[str] = (),
    config: Mapping[str, object] | None = None,
    peers: Sequence[tuple[str, str, str]] = (ALICE, BOB),
) -> TeamServers:
    """An internet with a STUN server on `stun_ips` (none when empty; two addresses give
    RFC 5780) and a relay `relay<i>` per (kind, ip) of `relays`, and a team of `peers`
    whose chat is `delay_ms` slow. kbwg.json names those servers, unless `config` says
    what it holds instead (e.g. servers where nothing answers)."""
    inet = world.internet(extra_subnets=extra_subnets)
    stun = StunServer.start(world.server("stun", inet, ips=list(stun_ips))) if stun_ips else None
    servers = [start_relay(world.server(f"relay{i}", inet, ips=[ip]), ip, kind=kind)
               for i, (kind, ip) in enumerate(relays)]  # fmt: skip
    team = Team(world, delay_ms=delay_ms)
    team.write_peers(list(peers))
    if config is None:
        named: dict[str, object] = {}
        if stun is not None:
            named["stun"] = [stun.address]
        if servers:
            named["relays"] = [s.config() for s in servers]
        config = named
    team.write_file("kbwg.json", json.dumps(config))
    return TeamServers(inet, team, stun, servers)


def nat_pair(world: World, inet: Segment, nats: tuple[NatMode, NatMode] = PORT_PRESERVING,
             names: tuple[str, str] = ("r1", "r2")) -> NatPair:
    """Host `a` behind a router with NAT `nats[0]`, host `b` behind one with `nats[1]`."""
    r1 = world.router(names[0], wan=inet, nat=nats[0])
    r2 = world.router(names[1], wan=inet, nat=nats[1])
    return NatPair(r1, r2, world.host("a", lans=[r1.lan]), world.host("b", lans=[r2.lan]))


def one_nat(world: World, inet: Segment, nat: NatMode = NatMode.MASQUERADE,
            name: str = "home") -> OneNat:
    """Hosts `a` and `b` on one LAN, behind a common NAT."""
    home = world.router(name, wan=inet, nat=nat)
    return OneNat(home, world.host("a", lans=[home.lan]), world.host("b", lans=[home.lan]))


def two_nats(
    world: World,
    *,
    nats: tuple[NatMode, NatMode] = PORT_PRESERVING,
    router_names: tuple[str, str] = ("r1", "r2"),
    stun_ips: Sequence[str] = (STUN_IP,),
    relays: Sequence[tuple[str, str]] = (),
    delay_ms: int = 0,
    extra_subnets: Sequence[str] = (),
) -> TwoNats:
    """`team_servers` (with its STUN server) and `nat_pair` on its internet, made in that
    order (the routers' public addresses come after the servers')."""
    if not stun_ips:
        raise ValueError("two_nats needs a STUN server: give stun_ips")
    servers = team_servers(world, stun_ips=stun_ips, relays=relays, delay_ms=delay_ms,
                           extra_subnets=extra_subnets)  # fmt: skip
    assert servers.stun is not None
    pair = nat_pair(world, servers.inet, nats, router_names)
    return TwoNats(servers.inet, servers.team, servers.stun, servers.relays,
                   pair.r1, pair.r2, pair.a, pair.b)  # fmt: skip


def start_pair(team: Team, a: Node, b: Node,
               timeout: float = 30.0) -> tuple[AgentProcess, AgentProcess]:
    """alice on `a` and bob on `b`, started at once; each answers `status` within
    `timeout` (start-up is Python importing: slow on a busy machine)."""
    alice, bob = team.start_agent(a, *ALICE[:2]), team.start_agent(b, *BOB[:2])
    for agent in (alice, bob):
        team.wait_running(agent, timeout=timeout)
    return alice, bob


def pings_both_ways(net: TwoNats) -> bool:
    return net.a.ping_ok(BOB[2]) and net.b.ping_ok(ALICE[2])


def connected(net: TwoNats, start_timeout: float = 120.0, path_timeout: float = 60.0,
              ping_timeout: float = 30.0) -> tuple[AgentProcess, AgentProcess]:
    """alice and bob started on `net`, each with a negotiated path to the other and
    pings answered both ways."""
    alice, bob = start_pair(net.team, net.a, net.b, timeout=start_timeout)
    alice.wait_path("desk", timeout=path_timeout)
    bob.wait_path("laptop", timeout=path_timeout)
    wait_until(lambda: pings_both_ways(net), timeout=ping_timeout, what="pings both ways")
    return alice, bob


def nat_moves_under_traffic(net: TwoNats, alice: AgentProcess, bob: AgentProcess,
                            follow_timeout: float = 30.0, ping_timeout: float = 15.0) -> str:
    """With pings flowing both ways, alice's NAT (`r1`) moves to a new public address;
    bob follows it on a direct path, pings pass again and alice's lost path sent her
    back to STUN, which found the new address. Returns that address."""
    for src, dest in ((net.a, BOB[2]), (net.b, ALICE[2])):
        src.popen(["ping", "-q", "-n", "-i", "0.1", dest])
    new = new_public_address(net.r1)

    peer = wait_until(
        lambda: (x := bob.negotiated("laptop")) and x["endpoint"] == f"{new}:51820" and x,
        timeout=follow_timeout, what="bob to follow alice's NAT to its new address")  # fmt: skip
    assert peer["path"] == "direct", peer
    wait_until(lambda: pings_both_ways(net), timeout=ping_timeout,
               what="pings both ways after the change")  # fmt: skip
    # Alice's host saw no network change: the lost path itself sent her back to STUN.
    log = alice.log(400_000)
    lost = rf"path to bob/desk lost: candidates now .*srflx {re.escape(new)}:"
    assert re.search(lost, log), log[-6000:]
    return new
