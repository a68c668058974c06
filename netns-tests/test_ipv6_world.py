"""IPv6 paths: two hosts behind symmetric NATs for IPv4 but with global IPv6 (routed by
their routers, behind the routers' stateful firewalls) get a direct IPv6 path, not the
relay; STUN from the shared WireGuard port works over IPv6 (a server-reflexive IPv6
candidate); `diag` reports IPv6 as netcheck does.

Addresses: the internet's IPv6 is 2001:db8::/64, each home LAN a /64 of its own.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from typing import Any

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, Node, Segment, World
from kbwg_world.stunserver import StunServer
from kbwg_world.team import AGENT, ALICE, BOB, AgentProcess, Team
from kbwg_world.turnserver import start_relay

pytestmark = pytest.mark.netns



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


def wait_direct_v6(agent: AgentProcess, device: str, peer_ip6: str) -> dict[str, Any]:
    def direct() -> dict[str, Any] | None:
        peer = agent.negotiated(device)
        return peer if peer and peer["endpoint"] == f"[{peer_ip6}]:51820" else None

    try:
        return wait_until(direct, timeout=30, what=f"{agent.name}: direct IPv6 path")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{agent.status()}\n{agent.log(8000)}") from None


# One UDP socket on [::]:PORT driven line by line from stdin: "send IP PORT TEXT" sends,
# "recv SECONDS" prints what arrives (or "none"); prints "ready" once bound.
UDP6_SCRIPT = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "send":
        s.sendto(args[2].encode(), (args[0], int(args[1])))
        print("sent", flush=True)
    elif cmd == "recv":
        s.settimeout(float(args[0]))
        try:
            data, addr = s.recvfrom(2048)
            print(f"{data.decode()} from [{addr[0]}]:{addr[1]}", flush=True)
        except OSError:
            print("none", flush=True)
"""


