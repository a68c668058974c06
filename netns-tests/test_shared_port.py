"""STUN through the device owner's raw socket on the WireGuard port, while WireGuard runs.

World: an internet with a coturn STUN server, host A behind a masquerade NAT, host B
public. Both run a real device owner with wireguard-go, peered with each other. The
server-reflexive address A learns from STUN on its WireGuard port must be the endpoint
B's WireGuard sees A's packets come from, STUN and WireGuard must keep working side by
side, and only STUN-shaped datagrams to the WireGuard port may reach the agent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aioice import stun
from nacl.public import PrivateKey

from kbwg.agent.owner_client import DeviceOwner
from kbwg.agent.owner_stun import OwnerStunTransport
from kbwg.negotiation.stun_client import StunClient
from kbwg.owner.rawstun import STUN_COOKIE
from kbwg_testing import wait_for, wait_until
from kbwg_world import Host, NatMode, Node, Segment, World

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

logger = logging.getLogger(__name__)


STUN_IP = "203.0.113.3"
STUN_PORT = 3478
# The owner creates kbwg<N> only; random digits keep concurrent runs apart.
IFNAME = f"kbwg{10000 + secrets.randbelow(90000)}"

# Sends the datagrams given as hex arguments, in order, from one UDP socket; prints its port.
SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
print(s.getsockname()[1], flush=True)
for item in sys.argv[1:]:
    host, port, data = item.split(",")
    s.sendto(bytes.fromhex(data), (host, int(port)))
"""

# Captures the first datagram to a port carrying the STUN cookie and checks its UDP
# checksum: on a veth nobody else does (the receiver trusts it), so a wrong one would pass.
CAPTURE = """
import json, socket, struct, sys
from kbwg.owner.rawstun import udp_checksum
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
print("ready", flush=True)
while True:
    pkt = s.recv(65535)
    ihl = (pkt[0] & 0xF) * 4
    sport, dport, length, check = struct.unpack_from("!HHHH", pkt, ihl)
    if dport != port or pkt[ihl + 12 : ihl + 16] != bytes.fromhex("2112a442"):
        continue
    src, dst = socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20])
    segment = pkt[ihl : ihl + 6] + b"\\0\\0" + pkt[ihl + 8 : ihl + length]
    print(json.dumps({"src": [src, sport], "check": check,
                      "expected": udp_checksum(src, dst, segment)}), flush=True)
    break
"""


@dataclass
class Device:
    node: Host
    owner: DeviceOwner
    port: int
    public_key: str
    overlay: str


@dataclass
class Devices:
    owners: list[DeviceOwner] = field(default_factory=list)

    async def start(self, node: Host, overlay: str) -> Device:
        argv = node.argv([sys.executable, "-I", "-m", "kbwg.owner", "--log-level", "DEBUG"])
        owner = await DeviceOwner.start(argv)
        self.owners.append(owner)
        key = PrivateKey.generate()
        created = await owner.request(
            "create", ifname=IFNAME, private_key=base64.b64encode(bytes(key)).decode(),
            listen_port=0, address=f"{overlay}/10", backend="auto",
        )  # fmt: skip
        return Device(node, owner, int(created["listen_port"]), created["public_key"], overlay)


@pytest.fixture
async def devices(world: World) -> AsyncIterator[Devices]:
    found = Devices()
    try:
        yield found
    finally:
        # Before the world goes: the owners remove their devices and raw sockets.
        codes = await asyncio.gather(*(o.close() for o in found.owners), return_exceptions=True)
        assert all(code == 0 for code in codes), codes


