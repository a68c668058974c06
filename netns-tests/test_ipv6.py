"""IPv6 paths: two hosts behind symmetric NATs for IPv4 but with global IPv6 (routed by
their routers, behind the routers' stateful firewalls) get a direct IPv6 path, not the
relay; the shared WireGuard port answers STUN over IPv6; `diag` reports IPv6.

Addresses: the internet's IPv6 is 2001:db8::/64, each home LAN a /64 of its own.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, Node, Segment, World
from kbwg_world.stunserver import StunServer
from kbwg_world.team import AgentProcess, Team
from kbwg_world.turnserver import start_relay

pytestmark = pytest.mark.netns

ALICE = ("alice", "laptop", "100.64.0.1")
BOB = ("bob", "desk", "100.64.0.2")


def dual_stack_homes(world: World) -> tuple[Segment, Team, Node, Node]:
    """An internet with IPv6, a STUN server and our relay, and two homes behind
    fully-random (symmetric) IPv4 NATs whose LANs have global IPv6."""
    inet = world.internet(ipv6="2001:db8::/64")
    stun = StunServer.start(world.server("stun", inet, ips=["203.0.113.2"]))
    relay = start_relay(world.server("relay", inet, ips=["203.0.113.5"]), "203.0.113.5")
    team = Team(world)
    team.write_peers([ALICE, BOB])
    team.write_file("kbwg.json", json.dumps(
        {"stun": [stun.address], "relays": [relay.config()]}))
    r1 = world.router("r1", wan=inet, nat=NatMode.FULLY_RANDOM, ipv6_lan="2001:db8:1::/64")
    r2 = world.router("r2", wan=inet, nat=NatMode.FULLY_RANDOM, ipv6_lan="2001:db8:2::/64")
    a, b = world.host("a", lans=[r1.lan]), world.host("b", lans=[r2.lan])
    return inet, team, a, b


def ping_ok(src: Node, dest: str) -> bool:
    return src.ping(dest, count=1, timeout=1.0).ok


def wait_direct_v6(agent: AgentProcess, device: str, peer_ip6: str) -> dict[str, Any]:
    def direct() -> dict[str, Any] | None:
        peer = agent.negotiated(device)
        return peer if peer and peer["endpoint"] == f"[{peer_ip6}]:51820" else None

    try:
        return wait_until(direct, timeout=30, what=f"{agent.name}: direct IPv6 path")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{agent.status()}\n{agent.log(8000)}") from None


def test_symmetric_ipv4_nats_with_global_ipv6_get_a_direct_ipv6_path(world: World) -> None:
    _inet, team, a, b = dual_stack_homes(world)
    # The world itself: IPv6 is routed between the homes, and the firewall lets no
    # unsolicited packet in (so the agents must punch it, as through a NAT).
    assert a.ip6.startswith("2001:db8:1::") and b.ip6.startswith("2001:db8:2::")
    alice, bob = team.start_running((a, *ALICE[:2]), (b, *BOB[:2]))

    cands = alice.status()["candidates"]
    assert any(c["type"] == "host" and c["address"] == a.ip6 for c in cands), cands
    assert any(c["type"] == "relay" for c in cands), "the relay is configured and allocated"

    peer = wait_direct_v6(alice, "desk", b.ip6)
    assert peer["path"] == "direct", peer
    assert peer["local_candidate"] == f"host [{a.ip6}]:51820"
    assert peer["remote_candidate"] == f"host [{b.ip6}]:51820"
    assert "IPv6" in peer["reason"], peer["reason"]
    wait_direct_v6(bob, "laptop", a.ip6)

    wait_until(lambda: ping_ok(a, BOB[2]), timeout=15, what="ping alice -> bob")
    wait_until(lambda: ping_ok(b, ALICE[2]), timeout=15, what="ping bob -> alice")
    # WireGuard really uses the IPv6 path: none of its packets goes through the relay
    # (checks and keepalives of the relayed pairs still do, so `sent` moves).
    def relayed(status: dict[str, Any]) -> int:
        return sum(r["proxy_to_peer"] + r["proxy_to_wireguard"] for r in status["relays"])

    before = relayed(alice.status())
    result = a.ping(BOB[2], count=20, interval=0.02, timeout=2.0)
    assert result.received >= 18, result
    after = alice.status()
    assert relayed(after) == before
    peer = next(p for p in after["peers"] if p["device"] == "desk")
    assert peer["path"] == "direct" and peer["endpoint"] == f"[{b.ip6}]:51820"
    assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0
