"""`kbwg-agent diag --json` behind every NAT type of the world, against coturn in the world.

Each test builds a small world: an internet with two subnets, coturn as an RFC 5780 STUN
server on two addresses (`StunServer`), routers with a NAT mode, and a host that runs the
real console script in its namespace (`ip netns exec ... kbwg-agent diag`). The STUN server
is always given explicitly: no public server is ever contacted.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from kbwg_world import NatMode, Node, Router, Segment, World
from kbwg_world.stunserver import StunServer

pytestmark = pytest.mark.netns

AGENT = Path(sys.executable).with_name("kbwg-agent")
STUN_IP = "203.0.113.2"
STUN_OTHER_IP = "198.51.100.2"  # the RFC 5780 "other address", on a second subnet
SECOND_STUN_IP = "203.0.113.3"
LOCAL_PORT = 40000  # diag's UDP port, fixed with --port so port preservation shows
DIAG_TIMEOUT = 3.0

EI = "endpoint-independent"
ED = "endpoint-dependent"
APD = "address-and-port-dependent"


def agent() -> str:
    return str(AGENT) if AGENT.exists() else shutil.which("kbwg-agent") or "kbwg-agent"


def internet_with_stun(world: World) -> tuple[Segment, StunServer]:
    inet = world.internet(extra_subnets=["198.51.100.0/24"])
    node = world.server("stun", inet, ips=[STUN_IP, STUN_OTHER_IP])
    return inet, StunServer.start(node)


def run_diag(
    host: Node,
    *servers: StunServer,
    args: tuple[str, ...] = (),
    timeout: float = DIAG_TIMEOUT,
    expect_exit: int = 0,
) -> dict[str, Any]:
    argv = [agent(), "diag", "--json", "--port", str(LOCAL_PORT), "--timeout", str(timeout)]
    for server in servers:
        argv += ["--stun", server.address]
    proc = host.run([*argv, *args], check=False, timeout=timeout + 20)
    assert proc.returncode == expect_exit, (proc.returncode, proc.stdout, proc.stderr)
    report: dict[str, Any] = json.loads(proc.stdout)
    assert report["version"] == 1 and report["local_port"] == LOCAL_PORT
    # Whatever the NAT, nothing in the world sends garbage: no ignored datagram.
    assert report["stun_counters"]["ignored"] == 0, report["stun_counters"]
    return report


def candidates(report: dict[str, Any], type_: str) -> list[dict[str, Any]]:
    return [c for c in report["candidates"] if c["type"] == type_]


def host_candidates(report: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {c["interface"]: (c["address"], c["port"]) for c in candidates(report, "host")}


def srflx_candidates(report: dict[str, Any]) -> set[tuple[str, int]]:
    return {(c["address"], c["port"]) for c in candidates(report, "srflx")}


# The expected verdicts per NAT mode, as this world really behaves:
# - every NAT router runs the stateful firewall (home-router behaviour, DESIGN), so inbound
#   packets are let in only as answers to what went out to that very IP and port: filtering
#   is address-and-port-dependent; only the plain router without firewall filters nothing.
# - STATIC_DNAT forwards the very port diag tests from (WAN 40000 -> host:40000), so
#   anybody can reach that port, yet diag reports address-and-port-dependent filtering: it
#   tests filtering from a second, fresh ephemeral socket (so the mapping test cannot open
#   holes), and that socket's mapping is an ordinary masquerade one behind the firewall.
#   The verdict describes the NAT, not the forward: a port forward is configuration.
# - hairpin: the routers do no NAT reflection (a LAN packet to the router's own WAN address
#   ends at the router; the DNAT forward matches only what comes in on the WAN), so no
#   hairpin behind a NAT; without NAT the "mapped" address is our own, so it comes back.
NAT_CASES = [
    pytest.param(NatMode.MASQUERADE, True, EI, APD, False, "port-restricted-cone", id="masquerade"),
    pytest.param(
        NatMode.MASQUERADE_RANDOM, True, ED, APD, False, "symmetric", id="masquerade-random"
    ),
    pytest.param(NatMode.FULLY_RANDOM, True, ED, APD, False, "symmetric", id="fully-random"),
    pytest.param(
        NatMode.STATIC_DNAT, True, EI, APD, False, "port-restricted-cone", id="static-dnat"
    ),
    pytest.param(NatMode.NONE, False, EI, EI, True, "open-internet", id="none"),
    # A routed public LAN behind a stateful firewall: no NAT, but filtered like a NAT.
    pytest.param(NatMode.NONE, True, EI, APD, True, "symmetric-udp-firewall", id="none-firewalled"),
]


@pytest.mark.parametrize(
    ("nat", "firewall", "mapping", "filtering", "hairpin", "classic"), NAT_CASES
)
def test_diag_behind_each_nat_mode(
    world: World,
    nat: NatMode,
    firewall: bool,
    mapping: str,
    filtering: str,
    hairpin: bool,
    classic: str,
) -> None:
    inet, stun = internet_with_stun(world)
    router = world.router("r", inet, nat=nat, firewall=firewall, lan_subnet="198.18.7.0/24")
    host = world.host("h", [router.lan], ips=["198.18.7.20"])
    if nat is NatMode.STATIC_DNAT:
        router.forward_port(LOCAL_PORT, host, LOCAL_PORT)

    report = run_diag(host, stun)

    assert report["udp"] is True
    assert report["mapping"] == mapping and report["mapping_method"] == "rfc5780"
    assert report["filtering"] == filtering
    assert report["filtering_server"] == stun.address
    assert report["hairpin"] is hairpin
    assert report["classic"] == classic
    assert report["notes"] == []

    [seen] = report["stun"]
    assert seen["server"] == seen["address"] == stun.address
    assert seen["other_address"] == stun.other_address == f"{STUN_OTHER_IP}:3479"
    assert seen["error"] is None and seen["rtt_ms"] > 0
    assert seen["mapped"] == report["mapped"]
    mapped_ip, mapped_port = report["mapped"].rsplit(":", 1)

    if nat is NatMode.NONE:
        assert report["behind_nat"] is False
        assert (mapped_ip, int(mapped_port)) == (host.ip, LOCAL_PORT)
        assert report["conclusion"].startswith("no NAT (public address)")
    else:
        assert report["behind_nat"] is True
        assert mapped_ip == router.wan_ip
        if mapping == EI:  # port-preserving masquerade
            assert int(mapped_port) == LOCAL_PORT
            assert report["conclusion"].startswith("port-preserving NAT")
        else:
            assert report["conclusion"].startswith("symmetric NAT")
    assert "no relay configured" in report["conclusion"]

    assert host_candidates(report) == {"eth0": (host.ip, LOCAL_PORT)}
    [srflx] = candidates(report, "srflx")
    assert (srflx["address"], srflx["port"]) == (mapped_ip, int(mapped_port))
    assert srflx["base"] == f"0.0.0.0:{LOCAL_PORT}" and srflx["source"] == f"stun {stun.address}"
    assert candidates(report, "host")[0]["priority"] > srflx["priority"]
    interfaces = {i["name"]: i for i in report["interfaces"]}
    assert interfaces["eth0"]["address"] == f"{host.ip}/24" and interfaces["eth0"]["used"]
    assert interfaces["lo"]["used"] is False


@pytest.mark.parametrize(
    ("nat", "mapping"),
    [
        pytest.param(NatMode.MASQUERADE, EI, id="masquerade"),
        pytest.param(NatMode.FULLY_RANDOM, ED, id="fully-random"),
    ],
)
def test_two_plain_servers_tell_the_mapping(world: World, nat: NatMode, mapping: str) -> None:
    """Without RFC 5780 the mapping still shows from two servers on different IPs."""
    inet = world.internet()
    first = StunServer.start(world.server("stun", inet, ips=[STUN_IP]))
    second = StunServer.start(world.server("stun2", inet, ips=[SECOND_STUN_IP]))
    router = world.router("r", inet, nat=nat)
    host = world.host("h", [router.lan])

    report = run_diag(host, first, second, args=("--no-classic",))

    assert report["udp"] is True and report["behind_nat"] is True
    assert report["mapping"] == mapping and report["mapping_method"] == "two servers"
    assert all(s["other_address"] is None and s["error"] is None for s in report["stun"])
    # Filtering needs CHANGE-REQUEST, which plain servers do not offer: unknown, and why.
    assert report["filtering"] == "unknown"
    assert any("does not support RFC 5780" in note for note in report["notes"])
    assert report["classic"] is None
    mapped = {s["mapped"] for s in report["stun"]}
    assert {ip for ip, _ in (m.rsplit(":", 1) for m in mapped)} == {router.wan_ip}
    # One srflx candidate per distinct mapped address: one for a port-preserving NAT, one
    # per server for a symmetric one.
    srflx = srflx_candidates(report)
    if mapping == EI:
        assert srflx == {(router.wan_ip, LOCAL_PORT)}
    else:
        assert len(mapped) == len(srflx) == 2
        assert report["conclusion"].startswith("symmetric NAT")


def test_multihomed_host_lists_both_uplinks(world: World) -> None:
    inet, stun = internet_with_stun(world)
    second = StunServer.start(world.server("stun2", inet, ips=[SECOND_STUN_IP]))
    first_router = world.router("r1", inet, nat=NatMode.MASQUERADE)
    second_router = world.router("r2", inet, nat=NatMode.MASQUERADE)
    host = world.host("h", [first_router.lan, second_router.lan])
    # The default route leaves by eth0; the second server is reached through eth1, so each
    # uplink gets a server-reflexive candidate of its own.
    host.add_route(f"{SECOND_STUN_IP}/32", via=second_router.lan_ip, dev="eth1")
    eth0, eth1 = (host.interface(f"eth{i}").addresses[0] for i in (0, 1))

    report = run_diag(host, stun, second, args=("--no-classic",))

    assert host_candidates(report) == {
        "eth0": (str(eth0), LOCAL_PORT),
        "eth1": (str(eth1), LOCAL_PORT),
    }
    # The default-route interface leads, and priorities stay distinct.
    hosts = candidates(report, "host")
    assert hosts[0]["interface"] == "eth0" and hosts[0]["priority"] > hosts[1]["priority"]
    interfaces = {i["name"]: i for i in report["interfaces"]}
    assert interfaces["eth0"]["address"] == f"{eth0}/24" and interfaces["eth0"]["used"]
    assert interfaces["eth1"]["address"] == f"{eth1}/24" and interfaces["eth1"]["used"]
    assert srflx_candidates(report) == {
        (first_router.wan_ip, LOCAL_PORT),
        (second_router.wan_ip, LOCAL_PORT),
    }
    assert report["mapped"] == f"{first_router.wan_ip}:{LOCAL_PORT}"
    # The mapping test goes to the RFC 5780 server's other IP, through eth0 as well.
    assert report["mapping"] == EI and report["mapping_method"] == "rfc5780"


def test_udp_blocked_exits_2(world: World) -> None:
    inet, stun = internet_with_stun(world)
    router: Router = world.router("r", inet, nat=NatMode.MASQUERADE)
    host = world.host("h", [router.lan])
    world.set_loss(router, "wan0", 100)

    report = run_diag(host, stun, timeout=1.0, expect_exit=2)

    assert report["udp"] is False
    assert report["mapped"] is None and report["behind_nat"] is None
    assert report["mapping"] == report["filtering"] == "unknown"
    [seen] = report["stun"]
    assert seen["mapped"] is None and seen["error"].startswith(f"no answer from {stun.address}")
    assert report["stun_counters"]["timeouts"] >= 1
    assert report["stun_counters"]["responses"] == 0
    assert host_candidates(report) == {"eth0": (host.ip, LOCAL_PORT)}
    assert candidates(report, "srflx") == []
    assert report["conclusion"].startswith("UDP blocked")