def start_turnserver(world: World, node: Node) -> None:
    log = open(world.dir / "turnserver.log", "wb")  # noqa: SIM115 (the process keeps it)
    node.popen(
        ["turnserver", "-n", "--stun-only", "--listening-ip", STUN_IP,
         "--listening-port", str(STUN_PORT), "--no-cli", "--no-tls", "--no-dtls",
         "--log-file", "stdout", "--simple-log",
         # Nothing of the system's: no config file (-n), its own pid file and database.
         "--pidfile", str(world.dir / "turnserver.pid"),
         "--userdb", str(world.dir / "turndb")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    wait_until(lambda: f"{STUN_IP}:{STUN_PORT}" in node.run(["ss", "-Hlun"]).stdout,
               what="turnserver listening")  # fmt: skip


async def peer_stats(device: Device, public_key: str) -> dict[str, Any]:
    stats = await device.owner.request("stats")
    (entry,) = [p for p in stats["peers"] if p["public_key"] == public_key]
    return dict(entry)


def binding_response(request: bytes, src: tuple[str, int]) -> bytes | None:
    """A Binding success answer for `request` as seen from `src`, or None if not a request."""
    message = stun.parse_message(request)
    if message.message_class != stun.Class.REQUEST:
        return None
    response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, message.transaction_id)
    response.attributes["XOR-MAPPED-ADDRESS"] = src
    response.add_fingerprint()
    return bytes(response)


def send_datagrams(node: Node, items: list[tuple[str, int, bytes]]) -> int:
    """Send, in order, from one socket of `node`; returns its port."""
    args = [f"{host},{port},{data.hex()}" for host, port, data in items]
    out = node.run([sys.executable, "-c", SENDER, *args]).stdout
    return int(out.split()[0])


@dataclass
class Mesh:
    world: World
    inet: Segment
    a: Device  # behind the masquerade NAT
    b: Device  # public
    wan_ip: str  # the NAT's


@pytest.fixture
async def mesh(world: World, devices: Devices) -> Mesh:
    inet = world.internet()
    start_turnserver(world, world.server("stun", inet, ips=[STUN_IP]))
    router = world.router("nat", inet, nat=NatMode.MASQUERADE)
    host_a = world.host("a", [router.lan])
    host_b = world.host("b", [inet])
    dev_a = await devices.start(host_a, "100.64.0.1")
    dev_b = await devices.start(host_b, "100.64.0.2")
    await dev_a.owner.request(
        "set_peer", public_key=dev_b.public_key, endpoint=f"{host_b.ip}:{dev_b.port}",
        allowed_ips=["100.64.0.2/32"], keepalive=0,
    )  # fmt: skip
    # B knows A's key only: it learns A's endpoint (A's NAT mapping) from the handshake.
    await dev_b.owner.request(
        "set_peer", public_key=dev_a.public_key, endpoint=None,
        allowed_ips=["100.64.0.1/32"], keepalive=0,
    )  # fmt: skip
    await asyncio.to_thread(
        wait_until, lambda: host_a.ping("100.64.0.2").ok, 20.0, 0.1, "a ping across the overlay"
    )
    return Mesh(world, inet, dev_a, dev_b, router.wan_ip)


async def test_srflx_equals_the_wireguard_mapping_while_traffic_flows(mesh: Mesh) -> None:
    world, host_a, dev_a, dev_b = mesh.world, mesh.a.node, mesh.a, mesh.b
    transport = await OwnerStunTransport.open(dev_a.owner)
    assert transport.port == dev_a.port
    client = StunClient(transport)
    transport.receiver = client.datagram_received

    # The checksum we compute is checked at the far end, after the NAT rewrote the packet.
    capture = world.nodes["stun"].popen(
        [sys.executable, "-c", CAPTURE, str(STUN_PORT)], stdout=subprocess.PIPE, text=True
    )
    assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"

    before = (await peer_stats(dev_b, dev_a.public_key))["rx_bytes"]
    ping = asyncio.create_task(
        asyncio.to_thread(host_a.ping, "100.64.0.2", count=400, timeout=2.0, interval=0.01)
    )
    # STUN only once the ping is really flowing through the tunnel.
    await wait_for(lambda: _grew(dev_b, dev_a.public_key, before + 20 * 84), "the ping to reach B")
    results = []
    for _ in range(20):
        results.append(await client.binding((STUN_IP, STUN_PORT), timeout=3.0))
        await asyncio.sleep(0.02)  # pacing, as ICE does; not synchronisation
    assert not ping.done(), "the ping ended before STUN did: no overlap was shown"
    pinged = await ping

    assert pinged.lost <= 2, pinged  # WireGuard kept its packets
    mapped = {r.mapped for r in results}
    assert len(mapped) == 1, mapped
    (srflx,) = mapped
    entry = await peer_stats(dev_b, dev_a.public_key)
    # The point of sharing the port: STUN's mapping is WireGuard's.
    assert entry["endpoint"] == f"{srflx[0]}:{srflx[1]}"
    assert srflx[0] == mesh.wan_ip
    rtts = sorted(r.rtt_ms for r in results)
    logger.info(
        "srflx %s:%d = B's WireGuard endpoint for A %s (A's port %d); STUN rtt median %.2f ms; "
        "ping %d/%d during STUN",
        *srflx, entry["endpoint"], dev_a.port, rtts[len(rtts) // 2], pinged.received, pinged.sent,
    )  # fmt: skip
    # Only STUN reached the agent: hundreds of WireGuard packets were filtered out.
    assert client.counters.not_stun == 0 and client.counters.undecodable == 0
    assert transport.counters.received >= len(results)
    assert transport.counters.send_failed == 0

    line = await asyncio.wait_for(asyncio.to_thread(capture.stdout.readline), 10)
    captured = json.loads(line)
    assert captured["src"] == [srflx[0], srflx[1]]
    assert captured["check"] == captured["expected"]
    await transport.close()


async def test_a_check_between_two_shared_ports_through_the_nat(mesh: Mesh) -> None:
    """A STUN check from A's WireGuard port to B's, answered by B through its own owner:
    it crosses A's port-restricted NAT on WireGuard's mapping, both ways."""
    dev_a, dev_b, host_b = mesh.a, mesh.b, mesh.b.node
    transport_a = await OwnerStunTransport.open(dev_a.owner)
    client = StunClient(transport_a)
    transport_a.receiver = client.datagram_received
    transport_b = await OwnerStunTransport.open(dev_b.owner)
    seen: list[tuple[str, int]] = []

    def respond(data: bytes, src: tuple[str, int]) -> None:
        seen.append(src)
        answer = binding_response(data, src)
        if answer is not None:
            transport_b.send(answer, src)

    transport_b.receiver = respond
    result = await client.binding((host_b.ip, dev_b.port), timeout=5.0)
    entry = await peer_stats(dev_b, dev_a.public_key)
    assert seen and all(f"{ip}:{port}" == entry["endpoint"] for ip, port in seen)
    assert f"{result.mapped[0]}:{result.mapped[1]}" == entry["endpoint"]
    assert result.source == (host_b.ip, dev_b.port)
    await transport_a.close()
    await transport_b.close()


async def test_only_stun_to_the_wireguard_port_reaches_the_agent(mesh: Mesh) -> None:
    world, dev_a, dev_b = mesh.world, mesh.a, mesh.b
    host_a, host_b = dev_a.node, dev_b.node
    received: list[tuple[bytes, tuple[str, int]]] = []
    transport = await OwnerStunTransport.open(dev_b.owner)
    transport.receiver = lambda data, src: received.append((data, src))
    # Opening again is harmless and keeps the same port.
    assert (await dev_b.owner.request("stun_open"))["port"] == dev_b.port

    # A request from a stranger passes the owner's filter only with a FINGERPRINT.
    marker_message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    marker_message.add_fingerprint()
    marker = bytes(marker_message)
    cookie = STUN_COOKIE.to_bytes(4, "big")
    probe = world.host("probe", [mesh.inet])
    port = dev_b.port
    sender_port = await asyncio.to_thread(send_datagrams, probe, [
        (host_b.ip, port, b"not stun at all, just bytes"),
        (host_b.ip, port, b"\x00\x01\x00\x00" + b"wxyz" + cookie + bytes(8)),  # cookie at 8
        (host_b.ip, port, b"\x00\x01\x00"),  # too short for any cookie
        (host_b.ip, port + 1 if port < 65535 else port - 1, marker),  # STUN, another port
        (host_b.ip, port, marker),  # the only one that may pass
    ])  # fmt: skip
    # One socket, one path: anything wrongly passed would have arrived before the marker.
    await wait_for(lambda: _has(received), "the STUN datagram at B's agent")
    assert received == [(marker, (probe.ip, sender_port))]

    # WireGuard got its packets all along, the raw socket open beside it.
    before = (await peer_stats(dev_b, dev_a.public_key))["rx_bytes"]
    pinged = await asyncio.to_thread(host_a.ping, "100.64.0.2", count=20, interval=0.02)
    assert pinged.lost == 0, pinged
    assert (await peer_stats(dev_b, dev_a.public_key))["rx_bytes"] > before
    assert received == [(marker, (probe.ip, sender_port))]
    await transport.close()


async def _grew(device: Device, public_key: str, threshold: int) -> bool:
    return bool((await peer_stats(device, public_key))["rx_bytes"] >= threshold)


async def _has(items: list[Any]) -> bool:
    return bool(items)