class Udp6:
    def __init__(self, node: Node, port: int) -> None:
        self.proc = node.popen([sys.executable, "-c", UDP6_SCRIPT, str(port)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.line(15.0) == "ready"

    def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().decode().strip() if ready else ""

    def do(self, command: str, timeout: float = 15.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.line(timeout)


def test_world_routes_ipv6_to_lans_behind_a_stateful_firewall(world: World) -> None:
    inet = world.internet(ipv6="2001:db8::/64")
    r1 = world.router("r1", wan=inet, nat=NatMode.FULLY_RANDOM, ipv6_lan="2001:db8:1::/64")
    a = world.host("a", lans=[r1.lan])
    b = world.host("b", lans=[inet])
    assert a.ip6.startswith("2001:db8:1::") and b.ip6.startswith("2001:db8::")
    inside, outside = Udp6(a, 5000), Udp6(b, 6000)
    # Unsolicited from the internet: dropped by r1's firewall.
    assert outside.do(f"send {a.ip6} 5000 unsolicited") == "sent"
    assert inside.do("recv 1.0") == "none"
    # Solicited: the reply gets in, and the source is a's own address (routed, no NAT).
    assert inside.do(f"send {b.ip6} 6000 hello") == "sent"
    assert outside.do("recv 5.0") == f"hello from [{a.ip6}]:5000"
    assert outside.do(f"send {a.ip6} 5000 reply") == "sent"
    assert inside.do("recv 5.0") == f"reply from [{b.ip6}]:6000"


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

    wait_until(lambda: a.ping_ok(BOB[2]), timeout=15, what="ping alice -> bob")
    wait_until(lambda: b.ping_ok(ALICE[2]), timeout=15, what="ping bob -> alice")
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


# A STUN server for IPv6 (coturn's readiness probe in kbwg_world speaks IPv4 only):
# answers Binding requests with the source address, and logs each source to stdout.
STUN6_SCRIPT = """
import asyncio, sys
from aioice import stun

class Server(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
        print("ready", flush=True)

    def datagram_received(self, data, addr):
        try:
            request = stun.parse_message(data)
        except ValueError:
            return
        response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                                transaction_id=request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = (addr[0], addr[1])
        response.add_fingerprint()
        self.transport.sendto(bytes(response), addr)
        print(f"[{addr[0]}]:{addr[1]}", flush=True)

async def main():
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Server, local_addr=(sys.argv[1], int(sys.argv[2])))
    await asyncio.Event().wait()

asyncio.run(main())
"""


def start_stun6(node: Node, port: int = 3478) -> subprocess.Popen[bytes]:
    proc = node.popen([sys.executable, "-c", STUN6_SCRIPT, node.ip6, str(port)],
                      stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15.0)
    assert ready and proc.stdout.readline().strip() == b"ready", "IPv6 STUN server"
    return proc


def test_the_shared_port_gets_a_server_reflexive_ipv6_candidate_and_diag_says_yes(
        world: World) -> None:
    inet = world.internet(ipv6="2001:db8::/64")
    stun_host = world.server("stun", inet, ips=["203.0.113.2"])
    stun = StunServer.start(stun_host)
    start_stun6(stun_host)
    stun6 = f"[{stun_host.ip6}]:3478"
    team = Team(world)
    team.write_peers([ALICE, BOB])
    team.write_file("kbwg.json", json.dumps({"stun": [stun.address, stun6]}))
    r1 = world.router("r1", wan=inet, nat=NatMode.MASQUERADE, ipv6_lan="2001:db8:1::/64")
    a = world.host("a", lans=[r1.lan])
    b = world.host("b", lans=[inet])
    alice, _bob = team.start_running((a, *ALICE[:2]), (b, *BOB[:2]))

    # STUN from the WireGuard port over IPv6, through the owner's raw IPv6 socket: the
    # server saw port 51820 (an ordinary socket could not have sent from it).
    def srflx6() -> dict[str, Any] | None:
        status = alice.try_status()
        cands = status["candidates"] if status else []
        return next((c for c in cands if c["type"] == "srflx" and ":" in c["address"]), None)

    cand = wait_until(srflx6, timeout=20, what="an IPv6 server-reflexive candidate")
    assert (cand["address"], cand["port"]) == (a.ip6, 51820), cand
    assert cand["source"] == f"stun {stun6}"
    # The IPv4 one is there as before, and announcements stay IPv4.
    status = alice.status()
    assert any(c["type"] == "srflx" and c["address"] == r1.wan_ip
               for c in status["candidates"])
    assert ":" not in status["endpoint"].rpartition(":")[0]

    # --no-classic: pystun3 against a coturn without RFC 5780 can spin for seconds.
    diag = subprocess.run([*AGENT, "diag", "--json", "--no-classic", "--timeout", "3",
                           "--state-dir", str(alice.state_dir)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert diag.returncode == 0, f"{diag.stderr}\n{alice.log(6000)}"
    ipv6 = json.loads(diag.stdout)["ipv6"]
    assert ipv6["state"] == "yes", ipv6
    assert ipv6["address"] == f"[{a.ip6}]:51820"
    assert ipv6["os_support"] is True
    text = subprocess.run([*AGENT, "diag", "--no-classic", "--timeout", "3",
                           "--state-dir", str(alice.state_dir)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"IPv6            yes, [{a.ip6}]:51820" in text, text

    # Standalone, from a host whose LAN has no IPv6: no, but the OS has support.
    r2 = world.router("r2", wan=inet, nat=NatMode.MASQUERADE)
    c = world.host("c", lans=[r2.lan])
    out = c.run([*AGENT, "diag", "--json", "--no-classic", "--timeout", "3",
                 "--stun", stun.address, "--stun", stun6], check=False, timeout=60)
    assert json.loads(out.stdout)["ipv6"]["state"] in ("no, but OS has support", "no"), out


def test_a_host_with_ipv6_alone_is_relayed_over_ipv6(world: World) -> None:
    """Alice's uplink is IPv6 alone (her LAN address stays, for the IPv4 announcement,
    but no IPv4 route leaves it), Bob's IPv4 alone behind a symmetric NAT: nothing
    direct can work, so the relay carries them, reached by Alice over IPv6
    (`--listen6`), which gives her an IPv4 relayed address asked over IPv6 and an IPv6
    one (REQUESTED-ADDRESS-FAMILY)."""
    inet = world.internet(ipv6="2001:db8::/64")
    node = world.server("relay", inet, ips=["203.0.113.5"])
    relay = start_relay(node, "203.0.113.5", extra=("--listen6", f"[{node.ip6}]:3478"))
    team = Team(world)
    team.write_peers([ALICE, BOB])
    # One relay under both of its addresses: each agent uses the one it can reach.
    team.write_file("kbwg.json", json.dumps({"relays": [
        relay.config(), {"url": f"turn:[{node.ip6}]:3478", "secret": relay.secret}]}))
    r1 = world.router("r1", wan=inet, nat=NatMode.FULLY_RANDOM, ipv6_lan="2001:db8:1::/64")
    r2 = world.router("r2", wan=inet, nat=NatMode.FULLY_RANDOM)
    a, b = world.host("a", lans=[r1.lan]), world.host("b", lans=[r2.lan])
    a.run(["ip", "-4", "route", "del", "default"])
    assert a.run(["ip", "-4", "route", "get", "203.0.113.5"], check=False).returncode != 0
    alice, bob = team.start_running((a, *ALICE[:2]), (b, *BOB[:2]))

    def relayed_peer(agent: AgentProcess, device: str) -> dict[str, Any] | None:
        peer = agent.negotiated(device)
        return peer if peer and peer["path"] == "relay" else None

    try:
        wait_until(lambda: relayed_peer(alice, "desk"), timeout=60, what="alice relayed")
        wait_until(lambda: relayed_peer(bob, "laptop"), timeout=60, what="bob relayed")
        wait_until(lambda: a.ping_ok(BOB[2]), timeout=30, what="ping alice -> bob")
        wait_until(lambda: b.ping_ok(ALICE[2]), timeout=30, what="ping bob -> alice")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{alice.status()}\n{alice.log(8000)}") from None
    status = alice.status()
    relayed = {c["address"] for c in status["candidates"] if c["type"] == "relay"}
    assert relayed == {"203.0.113.5", node.ip6}, status["candidates"]
    assert not any(c["type"] == "srflx" for c in status["candidates"])
