"""Time to connect and iperf3 throughput: direct vs relayed over UDP vs TURN over TCP/TLS.

One world for every row: a STUN server and `kbwg-agent relay` (UDP, TCP on the same
port, TLS on 5349 with a throwaway CA in kbwg.json's `ca_file`) on the internet, the
Keybase stand-in with a 300 ms chat delay, and three pairs of hosts:

- direct: both behind port-preserving masquerade NATs (the punched path);
- relayed over UDP: both behind fully-random symmetric NATs (no direct pair exists);
- relayed over TCP/TLS: one host whose router drops every outbound UDP datagram but
  DNS (an office or hotel network), its peer behind a masquerade NAT. kbwg.json lists
  the relay over UDP and over TCP (or TLS): the agent tries UDP, gets no answer in 3 s
  and falls back, which is in the connect time. The last row lists only TCP, so the
  agent goes there at once.

Each row starts the pair's two agents (restarted between the TCP/TLS rows, since
agents read kbwg.json when they start), then measures from process start and from
both agents answering `status` to the first ping reply over the overlay, then iperf3
from the first host to the second for --seconds.

    sudo .venv/bin/python bench/relay_transports.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-tests"))

from kbwg_testing.certs import make_certificates
from kbwg_world import NatMode, Node, World
from kbwg_world.iperf import iperf_mbits
from kbwg_world.stunserver import StunServer
from kbwg_world.team import Team, first_ping
from kbwg_world.turnserver import TurnServer, start_relay

Device = tuple[str, str, str]
DIRECT = (("alice", "laptop", "100.64.0.1"), ("bob", "desk", "100.64.0.2"))
RELAYED = (("carol", "phone", "100.64.0.3"), ("dave", "tablet", "100.64.0.4"))
BLOCKED = (("erin", "office", "100.64.0.5"), ("frank", "home", "100.64.0.6"))
RELAY_IP = "203.0.113.5"


@dataclass
class Row:
    name: str
    from_start: float | None = None
    from_running: float | None = None
    mbits: float | None = None
    detail: str = ""


def measure(team: Team, name: str, hosts: tuple[Node, Node], devices: tuple[Device, Device],
            seconds: float) -> Row:
    (a, b), (first, second) = hosts, devices
    row = Row(name)
    started = time.monotonic()
    try:
        agents = team.start_running((a, *first[:2]), (b, *second[:2]))
    except AssertionError:  # an agent slower than 30 s to answer: a loaded machine
        team.stop_all()
        row.detail = "agents not answering status in 30 s"
        return row
    running = time.monotonic()
    try:
        try:
            first_ping(a, second[2], timeout=40)
        except AssertionError:
            row.detail = "no path"
            return row
        now = time.monotonic()
        row.from_start, row.from_running = now - started, now - running
        status = agents[0].status()
        peer = next(p for p in status["peers"] if p["device"] == second[1])
        relays = [f"{r['transport']} ({r['transport_reason']})" for r in status["relays"]
                  if r["alive"]]
        row.mbits = iperf_mbits(a, b, second[2], seconds)
        row.detail = f"{peer['path']}; relay over {', '.join(relays) or '-'}"
    finally:
        for agent in agents:
            agent.stop()
    return row


def show(row: Row) -> None:
    def s(value: float | None) -> str:
        return f"{value:6.2f} s" if value is not None else "      -"

    mbits = f"{row.mbits:6.0f}" if row.mbits is not None else "     -"
    print(f"{row.name:34} {s(row.from_start)} {s(row.from_running)} {mbits}  {row.detail}",
          flush=True)


def run_rows(seconds: float) -> list[Row]:
    rows: list[Row] = []
    print(f"first ping and iperf3 over the overlay ({seconds:.0f} s per row)")
    print(f"{'path':34} {'start':>8} {'running':>8} {'Mbit/s':>6}  chosen")
    with World() as world:
        inet = world.internet()
        stun = StunServer.start(world.server("stun", inet, ips=["203.0.113.2"]))
        certs = make_certificates(world.dir / "certs", RELAY_IP)
        relay = start_relay(world.server("relay", inet, ips=[RELAY_IP]), RELAY_IP,
                            tls=certs)
        team = Team(world, delay_ms=300)
        team.write_peers([*DIRECT, *RELAYED, *BLOCKED])

        def use(server: TurnServer, *transports: str) -> None:
            team.write_file("kbwg.json", json.dumps({"stun": [stun.address], "relays": [
                server.config_for(t) for t in transports]}))

        def behind(name: str, nat: NatMode, block_udp: bool = False) -> Node:
            router = world.router(f"r-{name}", wan=inet, nat=nat)
            if block_udp:
                router.block_outbound_udp()
            return world.host(name, lans=[router.lan])

        direct = (behind("a", NatMode.MASQUERADE), behind("b", NatMode.MASQUERADE))
        symmetric = (behind("c", NatMode.FULLY_RANDOM), behind("d", NatMode.FULLY_RANDOM))
        blocked = (behind("e", NatMode.MASQUERADE, block_udp=True),
                   behind("f", NatMode.MASQUERADE))
        plan = [
            ("direct (port-preserving NATs)", ("udp",), direct, DIRECT),
            ("relayed, UDP (symmetric NATs)", ("udp",), symmetric, RELAYED),
            ("relayed, TCP after UDP (no UDP)", ("udp", "tcp"), blocked, BLOCKED),
            ("relayed, TLS after UDP (no UDP)", ("udp", "tls"), blocked, BLOCKED),
            ("relayed, TCP only listed", ("tcp",), blocked, BLOCKED),
        ]
        for name, transports, hosts, devices in plan:
            use(relay, *transports)
            row = measure(team, name, hosts, devices, seconds)
            show(row)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    rows = run_rows(args.seconds)
    direct = rows[0].mbits
    for row in rows[1:]:
        if direct and row.mbits:
            print(f"{row.name} / direct = {row.mbits / direct:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
