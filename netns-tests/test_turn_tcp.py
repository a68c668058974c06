"""TURN over TCP and TLS: a host whose network lets no UDP out (but DNS) still reaches
a peer, through the team's relay over TCP or TLS, or through coturn over TCP."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kbwg_testing import wait_until
from kbwg_testing.certs import make_certificates
from kbwg_world import NatMode, Node, Router, World
from kbwg_world.stunserver import StunServer
from kbwg_world.team import ALICE, BOB, AgentProcess, Team
from kbwg_world.turnserver import TurnServer, start_relay

pytestmark = pytest.mark.netns

RELAY_IP = "203.0.113.5"


def wait_running(agent: AgentProcess) -> None:
    def ready() -> bool:
        return agent.proc.poll() is not None or agent.quick_status() is not None

    wait_until(ready, timeout=90, what=f"{agent.name} to answer status")
    assert agent.proc.poll() is None, agent.log()


def relay_entry(agent: AgentProcess) -> dict[str, Any] | None:
    status = agent.quick_status()
    relays = status["relays"] if status else []
    return relays[0] if relays and relays[0]["alive"] else None


def relayed_peer(agent: AgentProcess, device: str) -> dict[str, Any] | None:
    status = agent.quick_status()
    peers = status["peers"] if status else []
    return next((p for p in peers if p["device"] == device and p["path"] == "relay"), None)


def udp_blocked_pair(world: World, kind: str, transport: str, both: bool = False) -> tuple[
        TurnServer, Router, tuple[Node, AgentProcess], tuple[Node, AgentProcess]]:
    """Alice behind a router that lets no UDP out, bob behind a plain NAT (`both`: one
    that lets no UDP out either), the team's relay listed twice (UDP first, then
    `transport`), both agents running."""
    inet = world.internet()
    stun = StunServer.start(world.server("stun", inet, ips=["203.0.113.2"]))
    certs = (make_certificates(world.dir / "certs", RELAY_IP) if transport == "tls"
             else None)
    relay = start_relay(world.server("relay", inet, ips=[RELAY_IP]), RELAY_IP, kind=kind,
                        tls=certs)
    team = Team(world, delay_ms=300)
    team.write_peers([ALICE, BOB])
    # The same relay twice: UDP first, the stream when UDP gets no answer.
    team.write_file("kbwg.json", json.dumps({"stun": [stun.address], "relays": [
        relay.config_for("udp"), relay.config_for(transport)]}))
    blocked = world.router("r1", wan=inet, nat=NatMode.MASQUERADE)
    blocked.block_outbound_udp()
    home = world.router("r2", wan=inet, nat=NatMode.MASQUERADE)
    if both:
        home.block_outbound_udp()
    a = world.host("a", lans=[blocked.lan])
    b = world.host("b", lans=[home.lan])
    alice, bob = (team.start_agent(a, *ALICE[:2]), team.start_agent(b, *BOB[:2]))
    for agent in (alice, bob):  # generous: start-up takes long on a loaded machine
        wait_running(agent)
    return relay, blocked, (a, alice), (b, bob)


@pytest.mark.parametrize(("kind", "transport"), [
    ("kbwg", "tcp"), ("kbwg", "tls"), ("coturn", "tcp"), ("coturn", "tls"),
])
def test_host_without_outbound_udp_connects_through_the_relay_over_a_stream(
        world: World, kind: str, transport: str) -> None:
    relay, _blocked, (a, alice), (b, bob) = udp_blocked_pair(world, kind, transport)

    def log_of(agent: AgentProcess) -> str:
        return f"\n{agent.log(6000)}\nrelay:\n{relay.log()[-3000:]}"

    try:
        entry = wait_until(lambda: relay_entry(alice), timeout=30,
                           what="alice's allocation over a stream")
        assert entry["transport"] == transport, entry
        # The stream started beside UDP after a second, not after UDP's 3 s time-out.
        waited = re.fullmatch(rf"udp: no answer in (\d+\.\d) s; using {transport}",
                              entry["transport_reason"])
        assert waited is not None and float(waited[1]) < 3.0, entry
        peer = wait_until(lambda: relayed_peer(alice, "desk"), timeout=45,
                          what="alice -> bob relayed")
        assert peer["reason"], peer
        wait_until(lambda: a.ping_ok(BOB[2]), timeout=20, what="ping alice -> bob")
        wait_until(lambda: b.ping_ok(ALICE[2]), timeout=20, what="ping bob -> alice")
    except AssertionError as exc:
        raise AssertionError(f"{exc}{log_of(alice)}\nbob:\n{bob.log(6000)}") from None
    bob_relay = relay_entry(bob)
    assert bob_relay is not None and bob_relay["transport"] == "udp", bob_relay
    # Alice's side of the path is her stream allocation: her WireGuard traffic went
    # through it (its loopback proxy), not over UDP she cannot send.
    status = alice.quick_status()
    assert status is not None
    [relay_status] = status["relays"]
    assert relay_status["proxy_to_peer"] > 0 or relay_status["sent"] > 0, relay_status
    # And the router did drop her UDP: nothing reached the STUN server from her.
    assert not any(c["type"] == "srflx" for c in status["candidates"]), status["candidates"]


@pytest.mark.parametrize("kind", ["kbwg", "coturn"])
def test_two_hosts_without_outbound_udp_meet_through_the_relay_both_over_tcp(
        world: World, kind: str) -> None:
    """Each side reaches the relay only over TCP: the one path is from one allocation
    to the other, a relayed address of the relay itself."""
    relay, _blocked, (a, alice), (b, bob) = udp_blocked_pair(world, kind, "tcp", both=True)
    try:
        for agent in (alice, bob):
            entry = wait_until(lambda agent=agent: relay_entry(agent), timeout=30,
                               what=f"{agent.name}'s allocation over TCP")
            assert entry["transport"] == "tcp", entry
        peer = wait_until(lambda: relayed_peer(alice, "desk"), timeout=45,
                          what="alice -> bob relayed")
        assert peer["local_candidate"].startswith("relay ") and peer[
            "remote_candidate"].startswith("relay "), peer
        wait_until(lambda: a.ping_ok(BOB[2]), timeout=20, what="ping alice -> bob")
        wait_until(lambda: b.ping_ok(ALICE[2]), timeout=20, what="ping bob -> alice")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{alice.log(8000)}\nbob:\n{bob.log(4000)}\n"
                             f"relay:\n{relay.log()[-3000:]}") from None


def test_a_relay_reached_over_tcp_is_used_over_udp_once_udp_gets_out_again(
        world: World) -> None:
    _relay, blocked, (a, alice), (b, bob) = udp_blocked_pair(world, "kbwg", "tcp")
    try:
        entry = wait_until(lambda: relay_entry(alice), timeout=30,
                           what="alice's allocation over TCP")
        assert entry["transport"] == "tcp", entry
        wait_until(lambda: a.ping_ok(BOB[2]), timeout=30, what="ping alice -> bob over TCP")
        blocked.allow_outbound_udp()

        def over_udp() -> dict[str, Any] | None:
            e = relay_entry(alice)
            return e if e is not None and e["transport"] == "udp" else None

        # Asked again 15 s after joining (then less often): well within this bound.
        entry = wait_until(over_udp, timeout=60, what="alice's allocation over UDP again")
        assert entry["transport_reason"] == "udp: answers again (was tcp)", entry
        status = alice.quick_status()
        assert status is not None and len(status["relays"]) == 1, status
        wait_until(lambda: a.ping_ok(BOB[2]), timeout=20, what="ping alice -> bob after")
        wait_until(lambda: b.ping_ok(ALICE[2]), timeout=20, what="ping bob -> alice after")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{alice.log(8000)}\nbob:\n{bob.log(4000)}") from None
    assert "moving from tcp to" in alice.log(100000), "the move was not logged"
