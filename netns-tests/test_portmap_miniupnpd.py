"""Port mapping against miniupnpd: a device behind a symmetric NAT whose router maps its
WireGuard port (PCP/NAT-PMP, or UPnP IGD) gets a direct path, not the relay, to a device
behind another symmetric NAT; its mapping is gone once the agent stops.

Without the mapping both sides are behind fully-random NATs and only the relay connects
them (test_relay_paths.py): the direct path here exists only through the mapped
candidate, which the peer's checks reach.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, World
from kbwg_world.miniupnpd import MiniUpnpd
from kbwg_world.team import AGENT, AgentProcess
from kbwg_world.two_nats import ALICE, BOB, start_pair, two_nats

pytestmark = pytest.mark.netns


def mapped_candidate(agent: AgentProcess) -> dict[str, Any] | None:
    status = agent.try_status()
    if status is None:
        return None
    return next((c for c in status["candidates"] if c["type"] == "mapped"), None)


def diag(agent: AgentProcess) -> dict[str, Any]:
    out = subprocess.run(
        [*AGENT, "diag", "--json", "--no-classic", "--state-dir", str(agent.state_dir)],
        capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("protocols", ["pcp-natpmp", "upnp"])
def test_mapped_port_gives_a_direct_path_through_symmetric_nats(
        world: World, protocols: str) -> None:
    # RFC 5780 (two addresses): miniupnpd's own STUN test needs it, the agents use it too.
    net = two_nats(world, nats=(NatMode.FULLY_RANDOM, NatMode.FULLY_RANDOM),
                   stun_ips=["203.0.113.2", "198.51.100.2"], relays=[("kbwg", "203.0.113.5")],
                   delay_ms=300, extra_subnets=["198.51.100.0/24"])
    r1, a, b = net.r1, net.a, net.b
    natpmp = protocols == "pcp-natpmp"
    upnpd = MiniUpnpd.start(r1, net.stun, upnp=not natpmp, natpmp=natpmp, pcp=natpmp,
                            timeout=60)
    try:
        # Generous: on a loaded machine start-up alone has taken 30 s.
        alice, bob = start_pair(net.team, a, b, timeout=120)
        cand = wait_until(lambda: mapped_candidate(alice), timeout=60,
                          what="alice's mapped candidate")
        assert cand["address"] == r1.wan_ip, cand
        port = alice.status()["listen_port"]
        mapping = alice.status()["portmap"]["mapping"]
        assert mapping["protocol"] == ("pcp" if natpmp else "upnp"), mapping
        assert (cand["port"], a.address_on(r1.lan), port) in upnpd.udp_mappings()

        def direct(agent: AgentProcess, device: str) -> dict[str, Any] | None:
            peer = agent.peer_view(device)
            return peer if peer and peer["path"] == "direct" else None

        try:
            seen = wait_until(lambda: direct(bob, "laptop"), timeout=90,
                              what="bob: a direct path to alice")
            wait_until(lambda: direct(alice, "desk"), timeout=60,
                       what="alice: a direct path to bob")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- alice:\n{alice.log(6000)}\n--- bob:\n"
                                 f"{bob.log(6000)}\n--- miniupnpd:\n{upnpd.log()[-3000:]}"
                                 ) from None
        # Bob reaches alice at the port her router maps for her.
        assert f"{r1.wan_ip}:{cand['port']}" in seen["remote_candidate"], seen
        wait_until(lambda: b.ping_ok(ALICE[2]), timeout=30, what="ping bob -> alice")
        wait_until(lambda: a.ping_ok(BOB[2]), timeout=30, what="ping alice -> bob")

        report = diag(alice)["portmap"]
        answers = {"pcp": report["pcp"], "nat_pmp": report["nat_pmp"], "upnp": report["upnp"]}
        expected = "yes" if natpmp else "no"
        assert answers == {"pcp": expected, "nat_pmp": expected,
                           "upnp": "no" if natpmp else "yes"}, report
        assert report["gateway"] == r1.lan_ip and report["mapping"]["external"] == (
            f"{r1.wan_ip}:{cand['port']}"), report

        assert alice.stop(timeout=60) == 0
        left = [m for m in upnpd.udp_mappings() if m[1] == a.address_on(r1.lan)]
        assert not left, f"mapping left after the agent stopped: {left}\n{alice.log()}"
    finally:
        upnpd.stop()
